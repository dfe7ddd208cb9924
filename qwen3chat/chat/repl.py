"""The interactive chat: a prompt-toolkit line editor, slash commands, and one reply per
message drawn by ``render.ReplyView``.

Ctrl-C while a reply is generated stops it and comes back to the prompt. What the reply
had already answered stays in the conversation as the assistant's reply (as in
llama.cpp), so the history is always whole user/assistant pairs and ``/regen`` can redo
it. A reply stopped before any answer text (still reading the prompt, or thinking) leaves
no turn; the message goes back into the input line to edit or send again.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, NestedCompleter, PathCompleter, WordCompleter
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console
from rich.table import Table
from rich.text import Text

try:
    import termios
except ImportError:  # Windows: typed keys are echoed during a reply
    termios = None

from .. import memory
from ..engine import Engine
from ..errors import QwenChatError
from ..generation import FinishEvent
from ..kernels import describe_variants
from ..loading import LoadedModel
from ..model import num_parameters
from ..model.qwen3_vl import VisualInput
from ..sampling import SamplingSettings
from ..vision.prompt import VisionChat
from .prompts import TextPrompts
from .render import ReplyView
from .session import (
    ChatOptions,
    Conversation,
    Turn,
    change_setting,
    describe_settings,
    setting_names,
    user_turn_message,
)

PROMPT = ">>> "
SOFT_SWITCHES = ("/think", "/no_think")  # Qwen3 reads these inside a user message

KEYS = [
    ("Enter", "send the message"),
    ("Alt-Enter, or \\ Enter", "new line (pasted lines stay one message)"),
    ("Ctrl-G, Ctrl-X Ctrl-E", "write the message in $EDITOR"),
    ("Tab", "complete commands and file paths"),
    ("Up, Down, Ctrl-R", "history (kept across sessions)"),
    ("Ctrl-C", "stop the reply; clear the line; on an empty line, quit"),
    ("Ctrl-D", "quit"),
]


def history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "qwen3chat" / "history"


def _history() -> History:
    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:  # read-only home: history for this session only
        return InMemoryHistory()
    return FileHistory(str(path))


def _key_bindings() -> KeyBindings:
    keys = KeyBindings()

    @keys.add("enter")
    def _send_or_continue(event):
        buffer = event.current_buffer
        if buffer.document.text_before_cursor.endswith("\\"):  # a shell-style continuation
            buffer.delete_before_cursor()
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    # Not Ctrl-J: Enter typed ahead while a reply streams reaches us as Ctrl-J (the
    # terminal turns CR into LF outside raw mode), and it must still send.
    @keys.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    @keys.add("c-g")
    def _editor(event):
        event.current_buffer.open_in_editor()

    @keys.add("c-c")
    def _clear_or_quit(event):
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=EOFError)

    return keys


class _SlashCompleter(Completer):
    """Completes command lines only (a message being typed gets no pop-up menu): first the
    command's name, then what it takes."""

    def __init__(self, names: list[str], arguments: dict[str, Completer | dict | None]):
        # sentence=True: the leading "/" belongs to the word being completed.
        self.names = WordCompleter(names, sentence=True)
        self.arguments = NestedCompleter.from_nested_dict(arguments)

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if text.startswith("/"):
            inner = self.arguments if " " in text else self.names
            yield from inner.get_completions(document, complete_event)


@contextlib.contextmanager
def _no_echo() -> Iterator[None]:
    """Keys typed while a reply streams are not echoed. An echoed "^C" (or anything typed)
    lands inside the region Rich redraws and shifts its lines; the keys themselves stay
    queued for the next prompt."""
    if termios is None or not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # the local-modes word
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


class _CtrlC:
    """SIGINT while a reply is generated (the terminal is not in raw mode then).

    Usually it only sets a flag that the engine reads between tokens and prefill chunks,
    so the reply ends cleanly as "cancelled". Until the first event, though, the engine
    may be inside one long forward pass (a whole prompt prefilled at once) that no flag
    reaches; there the handler raises instead. That is safe: the KV cache records a pass
    only once it has finished, and nothing of the reply exists yet.
    """

    def __init__(self):
        self.requested = False
        self.raising = False

    @contextlib.contextmanager
    def armed(self) -> Iterator[_CtrlC]:
        self.requested, self.raising = False, True
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
            self.raising = False

    def _on_sigint(self, signum, frame) -> None:
        self.requested = True
        if self.raising:
            raise KeyboardInterrupt

    def is_requested(self) -> bool:
        return self.requested


