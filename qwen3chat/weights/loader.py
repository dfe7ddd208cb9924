"""Fill a model built on the meta device from a weight source, tensor by tensor."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .. import memory
from ..distributed.split import Part
from ..errors import QwenChatError
from ..memory import HeapTrimmer, gather, return_freed_memory
from ..quant import QuantizedExperts, QuantizedMatrix, QuantizedWeight, QuantSpec, quantize
from .names import FLOAT32, FULL_PRECISION, TABLES, checkpoint_parts, expected_shapes


class WeightSource(Protocol):
    """A checkpoint seen through canonical tensor names (see names.py)."""

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def file_of(self, name: str) -> str: ...

    def read(
        self,
        name: str,
        dtype: torch.dtype,
        kept: bool = False,
        part: Part | None = None,
        layout: tuple[int, int] | None = None,
    ) -> torch.Tensor | QuantizedMatrix:
        """``kept``: the model keeps the tensor as returned (a source may then hand out
        the file's mapped pages); otherwise the caller converts it (quantizes,
        concatenates) and drops it. ``part``: only this process's share of it
        (distributed/split.py), read without the rest where the format allows.
        ``layout``: (bits, group size) that ``--quantize`` gives it (quant_layout), for a
        source that must convert stored blocks it cannot keep as they are."""
        ...


def check_tensors(model: nn.Module, source: WeightSource, where: str) -> None:
    """Every tensor ``model`` (on the meta device) needs present with its shape, and
    nothing unknown: else name the tensor."""
    available = source.shapes()
    expected = expected_shapes(model)
    for name, shape in expected.items():
        if name not in available:
            raise QwenChatError(f"{where}: tensor {name} is missing from the checkpoint")
        if tuple(available[name]) != shape:
            raise QwenChatError(
                f"{where}/{source.file_of(name)}: tensor {name} has shape "
                f"{list(available[name])}, expected {list(shape)} from the config"
            )
    # A tied checkpoint may still carry a copy of the embedding as lm_head: unused; so is
    # the vision tower of a multimodal checkpoint whose text path is all we run.
    allowed_extra = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if model.config.vision is None:
        allowed_extra |= {name for name in available if name.startswith("visual.")}
    for name in sorted(set(available) - set(expected) - allowed_extra):
        raise QwenChatError(
            f"{where}/{source.file_of(name)}: unexpected tensor {name}; "
            "this does not look like a Qwen3 checkpoint for this config"
        )


def load_weights(
    model: nn.Module,
    source: WeightSource,
    dtype: torch.dtype,
    device: torch.device,
    quant: QuantSpec | None = None,
) -> None:
    """Replace every (meta) parameter by its tensor from ``source``, converted on the way.

    A source may hand out a matrix already quantized (GGUF blocks): it stays quantized,
    packed for the device's kernel. With ``quant``, float matrices are quantized here, one
    at a time, so the model never exists in float first.
    """
    heap = HeapTrimmer()
    compute = dtype
    for name, param in list(model.named_parameters()):
        dtype = torch.float32 if FLOAT32.search(name) else compute
        names = checkpoint_parts(name)
        layout = quant_layout(name, param.shape, quant)
        kept = len(names) == 1 and layout is None
        # A model run across processes holds a share of some tensors (their modules' parts).
        shares = getattr(model.get_submodule(name.rpartition(".")[0]), "parts", None)
        shares = shares or (None,) * len(names)
        parts = [
            source.read(part, dtype, kept=kept, part=share, layout=layout)
            for part, share in zip(names, shares, strict=True)
        ]
        if len(parts) == 1:
            weight = parts[0]
        elif all(isinstance(p, torch.Tensor) for p in parts):
            weight = memory.cat(parts, -2)  # rows: output features
        else:
            weight = QuantizedMatrix.cat([_as_quantized(p, parts) for p in parts])
        del parts
        if weight.shape != param.shape:
            raise QwenChatError(
                f"tensor {name}: shape {list(weight.shape)} does not fit {list(param.shape)}"
            )
        place(model, name, weight, dtype, device, quant)
        del weight
        heap.placed(param.numel())
    gather(model)
    return_freed_memory()


def place(
    model: nn.Module,
    name: str,
    weight: torch.Tensor | QuantizedMatrix,
    dtype: torch.dtype,
    device: torch.device,
    quant: QuantSpec | None = None,
) -> None:
    """Make ``weight`` the parameter ``name``: quantized first when ``quant`` asks for it
    (float matrices only), packed for the device's kernel when quantized."""
    if FULL_PRECISION.search(name):
        if isinstance(weight, QuantizedMatrix):
            weight = weight.dequantize(dtype)
    elif isinstance(weight, torch.Tensor):
        layout = quant_layout(name, weight.shape, quant)
        if layout is not None:
            weight = quantize(weight, *layout)
    # A weight here was read, cut or quantized for this parameter alone: its codes are its own.
    if isinstance(weight, QuantizedMatrix) and weight.codes.dim() == 3:
        set_parameter(model, name, QuantizedExperts(weight, dtype, device, owned=True))
    elif isinstance(weight, QuantizedMatrix):
        set_parameter(model, name, QuantizedWeight(weight, dtype, device, owned=True))
    else:
        set_parameter(model, name, weight.to(device))


def quant_layout(
    name: str, shape: tuple[int, ...], quant: QuantSpec | None
) -> tuple[int, int] | None:
    """(bits, group size) that ``--quantize`` gives the float parameter ``name``, or None
    for what stays float: norms, the MoE router, the vision tower, everything without
    ``quant``."""
    if quant is None or len(shape) < 2 or FULL_PRECISION.search(name):
        return None
    return quant.layout(shape[-1], bool(TABLES.search(name)) or name == "lm_head.weight")


def set_parameter(
    model: nn.Module, name: str, value: torch.Tensor | QuantizedWeight | QuantizedExperts
) -> None:
    """Put a tensor (or a quantized weight module) in place of the parameter ``name``."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    delattr(module, leaf)
    if isinstance(value, nn.Module):
        setattr(module, leaf, value)
    else:
        setattr(module, leaf, nn.Parameter(value, requires_grad=False))


def _as_quantized(part, parts) -> QuantizedMatrix:
    """A float part fused with quantized ones (a GGUF file may keep one of them in F16)
    is quantized like its first quantized sibling."""
    if isinstance(part, QuantizedMatrix):
        return part
    like = next(p for p in parts if isinstance(p, QuantizedMatrix))
    return quantize(part, like.bits, like.group_size)
