"""The state of an interactive chat: its settings, and the conversation.

The conversation holds what the model is shown next time, which is not everything it
generated: a reply keeps its answer only. Qwen3's template rule is that earlier turns
carry no thinking, so the thinking shown on screen is never stored here.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..errors import QwenChatError
from ..sampling import SamplingSettings

FILE_FORMAT = "qwen3chat-conversation"


@dataclass
class ChatOptions:
    """The chat's settings that are not sampling settings; /set changes them all."""

    max_tokens: int = 256
    think: bool = True
    think_budget: int | None = None
    show_thinking: bool = True
    stats: bool = True


def _on_off(name: str, value: str) -> bool:
    words = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
    if value.lower() not in words:
        raise ValueError(f"{name} takes on or off")
    return words[value.lower()]


def _tokens(name: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} takes a number of tokens, at least 1")
    return int(value)


def _budget(name: str, value: str) -> int | None:
    return None if value.lower() in ("off", "none") else _tokens(name, value)


_OPTION_PARSERS: dict[str, Callable[[str, str], object]] = {
    "max_tokens": _tokens,
    "think_budget": _budget,
    "think": _on_off,
    "show_thinking": _on_off,
    "stats": _on_off,
}
_KIND_NAMES = {int: "an integer", float: "a number"}


def setting_names() -> list[str]:
    return [*SamplingSettings.names(), *_OPTION_PARSERS]


def change_setting(
    options: ChatOptions, sampling: SamplingSettings, name: str, value: str
) -> tuple[ChatOptions, SamplingSettings]:
    """``/set NAME VALUE``: both settings, one of them changed. A ValueError says what is
    wrong in words for the user."""
    if name in _OPTION_PARSERS:
        return replace(options, **{name: _OPTION_PARSERS[name](name, value)}), sampling
    if name not in SamplingSettings.names():
        close = difflib.get_close_matches(name, setting_names(), n=1)
        raise ValueError(
            f"unknown setting {name}" + (f"; did you mean {close[0]}?" if close else "")
        )
    kind = type(getattr(sampling, name))
    try:
        changed = replace(sampling, **{name: kind(value)})
    except ValueError:
        raise ValueError(f"{name} takes {_KIND_NAMES[kind]}") from None
    try:
        changed.validate()
    except QwenChatError:
        raise ValueError(f"{name} {value} is out of range") from None
    return options, changed


def describe_settings(options: ChatOptions, sampling: SamplingSettings) -> str:
    values = {f.name: getattr(sampling, f.name) for f in fields(sampling)}
    values.update({name: getattr(options, name) for name in _OPTION_PARSERS})
    return " · ".join(f"{name} {_word(value)}" for name, value in values.items())


def _word(value: object) -> str:
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


@dataclass
class Turn:
    user: str
    assistant: str
    pictures: list = field(default_factory=list)  # VisualInputs the user message held


def user_turn_message(text: str, pictures: list) -> dict:
    """The user message of a turn; with pictures, in the content-list form VL templates
    read (only a vision chat has pictures, so only it pays for the import)."""
    if not pictures:
        return {"role": "user", "content": text}
    from ..vision.prompt import user_message

    return user_message(text, pictures)


class Conversation:
    def __init__(self, system: str | None = None, turns: list[Turn] | None = None):
        self.system = system or None
        self.turns: list[Turn] = turns or []

    def messages(self, next_user: str | dict | None = None, pictures: bool = True) -> list[dict]:
        """Chat-template messages, plus ``next_user`` (text, or a message made by
        ``user_turn_message``) as the message about to be answered; without ``pictures``
        the user messages hold their text only."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns:
            out.append(user_turn_message(turn.user, turn.pictures if pictures else []))
            out.append({"role": "assistant", "content": turn.assistant})
        if isinstance(next_user, str):
            next_user = {"role": "user", "content": next_user}
        if next_user is not None:
            out.append(next_user)
        return out

    def drop_oldest_until(
        self, fits: Callable[[list[dict]], bool], next_user: str | dict
    ) -> list[Turn]:
        """Drop whole turns, oldest first, until the messages for ``next_user`` fit; the
        system prompt always stays. Returns the dropped turns (fewer if none were left)."""
        dropped = []
        while self.turns and not fits(self.messages(next_user)):
            dropped.append(self.turns.pop(0))
        return dropped

    def save(self, path: Path) -> None:
        # Pictures are not saved: a loaded conversation keeps its text only.
        data = {"format": FILE_FORMAT, "version": 1, "messages": self.messages(pictures=False)}
        write_atomically(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Conversation:
        """Read a file written by ``save``, or any JSON list of chat messages (or an object
        with a ``messages`` list) made of an optional system message and user/assistant
        pairs."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise QwenChatError(f"{path}: cannot read ({e.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QwenChatError(f"{path}: not valid JSON ({e})") from None
        messages = data.get("messages") if isinstance(data, dict) else data
        try:
            return cls.from_messages(messages)
        except ValueError as e:
            raise QwenChatError(f"{path}: not a conversation ({e})") from None

    @classmethod
    def from_messages(cls, messages: object) -> Conversation:
        if not isinstance(messages, list):
            raise ValueError("expected a list of messages")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("content"), str)):
                raise ValueError(f"message {i} has no text content")
        system = None
        if messages and messages[0].get("role") == "system":
            system = messages[0]["content"]
            messages = messages[1:]
        roles = [m.get("role") for m in messages]
        if roles != ["user", "assistant"] * (len(roles) // 2):
            raise ValueError("messages must alternate user, assistant, ending with a reply")
        turns = [
            Turn(u["content"], a["content"])
            for u, a in zip(messages[::2], messages[1::2], strict=True)
        ]
        return cls(system, turns)


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, then rename it over ``path``: a
    crash or a full disk leaves the old file whole, never a half-written one."""
    path = path.expanduser()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise QwenChatError(f"{path}: cannot write ({e.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        raise QwenChatError(f"{path}: cannot write ({e.strerror})") from None
