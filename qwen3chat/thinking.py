"""Splitting a reply into its <think> block and its answer, token by token, and cutting
a thinking block that runs over its budget."""

from __future__ import annotations

from .tokenizer import StreamDecoder, Tokenizer


def prompt_ends_in_thinking(prompt_ids: list[int], start_id: int | None, end_id: int | None):
    """True when the prompt opened a <think> it did not close (Thinking-2507 templates)."""
    if start_id is None:
        return False
    for token in reversed(prompt_ids):
        if token == end_id:
            return False
        if token == start_id:
            return True
    return False


class _Channel:
    """Text of one part (thinking or answer) with its surrounding whitespace trimmed.

    Leading whitespace is dropped and trailing whitespace held back until more text
    follows, so ``<think>\\n…\\n</think>\\n\\nAnswer`` streams as ``…`` and ``Answer``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.decoder = StreamDecoder(tokenizer)
        self.started = False
        self.pending = ""
        self.text = ""

    def feed(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        body = (self.pending + piece).rstrip()
        tail = (self.pending + piece)[len(body) :]
        self.pending = tail
        self.text += body
        return body

    def push(self, token_id: int) -> str:
        return self.feed(self.decoder.push(token_id))

    def flush(self) -> str:
        return self.feed(self.decoder.flush())


class ThinkSplitter:
    """Routes generated ids to the thinking or the answer channel.

    The <think> and </think> markers are single tokens in Qwen3's vocabulary, so the split
    happens on ids: exact, whatever text the tokens around them decode to.
    """

    def __init__(self, tokenizer: Tokenizer, in_thinking: bool = False):
        self.start_id = tokenizer.think_start_id
        self.end_id = tokenizer.think_end_id
        self.thinking = in_thinking
        self.thinking_tokens = 0
        self.channels = {True: _Channel(tokenizer), False: _Channel(tokenizer)}

    def push(self, token_id: int) -> tuple[str, bool]:
        """Text to show for this id, and whether it belongs to the thinking block."""
        if token_id == self.start_id:
            self.thinking = True
            return "", True
        if token_id == self.end_id:
            text = self.channels[True].flush()
            self.thinking = False
            return text, True
        if self.thinking:
            self.thinking_tokens += 1
        return self.channels[self.thinking].push(token_id), self.thinking

    def flush(self) -> tuple[str, bool]:
        return self.channels[self.thinking].flush(), self.thinking

    @property
    def thinking_text(self) -> str:
        return self.channels[True].text

    @property
    def answer_text(self) -> str:
        return self.channels[False].text


# Qwen's documented way to end thinking early (QwenLM/Qwen3, docs "thinking budget"): force
# this sentence and the closing tag, then let the model answer from what it has thought.
EARLY_STOP_THINKING = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on "
    "the thinking directly now.\n</think>\n\n"
)


class ThinkBudget:
    """Ends a thinking block once it holds ``limit`` tokens (None: never)."""

    def __init__(self, tokenizer: Tokenizer, limit: int | None):
        self.limit = limit
        self.closing_ids = tokenizer.encode(EARLY_STOP_THINKING) if limit is not None else []
        self.cut = False

    def forced_ids(self, splitter: ThinkSplitter) -> list[int]:
        """Ids to force next instead of sampling: the closing text, once, on reaching the limit."""
        over = self.limit is not None and splitter.thinking_tokens >= self.limit
        if self.cut or not splitter.thinking or not over:
            return []
        self.cut = True
        return list(self.closing_ids)
