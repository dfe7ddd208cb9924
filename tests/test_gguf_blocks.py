"""GGUF block types converted at load natively (kernels/gguf_blocks.cpp): those
requantized (int8, or int4 under --quantize int4) against gguf-py's decoding, the banded
path where there are no kernels, and Q4_K's repacking against the numpy one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as T

from qwen3chat import kernels
from qwen3chat.quant import quantize
from qwen3chat.weights import gguf_quants

# Where each type keeps its float16 fields (the rest of a block is codes and sub-scales,
# any byte valid).
F16_FIELDS = {
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.IQ4_NL: (0,),
    T.IQ4_XS: (0,),
    T.Q4_K: (0, 2),
}
REQUANTIZED = [t for t in F16_FIELDS if t != T.Q4_K]


def random_blocks(qtype: T, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Random bytes with finite float16 scales of either sign and many magnitudes (so
    some groups' scales round to float16's smallest steps)."""
    rng = np.random.default_rng(seed)
    size = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (rows, blocks_per_row, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        magnitude = 10.0 ** rng.integers(-7, 1, size=(rows, blocks_per_row, 1))
        scale = rng.normal(size=(rows, blocks_per_row, 1)) * magnitude
        raw[..., at : at + 2] = scale.astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def gguf_py_requantized(raw: np.ndarray, qtype: T, bits=8, group=gguf_quants.REQUANTIZED_GROUP):
    floats = torch.from_numpy(quants.dequantize(raw, qtype))
    return quantize(floats, bits, group)


def assert_same_matrix(ours, expected):
    for field in ("codes", "scales", "zeros"):
        mine, theirs = getattr(ours, field), getattr(expected, field)
        assert (mine is None) == (theirs is None), field
        assert mine is None or torch.equal(mine, theirs), field


native = pytest.mark.skipif(
    kernels.native(torch.empty(0)) is None, reason="no native kernels on this machine"
)


@native
def test_the_kernels_decode_every_type_listed_here():
    assert set(kernels.native(torch.empty(0)).GGUF_BLOCK_TYPES) == {int(t) for t in REQUANTIZED}


@native
@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 64)], ids=str)
@pytest.mark.parametrize("qtype", REQUANTIZED, ids=lambda t: t.name)
def test_native_requantization_is_gguf_py_decoding_quantized(qtype, bits, group):
    """int8 per 32 by default, int4 (with zeros) under --quantize int4 and its groups."""
    values = GGML_QUANT_SIZES[qtype][0]
    raw = random_blocks(qtype, rows=37, blocks_per_row=1024 // values, seed=int(qtype))
    matrix = gguf_quants.decode(raw, qtype, (37, 1024), torch.float32, (bits, group))
    assert (matrix.bits, matrix.group_size) == (bits, group)
    assert_same_matrix(matrix, gguf_py_requantized(raw, qtype, bits, group))


@pytest.mark.parametrize("layout", [None, (8, 1024), (4, 64)], ids=str)
def test_requantized_types_take_int4_only_where_asked(layout):
    """``--quantize int8`` (one scale a row) would be coarser than int8 per 32: kept."""
    expected = layout if layout and layout[0] == 4 else (8, 32)
    assert gguf_quants.requantized_layout(layout) == expected


def test_without_kernels_the_type_is_decoded_a_band_at_a_time(monkeypatch):
    raw = random_blocks(T.Q6_K, rows=50, blocks_per_row=2)
    monkeypatch.setattr(kernels, "native", lambda x: None)
    monkeypatch.setattr(gguf_quants, "_BAND_BYTES", 4 * 512 * 16)  # 16 rows of 512
    bands = []
    decode = quants.dequantize

    def spy(data, qtype):
        bands.append(data.shape[0])
        return decode(data, qtype)

    monkeypatch.setattr(quants, "dequantize", spy)
    matrix = gguf_quants.decode(raw, T.Q6_K, (5, 10, 512), torch.float32)
    assert bands == [16, 16, 16, 2]
    int4 = gguf_quants.decode(raw, T.Q6_K, (5, 10, 512), torch.float32, (4, 32))
    monkeypatch.undo()
    assert matrix.shape == int4.shape == (5, 10, 512)
    assert_same_matrix(matrix.reshape(50, 512), gguf_py_requantized(raw, T.Q6_K))
    assert_same_matrix(int4.reshape(50, 512), gguf_py_requantized(raw, T.Q6_K, 4, 32))


@native
def test_native_q4_k_repacking_is_the_numpy_one(monkeypatch):
    raw = random_blocks(T.Q4_K, rows=21, blocks_per_row=4)
    ours = gguf_quants.decode(raw, T.Q4_K, (21, 1024), torch.float32)
    monkeypatch.setattr(kernels, "native", lambda x: None)
    numpy = gguf_quants.decode(raw, T.Q4_K, (21, 1024), torch.float32)
    assert_same_matrix(ours, numpy)
