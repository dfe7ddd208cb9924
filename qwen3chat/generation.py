"""One reply's generation, apart from how its forward passes run: the events it produces,
its timings, and the per-reply state (sampler, thinking split and budget, stop ids and
limits) that turns each step's logits into the next token and text. The single-sequence
engine (engine.py) and the batched one (batch/) drive a ``Generation`` each per reply."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ContextOverflowError
from .sampling import Prepared, Sampler, SamplingSettings
from .thinking import ThinkBudget, ThinkSplitter, prompt_ends_in_thinking
from .tokenizer import Tokenizer


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model, and the ``top`` alternatives
    (id, log-probability), most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class TextEvent:
    text: str
    thinking: bool
    # With logprobs asked for: the tokens this text completes (and any whose text was
    # held back before it).
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class ThinkingEnd:
    """The thinking block closed after ``tokens`` tokens; ``cut`` when the budget closed it."""

    tokens: int
    cut: bool


@dataclass
class Timings:
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens: int = 0  # prompt tokens actually run (those after the reused prefix)
    vision_s: float = 0.0  # part of prefill_s spent in the vision tower
    decode_tokens: int = 0  # tokens chosen after the first (a forward pass each, or a draft's row)
    drafted_tokens: int = 0  # tokens drafted by prompt lookup (--draft ngram)
    accepted_tokens: int = 0  # of those, the ones the model chose too

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class FinishEvent:
    reason: str  # "stop" | "length" | "cancelled"
    token_ids: list[int]  # generated ids, without the stop id
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose keys/values were reused from the cache
    text: str
    thinking: str
    thinking_tokens: int
    timings: Timings = field(default_factory=Timings)
    logprobs: list[TokenLogprob] | None = None  # every generated token's, when asked for


Event = TextEvent | ThinkingEnd | FinishEvent


class Generation:
    """The state of one reply to ``prompt_ids``: ``choose`` the next token from a step's
    logits, ``accept`` it (its text events; ``done`` is then set when the reply ended at
    a stop id or a limit), and ``finish`` with the closing events."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        max_tokens: int,
        max_seq_len: int,
        vocab_size: int,
        device,
        sampling: SamplingSettings | None = None,
        think_budget: int | None = None,
        constraint=None,
        top_logprobs: int | None = None,
    ):
        """``constraint`` holds the reply to a grammar (grammar.GrammarConstraint);
        ``top_logprobs`` (0 or more alternatives) asks for each token's log-probability.
        A prompt that leaves no room for a token in ``max_seq_len`` is refused."""
        if not prompt_ids:
            raise ValueError("a reply needs at least one prompt token")
        if len(prompt_ids) + 1 > max_seq_len:
            raise ContextOverflowError(len(prompt_ids) + 1, max_seq_len)
        self.tokenizer = tokenizer
        self.prompt_tokens = len(prompt_ids)
        self.max_tokens = max_tokens
        self.max_seq_len = max_seq_len
        self.splitter = ThinkSplitter(
            tokenizer,
            prompt_ends_in_thinking(prompt_ids, tokenizer.think_start_id, tokenizer.think_end_id),
        )
        self.budget = ThinkBudget(tokenizer, think_budget)
        self.forced: list[int] = []  # ids that replace sampling (the budget's closing text)
        self.sampler = Sampler(
            sampling or SamplingSettings(), vocab_size, prompt_ids, device, constraint
        )
        self.stops = set(tokenizer.stop_ids)
        self.generated: list[int] = []
        self.cached = 0
        self.timings = Timings()
        self.done: str | None = None  # "stop" or "length" once the reply has ended
        self.top_logprobs = top_logprobs
        self.logprobs: list[TokenLogprob] = []
        self._unsent: list[TokenLogprob] = []  # not yet in a TextEvent

    def choose(self, logits: torch.Tensor, prepared: Prepared = None) -> int:
        """The next id from ``logits`` (``prepared``: see sampling.prepare_rows)."""
        token = self.forced.pop(0) if self.forced else self.sampler(logits, prepared)
        if self.top_logprobs is not None:
            # Of the model's distribution, before penalties, temperature and truncation.
            logprobs = torch.log_softmax(logits.view(-1).float(), dim=-1)
            top = logprobs.topk(self.top_logprobs)
            alternatives = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            self._unsent.append(TokenLogprob(token, float(logprobs[token]), alternatives))
        return token

    def _text(self, text: str, thinking: bool) -> list[Event]:
        if not text:
            return []
        event = TextEvent(text, thinking, self._unsent)
        self._unsent = []
        return [event]

    def accept(self, token: int) -> list[Event]:
        """Take the chosen ``token``; the text it completes."""
        if token in self.stops:
            self.done = "stop"
            del self._unsent[-1:]  # the stop id is not part of the reply
            return []
        self.logprobs += self._unsent[-1:]
        self.generated.append(token)
        self.sampler.observe(token)
        splitter = self.splitter
        was_thinking = splitter.thinking
        text, thinking = splitter.push(token)
        events = self._text(text, thinking)
        if was_thinking and not splitter.thinking:
            events.append(ThinkingEnd(splitter.thinking_tokens, self.budget.cut))
        self.forced += self.budget.forced_ids(splitter)
        length = self.prompt_tokens + len(self.generated)
        if len(self.generated) >= self.max_tokens or length >= self.max_seq_len:
            self.done = "length"
        return events

    def finish(self, reason: str) -> list[Event]:
        """The text still held back, then the FinishEvent."""
        events = self._text(*self.splitter.flush())
        s = self.splitter
        events.append(
            FinishEvent(
                reason,
                self.generated,
                self.prompt_tokens,
                self.cached,
                s.answer_text,
                s.thinking_text,
                s.thinking_tokens,
                self.timings,
                self.logprobs if self.top_logprobs is not None else None,
            )
        )
        return events
