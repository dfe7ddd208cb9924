"""The KV cache: preallocated for max_seq_len, written in place, trimmed back to a prefix.

``Cache`` is the protocol between the parts: a model's forward reads and writes a layer's
keys and values through ``window``/``update`` (and the native decode step takes a KVCache's
layer-stacked tensors), while the engine tracks what the cache holds through ``tokens``,
``commit``, ``trim`` and ``common_prefix``. Another kind of state (a recurrent layer's) is
another class with the same methods. The server's batched engine keeps many sequences'
keys and values in one PagedKVCache, which each step reaches through a PagedBatch.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Cache(Protocol):
    max_seq_len: int
    tokens: list

    def __len__(self) -> int: ...

    def window(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def commit(self, ids: list) -> None: ...

    def trim(self, length: int) -> None: ...

    def common_prefix(self, ids: list) -> int: ...


class KVCache:
    """Keys and values of every layer, ``[layers, 1, kv_heads, max_seq_len, head_dim]``.

    ``tokens`` lists the ids whose keys/values are stored, in order (a picture's tokens
    as ``(id, digest)`` pairs, so another picture never matches them); the engine commits
    them only after a forward pass succeeds, so an interrupted pass never leaves the cache
    claiming positions it did not finish. Trimming just forgets the tail: later writes
    overwrite it, nothing is reallocated.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (num_layers, 1, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def window(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's keys and values at positions ``start..end-1``."""
        return self.k[layer, :, :, start:end], self.v[layer, :, :, start:end]

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values at ``start``; return all keys/values up to their end."""
        end = start + k.shape[2]
        k_slots, v_slots = self.window(layer, start, end)
        k_slots.copy_(k)
        v_slots.copy_(v)
        return self.window(layer, 0, end)

    def commit(self, ids: list[int]) -> None:
        self.tokens.extend(ids)

    def trim(self, length: int) -> None:
        del self.tokens[length:]

    def common_prefix(self, ids: list[int]) -> int:
        n = 0
        for cached, new in zip(self.tokens, ids, strict=False):
            if cached != new:
                break
            n += 1
        return n

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class PagedKVCache:
    """Keys and values of many sequences in blocks of ``block_size`` tokens, ``[layers,
    kv_heads, num_blocks * block_size, head_dim]``: a token's keys sit at its *slot*, and a
    sequence's block table (batch/block_manager.py) says which blocks hold its positions.

    Allocated with ``torch.empty``: the operating system backs a page only when a block in
    it is first written, so a cache sized for many long sequences costs memory as it fills.
    Nothing reads a slot before it is written (attention reads only a sequence's earlier
    positions)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize


class PagedBatch:
    """The token rows of one engine step over a PagedKVCache: several sequences, each a
    run of consecutive rows (a prefill chunk, or the one token of a decode step).

    ``positions [N]`` is each row's position in its sequence, ``row_seq [N]`` its
    sequence's row in ``block_tables [S, max_blocks]`` (int32, padded with zeros), and
    ``logit_rows`` the rows whose next-token logits the step returns. A row's keys and
    values are stored at its slot, then it attends to its sequence's positions up to its
    own. ``store``/``attend`` are the torch path (the reference, and what runs where the
    native kernels do not: model/native.py's ``paged_layers`` does both in its one call).
    """

    def __init__(
        self,
        cache: PagedKVCache,
        positions: torch.Tensor,
        row_seq: torch.Tensor,
        block_tables: torch.Tensor,
        logit_rows: torch.Tensor,
    ):
        self.cache = cache
        self.positions = positions
        self.row_seq = row_seq
        self.block_tables = block_tables
        self.logit_rows = logit_rows

    def slots(self, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """The slots of ``positions`` in the sequences whose block tables are ``tables``
        (broadcast against each other)."""
        size = self.cache.block_size
        return tables.gather(-1, positions // size).long() * size + positions % size

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The rows' keys and values ``[N, kv_heads, head_dim]`` into their slots."""
        slots = self.slots(self.positions[:, None], self.block_tables[self.row_seq])[:, 0]
        self.cache.k[layer][:, slots] = k.transpose(0, 1)
        self.cache.v[layer][:, slots] = v.transpose(0, 1)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Each row's attention ``q [N, heads, head_dim] -> [N, heads * head_dim]``, over its
        sequence's keys up to its position: one SDPA call over the sequences, each padded
        to the batch's most rows and longest context and masked."""
        rows, heads, dim = q.shape
        seqs = self.block_tables.shape[0]
        counts = torch.bincount(self.row_seq, minlength=seqs)
        firsts = counts.cumsum(0) - counts
        index = torch.arange(rows, device=q.device) - firsts[self.row_seq]  # row in its seq
        ends = self.positions[firsts + counts - 1] + 1  # each sequence's context
        keys = torch.arange(int(ends.max()), device=q.device)
        slots = self.slots(keys.expand(seqs, -1), self.block_tables)  # [S, L]
        k = self.cache.k[layer][:, slots].transpose(0, 1)  # [S, kv_heads, L, D]
        v = self.cache.v[layer][:, slots].transpose(0, 1)
        padded = q.new_zeros(seqs, int(counts.max()), heads, dim)
        padded[self.row_seq, index] = q
        # A padding row sees key 0 (its output is dropped), so that no row is all masked.
        seen = torch.zeros(padded.shape[:2], dtype=torch.long, device=q.device)
        seen[self.row_seq, index] = self.positions
        mask = keys[None, None, :] <= seen[:, :, None]
        out = F.scaled_dot_product_attention(
            padded.transpose(1, 2), k, v, attn_mask=mask[:, None], enable_gqa=True
        )
        return out.transpose(1, 2)[self.row_seq, index].reshape(rows, heads * dim)
