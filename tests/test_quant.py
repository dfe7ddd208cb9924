"""Quantized matrices: round-trip error bounds, and every matmul path against a float
matmul on the dequantized weights."""

from __future__ import annotations

import pytest
import torch

from qwen3chat import kernels
from qwen3chat.quant import QuantizedMatrix, QuantizedWeight, quantize

CPU = torch.device("cpu")


@pytest.fixture
def weight():
    return torch.randn(96, 256, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits,group,bound", [(8, 32, 0.01), (8, 256, 0.015), (4, 32, 0.15)])
def test_round_trip_error(weight, bits, group, bound):
    m = quantize(weight, bits, group)
    error = (m.dequantize() - weight).norm() / weight.norm()
    assert error < bound
    # Round to nearest: no value moves by more than half a step of its group.
    step = m.scales.repeat_interleave(group, dim=1)
    assert ((m.dequantize() - weight).abs() <= step / 2 + 1e-6).all()


def test_int4_to_int8_is_exact_without_zeros():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    scales = torch.rand(8, 2)
    m = QuantizedMatrix(4, 32, codes, scales, torch.zeros_like(scales))
    assert torch.equal(m.to_int8().dequantize(), m.dequantize())


def test_cat_keeps_rows_in_order(weight):
    a, b = quantize(weight[:32], 8, 32), quantize(weight[32:], 8, 32)
    assert torch.equal(
        QuantizedMatrix.cat([a, b]).dequantize(), quantize(weight, 8, 32).dequantize()
    )


@pytest.mark.parametrize("bits,group", [(8, 32), (8, 256), (4, 32), (4, 128)])
@pytest.mark.parametrize("rows", [1, 2, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_float_matmul(weight, bits, group, rows, dtype):
    m = quantize(weight, bits, group)
    layer = QuantizedWeight(m, dtype, CPU)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = x.float() @ m.dequantize().T
    out = layer.linear(x)
    assert out.dtype == dtype and out.shape == (rows, 96)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert (out.float() - expected).abs().max() <= tolerance * expected.abs().max()


def test_native_kernel_matches_torch(weight):
    m = quantize(weight, 8, 32)
    x = torch.randn(3, 256)
    out = kernels.q8_linear(x, m.codes, m.scales)
    if out is None:
        pytest.skip("no AVX2 CPU or no C++ compiler here")
    assert torch.allclose(out, x @ m.dequantize().T, rtol=1e-5, atol=1e-4)


def test_embedding_rows(weight):
    m = quantize(weight, 8, 32)
    table = QuantizedWeight(m, torch.float32, CPU, row_lookup=True)
    ids = torch.tensor([[3, 0, 95]])
    assert torch.equal(table.rows(ids), m.dequantize()[ids])
    int4 = QuantizedWeight(quantize(weight, 4, 32), torch.float32, CPU, row_lookup=True)
    assert int4.bits == 8  # an int4 table is kept as int8 so that rows can be read
