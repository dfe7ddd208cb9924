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

from . import kernels, memory
from .device import matmul_dtype
from .errors import QwenChatError


@dataclass
class QuantizedMatrix:
    """``bits`` 8: w = code * scale, codes int8 in [-127, 127] (symmetric), one per value.
    ``bits`` 4: w = (code - 8) * scale + zero, codes in [0, 15] packed two per byte
    (``pack_int4``: GGUF Q4_0's own layout, so its blocks are taken as they are, and no
    matrix is ever held one code per byte); no ``zeros`` means zero 0.
    Scales and zeros are float32 ``[rows, cols / group_size]``. A stack of expert
    matrices has a leading expert dimension on all three: ``[experts, rows, …]``."""

    bits: int
    group_size: int
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        *lead, width = self.codes.shape
        return torch.Size((*lead, width * 2 if self.bits == 4 else width))

    def code_values(self) -> torch.Tensor:
        """One code per value (int4 unpacked), in the matrix's shape."""
        return unpack_int4(self.codes) if self.bits == 4 else self.codes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.code_values().unflatten(-1, (-1, self.group_size)).float()
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

    def take_rows(self, index: torch.Tensor) -> QuantizedMatrix:
        """The rows ``index`` of a matrix, in that order (each row is quantized alone)."""
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
            self.codes.reshape(*lead, -1),
            self.scales.reshape(*lead, -1),
            zeros,
        )

    def narrow(self, dim: int, start: int, length: int) -> QuantizedMatrix:
        """A copy of the values ``start..start+length-1`` along ``dim`` (-1: inputs, in
        whole groups), for a process's share of a weight (distributed/split.py)."""
        scale_start, scale_length = start, length
        code_start, code_length = start, length
        if dim % len(self.shape) == len(self.shape) - 1:
            if start % self.group_size or length % self.group_size:
                raise ValueError(f"columns {start}+{length} split a group of {self.group_size}")
            scale_start, scale_length = start // self.group_size, length // self.group_size
            if self.bits == 4:  # two codes a byte, a group's bytes together
                code_start, code_length = start // 2, length // 2

        def cut(t, at, n):
            return None if t is None else t.narrow(dim, at, n).clone()

        return QuantizedMatrix(
            self.bits,
            self.group_size,
            cut(self.codes, code_start, code_length),
            cut(self.scales, scale_start, scale_length),
            cut(self.zeros, scale_start, scale_length),
        )

    @staticmethod
    def cat(parts: list[QuantizedMatrix], dim: int = -2) -> QuantizedMatrix:
        """Concatenate along rows (output features; per expert for stacks of experts), or
        along columns (``dim`` -1: pieces of whole groups)."""
        widest = max(parts, key=lambda p: p.bits)
        layout = (widest.bits, widest.group_size)
        # Mixed formats (Q4_K_M files hold q and k in Q4_K, v in Q6_K): all in the widest
        # one, which keeps the part the file gave more bits; parts already in it as they are.
        parts = [
            p if (p.bits, p.group_size) == layout else quantize(p.dequantize(), *layout)
            for p in parts
        ]
        first = parts[0]
        zeros = None
        if any(p.zeros is not None for p in parts):  # Q4_0 (no zeros) beside Q4_1
            zeros = torch.cat([_zeros_of(p) for p in parts], dim=dim)
        return QuantizedMatrix(
            first.bits,
            first.group_size,
            memory.cat([p.codes for p in parts], dim),
            torch.cat([p.scales for p in parts], dim=dim),
            zeros,
        )


def _zeros_of(matrix: QuantizedMatrix) -> torch.Tensor:
    return torch.zeros_like(matrix.scales) if matrix.zeros is None else matrix.zeros


