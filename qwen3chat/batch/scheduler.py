"""Which sequences run in the next step, and how many of their positions.

Each step has a budget of token rows. Running sequences go first, oldest first: those
decoding take one row each, those still in their prompt a chunk of what is left; then
waiting sequences join, oldest first, while there is budget and room for ``max_running``.
A sequence that needs a block when none is free takes one from the newest running
sequence, which is preempted: its blocks are freed (its full blocks stay in the prefix
cache) and it waits at the head of the queue to be computed again. A hybrid model's
sequences also hold a state slot while they run (state_slots.py).
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence
from .state_slots import StateSlots


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_running: int,
        token_budget: int,
        states: StateSlots | None = None,
    ):
        self.blocks = blocks
        self.states = states
        self.max_running = max_running
        self.token_budget = token_budget
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out (finished or cancelled) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step's sequences and how many positions of each it runs."""
        chosen: dict[Sequence, int] = {}
        budget = self.token_budget
        # Decoding sequences first, so that a long prompt never holds their tokens back.
        for seq in sorted(self.running, key=lambda s: (s.remaining - len(s.drafts) > 1, s.order)):
            if seq not in self.running:  # preempted for an older one in this loop
                continue
            count = seq.runnable(budget)
            if count == 0:
                break
            while not self.blocks.grow(seq, seq.computed + count):
                victim = self.running[-1]
                budget += chosen.pop(victim, 0)
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                chosen[seq] = count
                budget -= count
        while self.waiting and len(self.running) < self.max_running and budget > 0:
            seq = self.waiting[0]
            if not seq.blocks:
                resumable = self.states.resumable if self.states else None
                seq.computed = self.blocks.adopt_prefix(seq, resumable)
            count = seq.runnable(budget)
            if not self.blocks.grow(seq, seq.computed + count):
                self.blocks.release(seq)  # wait for blocks without holding any
                break
            self.running.append(self.waiting.popleft())
            if self.states:
                seq.state = self.states.take()
            chosen[seq] = count
            budget -= count
        return list(chosen.items())

    def _preempt(self, seq: Sequence) -> None:
        seq.drop_drafts()
        seq.prepared = False
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        if seq.state is not None:
            self.states.give_back(seq.state)
            seq.state = None
