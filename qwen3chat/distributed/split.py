"""``--split``: which share of each weight a process holds.

tensor: attention by heads (q, k, v by rows, o_proj by columns) and feed-forwards by
their inner width (gate and up by rows, down by columns); each block's output is the sum
over processes, one all-reduce. expert: each process holds a range of each MoE layer's
experts (and a share of a shared expert's width), and everything else whole. auto:
experts for MoE layers, tensor for the rest. pipeline: each process holds a range of the
layers (pipeline.py). The hybrid generation's linear-attention layers do not divide
yet: its models take the expert split (auto, for a MoE one) or the pipeline (auto, for a
dense one).
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
    stack, -2: rows, the outputs, -1: columns, the inputs), cut as evenly as it divides."""

    dim: int
    index: int
    count: int

    def bounds(self, size: int) -> tuple[int, int]:
        return size * self.index // self.count, size * (self.index + 1) // self.count

    def size(self, size: int) -> int:
        start, stop = self.bounds(size)
        return stop - start

    def slices(self, shape) -> tuple[slice, ...]:
        """The index that takes this share of a tensor of ``shape``."""
        start, stop = self.bounds(shape[self.dim])
        return (slice(None),) * (self.dim % len(shape)) + (slice(start, stop),)

    def take(self, value):
        """A copy of this share of ``value``, a tensor or a QuantizedMatrix (not a view:
        the whole may then be freed)."""
        start, stop = self.bounds(value.shape[self.dim])
        share = value.narrow(self.dim, start, stop - start)
        return share.clone() if isinstance(share, torch.Tensor) else share


def _has_experts(config) -> bool:
    return any(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def resolved(config, split: str) -> str:
    """``split`` as ``config``'s layers take it: auto stays auto (experts and tensor) but
    for the hybrid generation (see the module's docstring)."""
    if split != "auto" or not config.hybrid:
        return split
    return "expert" if _has_experts(config) else "pipeline"


def check_split(config, split: str, size: int) -> None:
    """That ``config``'s model divides ``size`` ways as ``split`` says, else a one-line
    error naming the flag and what does not divide."""
    if split not in SPLITS:
        raise QwenChatError(f"--split: unknown split {split!r}; use {', '.join(SPLITS)}")
    if config.vision is not None:
        raise QwenChatError(
            "models that see pictures do not run across processes yet (text models do)"
        )
    if config.hybrid and split == "tensor":
        raise QwenChatError(
            "--split tensor: the hybrid generation's linear-attention layers do not divide "
            "among processes yet; use --split expert (a MoE model) or --split pipeline"
        )
    split = resolved(config, split)
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
        split = resolved(model.config, self.split)
        whole = {
            name: getattr(model.get_submodule(name.rpartition(".")[0]), "split", ())
            or (param.shape[-2],)
            for name, param in model.named_parameters()
            if param.dim() >= 2
        }
        model.shard(self.world, split)
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
