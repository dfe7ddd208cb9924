"""GGUF tensor data -> float tensors or QuantizedMatrix (where GGUF Q-blocks are decoded).

Q8_0, Q4_0, Q4_1 and Q4_K map onto our group-32 int8/int4 layouts with their codes
copied (Q4_0's and Q4_1's packed bytes as they are: quant.py packs int4 in their order;
Q4_K's re-paired). Q8_0's and Q4_0's float16 scales are kept as they are; Q4_1's zeros (m + 8d) and
Q4_K's scales (d times a 6-bit sub-scale) are rounded to float16 when stored, a relative
change of at most 2^-11. Every other block type gguf-py can decode
(Q5_*, Q6_K, Q2_K, Q3_K, IQ*, …) is decoded and requantized to int8 with groups of 32,
which adds well under 1% relative error (see tests/test_gguf.py), or to int4 where
``--quantize int4`` asks for it (half the memory): natively where the kernels know the
type (kernels/gguf_blocks.cpp, which also repacks Q4_K), else through gguf-py a band of
rows at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from .. import kernels, memory
from ..quant import QuantizedMatrix, quantize

FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
REQUANTIZED_GROUP = 32
# The float32 gguf-py decodes at a time where the kernels do not decode a type.
_BAND_BYTES = 16 << 20

# Where a decoded tensor goes: memory.empty or torch.empty (decode's ``kept``).
Empty = Callable[..., torch.Tensor]


def _file_pages(array: np.ndarray) -> torch.Tensor:
    """A read-only view of the file's pages as a tensor, which is only read from (torch
    warns of any non-writable array)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _words(blocks: np.ndarray) -> torch.Tensor:
    """Blocks ``[..., bytes]`` as 16-bit words ``[blocks, bytes / 2]``: every field of a
    Q8_0, Q4_0, Q4_1 or Q4_K block is whole words from an even offset (GGUF aligns its
    tensors), and torch copies a strided column of words out 3x as fast as numpy copies
    its bytes (the Q4_0 0.6B file's weights: 0.56 -> 0.18 s)."""
    return _file_pages(blocks.reshape(-1, blocks.shape[-1]).view(np.int16))


def _f16(words: torch.Tensor) -> torch.Tensor:
    """A column of float16 words, widened (torch does it with F16C)."""
    return words.contiguous().view(torch.float16).float()


def _codes(words: torch.Tensor, rows: int) -> torch.Tensor:
    """Blocks' code words, already in our layout (int8, or int4 in quant.py's packing),
    as one ``[rows, …]`` uint8 copy (the file's pages are released once a tensor is read)."""
    return words.contiguous().view(torch.uint8).view(rows, -1)


