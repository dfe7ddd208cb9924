"""The KV cache: preallocated for max_seq_len, written in place, trimmed back to a prefix.

``Cache`` is the protocol between the parts: a model's forward reads and writes a layer's
keys and values through ``window``/``update`` (and the native decode step takes a KVCache's
layer-stacked tensors), while the engine tracks what the cache holds through ``tokens``,
``commit``, ``trim`` and ``common_prefix``. Another kind of state (a recurrent layer's) is
another class with the same methods. The server's batched engine keeps many sequences'
keys and values in one PagedKVCache, which each step reaches through a PagedBatch.

Either cache stores rows in the compute dtype, or (``dtype`` torch.int8, ``--kv-cache
int8``) as llama.cpp's q8_0 does: each block of KV_BLOCK values as int8 codes with one
float16 scale, a row of ``head_dim`` values packed as its codes and then its scales' bytes
(``row_bytes``), 0.53 of a bf16 row. Attention reads them dequantized (``readable``);
the native kernels read and write the packed rows themselves, with the same arithmetic.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from . import memory
from .errors import QwenChatError

KV_BLOCK = 32  # values per int8 block and scale


def kv_dtype(name: str) -> torch.dtype | None:
    """What ``--kv-cache NAME`` stores: None (auto, the compute dtype) or torch.int8."""
    return torch.int8 if name == "int8" else None


def row_bytes(head_dim: int) -> int:
    """Elements of one stored row of an int8 cache: the codes, then float16 scales."""
    return head_dim + head_dim // KV_BLOCK * 2


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` as an int8 cache's packed rows ``[..., row_bytes(D)]``: per block of
    KV_BLOCK, scale = max |x| / 127 (float32) and codes round(x / scale), to nearest even
    as the kernels round; the scale is stored as float16 (q8_0's)."""
    blocks = x.float().unflatten(-1, (-1, KV_BLOCK))
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, 0.0)
    codes = torch.round(blocks * inverse).to(torch.int8).flatten(-2)
    return torch.cat((codes, scale.squeeze(-1).half().view(torch.int8)), dim=-1)


def dequantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """An int8 cache's packed rows ``[..., row_bytes(D)]`` as float32 ``[..., D]``."""
    dim = rows.shape[-1] * KV_BLOCK // (KV_BLOCK + 2)
    scales = rows[..., dim:].contiguous().view(torch.float16).float()
    codes = rows[..., :dim].float().unflatten(-1, (-1, KV_BLOCK))
    return (codes * scales[..., None]).flatten(-2)


def stored(x: torch.Tensor, storage: torch.Tensor) -> torch.Tensor:
    """Keys or values ``x`` as ``storage`` (a cache's tensor) holds them."""
    return quantize_rows(x) if storage.dtype == torch.int8 else x