@dataclass(frozen=True)
class QuantSpec:
    """``--quantize`` at load. Linear layers get ``bits``: int8 with one scale per output
    channel, or int4 with a scale and zero per ``group_size`` inputs. Embedding tables and
    the LM head (151936 rows, a quarter of a small model) are always int8 per channel:
    int4 costs them too much accuracy."""

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
        if in_features % self.group_size or in_features % 32:
            raise QwenChatError(
                f"--quantize int4: the layer width {in_features} must be a multiple of 32 "
                f"and of --group-size {self.group_size}"
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
    if cols % group_size or (bits == 4 and cols % 32):
        raise ValueError(f"{cols} columns are not a multiple of group size {group_size}")
    native = kernels.native(weight)
    if native is not None and group_size % 8 == 0:  # one pass, the same codes
        codes, scales, *zeros = native.quantize_rows(weight, bits, group_size)
        return QuantizedMatrix(bits, group_size, codes, scales, zeros[0] if zeros else None)
    groups = cols // group_size
    on = weight.device
    if bits == 8:
        codes = torch.empty(rows, cols, dtype=torch.int8, device=on)
    else:
        codes = torch.empty(rows, cols // 2, dtype=torch.uint8, device=on)
    scales = torch.empty(rows, groups, device=on)
    zeros = torch.empty(rows, groups, device=on) if bits == 4 else None
    for start in range(0, rows, _QUANTIZE_ROWS):
        block = slice(start, start + _QUANTIZE_ROWS)
        w = weight[block].float().view(-1, groups, group_size)
        # Scales and zeros are stored as float16 (QuantizedWeight), so they are rounded to
        # it before the codes are chosen: the stored matrix is exactly this one.
        if bits == 8:
            scale = _half(w.abs().amax(-1) / 127)
            q = (w / scale[..., None]).round().clamp(-127, 127)
        else:
            low, high = w.amin(-1), w.amax(-1)
            scale = _half((high - low) / 15)
            # w = (code - 8) * scale + zero with code 0 near the group minimum.
            zero = (low + 8 * scale).half().float()
            zeros[block] = zero
            q = ((w - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15)
        q = q.view(-1, cols).to(codes.dtype)
        codes[block] = q if bits == 8 else pack_int4(q)
        scales[block] = scale
    return QuantizedMatrix(bits, group_size, codes, scales, zeros)


def _half(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` rounded to float16, at least its smallest step (a constant group)."""
    return scale.half().float().clamp(min=2.0**-24)


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
    else:  # uniform bytes: both of their codes uniform over [0, 15]
        codes = torch.empty((*lead, cols // 2), dtype=torch.uint8, device=device)
        codes.random_(0, 256, generator=generator)
    levels = 255 if bits == 8 else 16
    scale = std / math.sqrt((levels**2 - 1) / 12)  # a uniform integer's std
    scales = _half(torch.full((*lead, cols // group_size), scale, device=device))
    # int4 codes minus 8 average -0.5: the zero point centres them.
    zeros = None if bits == 8 else scales * 0.5
    return QuantizedMatrix(bits, group_size, codes, scales, zeros)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes ``[..., K]`` two per byte ``[..., K / 2]``: in each block of 32 inputs,
    byte j holds code j in its low nibble and code j + 16 in its high one (GGUF Q4_0's
    order, which the kernel widens with two masks and no shuffle)."""
    blocks = codes.unflatten(-1, (-1, 2, 16))
    return (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).flatten(-2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    blocks = packed.unflatten(-1, (-1, 16))
    return torch.stack([blocks & 15, blocks >> 4], dim=-2).flatten(-3)


class QuantizedWeight(nn.Module):
    """A quantized matrix as the native kernels read it (kernels/linear.cpp): int8 codes,
    or int4 codes packed two per byte, with float16 scales (and zeros) per group, which
    is GGUF's own precision for them. int4 zeros that are all 0 (Q4_0) are not stored.
    Where the kernels cannot run (another device, groups not a multiple of 32, no
    build), each matmul dequantizes first, which is correct everywhere.

    Groups of 32 (GGUF's Q8_0, Q4_0, Q4_1, Q4_K, ``--quantize int4``) and int8 with one
    scale a row (``--quantize int8``) on an x86 CPU are held ``interleaved``:
    codes ``[rows / 16, cols / 32, steps, 16, 4]`` (each 16 rows' block of 32 as 4 or 8
    steps of the 16 rows' four bytes; int8's as unsigned ``code + 128``), scales and zeros
    ``[rows / 16, groups, 16]``, the layout their kernel there reads (kernels.interleaves);
    ``matrix`` gives rows back."""

    def __init__(
        self,
        matrix: QuantizedMatrix,
        dtype: torch.dtype,
        device: torch.device,
        owned: bool = False,
    ):
        """``owned``: nothing else reads ``matrix``'s codes, which may then be interleaved
        where they are (a loader's freshly read or quantized weights)."""
        super().__init__()
        self.bits = matrix.bits
        self.group_size = matrix.group_size
        self.out_features, self.in_features = matrix.shape
        self.dtype = dtype
        zeros = matrix.zeros if matrix.zeros is not None and matrix.zeros.any() else None
        codes, scales = matrix.codes.to(device), matrix.scales.to(device, torch.float16)
        zeros = None if zeros is None else zeros.to(device, torch.float16)
        groups = self.in_features // self.group_size
        self.interleaved = (
            (self.group_size == 32 or (self.bits == 8 and groups == 1))
            and self.out_features % 16 == 0
            and self.in_features % 32 == 0
            and kernels.interleaves(device)
        )
        if self.interleaved:
            blocks = self.in_features // 32
            # In place where the codes are this weight's own: a copy's fresh memory faults
            # in at ~1.5 GB/s a thread, the interleaving's own work runs in cache (a 5 GB
            # Q4_0 file: 2.5 s of its load in torch's permuted copy).
            rows = codes.contiguous().view(torch.uint8)
            out = rows if owned or rows.data_ptr() != codes.data_ptr() else torch.empty_like(rows)
            kernels.native(torch.empty(0)).interleave_rows(rows, out, self.bits)
            codes = out.view(self.out_features // 16, blocks, -1, 16, 4)
            scales = scales.reshape(-1, 16, groups).transpose(1, 2).contiguous()
            if zeros is not None:
                zeros = zeros.reshape(-1, 16, groups).transpose(1, 2).contiguous()
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers())

    def matrix(self, rows: torch.Tensor | slice = slice(None)) -> QuantizedMatrix:
        """The matrix (or some of its rows) with float32 scales, as QuantizedMatrix."""
        zeros = self.zeros
        if not self.interleaved:
            codes, scales = self.codes[rows], self.scales[rows]
            zeros = None if zeros is None else zeros[rows]
        else:  # row n is row n % 16 of interleaved group n // 16
            n = (
                rows
                if isinstance(rows, torch.Tensor)
                else torch.arange(self.out_features, device=self.codes.device)[rows]
            )
            codes = self.codes[n // 16, :, :, n % 16].flatten(-3)
            if self.bits == 8:
                codes = (codes ^ 128).view(torch.int8)
            scales = self.scales[n // 16, :, n % 16]
            zeros = None if zeros is None else zeros[n // 16, :, n % 16]
        zeros = None if zeros is None else zeros.float()
        return QuantizedMatrix(self.bits, self.group_size, codes, scales.float(), zeros)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` by dequantizing first: the path where the native kernels (which
        model/layers.py's ``linear`` prefers) cannot run."""
        compute = matmul_dtype(x.numel() // x.shape[-1], x.dtype, x.device)
        return F.linear(x.to(compute), self.matrix().dequantize(compute)).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: dequantize only the selected rows (natively where they are
        held interleaved: the same values)."""
        flat = ids.reshape(-1).long()
        native = kernels.native(torch.empty(0)) if self.interleaved else None
        if native is not None:
            selected = native.interleaved_rows(
                self.codes, self.scales, self.zeros, flat, self.bits, self.dtype
            )
        else:
            selected = self.matrix(flat).dequantize(self.dtype)
        return selected.view(*ids.shape, self.in_features)


class QuantizedExperts(nn.Module):
    """A stack of quantized expert matrices ``[experts, out, in]``: one QuantizedWeight per
    expert, so each expert runs on the same fused kernels as any other matrix."""

    def __init__(
        self,
        matrix: QuantizedMatrix,
        dtype: torch.dtype,
        device: torch.device,
        owned: bool = False,
    ):
        super().__init__()
        self.shape = matrix.shape
        self.experts = nn.ModuleList(
            QuantizedWeight(matrix.expert(e), dtype, device, owned) for e in range(matrix.shape[0])
        )

    def __getitem__(self, index: int) -> QuantizedWeight:
        return self.experts[index]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers())
