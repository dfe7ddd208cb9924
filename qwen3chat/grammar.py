"""Constrained decoding: a reply held to a JSON schema (or to any JSON object), or to tool
calls in Qwen3's form, with llguidance computing which tokens the grammar allows next.

Before each token is sampled, the tokens the grammar cannot take are masked out (~70 us a
token for Qwen3's 151,936 ids); each token taken moves the grammar on. Once the value is
complete only the end-of-turn token is allowed, so the reply ends there.
"""

from __future__ import annotations

import functools
import json

import llguidance
import torch

from .errors import QwenChatError
from .tokenizer import Tokenizer

_END_OF_TURN = "<|im_end|>"
# Written compactly, so that a model cannot pad a value with whitespace forever.
_COMPACT = {"whitespace_flexible": False}


@functools.cache
def _grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    # Built from the tokenizer's own JSON, so it splits text exactly as it does (~1 s once).
    return llguidance.LLTokenizer(
        tokenizer.backend.to_str(),
        n_vocab=vocab_size,
        eos_token=tokenizer.token_id(_END_OF_TURN),
    )


def json_grammar(schema: dict | None) -> str:
    """The grammar of a JSON value that follows ``schema`` (None: any JSON object)."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema if schema is not None else {"type": "object"}, overrides=_COMPACT
        )
    except ValueError as e:
        raise QwenChatError(f"not a JSON schema: {e}") from None


def tool_call_grammar(tools: list[dict], name: str | None = None) -> str:
    """The grammar of a reply that is tool calls alone, as Qwen3 writes them
    (``<tool_call>`` and ``</tool_call>`` are tokens of their own): one or more calls of
    ``tools`` (OpenAI's function tools), or one call of the function ``name``."""
    functions = [tool.get("function", tool) for tool in tools]
    if name is not None:
        functions = [f for f in functions if f.get("name") == name]
        if not functions:
            raise QwenChatError(f"the function {name!r} is not among the request's tools")
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f.get("name")},
                "arguments": f.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    body = json.dumps({"x-guidance": _COMPACT, "anyOf": calls})
    more = "" if name is not None else ' ("\\n" call)*'
    return (
        f'start: call{more}\ncall: <tool_call> "\\n" body "\\n" </tool_call>\nbody: %json {body}\n'
    )


class GrammarConstraint:
    """One reply's grammar: ``mask`` the logits before sampling, ``advance`` with the token
    sampled."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, grammar: str):
        self.matcher = llguidance.LLMatcher(_grammar_tokenizer(tokenizer, vocab_size), grammar)
        if self.matcher.is_error():
            raise QwenChatError(f"the schema cannot be used: {self.matcher.get_error()}")
        self.vocab_size = vocab_size
        self._words = torch.empty(1, (vocab_size + 31) // 32, dtype=torch.int32)
        self._bits = torch.arange(32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [vocab]`` with every token the grammar does not allow at -inf."""
        self.matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.nbytes)
        allowed = ((self._words[0, :, None] >> self._bits) & 1).view(-1)[: self.vocab_size]
        return logits.masked_fill(allowed.to(logits.device) == 0, float("-inf"))

    def advance(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)
