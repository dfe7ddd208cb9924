"""Generation: prompt ids in, a stream of text events and one finish event out.

The engine knows ids, the model and the KV cache; it knows nothing of terminals, nor of
what a model family adds to ids (pictures): the model hands it a prompt layout
(``model.prompt_layout``) that says how the prompt is cached and what each forward pass
takes. The CLI, the REPL and bench all drive it through ``generate``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from .errors import ContextOverflowError
from .generation import Event, Generation, Timings
from .hybrid_cache import checkpoint_marks
from .kv_cache import Cache
from .sampling import SamplingSettings
from .tokenizer import Tokenizer


class Engine:
    """Runs one model with one KV cache that persists across calls (prefix reuse)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        max_seq_len: int,
        chunk_size: int | None = None,
        kv_dtype: torch.dtype | None = None,
    ):
        """``kv_dtype``: what the KV cache stores (torch.int8: ``--kv-cache int8``)."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.chunk_size = chunk_size
        self.cache: Cache = model.new_cache(max_seq_len, kv_dtype)
        self.vocab_size = model.config.vocab_size
        # The last prompt's layout: what its decode steps pass the model besides ids.
        self.layout = model.prompt_layout([])

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def reusable_prefix(self, keys: list) -> int:
        """Prompt tokens whose keys/values the cache already holds (at least one token is
        always left to run, so that there are logits); ``keys`` as a layout's."""
        return self.cache.common_prefix(keys[: len(keys) - 1])

    @torch.inference_mode()
    def prefill(
        self,
        prompt_ids: list[int],
        should_stop: Callable[[], bool],
        visuals: Sequence = (),
        timings: Timings | None = None,
    ) -> torch.Tensor | None:
        """Bring the cache to ``prompt_ids``; logits of the last position, or None if stopped.

        Only the part after the longest prefix already in the cache is run, in chunks of
        ``chunk_size``; at least one token always runs so that there are logits. The
        prompt's ``visuals`` (pictures, in the order of their pad tokens) are encoded for
        that part first; the time goes to ``timings.vision_s``.
        """
        self.layout = self.model.prompt_layout(prompt_ids, visuals)
        return self._run_prompt(prompt_ids, should_stop, timings)

    def _run_prompt(self, prompt_ids, should_stop, timings) -> torch.Tensor | None:
        layout = self.layout
        reuse = self.reusable_prefix(layout.keys)
        self.cache.trim(reuse)
        if should_stop():
            return None
        encoding_s = layout.prepare(self.model, reuse)
        if timings is not None:
            timings.vision_s = encoding_s
        end = len(prompt_ids)
        step = self.chunk_size or end - reuse
        marks = self._checkpoint_marks(prompt_ids, reuse)
        logits = None
        bounds = sorted({*range(reuse, end, step), *marks, end})
        for start, stop in itertools.pairwise(bounds):
            if should_stop():
                return None
            ids = self._ids(prompt_ids[start:stop])
            logits = self.model(ids, self.cache, start, **layout.rows(start, stop, self.device))
            self.cache.commit(layout.keys[start:stop])
            if stop in marks:
                self.cache.checkpoint()
        return logits

    def _checkpoint_marks(self, prompt_ids: list[int], reuse: int) -> set[int]:
        """Where a cache whose state cannot be trimmed back (a recurrent one) keeps a copy."""
        if not self.cache.recurrent:
            return set()
        return checkpoint_marks(prompt_ids, self.tokenizer.turn_start_id, reuse)

    @torch.inference_mode()
    def decode_step(self, token: int) -> torch.Tensor:
        start = len(self.cache)
        extra = self.layout.rows(start, start + 1, self.device)
        logits = self.model(self._ids([token]), self.cache, start, **extra)
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
        visuals: Sequence = (),
        constraint=None,
    ) -> Iterator[Event]:
        """Generate a reply to ``prompt_ids``; ``visuals`` are the prompt's pictures in the
        order of their pad tokens (a Qwen3-VL model); ``constraint`` holds the reply to a
        grammar (grammar.GrammarConstraint)."""
        reply = Generation(
            self.tokenizer,
            prompt_ids,
            max_tokens,
            self.max_seq_len,
            self.vocab_size,
            self.device,
            sampling,
            think_budget,
            constraint,
        )
        timings = reply.timings
        start = time.perf_counter()
        self.layout = self.model.prompt_layout(prompt_ids, visuals)
        reply.cached = self.reusable_prefix(self.layout.keys)
        with torch.inference_mode():
            logits = self._run_prompt(prompt_ids, should_stop, timings)
        if logits is None:
            timings.prefill_s = time.perf_counter() - start
            yield from reply.finish("cancelled")
            return
        timings.prefill_tokens = len(prompt_ids) - reply.cached
        token = reply.choose(logits)
        first = time.perf_counter()
        timings.prefill_s = timings.ttft_s = first - start
        while True:
            yield from reply.accept(token)
            if reply.done:
                reason = reply.done
                break
            if should_stop():
                reason = "cancelled"
                break
            logits = self.decode_step(token)
            timings.decode_tokens += 1
            token = reply.choose(logits)
        timings.decode_s = time.perf_counter() - first
        yield from reply.finish(reason)
