"""``--split``: which share of each weight a process holds.

tensor: attention by heads (q, k, v by rows, o_proj by columns) and feed-forwards by
their inner width (gate and up by rows, down by columns); each block's output is the sum
over processes, one all-reduce. expert: each process holds a range of each MoE layer's
experts (and a share of a shared expert's width), and everything else whole. auto:
experts for MoE layers, tensor for the rest. pipeline: each process holds a range of the
layers (pipeline.py). The hybrid generation's Gated DeltaNet layers divide as attention
does, by heads: each process holds a share of the key heads and the value heads that
read them, with their states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QwenChatError
from ..quant import QuantizedMatrix
from .world import World

SPLITS = ("auto", "tensor", "expert", "pipeline")


@dataclass(frozen=True)
class Part:
    """Share ``index`` of ``count`` of a checkpoint tensor along ``dim`` (0: experts of a
    stack, -2: rows, the outputs, -1: columns, the inputs), cut as evenly as it divides.
    With ``sections`` (sizes along ``dim``, adding up to it) each section is cut so and the
    share is their pieces in order: a tensor that stacks several things, each divided by
    heads (a Gated DeltaNet's q, k and v rows)."""

    dim: int
    index: int
    count: int
    sections: tuple[int, ...] = ()

    def bounds(self, size: int) -> tuple[int, int]:
        """The share of ``size`` things, one range (a Part without sections)."""
        return size * self.index // self.count, size * (self.index + 1) // self.count

    def ranges(self, size: int) -> list[tuple[int, int]]:
        """The (start, stop) of each piece of the share of ``size`` along ``dim``."""
        if not self.sections:
            return [self.bounds(size)]
        if sum(self.sections) != size:
            raise ValueError(f"sections {list(self.sections)} do not add up to {size}")
        ranges, offset = [], 0
        for section in self.sections:
            start, stop = self.bounds(section)
            ranges.append((offset + start, offset + stop))
            offset += section
        return ranges

    def size(self, size: int) -> int:
        return sum(stop - start for start, stop in self.ranges(size))

    def slices(self, shape) -> list[tuple[slice, ...]]:
        """The indices that take this share's pieces of a tensor of ``shape``."""
        lead = (slice(None),) * (self.dim % len(shape))
        return [(*lead, slice(start, stop)) for start, stop in self.ranges(shape[self.dim])]

    def take(self, value):
        """A copy of this share of ``value``, a tensor or a QuantizedMatrix (not a view:
        the whole may then be freed)."""
        pieces = [
            value.narrow(self.dim, start, stop - start)
            for start, stop in self.ranges(value.shape[self.dim])
        ]
        if isinstance(value, QuantizedMatrix):  # narrow copied them
            return pieces[0] if len(pieces) == 1 else QuantizedMatrix.cat(pieces, self.dim)
        return torch.cat(pieces, dim=self.dim) if len(pieces) > 1 else pieces[0].clone()


def _has_experts(config) -> bool:
    return any(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def check_split(config, split: str, size: int) -> None:
    """That ``config``'s model divides ``size`` ways as ``split`` says, else a one-line
    error naming the flag and what does not divide."""
    if split not in SPLITS:
        raise QwenChatError(f"--split: unknown split {split!r}; use {', '.join(SPLITS)}")
    if split == "pipeline":
        if config.num_hidden_layers < size:
            raise QwenChatError(
                f"--split pipeline: {config.num_hidden_layers} layers among {size} processes; "
                "run at most one process a layer"
            )
        return
    moe = _has_experts(config)
    dense = not all(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    uneven = []
    if split != "expert":
        fields = ["num_attention_heads", *(["intermediate_size"] if dense else [])]
        if config.hybrid:
            fields.append("linear_num_key_heads")
        if moe and split == "tensor":
            fields.append("moe_intermediate_size")
        uneven = [f"{f} = {getattr(config, f)}" for f in fields if getattr(config, f) % size]
        kv = config.num_key_value_heads
        if kv % size and size % kv:  # fewer KV heads than processes: each holds a copy of one
            uneven.append(f"num_key_value_heads = {kv}")
    if moe and split != "tensor" and config.num_experts < size:
        uneven.append(f"num_experts = {config.num_experts} (fewer than the processes)")
    if uneven:
        raise QwenChatError(
            f"--split {split}: {uneven[0]} does not divide among {size} processes; run a "
            "number of processes that divides it, or another --split"
        )


def kv_part(rank: int, size: int, kv_heads: int) -> Part:
    """A process's rows of k_proj and v_proj under the tensor split: its share of the KV
    heads or, with fewer KV heads than processes, the one KV head its query heads read
    (held by several processes, as vLLM does)."""
    if kv_heads >= size:
        return Part(-2, rank, size)
    return Part(-2, rank * kv_heads // size, kv_heads)


@dataclass(frozen=True)
class Sharding:
    """A model run across processes: this process's place and ``--split``."""

    world: World
    split: str

    def apply(self, model) -> dict[str, tuple[int, ...]]:
        """Make ``model`` (on the meta device, before loading) this process's share, once
        it is checked to divide; the whole model's row splits of its fused parameters."""
        check_split(model.config, self.split, self.world.size)
        whole = {
            name: getattr(model.get_submodule(name.rpartition(".")[0]), "split", ())
            or tuple(param.shape[-2:-1])
            for name, param in model.named_parameters()
        }
        model.shard(self.world, self.split)
        return whole


def take_fused(value, split: tuple[int, ...], parts: tuple[Part, ...]):
    """This process's share of a whole weight fused from checkpoint tensors of ``split``
    rows each: each tensor's Part, put together again."""
    if len(parts) == 1:
        return parts[0].take(value)
    pieces, start = [], 0
    for rows, part in zip(split, parts, strict=True):
        pieces.append(part.take(value.narrow(-2, start, rows)))
        start += rows
    if isinstance(value, QuantizedMatrix):
        return QuantizedMatrix.cat(pieces)
    return torch.cat(pieces, dim=-2)
