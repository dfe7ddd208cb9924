"""The state slots of a hybrid model's cache (hybrid_cache.py's PagedHybridCache): which
slot each running sequence moves its linear layers' states on in, and snapshots.

A recurrent state cannot be cut back to a prefix as keys and values can, so the prefix
cache alone cannot resume a request after shared blocks. A snapshot is a copy of a
sequence's states where its keys reach the end of a block, known by that block's chain
hash (block_manager.py): a request whose prompt shares those blocks adopts them and starts
from the copy. Snapshots are taken at a sequence's stops (engine.py: the end of its first
turn, before its last turn's header, its prompt's end, each rounded down to a block), the
least recently used given up when a new one needs a slot.
"""

from __future__ import annotations

from collections import OrderedDict


class StateSlots:
    def __init__(self, running: int, snapshots: int):
        """Slots 0..running-1 for running sequences, the next ``snapshots`` for copies."""
        self.free = list(range(running - 1, -1, -1))
        self.spare = list(range(running, running + snapshots))
        self.snapshots: OrderedDict[bytes, int] = OrderedDict()

    def take(self) -> int:
        """A slot for a sequence that starts running (the scheduler admits at most as many
        sequences as there are)."""
        return self.free.pop()

    def give_back(self, slot: int) -> None:
        self.free.append(slot)

    def resumable(self, block_hash: bytes) -> bool:
        """Whether a sequence can start from the end of the block with this hash."""
        return block_hash in self.snapshots

    def snapshot_of(self, block_hash: bytes) -> int:
        """The slot of the snapshot at this block's end (now the most recently used)."""
        self.snapshots.move_to_end(block_hash)
        return self.snapshots[block_hash]

    def new_snapshot(self, block_hash: bytes) -> int | None:
        """A slot to copy the states at this block's end into; None if one is kept."""
        if block_hash in self.snapshots:
            self.snapshots.move_to_end(block_hash)
            return None
        if self.spare:
            slot = self.spare.pop()
        elif self.snapshots:
            slot = self.snapshots.popitem(last=False)[1]
        else:
            return None
        self.snapshots[block_hash] = slot
        return slot
