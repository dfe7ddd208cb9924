"""One request in the batched engine: what its cache must hold, and its reply."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from ..drafting import NgramDrafter
from ..generation import Generation
from ..model.qwen3 import TextLayout

_arrivals = itertools.count()


@dataclass(eq=False)
class Sequence:
    """``ids`` is the prompt, then each generated id once it is fed back; ``keys`` the same
    positions as the prefix cache knows them (a prompt layout's keys, then the generated
    ids). ``computed`` leading positions have their keys and values in ``blocks``; a step
    runs some of the rest, and when it reaches the end its logits choose the next token."""

    ids: list[int]
    layout: TextLayout  # the model's prompt layout (what a picture adds to its ids)
    generation: Generation
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    hashed: int = 0  # leading full blocks registered with the prefix cache
    last_hash: bytes | None = None  # the hash of block hashed - 1 (hashes chain)
    admitted: bool = False  # has run at least once (the cached prefix is counted then)
    prepared: bool = False  # the layout has prepared what positions from computed need
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    order: int = field(default_factory=lambda: next(_arrivals))
    # A hybrid model's: the slot its states move on in while it runs (state_slots.py),
    # and the positions at which a step stops so that they can be kept (engine.py).
    state: int | None = None
    stops: list[int] = field(default_factory=list)
    # With --draft ngram: the guesses that follow the pending token at the end of ``ids``
    # (and ``keys``) until a step checks them (engine.py).
    drafter: NgramDrafter | None = None
    drafts: list[int] = field(default_factory=list)
    keys: list = field(init=False)

    def __post_init__(self):
        self.keys = list(self.layout.keys)

    @property
    def remaining(self) -> int:
        """Positions whose keys and values are still to be computed."""
        return len(self.ids) - self.computed

    def runnable(self, budget: int) -> int:
        """Positions the next step may run: what remains, within ``budget``, up to the
        next stop. Drafts that do not fit are dropped: they are checked in one step."""
        count = min(self.remaining, budget)
        self.drop_drafts(min(len(self.drafts), self.remaining - count))
        end = next((s for s in self.stops if self.computed < s < self.computed + count), None)
        return count if end is None else end - self.computed

    def append(self, token: int) -> None:
        self.ids.append(token)
        self.keys.append(token)

    def take_drafts(self, drafts: list[int]) -> None:
        self.drafts = drafts
        self.ids += drafts
        self.keys += drafts

    def drop_drafts(self, count: int | None = None) -> None:
        """Forget the last ``count`` drafts (all by default)."""
        count = len(self.drafts) if count is None else count
        if count:
            del self.ids[-count:], self.keys[-count:], self.drafts[-count:]
