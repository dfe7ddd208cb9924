"""The KV cache: preallocated for max_seq_len, written in place, trimmed back to a prefix.

``Cache`` is the protocol between the parts: a model's forward reads and writes a layer's
keys and values through ``window``/``update`` (and the native decode step takes a KVCache's
layer-stacked tensors), while the engine tracks what the cache holds through ``tokens``,
``commit``, ``trim`` and ``common_prefix``. Another kind of state (a recurrent layer's, a
paged batch's) is another class with the same methods.
"""

from __future__ import annotations

from typing import Protocol

import torch


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
