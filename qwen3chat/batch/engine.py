"""Continuous batching: requests join and leave the running batch between steps.

``add`` queues a request; each ``step`` runs one forward over the decode tokens of every
running sequence and prefill chunks of new ones (scheduler.py), samples each sequence
whose last position ran with its own settings, and returns every sequence's events (the
single-sequence engine's: text, thinking end, finish). A sequence that finishes or is
``cancel``led frees its blocks at once.

With ``draft_max`` (``--draft ngram``) a decoding sequence's step runs its pending token
and the tokens its prompt-lookup drafter guesses, and keeps the guesses its sampler
chooses too (the single-sequence engine's rule, engine.py).

A hybrid model's sequences also move on recurrent states, each in its own slot, and
stop at a few block ends of their prompt so that the states there are kept for later
requests that share those blocks (state_slots.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Sequence_

import torch

from ..device import available_memory
from ..drafting import NgramDrafter, drafts_per_pass
from ..generation import Event, Generation
from ..hybrid_cache import checkpoint_marks
from ..sampling import SamplingSettings, prepare_rows
from ..tokenizer import Tokenizer
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence
from .state_slots import StateSlots

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
# A hybrid model's state slots: one per running sequence, and as many again for snapshots.
SNAPSHOTS_PER_SEQUENCE = 1


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
        draft_max: int = 0,
    ):
        """``token_budget``: rows a step runs at most (prompt chunks fill what decoding
        leaves; ``--chunk-size``). By default a step takes whole prompts, as ``chat``
        does, up to STEP_ROWS rows or one longest prompt: prompts that arrive together
        are prefilled in one step and then decode together, where chunks of 256 started
        each stream's decoding behind the others' prompts. ``kv_dtype``: what the KV
        cache stores (torch.int8: ``--kv-cache int8``). ``draft_max``: tokens each
        sequence drafts by prompt lookup per step (``--draft ngram``; 0: none), as the
        single-sequence engine does (drafting.drafts_per_pass); not on a model with recurrent
        states."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.vocab_size = model.config.vocab_size
        num_blocks = num_blocks or default_num_blocks(model, max_running, max_seq_len, kv_dtype)
        slots = max_running * (1 + SNAPSHOTS_PER_SEQUENCE)
        self.cache = model.new_paged_cache(num_blocks, BLOCK_SIZE, max_seq_len, kv_dtype, slots)
        self.blocks = BlockManager(num_blocks, BLOCK_SIZE)
        self.states = None
        if self.cache.state_slots:
            self.states = StateSlots(max_running, self.cache.state_slots - max_running)
        budget = token_budget or max(max_seq_len, STEP_ROWS) + max_running
        self.scheduler = Scheduler(self.blocks, max_running, budget, self.states)
        self.runner = ModelRunner(model, self.cache)
        self.draft_max = drafts_per_pass(model, draft_max, self.states is not None)
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
        if self.draft_max:
            seq.drafter = NgramDrafter(prompt_ids, self.draft_max)
        if self.states:
            seq.stops = self._stops(prompt_ids)
        self.scheduler.add(seq)
        return seq

    def _stops(self, ids: list[int]) -> list[int]:
        """Where a hybrid sequence's states are kept: the single-sequence engine's
        checkpoint marks and the end of the prompt's first turn (a system prompt that many
        requests share), each at or before the block with the last position."""
        header = self.tokenizer.turn_start_id
        marks = checkpoint_marks(ids, header)
        if ids.count(header) > 1:
            marks.add(ids.index(header, 1))
        size = BLOCK_SIZE
        return sorted({min(m, len(ids) - 1) // size * size for m in marks} - {0})

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
        sampled, logits = self.run(chosen)
        for seq, count in chosen:
            if not seq.admitted:
                seq.admitted = True
                seq.generation.cached = seq.computed
            seq.computed += count - len(seq.drafts)  # a draft counts once it is kept
            self.blocks.register(seq)
            if seq.computed in seq.stops:
                self._keep_state(seq)
        now = time.perf_counter()
        events: list[tuple[Sequence, Event]] = []
        samplers = [seq.generation.sampler for seq in sampled for _ in range(1 + len(seq.drafts))]
        prepared = prepare_rows(samplers, logits)
        first = 0
        for seq in sampled:
            rows = range(first, first + 1 + len(seq.drafts))
            first = rows.stop
            events += self._sample(
                seq, logits[rows.start : rows.stop], prepared[rows.start : rows.stop], now
            )
        return events

    def _sample(self, seq: Sequence, logits, prepared, now: float) -> list[tuple[Sequence, Event]]:
        """Choose ``seq``'s next token from its row of ``logits``, or with drafts as the
        single-sequence engine does: from each row in turn, keeping the drafts chosen (their
        keys and values are computed) up to the first that is not, whose row's token is
        the next pending one."""
        reply, drafts, events, right = seq.generation, list(seq.drafts), [], 0
        seq.drop_drafts()
        timings = reply.timings
        timings.drafted_tokens += len(drafts)
        for row, ready, draft in zip(logits, prepared, [*drafts, None], strict=True):
            token = reply.choose(row, ready)
            self.tokens_sampled += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
                timings.prefill_s = timings.ttft_s = now - seq.arrived
                timings.prefill_tokens = reply.prompt_tokens - reply.cached
            else:
                timings.decode_tokens += 1
            events += [(seq, event) for event in reply.accept(token)]
            if reply.done:
                return events + self._finish(seq, reply.done)
            seq.append(token)
            if seq.drafter is not None:
                seq.drafter.add(token)
            if token != draft:
                break
            seq.computed += 1
            right += 1
            timings.accepted_tokens += 1
        if seq.drafter is not None:
            if drafts:
                self.blocks.register(seq)  # the kept drafts' full blocks
                seq.drafter.kept(right)
            room = min(reply.max_tokens - len(reply.generated), self.max_seq_len - len(seq.ids))
            seq.take_drafts(seq.drafter.propose(room - 1))
        return events

    def run(self, chosen: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """The forward of the scheduled ``(sequence, count)`` pairs, what they need first
        set up; the sequences to sample and their logits (ModelRunner.run's)."""
        for seq, _ in chosen:
            if not seq.prepared:  # (again, after a preemption) e.g. run the vision tower
                seq.generation.timings.vision_s += seq.layout.prepare(self.model, seq.computed)
                if self.states:  # the states at its adopted blocks' end
                    kept = self.states.snapshot_of(seq.last_hash) if seq.computed else None
                    self.cache.copy_state(kept, seq.state)
                seq.prepared = True
        return self.runner.run(chosen)

    def _keep_state(self, seq: Sequence) -> None:
        """Snapshot ``seq``'s states at the end of its block ``computed`` ends."""
        slot = self.states.new_snapshot(seq.last_hash)
        if slot is not None:
            self.cache.copy_state(seq.state, slot)

    def _finish(self, seq: Sequence, reason: str) -> list[tuple[Sequence, Event]]:
        self.scheduler.remove(seq)
        reply = seq.generation
        if seq.first_token_at is not None:
            reply.timings.decode_s = time.perf_counter() - seq.first_token_at
        return [(seq, event) for event in reply.finish(reason)]
