"""The paged KV cache's blocks: reference counts, free blocks, and the prefix cache.

A block holds ``block_size`` positions of one sequence, or of several that share them: a
full block is known by a hash chained over every key up to its end, so a request whose
prompt starts with the same tokens (a system prompt, a conversation's history) adopts the
blocks instead of computing them again. A block nobody holds stays in the cache, findable
by its hash, until a new block is needed: blocks without a hash are reused first, then
hashed ones, least recently freed first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from .sequence import Sequence


def chain_hash(previous: bytes | None, keys: list) -> bytes:
    """A block's hash: its keys and everything before them (a digest, not Python's hash,
    so that no request can make its block collide with another's)."""
    return hashlib.blake2b(repr((previous, keys)).encode(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refs = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def in_use(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def adopt_prefix(self, seq: Sequence, resumable=None) -> int:
        """Give ``seq`` the cached blocks of its leading full blocks; the positions adopted.

        The block with the last position is never adopted: that position runs, so that
        there are logits, and must not write into a block others read. ``resumable(hash)``
        says whether a sequence can start after the block with that hash (a hybrid model's
        states, state_slots.py): then the adopted blocks end at the last such block."""
        size = self.block_size
        found: list[tuple[bytes, int]] = []
        h = seq.last_hash
        for j in range((len(seq.keys) - 1) // size):
            h = chain_hash(h, seq.keys[j * size : (j + 1) * size])
            block = self.by_hash.get(h)
            if block is None:
                break
            found.append((h, block))
        while resumable is not None and found and not resumable(found[-1][0]):
            found.pop()
        for h, block in found:
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
            seq.blocks.append(block)
            seq.last_hash, seq.hashed = h, len(seq.blocks)
        return len(seq.blocks) * size

    def grow(self, seq: Sequence, tokens: int) -> bool:
        """Enough blocks for ``seq``'s first ``tokens`` positions; False (and nothing
        taken) when there are not enough free ones."""
        needed = self.blocks_for(tokens) - len(seq.blocks)
        if needed > len(self.free):
            return False
        for _ in range(needed):
            block, _ = self.free.popitem(last=False)
            if self.hash_of[block] is not None:
                del self.by_hash[self.hash_of[block]]
                self.hash_of[block] = None
            self.refs[block] = 1
            seq.blocks.append(block)
        return True

    def register(self, seq: Sequence) -> None:
        """Make ``seq``'s newly completed blocks findable by their hash."""
        size = self.block_size
        while (seq.hashed + 1) * size <= seq.computed:
            j = seq.hashed
            h = chain_hash(seq.last_hash, seq.keys[j * size : (j + 1) * size])
            block = seq.blocks[j]
            # Two requests may compute the same block at once: the first one stays known.
            if h not in self.by_hash and self.hash_of[block] is None:
                self.by_hash[h] = block
                self.hash_of[block] = h
            seq.last_hash, seq.hashed = h, j + 1

    def release(self, seq: Sequence) -> None:
        """``seq`` no longer holds its blocks (finished, cancelled or preempted)."""
        for block in reversed(seq.blocks):  # its last blocks are the first to go
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
                if self.hash_of[block] is None:
                    self.free.move_to_end(block, last=False)
        seq.blocks, seq.hashed, seq.last_hash, seq.computed = [], 0, None, 0
