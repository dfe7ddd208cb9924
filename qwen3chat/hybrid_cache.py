"""The cache of a hybrid model (Qwen3-Next, Qwen3.5/3.6): keys and values of its
full-attention layers, and the conv and delta states of its Gated DeltaNet layers.

It keeps kv_cache.Cache's protocol, so the engine drives it as a KVCache. What differs is
``trim``: keys and values can be cut back to any prefix, a recurrent state cannot (it
holds every token it has seen). So the cache keeps *checkpoints*, copies of the states
after a given number of tokens: the engine asks for one at the end of each prompt and
before its last turn's header (``checkpoint``), as llama.cpp's context checkpoints do,
and ``common_prefix`` only offers lengths it can return to (a checkpoint, the live
state, or nothing). A new turn whose prompt starts with the last one's thus prefills
only what is new.

A forward pass moves the states on in place before the engine commits its tokens (a
pipeline stage moves them a piece of the prompt at a time); if it is interrupted the live
state is not trusted again (``_state_len`` None) and only the checkpoints are offered.

The server's engine keeps many sequences in a PagedHybridCache: the attention layers'
keys and values in blocks, and a pool of state slots, one per running sequence and the
rest copies kept at block ends (batch/state_slots.py says which slot is whose).
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache, PagedKVCache, shared_prefix

MAX_CHECKPOINTS = 4  # the newest kept; each is a copy of every linear layer's states


def checkpoint_marks(ids: list, header, after: int = 0) -> set[int]:
    """Where a recurrent state is worth keeping for a prompt ``ids`` (run from ``after``):
    at its end, and before its last turn's ``header`` (the turn start id), where the next
    turn's prompt often parts from this one (a template that renders a past reply without
    its thinking, as Qwen3.5's does, changes what follows the header)."""
    marks = {len(ids)}
    if header in ids[after + 1 :]:
        marks.add(len(ids) - 1 - ids[::-1].index(header))
    return marks


def attention_layers(config) -> int:
    return sum(not config.is_linear_layer(i) for i in range(config.num_hidden_layers))


def linear_states(config, slots: int, dtype, device, make=torch.zeros):
    """Every linear layer's conv history ``[layers, slots, conv, kernel - 1]`` (``dtype``)
    and delta state ``[layers, slots, Hv, dk, dv]`` (float32, as the reference keeps it)."""
    layers = config.num_hidden_layers - attention_layers(config)
    conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim
    conv_dim += config.linear_num_value_heads * config.linear_value_head_dim
    history = config.linear_conv_kernel_dim - 1
    conv = make(layers, slots, conv_dim, history, dtype=dtype, device=device)
    delta = make(
        layers,
        slots,
        config.linear_num_value_heads,
        config.linear_key_head_dim,
        config.linear_value_head_dim,
        dtype=torch.float32,
        device=device,
    )
    return conv, delta


class HybridCache:
    def __init__(self, config, max_seq_len: int, dtype: torch.dtype, kv_dtype, device):
        attention = [i for i in range(config.num_hidden_layers) if not config.is_linear_layer(i)]
        linear = [i for i in range(config.num_hidden_layers) if config.is_linear_layer(i)]
        # Each kind of layer indexes its own stack.
        self._slot = {i: config.layer_slot(i) for i in range(config.num_hidden_layers)}
        self.kv = KVCache(
            len(attention),
            config.num_key_value_heads,
            config.head_dim,
            max_seq_len,
            kv_dtype or dtype,
            device,
        )
        self.conv, self.delta = linear_states(config, 1, dtype, device)
        self._first_linear = linear[0] if linear else None
        self.max_seq_len = max_seq_len
        self.recurrent = True
        self.tokens: list = []
        self._state_len: int | None = 0  # tokens the live states hold; None: not trusted
        self._moved = 0  # tokens the live states have moved through, committed or not
        self._checkpoints: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def quantized(self) -> bool:
        return self.kv.quantized

    def window(self, layer: int, start: int, end: int):
        return self.kv.window(self._slot[layer], start, end)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        return self.kv.update(self._slot[layer], start, k, v)

    def linear_state(self, layer: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one Gated DeltaNet layer's conv and delta states, which the layer moves
        on in place from ``start`` tokens by ``count``."""
        if layer == self._first_linear:
            self.moving(start, count)
        slot = self._slot[layer]
        return self.conv[slot], self.delta[slot]

    def moving(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every linear layer's states ``[layers, 1, ...]``, which a pass is about to move
        on from ``start`` tokens by ``count`` (not trusted again until it commits): the
        states must have moved through exactly ``start``, committed or not."""
        if start != self._moved or self._state_len not in (start, None):
            raise RuntimeError(f"hybrid cache: states hold {self._moved}, not {start}")
        self._state_len, self._moved = None, start + count
        return self.conv, self.delta

    def commit(self, ids: list) -> None:
        self.tokens.extend(ids)
        self._state_len = self._moved = len(self.tokens)

    def checkpoint(self) -> None:
        """Keep a copy of the live states (the engine's marks: engine._checkpoint_marks)."""
        length = self._state_len
        if not length or length in self._checkpoints:
            return
        self._checkpoints[length] = (self.conv.clone(), self.delta.clone())
        while len(self._checkpoints) > MAX_CHECKPOINTS:
            del self._checkpoints[min(self._checkpoints)]

    def common_prefix(self, ids: list) -> int:
        """The longest prefix of ``ids`` that the cache holds and can return to."""
        shared = shared_prefix(self.tokens, ids)
        usable = [n for n in (*self._checkpoints, self._state_len) if n is not None and n <= shared]
        return max(usable, default=0)

    def trim(self, length: int) -> None:
        """Forget every token from ``length`` on (``length`` as ``common_prefix`` gave)."""
        if length != self._state_len:
            if length == 0:
                self.conv.zero_()
                self.delta.zero_()
            else:
                conv, delta = self._checkpoints[length]
                self.conv.copy_(conv)
                self.delta.copy_(delta)
            self._state_len = length
        self._moved = length
        # Checkpoints past the cut describe tokens that are gone.
        for n in [n for n in self._checkpoints if n > length]:
            del self._checkpoints[n]
        del self.tokens[length:]

    @property
    def state_nbytes(self) -> int:
        """The linear layers' states: a decode step reads and writes them all."""
        return self.conv.nbytes + self.delta.nbytes

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.state_nbytes


class PagedHybridCache(PagedKVCache):
    """A PagedKVCache over a hybrid model's attention layers, and ``state_slots`` slots of
    its linear layers' states (``conv``, ``delta``: linear_states' pools). Allocated with
    ``torch.empty`` like the blocks: a slot costs memory once used, and is set (``start``)
    before a sequence runs on it."""

    def __init__(self, config, num_blocks, block_size, state_slots, dtype, kv_dtype, device):
        super().__init__(
            attention_layers(config),
            config.num_key_value_heads,
            config.head_dim,
            num_blocks,
            block_size,
            kv_dtype or dtype,
            device,
        )
        self.state_slots = state_slots
        self.conv, self.delta = linear_states(config, state_slots, dtype, device, torch.empty)

    def copy_state(self, source: int | None, target: int) -> None:
        """Slot ``target`` takes slot ``source``'s states (None: the states of no tokens)."""
        if source is None:
            self.conv[:, target].zero_()
            self.delta[:, target].zero_()
        else:
            self.conv[:, target] = self.conv[:, source]
            self.delta[:, target] = self.delta[:, source]

    @property
    def state_nbytes(self) -> int:
        """One slot's states."""
        return (self.conv.nbytes + self.delta.nbytes) // self.state_slots