def readable(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A cache's stored keys or values as attention reads them: int8 rows dequantized in
    float32 and rounded once to ``dtype``, the activations' (what a float cache holds)."""
    return dequantize_rows(rows).to(dtype) if rows.dtype == torch.int8 else rows


def stored_width(head_dim: int, dtype: torch.dtype) -> int:
    """The last dimension of a cache that stores ``head_dim`` values a row as ``dtype``."""
    if dtype != torch.int8:
        return head_dim
    if head_dim % KV_BLOCK:
        raise QwenChatError(f"--kv-cache int8 needs a head_dim that is a multiple of {KV_BLOCK}")
    return row_bytes(head_dim)


class Cache(Protocol):
    max_seq_len: int
    tokens: list
    # Whether it holds state that cannot be trimmed back to any prefix, so that the
    # engine asks for checkpoints (hybrid_cache.py).
    recurrent: bool
    quantized: bool  # keys and values stored as int8 rows

    def __len__(self) -> int: ...

    def window(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def commit(self, ids: list) -> None: ...

    def trim(self, length: int) -> None: ...

    def common_prefix(self, ids: list) -> int: ...

    def checkpoint(self) -> None: ...


def shared_prefix(a: list, b: list) -> int:
    """How many leading items ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class KVCache:
    """Keys and values of every layer, ``[layers, 1, kv_heads, slots, head_dim]`` (slots:
    max_seq_len rounded up to whole blocks of 16)
    (the last dimension ``row_bytes(head_dim)`` in an int8 cache).

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
        # Whole blocks of 16 positions (the kernels' paged_block_align), so that the paged
        # kernels take the cache as one block (model/native.py's decode_layers of a few tokens).
        slots = -(-max_seq_len // 16) * 16
        shape = (num_layers, 1, num_kv_heads, slots, stored_width(head_dim, dtype))
        self.k = memory.zeros(shape, dtype, device)
        self.v = memory.zeros(shape, dtype, device)
        self.max_seq_len = max_seq_len
        self.tokens: list[int] = []
        self.recurrent = False

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def quantized(self) -> bool:
        """Keys and values stored as int8 rows (``--kv-cache int8``)."""
        return self.k.dtype == torch.int8

    def window(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's stored keys and values at positions ``start..end-1``."""
        return self.k[layer, :, :, start:end], self.v[layer, :, :, start:end]

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values at ``start``; return all stored ones up to their end."""
        end = start + k.shape[2]
        k_slots, v_slots = self.window(layer, start, end)
        k_slots.copy_(stored(k, k_slots))
        v_slots.copy_(stored(v, v_slots))
        return self.window(layer, 0, end)

    def commit(self, ids: list[int]) -> None:
        self.tokens.extend(ids)

    def trim(self, length: int) -> None:
        del self.tokens[length:]

    def common_prefix(self, ids: list[int]) -> int:
        return shared_prefix(self.tokens, ids)

    def checkpoint(self) -> None:
        """Nothing to keep: keys and values can be trimmed back to any prefix."""

    state_nbytes = 0  # no state besides keys and values (hybrid_cache.py has some)

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values for max_seq_len positions (not the rounding up)."""
        return 2 * self.k[..., : self.max_seq_len, :].nbytes


class PagedKVCache:
    """Keys and values of many sequences in blocks of ``block_size`` tokens, ``[layers,
    kv_heads, num_blocks * block_size, head_dim]``: a token's keys sit at its *slot*, and a
    sequence's block table (batch/block_manager.py) says which blocks hold its positions.

    Allocated as a fresh mapping (memory.zeros): the operating system backs a page only
    when a block in it is first written, so a cache sized for many long sequences costs
    memory as it fills, 2 MiB of each layer's and head's rows at a time where the OS gives
    such pages.
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
        shape = (num_layers, num_kv_heads, num_blocks * block_size, stored_width(head_dim, dtype))
        self.k = memory.zeros(shape, dtype, device)
        self.v = memory.zeros(shape, dtype, device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    quantized = KVCache.quantized

    state_slots = 0  # no per-sequence state besides keys and values (hybrid_cache.py's)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> int:
        return 2 * num_layers * num_kv_heads * stored_width(head_dim, dtype) * dtype.itemsize


class PagedBatch:
    """The token rows of one engine step over a PagedKVCache: several sequences, each a
    run of consecutive rows (a prefill chunk, or the one token of a decode step).

    ``positions [N]`` is each row's position in its sequence, ``row_seq [N]`` its
    sequence's row in ``block_tables [S, max_blocks]`` (int32, padded with zeros), and
    ``logit_rows`` the rows whose next-token logits the step returns. A row's keys and
    values are stored at its slot, then it attends to its sequence's positions up to its
    own. ``store``/``attend`` are the torch path (the reference, and what runs where the
    native kernels do not: model/native.py's ``paged_layers`` does both in its one call).
    ``counts`` lists each sequence's rows, and ``states`` its state slot where the cache
    keeps states (a hybrid model's linear layers).
    """

    def __init__(
        self,
        cache: PagedKVCache,
        positions: torch.Tensor,
        row_seq: torch.Tensor,
        block_tables: torch.Tensor,
        logit_rows: torch.Tensor,
        counts: list[int] | None = None,
        states: list[int] | None = None,
    ):
        self.cache = cache
        self.positions = positions
        self.row_seq = row_seq
        self.block_tables = block_tables
        self.logit_rows = logit_rows
        self.counts = counts
        self.states = states

    @property
    def decode_only(self) -> bool:
        """One row per sequence (each sequence's next token)."""
        return len(self.positions) == len(self.block_tables)

    def row_states(self) -> torch.Tensor:
        """Each row's state slot ``[N]``."""
        states = torch.tensor(self.states, dtype=torch.long, device=self.positions.device)
        return states[self.row_seq]

    def slots(self, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """The slots of ``positions`` in the sequences whose block tables are ``tables``
        (broadcast against each other)."""
        size = self.cache.block_size
        return tables.gather(-1, positions // size).long() * size + positions % size

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The rows' keys and values ``[N, kv_heads, head_dim]`` into their slots."""
        slots = self.slots(self.positions[:, None], self.block_tables[self.row_seq])[:, 0]
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        k_cache[:, slots] = stored(k.transpose(0, 1), k_cache)
        v_cache[:, slots] = stored(v.transpose(0, 1), v_cache)

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
        k = readable(self.cache.k[layer][:, slots], q.dtype).transpose(0, 1)  # [S, kv_heads, L, D]
        v = readable(self.cache.v[layer][:, slots], q.dtype).transpose(0, 1)
        padded = q.new_zeros(seqs, int(counts.max()), heads, dim)
        padded[self.row_seq, index] = q
        # A padding row sees key 0 (its output is dropped), so that no row is all masked.
        seen = torch.zeros(padded.shape[:2], dtype=torch.long, device=q.device)
        seen[self.row_seq, index] = self.positions
        mask = keys[None, None, :] <= seen[:, :, None]
        out = F.scaled_dot_product_attention(
            padded.transpose(1, 2).to(k.dtype), k, v, attn_mask=mask[:, None], enable_gqa=True
        )
        return out.transpose(1, 2)[self.row_seq, index].reshape(rows, heads * dim).to(q.dtype)