def _fields(
    blocks: np.ndarray, rows: int, halves: int, empty: Empty
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Blocks whose ``halves`` leading float16 fields precede their codes: the codes as one
    ``[rows, …]`` uint8 copy (in our layout already), each field widened, ``[rows, blocks]``.
    The kernels split them in one pass over the file (kernels/gguf_blocks.cpp): column by
    column, torch read its pages once per field and once for the codes."""
    native = kernels.native(torch.empty(0))
    if native is not None:
        _, per_row, block_bytes = blocks.shape  # [rows, blocks, bytes]
        codes = empty((rows, per_row * (block_bytes - 2 * halves)), dtype=torch.uint8)
        pages = _file_pages(blocks.reshape(rows, -1))
        fields = native.split_blocks(pages, block_bytes, halves, codes)
        return codes, list(fields.unbind(-1))
    words = _words(blocks)
    return _codes(words[:, halves:], rows), [
        _f16(words[:, h]).view(rows, -1) for h in range(halves)
    ]


def _q8_0(blocks: np.ndarray, rows: int, cols: int, empty: Empty) -> QuantizedMatrix:
    # block: f16 d, 32 x int8
    codes, (scales,) = _fields(blocks, rows, 1, empty)
    return QuantizedMatrix(8, 32, codes.view(torch.int8), scales)


def _q4_0(blocks: np.ndarray, rows: int, cols: int, empty: Empty) -> QuantizedMatrix:
    # block: f16 d, 16 bytes of nibbles; w = d * (q - 8)
    codes, (scales,) = _fields(blocks, rows, 1, empty)
    return QuantizedMatrix(4, 32, codes, scales)


def _q4_1(blocks: np.ndarray, rows: int, cols: int, empty: Empty) -> QuantizedMatrix:
    # block: f16 d, f16 m, 16 bytes of nibbles; w = d * q + m = (q - 8) * d + (m + 8d)
    codes, (scales, mins) = _fields(blocks, rows, 2, empty)
    return QuantizedMatrix(4, 32, codes, scales, mins + 8 * scales)


def _q4_k(blocks: np.ndarray, rows: int, cols: int, empty: Empty) -> QuantizedMatrix:
    # super-block of 256: f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) for 8 sub-blocks
    # of 32, 128 bytes of nibbles in 4 chunks of 32 bytes (low nibbles: sub-block 2j,
    # high: 2j+1); w = d*sc*q - dmin*m. The kernels do the same in one pass
    # (kernels/gguf_blocks.cpp).
    native = kernels.native(torch.empty(0))
    if native is not None:
        codes = empty((rows, cols // 2), dtype=torch.uint8)
        scales, zeros = native.repack_q4_k(_file_pages(blocks.reshape(rows, -1)), codes)
        return QuantizedMatrix(4, 32, codes, scales, zeros)
    words = _words(blocks)
    d, dmin, n = _f16(words[:, 0]), _f16(words[:, 1]), words.shape[0]
    sc, m = quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(n, 12))
    scales = d.view(n, 1) * torch.from_numpy(sc.astype(np.float32))
    mins = dmin.view(n, 1) * torch.from_numpy(m.astype(np.float32))
    qs = blocks[..., 16:].reshape(n, 4, 1, 2, 16)
    first, second = qs[..., 0, :], qs[..., 1, :]  # bytes 0-15 and 16-31 of each chunk
    # Re-paired so that each sub-block's code j and j + 16 share a byte, as in Q4_0.
    even = (first & 0x0F) | (second << 4)
    odd = (first >> 4) | (second & 0xF0)
    return QuantizedMatrix(
        4,
        32,
        torch.from_numpy(np.concatenate([even, odd], axis=2)).view(rows, -1),
        scales.view(rows, -1),
        (8 * scales - mins).view(rows, -1),
    )


EXACT = {T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q4_K: _q4_k}


def requantized(qtype: T) -> bool:
    """Whether tensors of ``qtype`` are held in another format here (int8 per 32)."""
    return qtype not in FLOAT_TYPES and qtype not in EXACT


def requantized_layout(layout: tuple[int, int] | None) -> tuple[int, int]:
    """(bits, group size) for a tensor of a requantized type, given the one ``--quantize``
    gives the tensor (loader.quant_layout): int4 where it asks for int4, else int8 per 32
    (finer than ``--quantize int8``'s one scale a row, for the same codes' bytes)."""
    return layout if layout is not None and layout[0] == 4 else (8, REQUANTIZED_GROUP)


def supported(qtype: T) -> bool:
    if qtype in FLOAT_TYPES or qtype in EXACT:
        return True
    try:
        quants.dequantize(np.zeros(quants.GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


def share(
    raw: np.ndarray, qtype: T, shape: tuple[int, ...], part
) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """The stored data of ``part`` (distributed/split.py's Part) of a tensor of ``shape``
    (torch order), and the share's shape: whole experts and rows as they lie in the file,
    columns in whole blocks, copied out before anything is decoded. None where the
    columns would cut a block (the caller decodes the whole and cuts it)."""
    block = 1 if qtype in FLOAT_TYPES else quants.GGML_QUANT_SIZES[qtype][0]
    dim = part.dim % len(shape)
    ranges = part.ranges(shape[dim])
    if dim == len(shape) - 1:
        if any(start % block or stop % block for start, stop in ranges):
            return None
        ranges = [(start // block, stop // block) for start, stop in ranges]
    # One entry a value (float types) or a block (its bytes along the last axis).
    units = np.asarray(raw).reshape(*shape[:-1], shape[-1] // block, -1)
    lead = (slice(None),) * dim
    cut = np.concatenate([units[(*lead, slice(start, stop))] for start, stop in ranges], dim)
    sizes = list(shape)
    sizes[dim] = part.size(shape[dim])
    return cut, tuple(sizes)


def decode(
    raw: np.ndarray,
    qtype: T,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    layout: tuple[int, int] | None = None,
    kept: bool = True,
) -> torch.Tensor | QuantizedMatrix:
    """``raw`` as gguf-py's reader hands it out; ``shape`` in torch order (rows, cols), or
    (experts, rows, cols) for a stack of experts. ``layout``: what ``--quantize`` gives
    the tensor (see requantized_layout). ``kept``: the model keeps the result as it is, so
    it goes into memory in 2 MiB pages (memory.empty); otherwise it is a part that the
    loader fuses with others (or quantizes) and drops, which torch's memory holds: fresh 2
    MiB pages fault in slowly on a VM that hands free memory back to its host (7.5 s per
    GB on a Zen 3 VM, 4 KiB pages 0.35 s), and a fused weight's parts took them twice."""
    empty = memory.empty if kept else torch.empty
    if qtype in FLOAT_TYPES:
        array = np.asarray(raw)
        if qtype == T.BF16:  # numpy has no bfloat16: reinterpret the 16-bit words
            array = array.view(np.int16)
        stored = _file_pages(array).view(FLOAT_TYPES[qtype]).reshape(shape)
        # Memory of its own, written once: a conversion reads the file's pages straight
        # (copied first, then converted, F16 -> bf16 took 2.5 s of a 0.6B load, not 0.7).
        return empty(tuple(shape), dtype=dtype).copy_(stored)
    if len(shape) not in (2, 3):
        raise ValueError(f"a {qtype.name} tensor must be 2-D or 3-D, got shape {list(shape)}")
    # A stack of experts [E, R, C] is decoded as E*R rows, then split again.
    cols = shape[-1]
    rows = int(np.prod(shape[:-1]))
    block, block_bytes = quants.GGML_QUANT_SIZES[qtype]
    blocks = np.asarray(raw).reshape(rows, cols // block, block_bytes)
    if qtype in EXACT:
        return EXACT[qtype](blocks, rows, cols, empty).reshape(*shape)
    bits, group = requantized_layout(layout)
    return _requantized(blocks.reshape(rows, -1), qtype, cols, bits, group).reshape(*shape)


def _requantized(blocks: np.ndarray, qtype: T, cols: int, bits: int, group: int) -> QuantizedMatrix:
    """Rows of blocks of any other type as ``bits`` per ``group``: in one native pass over
    the file's blocks where the kernels decode the type (kernels/gguf_blocks.cpp), else
    through gguf-py's float32 decoding a band of rows at a time (a whole embedding table
    or stack of experts in float32 is 4 bytes a weight)."""
    native = kernels.native(torch.empty(0))
    if native is not None and int(qtype) in native.GGUF_BLOCK_TYPES:
        codes, scales, *zeros = native.requantize_blocks(
            _file_pages(blocks), int(qtype), bits, group
        )
        return QuantizedMatrix(bits, group, codes, scales, zeros[0] if zeros else None)
    band = max(1, _BAND_BYTES // (4 * cols))
    return QuantizedMatrix.cat(
        [
            quantize(
                torch.from_numpy(quants.dequantize(blocks[start : start + band], qtype)),
                bits,
                group,
            )
            for start in range(0, blocks.shape[0], band)
        ]
    )
