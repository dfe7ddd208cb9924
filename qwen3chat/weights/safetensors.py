"""SafeTensors checkpoints: one file or shards with model.safetensors.index.json.

Block-FP8 checkpoints (``quant_method: fp8``, e.g. Qwen3-VL-2B-Thinking-FP8) are read as
floats: each float8_e4m3fn weight is multiplied by its ``weight_scale_inv`` tensor, one
scale per ``weight_block_size`` block (128x128), as it is read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..distributed.split import Part
from ..errors import QwenChatError
from .names import (
    IGNORED,
    ExpertStacks,
    KeyHeadPart,
    canonical_from_hf,
    expert_stacks,
    fp8_scale_of,
    hybrid_converts,
    hybrid_from_hf,
    hybrid_shape,
    key_head_parts,
)

INDEX_NAME = "model.safetensors.index.json"
# What quantization_config.weight_block_size defaults to in transformers' FP8 support.
FP8_BLOCK_SIZE = (128, 128)


class SafeTensorsSource:
    """Canonical tensor name -> tensor, read lazily from memory-mapped files.

    A tensor the model keeps as it is stored stays a view of its file's pages, one mapping
    per file for all of them, as llama.cpp and transformers map weights: nothing is
    copied, and the page cache holds it once. A read for conversion (say bf16 -> float32,
    or rows concatenated) opens the file briefly instead, so that the pages read leave
    memory with the temporary: loading peaks at the final weights plus one tensor, never
    at the file plus the weights. Per-expert tensors are read as one stack;
    a tensor holding whole stacks (Qwen3-VL-MoE, names.EXPERT_STACKS) is read one stack
    at a time, transposed as it is converted when the file stores it as ``x @ W``.
    """

    def __init__(self, directory: Path, config_json: Mapping | None = None, config=None):
        """``config``: the model's, where a hybrid-generation checkpoint holds tensors we
        read converted (names.hybrid_from_hf) or split (names.key_head_parts)."""
        self.directory = directory
        self.hybrid = config is not None and config.hybrid
        # config.json's raw fields, as loading.py read them (FP8 blocks, who wrote it).
        self.config_json = config_json or {}
        # Canonical name -> its (file, checkpoint name) slices: one, or one per expert.
        self._slices: dict[str, dict[int | None, tuple[Path, str]]] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        # Checkpoint name of an FP8 weight -> the (file, name) of its block scales.
        self._fp8_scales: dict[str, tuple[Path, str]] = {}
        # Canonical stack -> (which slice, stored transposed) of the checkpoint tensor
        # that holds it (names.EXPERT_STACKS).
        self._stack_part: dict[str, tuple[int, bool]] = {}
        # Canonical part -> how to take it from a per-key-head fused tensor (Qwen3-Next).
        self._key_head_part: dict[str, KeyHeadPart] = {}
        # File -> its open handle for kept tensors, which share that one mapping.
        self._kept_mappings: dict[Path, safe_open] = {}
        stacks = []
        for file in self._files():
            try:
                with safe_open(file, framework="pt") as f:
                    for hf_name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                        if IGNORED.search(hf_name):
                            continue
                        scaled = fp8_scale_of(hf_name)
                        if scaled is not None:
                            self._fp8_scales[scaled] = (file, hf_name)
                            continue
                        name, expert = canonical_from_hf(hf_name)
                        shape = tuple(f.get_slice(hf_name).get_shape())
                        if self.hybrid:
                            shape = hybrid_shape(name, shape)
                        held = expert_stacks(name)
                        if held:
                            stacks.append((file, hf_name, shape, held))
                            continue
                        key_head = key_head_parts(name, config) if self.hybrid else {}
                        for part, take in key_head.items():
                            self._slices[part] = {None: (file, hf_name)}
                            self._shape[part] = (take.rows, shape[-1])
                            self._key_head_part[part] = take
                        if key_head:
                            continue
                        self._slices.setdefault(name, {})[expert] = (file, hf_name)
                        if self._shape.setdefault(name, shape) != shape:
                            raise QwenChatError(
                                f"{file}: tensor {hf_name} has shape {list(shape)}, other "
                                f"experts of its layer {list(self._shape[name])}"
                            )
            except (SafetensorError, OSError) as e:
                raise QwenChatError(f"{file}: not a readable safetensors file ({e})") from None
        for name, slices in self._slices.items():
            if None in slices:
                continue
            if sorted(slices) != list(range(len(slices))):
                missing = min(set(range(len(slices))) - set(slices))
                raise QwenChatError(
                    f"{directory}: expert {missing} of {name} is missing from the checkpoint"
                )
            self._shape[name] = (len(slices), *self._shape[name])
        for stack in stacks:  # once the hidden size (embed_tokens' width) is known
            self._add_stack(*stack)
        self._fp8_block = (
            _fp8_block_size(self.config_json, directory / "config.json")
            if self._fp8_scales
            else FP8_BLOCK_SIZE
        )

    def _add_stack(
        self, file: Path, hf_name: str, shape: tuple[int, ...], held: ExpertStacks
    ) -> None:
        """A 3-D tensor holding the stacks ``held.parts`` as equal slices of its output
        dim: ``[experts, out, in]``, or transposed ``[experts, in, out]`` as the hub's
        Qwen3-VL-MoE files hold them, told apart by where the hidden size (embed_tokens'
        width) is, as transformers 5 tells them apart by the parameter's shape."""
        parts = held.parts
        hidden = self._shape.get("embed_tokens.weight", (0, 0))[-1]
        rows, cols = shape[-2:] if len(shape) == 3 else (0, 0)
        if rows != cols:
            transposed = (rows if held.hidden_is_input else cols) == hidden
        else:  # 2 * moe_inter == hidden: transformers 5 keeps what it finds, 4.x wrote x @ W
            transposed = _saved_by_transformers_4(self.config_json)
        out = cols if transposed else rows
        if len(shape) != 3 or out % len(parts):
            raise QwenChatError(
                f"{file}: tensor {hf_name} has shape {list(shape)}; expected [experts, out, in] "
                f"or [experts, in, out] with out split in {len(parts)} ({', '.join(parts)})"
            )
        inner = rows if transposed else cols
        for i, part in enumerate(parts):
            self._slices[part] = {None: (file, hf_name)}
            self._shape[part] = (shape[0], out // len(parts), inner)
            self._stack_part[part] = (i, transposed)

    def _files(self) -> list[Path]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted({self.directory / f for f in weight_map.values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise QwenChatError(f"{index}: not a valid shard index ({e})") from None
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise QwenChatError(
                    f"{index}: shard {missing[0]} is missing; download the whole model again"
                )
            return files
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise QwenChatError(f"{self.directory}: no *.safetensors files found")
        return files

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shape)

    def file_of(self, name: str) -> str:
        return next(iter(self._slices[name].values()))[0].name

    def read(
        self,
        name: str,
        dtype: torch.dtype,
        kept: bool = False,
        part: Part | None = None,
        layout: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The tensor converted to ``dtype`` (a float tensor: ``layout`` is the loader's to
        apply). ``kept``: the model keeps it as returned, so where no conversion is needed
        it is a view of the file's lasting mapping; otherwise a view of a brief one or
        memory of its own. ``part``: only that share, the rest never read (a share of the
        experts reads only theirs)."""
        slices = self._slices[name]
        if kept and part is None and None in slices:
            mapped = self._mapped_view(name, slices[None], dtype)
            if mapped is not None:
                return mapped
        shape = list(self._shape[name])
        if part is not None:
            shape[part.dim] = part.size(shape[part.dim])
        # A share of a stack of per-expert tensors: only its experts, each whole, or a
        # share of each.
        first, each = 0, part
        if part is not None and None not in slices and part.dim % len(shape) == 0:
            first, stop = part.bounds(len(slices))
            slices = {e: slices[e] for e in range(first, stop)}
            each = None
        stacked = None if None in slices else torch.empty(shape, dtype=dtype)
        by_file: dict[Path, list[tuple[int | None, str]]] = {}
        for expert, (file, hf_name) in slices.items():
            by_file.setdefault(file, []).append((expert, hf_name))
        for file, names in by_file.items():
            try:
                with safe_open(file, framework="pt") as f:
                    for expert, hf_name in names:
                        tensor = self._get(f, name, hf_name, each)
                        tensor = tensor.to(dtype=dtype, memory_format=torch.contiguous_format)
                        if stacked is None:
                            return tensor
                        stacked[expert - first] = tensor
            except (SafetensorError, OSError, RuntimeError) as e:
                raise QwenChatError(f"{file}: cannot read {name} ({e})") from None
        return stacked

    def _mapped_view(
        self, name: str, where: tuple[Path, str], dtype: torch.dtype
    ) -> torch.Tensor | None:
        """``name`` as a view of its file's lasting mapping, or None where it must be
        converted first (another dtype, FP8, a slice of an expert stack). Making the view
        reads none of its pages, so a None leaves nothing of the tensor in memory."""
        file, hf_name = where
        if name in self._stack_part or name in self._key_head_part or hf_name in self._fp8_scales:
            return None
        if self.hybrid and hybrid_converts(name):
            return None
        try:
            if file not in self._kept_mappings:
                self._kept_mappings[file] = safe_open(file, framework="pt")
            tensor = self._kept_mappings[file].get_tensor(hf_name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise QwenChatError(f"{file}: cannot read {name} ({e})") from None
        return tensor if tensor.dtype == dtype and tensor.is_contiguous() else None

    def _get(self, f, name: str, hf_name: str, part: Part | None) -> torch.Tensor:
        """``name`` from the checkpoint tensor ``hf_name``, converted (FP8 dequantized,
        the hybrid generation's forms), or its share ``part``: a plain tensor's read
        alone, any other's cut from the whole."""
        plain = not (
            name in self._key_head_part
            or name in self._stack_part
            or hf_name in self._fp8_scales
            or (self.hybrid and hybrid_converts(name))
        )
        if part is not None and plain:
            sliced = f.get_slice(hf_name)
            pieces = [sliced[index] for index in part.slices(tuple(sliced.get_shape()))]
            return torch.cat(pieces, dim=part.dim) if len(pieces) > 1 else pieces[0]
        tensor = self._whole(f, name, hf_name)
        if self.hybrid:
            tensor = hybrid_from_hf(name, tensor)
        return tensor if part is None else part.take(tensor)

    def _whole(self, f, name: str, hf_name: str) -> torch.Tensor:
        """The checkpoint tensor ``hf_name`` as floats (FP8 dequantized); for one holding
        expert stacks, only ``name``'s slice of it, as ``[experts, out, in]`` (a view)."""
        if name in self._key_head_part:
            return f.get_tensor(hf_name)[self._key_head_part[name].row_index()]
        stack = self._stack_part.get(name)
        scaled = hf_name in self._fp8_scales
        if stack is not None:
            part, transposed = stack
            width = self._shape[name][-2]
            # The slice of the output dim: the last one when stored transposed.
            index = (slice(None),) * (2 if transposed else 1)
            index += (slice(part * width, (part + 1) * width),)
            if not scaled:  # reads only the slice
                tensor = f.get_slice(hf_name)[index]
                return tensor.transpose(-2, -1) if transposed else tensor
        tensor = f.get_tensor(hf_name)
        if scaled:
            tensor = dequantize_fp8(tensor, self._read_scale(hf_name), self._fp8_block, hf_name)
        if stack is None:
            return tensor
        return tensor[index].transpose(-2, -1) if transposed else tensor[index]

    def _read_scale(self, weight_name: str) -> torch.Tensor:
        file, name = self._fp8_scales[weight_name]
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(name)


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str
) -> torch.Tensor:
    """``weight * scale_inv`` in float32, each scale covering one ``block`` of the last two
    dims (the blocks at the right and bottom edges may be partial)."""
    rows, cols = weight.shape[-2:]
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_inv.shape[-2:]) != grid:
        raise QwenChatError(
            f"{name}: FP8 scales have shape {list(scale_inv.shape)}, expected {list(grid)} "
            f"for {block[0]}x{block[1]} blocks of a {rows}x{cols} weight"
        )
    scales = scale_inv.float().repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)
    return weight.float() * scales[..., :rows, :cols]


def _fp8_block_size(config_json: Mapping, source: Path) -> tuple[int, int]:
    """quantization_config.weight_block_size from config.json (128x128 if absent)."""
    quantization = config_json.get("quantization_config") or {}
    block = quantization.get("weight_block_size") or FP8_BLOCK_SIZE
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise QwenChatError(
            f"{source}: quantization_config.weight_block_size {block} is not two positive integers"
        )
    return int(block[0]), int(block[1])


def _saved_by_transformers_4(config_json: Mapping) -> bool:
    """Whether config.json says transformers 4.x wrote the checkpoint."""
    try:
        return int(str(config_json.get("transformers_version", "")).split(".")[0]) < 5
    except ValueError:
        return False