class Repl:
    def __init__(
        self,
        engine: Engine,
        model: LoadedModel,
        sampling: SamplingSettings,
        options: ChatOptions,
        conversation: Conversation,
        console: Console | None = None,
        vision: VisionChat | None = None,
    ):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model = model
        self.sampling = sampling
        self.options = options
        self.conversation = conversation
        self.console = console or Console(highlight=False)
        self.ctrl_c = _CtrlC()
        self.replies = 0
        self.next_input = ""  # a message given back to the input line
        self.vision = vision  # a Qwen3-VL chat: /image attaches pictures
        self.prompts = vision or TextPrompts()
        self.pending: list[VisualInput] = []  # pictures for the next message
        self.commands: dict[str, tuple[Callable[[str], bool | None], str, str]] = {
            "/help": (self.help, "", "show this help"),
            "/clear": (self.clear, "", "forget the conversation (the system prompt stays)"),
            "/system": (self.system, "[TEXT]", "set the system prompt (no text: show it)"),
            "/think": (self.think_on, "", "thinking on (or end one message with /think)"),
            "/no_think": (self.think_off, "", "thinking off (or end one with /no_think)"),
            "/set": (self.set, "NAME VALUE", "change a setting (no name: list them)"),
            "/save": (self.save, "FILE", "save the conversation as JSON"),
            "/load": (self.load, "FILE", "load a conversation saved with /save"),
            "/stats": (self.toggle_stats, "", "show or hide the stats line after replies"),
            "/regen": (self.regen, "", "drop the last reply and generate it again"),
            "/show": (self.show, "[template]", "model, template, settings, context used"),
            "/exit": (self.exit, "", "quit (also Ctrl-D, or Ctrl-C on an empty line)"),
        }
        if vision is not None:
            self.commands["/image"] = (self.image, "PATH", "attach an image to the next message")

    # The loop --------------------------------------------------------------------------

    def run(self) -> None:
        session = PromptSession(
            history=_history(),
            multiline=True,
            prompt_continuation="... ",
            key_bindings=_key_bindings(),
            completer=self._completer(),
            complete_while_typing=True,
            enable_open_in_editor=True,
        )
        self._banner()
        while True:
            default, self.next_input = self.next_input, ""
            try:
                line = session.prompt(PROMPT, default=default)
            except EOFError:
                return
            try:
                if not self.handle(line):
                    return
            except QwenChatError as e:
                self.console.print(Text(f"error: {e}", style="red"))
            except KeyboardInterrupt:  # Ctrl-C during a command: back to the prompt
                self.console.print()

    def handle(self, line: str) -> bool:
        """Run one input line; False when the chat should end."""
        if not line.strip():
            return True
        if line.startswith("//"):  # a message that starts with a slash
            return self.send(line[1:])
        word, _, arg = line.strip().partition(" ")
        if not line.startswith("/") or (word in SOFT_SWITCHES and arg.strip()):
            return self.send(line)
        if word not in self.commands:
            close = difflib.get_close_matches(word, self.commands, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            self._note(f"unknown command {word}; {hint}/help lists them (// sends a '/')")
            return True
        handler = self.commands[word][0]
        return handler(arg.strip()) is not False

    def send(self, text: str) -> bool:
        self.next_input = text  # given back unless a turn is kept
        if self.reply(text, self.pending) is None:
            self._note("no answer, so no turn was kept; your message is back in the input line")
        else:
            self.next_input = ""
            self.pending = []
        self.console.print()
        return True

    # One reply -------------------------------------------------------------------------

    def reply(self, user_text: str, pictures: list[VisualInput] = ()) -> Turn | None:
        """Answer ``user_text`` (about ``pictures``) and add the turn; None (and no turn)
        when no answer text came, because it was stopped early or the thinking used every
        token."""
        prompt_ids, visuals = self._prompt_ids(user_turn_message(user_text, list(pictures)))
        if visuals:
            self._note(f"{self.prompts.count_tokens(visuals)} visual tokens")
        # A new seed per reply, so that /regen gives another answer, while a session that
        # is replayed with the same --seed gives the same replies.
        sampling = replace(self.sampling, seed=self.sampling.seed + self.replies)
        self.replies += 1
        view = ReplyView(
            self.console, self.options.show_thinking, self.options.stats, self.engine.max_seq_len
        )
        finish = None
        with _no_echo(), view, self.ctrl_c.armed() as ctrl_c:
            events = self.engine.generate(
                prompt_ids,
                self.options.max_tokens,
                sampling,
                should_stop=ctrl_c.is_requested,
                think_budget=self.options.think_budget,
                visuals=visuals,
            )
            try:
                for event in events:
                    ctrl_c.raising = False
                    view.show(event)
                    if isinstance(event, FinishEvent):
                        finish = event
            except KeyboardInterrupt:
                pass  # stopped before the first token: nothing was answered
        if finish is None or not finish.text:
            return None
        turn = Turn(user_text, finish.text, list(pictures))
        self.conversation.turns.append(turn)
        return turn

    def _encode(self, messages: list[dict], add_generation_prompt: bool = True):
        """Prompt ids of ``messages`` (pictures count as their expanded pad tokens), and
        their pictures."""
        return self.prompts.encode_chat(
            self.tokenizer, messages, self.options.think, add_generation_prompt
        )

    def _prompt_ids(self, user_text: str | dict) -> tuple[list[int], list[VisualInput]]:
        """The prompt for the next reply and its pictures, after dropping the oldest turns
        if it would not leave room for the reply (up to max_tokens, at most half the
        window)."""
        limit = self.engine.max_seq_len
        budget = limit - min(self.options.max_tokens, limit // 2)
        conversation = self.conversation
        if len(self._encode(conversation.messages(user_text))[0]) > budget:
            # Down to half the budget, not just below it: the turns after this one then
            # find their prefix in the KV cache again, instead of each re-reading the
            # whole window once it is full.
            dropped = conversation.drop_oldest_until(
                lambda messages: len(self._encode(messages)[0]) <= budget // 2, user_text
            )
            if dropped:
                first, last = _shorten(dropped[0].user), _shorten(dropped[-1].user)
                which = f"{len(dropped)} oldest turns, {first!r} to {last!r}"
                if len(dropped) == 1:
                    which = f"oldest turn, {first!r}"
                self._note(f"context full (--max-seq-len {limit}): dropped the {which}")
        prompt_ids, visuals = self._encode(conversation.messages(user_text))
        if len(prompt_ids) >= limit:
            raise QwenChatError(
                f"this message needs {len(prompt_ids)} tokens of context but --max-seq-len "
                f"is {limit}; shorten it or restart with a larger --max-seq-len"
            )
        return prompt_ids, visuals

    def context_used(self) -> int:
        messages = self.conversation.messages()
        if not messages:
            return 0
        return len(self._encode(messages, add_generation_prompt=False)[0])

    # Commands --------------------------------------------------------------------------

    def help(self, arg: str) -> None:
        table = Table.grid(padding=(0, 2))
        for name, (_, usage, about) in self.commands.items():
            table.add_row(f"{name} {usage}".strip(), about)
        table.add_row("", "")
        for key, about in KEYS:
            table.add_row(key, about)
        table.add_row("", "")
        table.add_row("settings", ", ".join(setting_names()))
        self.console.print(table)

    def clear(self, arg: str) -> None:
        self.conversation.turns.clear()
        self._note("conversation cleared")

    def system(self, arg: str) -> None:
        if not arg:
            self._note(f"system prompt: {self.conversation.system or '(none)'}")
            return
        self.conversation.system = arg
        self._note("system prompt set")

    def think_on(self, arg: str) -> None:
        self.options.think = True
        self._note("thinking on")

    def think_off(self, arg: str) -> None:
        self.options.think = False
        self._note("thinking off")

    def toggle_stats(self, arg: str) -> None:
        self.options.stats = not self.options.stats
        self._note(f"stats {'on' if self.options.stats else 'off'}")

    def set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        value = value.strip()
        if not name:
            self._note(describe_settings(self.options, self.sampling))
        elif not value:
            self._note("usage: /set NAME VALUE (/set alone lists the settings)")
        else:
            try:
                self.options, self.sampling = change_setting(
                    self.options, self.sampling, name, value
                )
            except ValueError as e:
                self._note(f"/set: {e}")
                return
            self._note(f"{name} = {value}")

    def save(self, arg: str) -> None:
        if not arg:
            self._note("usage: /save FILE")
            return
        path = Path(arg).expanduser()
        self.conversation.save(path)
        self._note(f"saved {len(self.conversation.turns)} turn(s) to {path}")

    def load(self, arg: str) -> None:
        if not arg:
            self._note("usage: /load FILE")
            return
        path = Path(arg).expanduser()
        self.conversation = Conversation.load(path)
        self._note(f"loaded {len(self.conversation.turns)} turn(s) from {path}")

    def regen(self, arg: str) -> None:
        if not self.conversation.turns:
            self._note("no reply to regenerate yet")
            return
        last = self.conversation.turns.pop()
        if self.reply(last.user, last.pictures) is None:
            self.conversation.turns.append(last)
            self._note("no new answer; the previous reply stays")

    def show(self, arg: str) -> None:
        tok = self.tokenizer
        if arg == "template":
            self.console.print(Text(tok.chat_template))
            return
        model = self.model
        config = self.engine.model.config
        template = "built-in Qwen3" if tok.template_is_builtin else "the model's"
        think = "on" if self.options.think else "off"
        budget = self.options.think_budget or "off"
        rows = [
            ("model", f"{model.path} ({model.format}, {num_parameters(config) / 1e6:.0f}M)"),
            ("quantization", self.model.quantization),
            ("device", f"{self.engine.device}, {self.engine.model.dtype}".replace("torch.", "")),
            ("kernels", describe_variants(self.engine.device)),
            ("pages", memory.describe_pages()),
            ("kv cache", self._kv_cache()),
            ("drafts", self._drafts()),
            ("template", f"{template} chat template (/show template prints it)"),
            ("thinking", f"{think}, budget {budget}"),
            ("settings", describe_settings(self.options, self.sampling)),
            ("context", f"{self.context_used()} of {self.engine.max_seq_len} tokens used"),
            ("turns", str(len(self.conversation.turns))),
        ]
        table = Table.grid(padding=(0, 2))
        for row in rows:
            table.add_row(*row)
        self.console.print(table)

    def _kv_cache(self) -> str:
        cache = self.engine.cache
        kind = "int8 (32-value blocks)" if cache.quantized else "compute dtype"
        return f"{kind}, {cache.nbytes / 2**20:.0f} MiB for {cache.max_seq_len} tokens"

    def _drafts(self) -> str:
        n = self.engine.draft_max
        return f"ngram (prompt lookup), up to {n} tokens a step" if n else "none"

    def image(self, arg: str) -> None:
        if not arg:
            self._note("usage: /image PATH")
            return
        picture = self.vision.image(Path(arg).expanduser())
        self.vision.check_fits([*self.pending, picture], self.engine.max_seq_len)
        self.pending.append(picture)
        self._note(f"attached {arg} to the next message ({len(self.pending)} picture(s))")

    def exit(self, arg: str) -> bool:
        return False

    # Helpers ---------------------------------------------------------------------------

    def _completer(self) -> Completer:
        paths = PathCompleter(expanduser=True)
        arguments = {
            "/save": paths,
            "/load": paths,
            "/image": paths,
            "/set": dict.fromkeys(setting_names()),
            "/show": {"template": None},
        }
        return _SlashCompleter(list(self.commands), arguments)

    def _banner(self) -> None:
        name = self.model.path.name
        if self.model.format == "preset":  # said before the first reply shows it
            name = f"preset {name}, random weights"
        think = "on" if self.options.think else "off"
        self.console.print(
            Text.assemble(
                ("qwen3chat", "bold"),
                f" · {name} · context {self.engine.max_seq_len} · thinking {think}\n",
                ("/help for commands · Alt-Enter new line · Ctrl-C stops a reply · ", "dim"),
                ("Ctrl-D quits", "dim"),
            )
        )
        if self.sampling.temperature == 0:
            self._note(
                "temperature 0 is greedy decoding, which Qwen3 warns can repeat endlessly; "
                "try /set temperature 0.6"
            )

    def _note(self, text: str) -> None:
        self.console.print(Text(text, style="dim"))


def _shorten(text: str, width: int = 30) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"
