"""Weight-only quantized matrices: integer codes with per-group scales, and their matmuls.

One representation serves both sources of quantized weights: GGUF blocks (Q8_0, Q4_0, …)
converted at load, and float weights quantized at load (``--quantize``). A matrix is
``QuantizedMatrix`` while it is assembled (rows can be concatenated, e.g. q/k/v into
qkv), then ``QuantizedWeight``, the module that holds it packed for the device's kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .device import CPU_FLOAT32_MIN_ROWS, matmul_dtype
from .errors import QwenChatError
from .kernels import q8_linear


@dataclass
class QuantizedMatrix:
    """``bits`` 8: w = code * scale, codes int8 in [-127, 127] (symmetric).
    ``bits`` 4: w = (code - 8) * scale + zero, codes uint8 in [0, 15].
    Scales and zeros are float32 ``[rows, cols / group_size]``. A stack of expert
    matrices has a leading expert dimension on all three: ``[experts, rows, …]``."""

    bits: int
    group_size: int
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.codes.unflatten(-1, (-1, self.group_size)).float()
        if self.bits == 4:
            codes = codes - 8
        w = codes * self.scales[..., None]
        if self.zeros is not None:
            w = w + self.zeros[..., None]
        return w.flatten(-2).to(dtype)

    def expert(self, index: int) -> QuantizedMatrix:
        """One matrix of a stack of experts."""
        zeros = None if self.zeros is None else self.zeros[index]
        return QuantizedMatrix(
            self.bits, self.group_size, self.codes[index], self.scales[index], zeros
        )

    def reshape(self, *shape: int) -> QuantizedMatrix:
        """The same weights viewed as ``shape`` (e.g. ``[E*R, C]`` as ``[E, R, C]``);
        the last dimension (the inputs) stays."""
        lead = shape[:-1]
        zeros = None if self.zeros is None else self.zeros.reshape(*lead, -1)
        return QuantizedMatrix(
            self.bits,
            self.group_size,
            self.codes.reshape(shape),
            self.scales.reshape(*lead, -1),
            zeros,
        )

    def to_int8(self) -> QuantizedMatrix:
        """The same matrix as int8: exact when the int4 zeros are all 0 (GGUF Q4_0)."""
        if self.bits == 8:
            return self
        if not self.zeros.any():
            codes = self.codes.to(torch.int8) - 8
            return QuantizedMatrix(8, self.group_size, codes, self.scales)
        return quantize(self.dequantize(), 8, self.group_size)

    @staticmethod
    def cat(parts: list[QuantizedMatrix]) -> QuantizedMatrix:
        """Concatenate along rows (output features; per expert for stacks of experts)."""
        first = parts[0]
        if any((p.bits, p.group_size) != (first.bits, first.group_size) for p in parts):
            # Mixed formats (a GGUF file may quantize q and v differently): requantize.
            return quantize(
                torch.cat([p.dequantize() for p in parts], dim=-2), first.bits, first.group_size
            )
        zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts], dim=-2)
        return QuantizedMatrix(
            first.bits,
            first.group_size,
            torch.cat([p.codes for p in parts], dim=-2),
            torch.cat([p.scales for p in parts], dim=-2),
            zeros,
        )


@dataclass(frozen=True)
class QuantSpec:
    """``--quantize`` at load. Linear layers get ``bits``: int8 with one scale per output
    channel, or int4 with a scale and zero per ``group_size`` inputs. Embedding tables and
    the LM head (151936 rows, a quarter of a small model) are always int8 per channel:
    their rows must be readable, and int4 costs them too much accuracy."""

    bits: int
    group_size: int = 32

    @classmethod
    def parse(cls, name: str, group_size: int = 32) -> QuantSpec | None:
        if name == "none":
            return None
        bits = {"int8": 8, "int4": 4}.get(name)
        if bits is None:
            raise QwenChatError(f"--quantize: unknown {name!r}; use none, int8 or int4")
        if group_size <= 0 or group_size % 8:
            raise QwenChatError(f"--group-size: {group_size} must be a positive multiple of 8")
        return cls(bits, group_size)

    def layout(self, in_features: int, table: bool) -> tuple[int, int]:
        """(bits, group size) for a matrix with ``in_features`` columns."""
        if table or self.bits == 8:
            return 8, in_features
        if in_features % self.group_size:
            raise QwenChatError(
                f"--group-size {self.group_size} does not divide the layer width {in_features}"
            )
        return 4, self.group_size

    def __str__(self) -> str:
        return "int8" if self.bits == 8 else f"int4 (group {self.group_size})"


# Rows quantized at a time: bounds the float32 working copy (a 151936-row embedding
# would otherwise need one as large as the whole matrix in float32).
_QUANTIZE_ROWS = 4096


def quantize(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedMatrix:
    """Round-to-nearest quantization of a float matrix (or a stack of expert matrices):
    int8 symmetric, int4 asymmetric."""
    if bits not in (4, 8):
        raise ValueError(f"unsupported bit width {bits}")
    if weight.dim() > 2:
        return quantize(weight.reshape(-1, weight.shape[-1]), bits, group_size).reshape(
            *weight.shape
        )
    rows, cols = weight.shape
    if cols % group_size:
        raise ValueError(f"{cols} columns are not a multiple of group size {group_size}")
    groups = cols // group_size
    on = weight.device
    codes = torch.empty(rows, cols, dtype=torch.int8 if bits == 8 else torch.uint8, device=on)
    scales = torch.empty(rows, groups, device=on)
    zeros = torch.empty(rows, groups, device=on) if bits == 4 else None
    for start in range(0, rows, _QUANTIZE_ROWS):
        block = slice(start, start + _QUANTIZE_ROWS)
        w = weight[block].float().view(-1, groups, group_size)
        if bits == 8:
            scale = w.abs().amax(-1).clamp(min=1e-10) / 127
            q = (w / scale[..., None]).round().clamp(-127, 127)
        else:
            low, high = w.amin(-1), w.amax(-1)
            scale = ((high - low) / 15).clamp(min=1e-10)
            # w = (code - 8) * scale + zero with code 0 at the group minimum.
            zeros[block] = low + 8 * scale
            q = ((w - low[..., None]) / scale[..., None]).round().clamp(0, 15)
        codes[block] = q.view(-1, cols).to(codes.dtype)
        scales[block] = scale
    return QuantizedMatrix(bits, group_size, codes, scales, zeros)


def random_quantized(
    shape: tuple[int, ...],
    bits: int,
    group_size: int,
    std: float,
    generator: torch.Generator,
    device: torch.device,
) -> QuantizedMatrix:
    """Random weights of standard deviation ``std`` drawn directly as codes (uniform over
    the code range) and one scale: for random-weight presets, several times faster than
    drawing floats and quantizing them, and never holding the float matrix."""
    lead, cols = tuple(shape[:-1]), shape[-1]
    if bits == 8:
        codes = torch.empty(shape, dtype=torch.int8, device=device)
        codes.random_(-127, 128, generator=generator)
    else:
        codes = torch.empty(shape, dtype=torch.uint8, device=device)
        codes.random_(0, 16, generator=generator)
    levels = 255 if bits == 8 else 16
    scale = std / math.sqrt((levels**2 - 1) / 12)  # a uniform integer's std
    scales = torch.full((*lead, cols // group_size), scale, device=device)
    # int4 codes minus 8 average -0.5: the zero point centres them.
    zeros = None if bits == 8 else scales * 0.5
    return QuantizedMatrix(bits, group_size, codes, scales, zeros)


class QuantizedWeight(nn.Module):
    """A quantized matrix packed for the fused weight-only kernels torch ships for the CPU
    (``_weight_int8pack_mm`` for per-channel int8, ``_weight_int4pack_mm_for_cpu`` for
    int4); other layouts and devices dequantize per matmul, which is correct everywhere."""

    def __init__(
        self,
        matrix: QuantizedMatrix,
        dtype: torch.dtype,
        device: torch.device,
        row_lookup: bool = False,
    ):
        super().__init__()
        if row_lookup and matrix.bits == 4:
            # Embedding tables need rows back, which the packed int4 layout cannot give:
            # such a table (tied to the LM head or not) is kept as int8 instead.
            matrix = matrix.to_int8()
        self.bits = matrix.bits
        self.group_size = matrix.group_size
        self.out_features, self.in_features = matrix.shape
        self.dtype = dtype
        self.int4_kernel = matrix.bits == 4 and device.type == "cpu"
        if self.int4_kernel:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                matrix.codes.to(torch.int32), 1
            )
            self.register_buffer("packed", packed.to(device))
            # Kernel layout [groups, rows, 2]; it wants them in the activations' dtype.
            scales_zeros = torch.stack([matrix.scales, matrix.zeros], dim=-1).transpose(0, 1)
            self.register_buffer("scales_zeros", scales_zeros.contiguous().to(device, dtype))
        else:
            self.register_buffer("codes", matrix.codes.to(device))
            self.register_buffer("scales", matrix.scales.to(device))
            self.register_buffer("zeros", None if matrix.zeros is None else matrix.zeros.to(device))

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers())

    def matrix(self) -> QuantizedMatrix:
        if self.int4_kernel:
            raise RuntimeError("the packed int4 layout cannot be read back")
        return QuantizedMatrix(self.bits, self.group_size, self.codes, self.scales, self.zeros)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self._matmul(x.reshape(-1, shape[-1]))
        return out.to(x.dtype).view(*shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4_kernel:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(self.scales_zeros.dtype), self.packed, self.group_size, self.scales_zeros
            )
        # Few rows (decode) are bandwidth bound: stream the int8 codes through a fused
        # kernel. Many rows (prefill) are compute bound: dequantize once, then GEMM.
        if self.bits == 8 and x.device.type == "cpu" and x.shape[0] < CPU_FLOAT32_MIN_ROWS:
            if self.group_size % 32 == 0:
                out = q8_linear(x.float(), self.codes, self.scales)
                if out is not None:
                    return out
            if self.group_size == self.in_features:
                scales = self.scales[:, 0].to(x.dtype)
                return torch.ops.aten._weight_int8pack_mm(x, self.codes, scales)
        compute = matmul_dtype(x.shape[0], x.dtype, x.device)
        return F.linear(x.to(compute), self.matrix().dequantize(compute))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: dequantize only the selected rows."""
        m = self.matrix()
        selected = QuantizedMatrix(
            m.bits,
            m.group_size,
            m.codes[ids.reshape(-1)],
            m.scales[ids.reshape(-1)],
            None if m.zeros is None else m.zeros[ids.reshape(-1)],
        )
        return selected.dequantize(self.dtype).view(*ids.shape, self.in_features)


class QuantizedExperts(nn.Module):
    """A stack of quantized expert matrices ``[experts, out, in]``: one QuantizedWeight per
    expert, so each expert runs on the same fused kernels as any other matrix."""

    def __init__(self, matrix: QuantizedMatrix, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.shape = matrix.shape
        self.experts = nn.ModuleList(
            QuantizedWeight(matrix.expert(e), dtype, device) for e in range(matrix.shape[0])
        )

    def __getitem__(self, index: int) -> QuantizedWeight:
        return self.experts[index]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers())
