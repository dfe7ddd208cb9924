"""Text <-> ids with `tokenizers`, chat formatting, and a streaming detokenizer."""

from __future__ import annotations

import hashlib
import lzma
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .chat_template import builtin_template, find_chat_template, render_chat
from .errors import QwenChatError
from .jsonfiles import read_json

THINK_START = "<think>"
TURN_START = "<|im_start|>"  # opens every turn of the ChatML templates
THINK_END = "</think>"
_DEFAULT_STOPS = ("<|im_end|>", "<|endoftext|>")
# The real Qwen3 tokenizer.json, xz-compressed (1.4 MB instead of 11 MB), shipped so that
# a preset can chat with no download.
_QWEN3_ASSET = "assets/qwen3-tokenizer.json.xz"
# Qwen3's tokenizer_config.json names these; there is no bos.
_QWEN3_SPECIAL = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}

# The last few tokenizers built, by a digest of what they were built from: parsing
# Qwen's 151k merges takes 0.4 s, once per process for each distinct tokenizer, not once
# per model loaded (a draft model beside its target; a server's or a worker's models).
# Nothing changes a built tokenizer, so models share it.
_BUILT: dict[bytes, HFTokenizer] = {}
_KEEP_BUILT = 4


def digest(*parts: bytes) -> bytes:
    """What a tokenizer is built from, as _BUILT's key."""
    hasher = hashlib.blake2b(digest_size=16)
    for part in parts:
        hasher.update(len(part).to_bytes(8, "little"))
        hasher.update(part)
    return hasher.digest()


def shared_backend(key: bytes, build: Callable[[], HFTokenizer]) -> HFTokenizer:
    """The tokenizer built from what ``key`` digests: ``build()``'s, once per process."""
    backend = _BUILT.pop(key, None)
    if backend is None:
        backend = build()
    _BUILT[key] = backend  # the most recent last
    while len(_BUILT) > _KEEP_BUILT:
        del _BUILT[next(iter(_BUILT))]
    return backend


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        chat_template: str | None = None,
        special_tokens: dict[str, str | None] | None = None,
        stop_ids: list[int] | None = None,
        builtin: str = "qwen3",
    ):
        self.backend = backend
        self.template_is_builtin = chat_template is None
        self.chat_template = chat_template or builtin_template(builtin)
        self.special_tokens = special_tokens or {}
        # The model's own stop ids (generation_config, config or GGUF metadata), and always
        # the ends of a chat turn and of a text.
        stops = [*(stop_ids or []), *(self.token_id(t) for t in _DEFAULT_STOPS)]
        self.stop_ids = sorted({i for i in stops if i is not None})
        self.think_start_id = self.token_id(THINK_START)
        self.turn_start_id = self.token_id(TURN_START)
        self.think_end_id = self.token_id(THINK_END)
        self._special_ids = {
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        }

    @classmethod
    def from_dir(
        cls,
        directory: Path,
        stop_ids: list[int] | None = None,
        builtin: str = "qwen3",
        requires: str | None = None,
    ) -> Tokenizer:
        """The folder's tokenizer.json and chat template (one that contains ``requires``,
        else the packaged ``builtin`` one)."""
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise QwenChatError(f"{path}: not found; the model directory needs it")
        try:
            data = path.read_bytes()
            backend = shared_backend(
                digest(data), lambda: HFTokenizer.from_str(data.decode("utf-8"))
            )
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise QwenChatError(f"{path}: not a valid tokenizer.json ({e})") from None
        config = read_json(directory / "tokenizer_config.json")
        special = {}
        if config:
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                value = config.get(key)
                special[key] = value.get("content") if isinstance(value, dict) else value
        template = find_chat_template(directory, requires)
        return cls(backend, template, special, stop_ids, builtin)

    @classmethod
    def builtin_qwen3(cls, template: str = "qwen3") -> Tokenizer:
        """The packaged Qwen3 tokenizer with a builtin template and the default stops."""
        packed = resources.files("qwen3chat").joinpath(_QWEN3_ASSET).read_bytes()
        backend = shared_backend(
            digest(packed), lambda: HFTokenizer.from_str(lzma.decompress(packed).decode("utf-8"))
        )
        return cls(backend, None, dict(_QWEN3_SPECIAL), builtin=template)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def render(
        self,
        messages: list[dict],
        enable_thinking: bool = True,
        add_generation_prompt=True,
        tools: list[dict] | None = None,
    ) -> str:
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt,
            enable_thinking,
            self.special_tokens,
            tools,
        )

    def encode_chat(
        self,
        messages: list[dict],
        enable_thinking: bool = True,
        add_generation_prompt=True,
        tools: list[dict] | None = None,
    ) -> list[int]:
        return self.encode(self.render(messages, enable_thinking, add_generation_prompt, tools))


class StreamDecoder:
    """Turns ids into text one id at a time, never splitting a UTF-8 character.

    Only a short window of ids (those since the last emitted text, plus the ids before
    them for context) is decoded per step, so the cost per token does not grow with the
    length of the reply.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._ids: list[int] = []
        self._read = 0  # ids before this index are already emitted as text

    def push(self, token_id: int) -> str:
        if self.tokenizer.is_special(token_id):
            return ""
        self._ids.append(token_id)
        emitted = self.tokenizer.decode(self._ids[: self._read])
        full = self.tokenizer.decode(self._ids)
        # An incomplete multi-byte character decodes as U+FFFD: wait for the next id.
        if len(full) <= len(emitted) or full.endswith("\ufffd"):
            return ""
        delta = full[len(emitted) :]
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return delta

    def flush(self) -> str:
        """Whatever is left (an incomplete character shows as U+FFFD)."""
        emitted = self.tokenizer.decode(self._ids[: self._read])
        full = self.tokenizer.decode(self._ids)
        self._ids, self._read = [], 0
        return full[len(emitted) :]
