"""A text chat's prompt encoder: messages to prompt ids. vision/prompt.py's VisionChat has
the same interface for a chat with pictures, so the chat code never asks which it has."""

from __future__ import annotations

from collections.abc import Sequence

from ..tokenizer import Tokenizer


class TextPrompts:
    def encode_chat(
        self,
        tokenizer: Tokenizer,
        messages: list[dict],
        enable_thinking: bool = True,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> tuple[list[int], list]:
        """Ids of the templated ``messages``, and their pictures (none in a text chat)."""
        ids = tokenizer.encode_chat(messages, enable_thinking, add_generation_prompt, tools)
        return ids, []

    def count_tokens(self, visuals: Sequence) -> int:
        return 0
