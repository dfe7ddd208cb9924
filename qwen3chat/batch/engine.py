"""Continuous batching: requests join and leave the running batch between steps.

``add`` queues a request; each ``step`` runs one forward over the decode tokens of every
running sequence and prefill chunks of new ones (scheduler.py), samples each sequence
whose last position ran with its own settings, and returns every sequence's events (the
single-sequence engine's: text, thinking end, finish). A sequence that finishes or is
``cancel``led frees its blocks at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Sequence_

import torch

from ..device import available_memory
from ..generation import Event, Generation
from ..sampling import SamplingSettings, top_k_rows
from ..tokenizer import Tokenizer
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence

BLOCK_SIZE = 16  # positions per block: a multiple of the attention kernel's row blocks
# The KV cache takes at most this share of the memory available at start (it is allocated
# lazily, so what is not used is not resident), and holds at least one whole context.
KV_MEMORY_SHARE = 0.5


def default_num_blocks(model, max_running: int, max_seq_len: int, kv_dtype=None) -> int:
    """Blocks for ``max_running`` whole contexts, as far as memory allows."""
    per_block = model.kv_bytes_per_token(kv_dtype) * BLOCK_SIZE
    wanted = -(-max_running * max_seq_len // BLOCK_SIZE)
    affordable = int(available_memory(model.device) * KV_MEMORY_SHARE) // per_block
    return max(-(-max_seq_len // BLOCK_SIZE), min(wanted, affordable))


# Rows of a step without --chunk-size, beside the decode rows: vLLM's default
# max_num_batched_tokens.
STEP_ROWS = 2048


class BatchEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        max_seq_len: int,
        max_running: int = 16,
        token_budget: int | None = None,
        num_blocks: int | None = None,
        kv_dtype: torch.dtype | None = None,
    ):
        """``token_budget``: rows a step runs at most (prompt chunks fill what decoding
        leaves; ``--chunk-size``). By default a step takes whole prompts, as ``chat``
        does, up to STEP_ROWS rows or one longest prompt: prompts that arrive together
        are prefilled in one step and then decode together, where chunks of 256 started
        each stream's decoding behind the others' prompts. ``kv_dtype``: what the KV
        cache stores (torch.int8: ``--kv-cache int8``)."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.vocab_size = model.config.vocab_size
        num_blocks = num_blocks or default_num_blocks(model, max_running, max_seq_len, kv_dtype)
        self.cache = model.new_paged_cache(num_blocks, BLOCK_SIZE, max_seq_len, kv_dtype)
        self.blocks = BlockManager(num_blocks, BLOCK_SIZE)
        budget = token_budget or max(max_seq_len, STEP_ROWS) + max_running
        self.scheduler = Scheduler(self.blocks, max_running, budget)
        self.runner = ModelRunner(model, self.cache)
        self.tokens_sampled = 0  # over all steps (for a tokens-per-second rate)

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def add(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingSettings | None = None,
        constraint=None,
        top_logprobs: int | None = None,
        visuals: Sequence_ = (),
    ) -> Sequence:
        """Queue a reply to ``prompt_ids``; its events come from later steps. ``constraint``
        and ``top_logprobs`` as Generation takes them."""
        reply = Generation(
            self.tokenizer,
            prompt_ids,
            max_tokens,
            self.max_seq_len,
            self.vocab_size,
            self.cache.k.device,
            sampling,
            constraint=constraint,
            top_logprobs=top_logprobs,
        )
        seq = Sequence(list(prompt_ids), self.model.prompt_layout(prompt_ids, visuals), reply)
        self.scheduler.add(seq)
        return seq

    def warm_up(self) -> None:
        """Run one step of a one-token prompt, so that the first request does not wait for
        the native kernels to be built or loaded (a build takes about a minute)."""
        self.add([0], 1, SamplingSettings(temperature=0.0))
        while self.has_work:
            self.step()

    def cancel(self, seq: Sequence) -> list[tuple[Sequence, Event]]:
        """End ``seq`` now (its blocks are freed); its closing events, as ``step``'s."""
        return self._finish(seq, "cancelled")

    def step(self) -> list[tuple[Sequence, Event]]:
        """One forward over the scheduled rows; each sequence's new events."""
        chosen = self.scheduler.schedule()
        if not chosen:
            return []
        for seq, _ in chosen:
            if not seq.prepared:  # (again, after a preemption) e.g. run the vision tower
                seq.generation.timings.vision_s += seq.layout.prepare(self.model, seq.computed)
                seq.prepared = True
        sampled, logits = self.runner.run(chosen)
        self.tokens_sampled += len(sampled)
        for seq, count in chosen:
            if not seq.admitted:
                seq.admitted = True
                seq.generation.cached = seq.computed
            seq.computed += count
            self.blocks.register(seq)
        now = time.perf_counter()
        events: list[tuple[Sequence, Event]] = []
        tops = top_k_rows([seq.generation.sampler for seq in sampled], logits)
        for seq, row, top in zip(sampled, logits, tops, strict=True):
            reply = seq.generation
            token = reply.choose(row, top)
            timings = reply.timings
            if seq.first_token_at is None:
                seq.first_token_at = now
                timings.prefill_s = timings.ttft_s = now - seq.arrived
                timings.prefill_tokens = reply.prompt_tokens - reply.cached
            else:
                timings.decode_tokens += 1
            events += [(seq, event) for event in reply.accept(token)]
            if reply.done:
                events += self._finish(seq, reply.done)
            else:
                seq.append(token)
        return events

    def _finish(self, seq: Sequence, reason: str) -> list[tuple[Sequence, Event]]:
        self.scheduler.remove(seq)
        reply = seq.generation
        if seq.first_token_at is not None:
            reply.timings.decode_s = time.perf_counter() - seq.first_token_at
        return [(seq, event) for event in reply.finish(reason)]
