"""Generation: prompt ids in, a stream of text events and one finish event out.

The engine knows ids, the model and the KV cache; it knows nothing of terminals. The CLI,
the REPL and bench all drive it through ``generate``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .errors import ContextOverflowError
from .kv_cache import KVCache
from .model.qwen3_vl import VisionPrompt, VisualInput
from .sampling import Sampler, SamplingSettings
from .thinking import ThinkBudget, ThinkSplitter, prompt_ends_in_thinking
from .tokenizer import Tokenizer


@dataclass
class TextEvent:
    text: str
    thinking: bool


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
    decode_tokens: int = 0  # forward passes of one token after the first sampled token

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


Event = TextEvent | ThinkingEnd | FinishEvent


class Engine:
    """Runs one model with one KV cache that persists across calls (prefix reuse)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        max_seq_len: int,
        chunk_size: int | None = None,
        reference: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.chunk_size = chunk_size
        # Reference mode re-runs the whole sequence every step without a cache: slow, and
        # only there to check the cached path against.
        self.reference = reference
        self.cache: KVCache = model.new_cache(max_seq_len)
        self.vocab_size = model.config.vocab_size
        # M-RoPE: the last prompt's pictures put later tokens at cache index + delta.
        self.rope_delta = 0

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def reusable_prefix(self, keys: list) -> int:
        """Prompt tokens whose keys/values the cache already holds (at least one token is
        always left to run, so that there are logits). ``keys`` are the prompt ids, or a
        VisionPrompt's keys."""
        if self.reference:
            return 0
        return min(self.cache.common_prefix(keys), len(keys) - 1)

    @torch.inference_mode()
    def prefill(
        self,
        prompt_ids: list[int],
        should_stop: Callable[[], bool],
        vision: VisionPrompt | None = None,
        timings: Timings | None = None,
    ) -> torch.Tensor | None:
        """Bring the cache to ``prompt_ids``; logits of the last position, or None if stopped.

        Only the part after the longest prefix already in the cache is run, in chunks of
        ``chunk_size``; at least one token always runs so that there are logits. With
        ``vision`` (the prompt's pictures, Qwen3-VL) the vision tower first encodes those
        with tokens in that part; its time goes to ``timings.vision_s``.
        """
        self.rope_delta = vision.rope_delta if vision else 0
        if self.reference:
            if vision:
                raise ValueError("reference mode runs text prompts only")
            return self.model(self._ids(prompt_ids))
        keys = vision.keys if vision else prompt_ids
        reuse = self.reusable_prefix(keys)
        self.cache.trim(reuse)
        if vision:
            if should_stop():
                return None
            started = time.perf_counter()
            vision.encode_from(self.model, reuse)
            if timings is not None:
                timings.vision_s = time.perf_counter() - started
        step = self.chunk_size or len(prompt_ids) - reuse
        logits = None
        for start in range(reuse, len(prompt_ids), step):
            if should_stop():
                return None
            end = min(start + step, len(prompt_ids))
            positions, visual = vision.chunk(start, end, self.device) if vision else (None, None)
            logits = self.model(
                self._ids(prompt_ids[start:end]),
                self.cache,
                start=start,
                positions=positions,
                visual=visual,
            )
            self.cache.commit(keys[start:end])
        return logits

    @torch.inference_mode()
    def decode_step(self, sequence: list[int], token: int) -> torch.Tensor:
        if self.reference:
            return self.model(self._ids(sequence))
        start = len(self.cache)
        positions = None
        if self.rope_delta:
            positions = torch.full((3, 1), start + self.rope_delta, device=self.device)
        logits = self.model(self._ids([token]), self.cache, start=start, positions=positions)
        self.cache.commit([token])
        return logits

    @torch.inference_mode()
    def score(self, ids: list[int]) -> torch.Tensor:
        """Logits at every position of ``ids`` (``[len, vocab]``), e.g. for perplexity."""
        if len(ids) > self.max_seq_len:
            raise ContextOverflowError(len(ids), self.max_seq_len)
        self.cache.trim(0)
        logits = self.model(self._ids(ids), self.cache, start=0, all_logits=True)
        self.cache.commit(ids)
        return logits[0]

    def generate(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingSettings | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        think_budget: int | None = None,
        visuals: Sequence[VisualInput] = (),
    ) -> Iterator[Event]:
        """Generate a reply to ``prompt_ids``; ``visuals`` are the prompt's pictures in the
        order of their pad tokens (a Qwen3-VL model)."""
        if not prompt_ids:
            raise ValueError("generate needs at least one prompt token")
        if len(prompt_ids) + 1 > self.max_seq_len:
            raise ContextOverflowError(len(prompt_ids) + 1, self.max_seq_len)
        sampling = sampling or SamplingSettings()
        tok = self.tokenizer
        splitter = ThinkSplitter(
            tok, prompt_ends_in_thinking(prompt_ids, tok.think_start_id, tok.think_end_id)
        )
        budget = ThinkBudget(tok, think_budget)
        forced: list[int] = []  # ids that replace sampling (the budget's closing text)
        sampler = Sampler(sampling, self.vocab_size, prompt_ids, self.device)
        stops = set(tok.stop_ids)
        timings = Timings()
        start = time.perf_counter()
        vision = VisionPrompt(prompt_ids, visuals, self.model.config) if visuals else None
        cached = self.reusable_prefix(vision.keys if vision else prompt_ids)
        generated: list[int] = []

        def finish(reason: str) -> FinishEvent:
            return FinishEvent(
                reason,
                generated,
                len(prompt_ids),
                cached,
                splitter.answer_text,
                splitter.thinking_text,
                splitter.thinking_tokens,
                timings,
            )

        logits = self.prefill(prompt_ids, should_stop, vision, timings)
        if logits is None:
            timings.prefill_s = time.perf_counter() - start
            yield finish("cancelled")
            return
        timings.prefill_tokens = len(prompt_ids) - cached
        token = sampler(logits)
        first = time.perf_counter()
        timings.prefill_s = timings.ttft_s = first - start
        reason = "length"
        sequence = list(prompt_ids)
        while True:
            if token in stops:
                reason = "stop"
                break
            generated.append(token)
            sequence.append(token)
            sampler.observe(token)
            was_thinking = splitter.thinking
            text, thinking = splitter.push(token)
            if text:
                yield TextEvent(text, thinking)
            if was_thinking and not splitter.thinking:
                yield ThinkingEnd(splitter.thinking_tokens, budget.cut)
            forced += budget.forced_ids(splitter)
            if len(generated) >= max_tokens or len(sequence) >= self.max_seq_len:
                break
            if should_stop():
                reason = "cancelled"
                break
            logits = self.decode_step(sequence, token)
            timings.decode_tokens += 1
            token = forced.pop(0) if forced else sampler(logits)
        text, thinking = splitter.flush()
        if text:
            yield TextEvent(text, thinking)
        timings.decode_s = time.perf_counter() - first
        yield finish(reason)
