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

from .drafting import NgramDrafter, drafts_per_pass
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
        draft_max: int = 0,
    ):
        """``kv_dtype``: what the KV cache stores (torch.int8: ``--kv-cache int8``);
        ``draft_max``: tokens drafted by prompt lookup per step (``--draft ngram``; 0:
        none), where the cache can be trimmed back past rejected drafts (not a recurrent
        one) and no more than keep a pass's rows exact (drafting.drafts_per_pass)."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.chunk_size = chunk_size
        self.cache: Cache = model.new_cache(max_seq_len, kv_dtype)
        self.vocab_size = model.config.vocab_size
        self.draft_max = drafts_per_pass(model, draft_max, self.cache.recurrent)
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
    def decode_step(self, *tokens: int) -> torch.Tensor:
        """Logits after each of ``tokens`` (``[len(tokens), vocab]``): a step's one token,
        or the pending token and its drafts in one pass; all of them committed (the caller
        trims rejected drafts)."""
        start = len(self.cache)
        extra = self.layout.rows(start, start + len(tokens), self.device)
        logits = self.model(self._ids(list(tokens)), self.cache, start, all_logits=True, **extra)
        self.cache.commit(list(tokens))
        return logits[0]

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
        tokens = self._tokens(reply, reply.choose(logits), prompt_ids)
        first = time.perf_counter()
        timings.prefill_s = timings.ttft_s = first - start
        reason = "cancelled"
        for token in tokens:
            yield from reply.accept(token)
            if reply.done or should_stop():
                reason = reply.done or reason
                tokens.close()  # trims the cache back to what the reply kept
                break
        timings.decode_s = time.perf_counter() - first
        yield from reply.finish(reason)

    def _tokens(self, reply: Generation, token: int, prompt_ids: list[int]) -> Iterator[int]:
        """The reply's tokens from its first, ``token``, each chosen once the caller has
        accepted the one before it (its penalties, grammar and thinking budget see it).

        With drafting, a step runs the pending token and the drafts that follow it in the
        history in one pass; the token chosen after each row is the one a step of its own
        would choose, so the drafts it equals are kept and the first it differs from ends
        the step (that chosen token is the next pending one). The cache is trimmed back
        to the kept tokens, also when the caller stops in the middle."""
        drafter = NgramDrafter(prompt_ids, self.draft_max) if self.draft_max else None
        timings = reply.timings
        while True:
            yield token
            drafts = []
            if drafter is not None:
                drafter.add(token)
                # Tokens the reply may still take, and positions the cache still has.
                room = min(
                    reply.max_tokens - len(reply.generated), self.max_seq_len - len(self.cache) - 1
                )
                drafts = drafter.propose(room - 1)  # the pass's last row chooses one more
            if not drafts:
                timings.decode_tokens += 1
                token = reply.choose(self.decode_step(token))
                continue
            kept, right = len(self.cache) + 1, 0  # the pending token's, then each right draft
            rows = self.decode_step(token, *drafts)
            timings.drafted_tokens += len(drafts)
            try:
                for row, draft in zip(rows, [*drafts, None], strict=True):
                    timings.decode_tokens += 1
                    token = reply.choose(row)
                    if token != draft:
                        break
                    yield token
                    drafter.add(token)
                    right += 1
                    timings.accepted_tokens += 1
            finally:
                drafter.kept(right)
                self.cache.trim(kept + right)
