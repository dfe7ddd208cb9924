"""Quantized matrices: round-trip error bounds, and every matmul path against a float
matmul on the dequantized weights."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from qwen3chat import kernels, quant
from qwen3chat.model.layers import linear
from qwen3chat.quant import QuantizedMatrix, QuantizedWeight, quantize

CPU = torch.device("cpu")
NATIVE = kernels.native(torch.zeros(1))
# The integer GEMM's kernel as the CPU chose it (the x86 kernels report AVX-VNNI here too).
INTEGER_GEMM = kernels.variants(CPU).get("int8/int4 GEMMs (8+ rows, 4+ with VNNI)")


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


@pytest.mark.skipif(NATIVE is None, reason="no native kernels here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group", [(8, 256), (8, 32), (4, 32), (4, 8), (4, 128)])
def test_native_quantization_gives_the_torch_codes(dtype, bits, group, monkeypatch):
    # Loading quantizes natively where it can: the codes, scales and zeros must be those
    # of the torch path, bit for bit (constant groups, ties and outliers included).
    generator = torch.Generator().manual_seed(4)
    w = torch.randn(70, 256, generator=generator) * torch.rand(70, 1, generator=generator) * 3
    w[3] = 0.5  # a constant row: the smallest scale
    w[5, :16] = torch.arange(16) * 0.25 - 2  # values on the rounding ties
    w[7, 9] = 1e3  # an outlier that owns its group's scale
    w = w.to(dtype)
    native = quantize(w, bits, group)
    monkeypatch.setattr(kernels, "native", lambda x: None)
    reference = quantize(w, bits, group)
    assert native.codes.dtype == reference.codes.dtype
    assert torch.equal(native.codes, reference.codes)
    assert torch.equal(native.scales, reference.scales)
    if bits == 4:
        assert torch.equal(native.zeros, reference.zeros)


def test_cat_keeps_rows_in_order(weight):
    a, b = quantize(weight[:32], 8, 32), quantize(weight[32:], 8, 32)
    assert torch.equal(
        QuantizedMatrix.cat([a, b]).dequantize(), quantize(weight, 8, 32).dequantize()
    )


def test_cat_of_mixed_formats_keeps_the_widest(weight, monkeypatch):
    """A Q4_K_M file's q (Q4_K) beside its v (Q6_K, requantized to int8): the fused
    matrix is int8, so v keeps the precision the file gave it; only q is converted."""
    q, v = quantize(weight[:32], 4, 32), quantize(weight[32:], 8, 32)
    converted = []

    def spy(w, bits, group_size):
        converted.append(w.shape[0])
        return quantize(w, bits, group_size)

    monkeypatch.setattr(quant, "quantize", spy)
    fused = QuantizedMatrix.cat([q, v])
    assert converted == [32]
    assert (fused.bits, fused.group_size) == (8, 32)
    for part, rows in ((q, slice(None, 32)), (v, slice(32, None))):
        exact = part.dequantize()
        assert (fused.dequantize()[rows] - exact).norm() / exact.norm() < 0.01
    assert torch.equal(fused.codes[32:], v.codes)


@contextmanager
def kernel_off(setter: str, loaded: bool = True):
    """The native kernel that ``setter`` chooses turned off inside, as it was loaded
    (``loaded``: on) after."""
    getattr(NATIVE, setter)(False)
    try:
        yield
    finally:
        getattr(NATIVE, setter)(loaded)


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the native kernels see it: quantized to int8 per block of 32 (scale
    max|x| / 127, round half to even), dequantized."""
    blocks = x.float().view(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(scale > 0, blocks / scale, torch.zeros_like(blocks)).round()
    return (codes * scale).view(x.shape)


def expected_product(x: torch.Tensor, m: QuantizedMatrix) -> torch.Tensor:
    """What ``linear`` computes: with the kernels, for any number of rows (decode steps
    stream the weights, prompts take the integer GEMM), the codes' part sees int8
    activations and int4's offsets (zero - 8 * scale) the float ones; the torch code is a
    float32 product with the dequantized weights."""
    if kernels.native(x) is None:
        return x.float() @ m.dequantize().T
    scales = m.scales.repeat_interleave(m.group_size, dim=1)
    product = int8_activations(x) @ (m.code_values().float() * scales).T
    if m.bits == 4:
        zeros = 0 if m.zeros is None else m.zeros
        offsets = (zeros - 8 * m.scales).repeat_interleave(m.group_size, dim=1)
        product = product + x.float() @ offsets.T
    return product


@pytest.mark.parametrize(
    "bits,group,zero_points",
    [(8, 32, False), (8, 256, False), (4, 32, True), (4, 128, True), (4, 32, False)],
)
@pytest.mark.parametrize("rows", [1, 7, 8, 15, 20, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_float_matmul(weight, bits, group, zero_points, rows, dtype):
    """Decode steps and prompts, with rows and outputs that do not fill the kernels'
    blocks of 8 activation rows and 4 weight rows; int4 with zero points (--quantize) and
    without (GGUF's Q4_0, whose offsets are -8 * scale: the integer GEMM uses that)."""
    m = quantize(weight[:93], bits, group)
    if not zero_points:
        m.zeros = None
    layer = QuantizedWeight(m, dtype, CPU)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = expected_product(x, m)
    out = linear(x, layer)
    assert out.dtype == dtype and out.shape == (rows, 93)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert (out.float() - expected).abs().max() <= tolerance * expected.abs().max()
    # The int8 activations move the result by a percent or so.
    exact = x.float() @ m.dequantize().T
    assert (out.float() - exact).norm() / exact.norm() < 2e-2


def test_torch_fallback_matches_float_matmul(weight, torch_matmuls):
    for bits, group in ((8, 32), (4, 32)):
        m = quantize(weight, bits, group)
        x = torch.randn(2, 256)
        out = linear(x, QuantizedWeight(m, torch.float32, CPU))
        torch.testing.assert_close(out, x @ m.dequantize().T, rtol=1e-5, atol=1e-5)


def test_stored_matrix_is_the_quantized_one(weight):
    """float16 scales and zeros, and packed int4 codes, hold exactly what quantize chose."""
    for bits, group in ((8, 32), (8, 256), (4, 32), (4, 128)):
        m = quantize(weight, bits, group)
        layer = QuantizedWeight(m, torch.float32, CPU)
        assert torch.equal(layer.matrix().dequantize(), m.dequantize())
    assert layer.codes.shape == (96, 128)  # two int4 codes per byte


@pytest.mark.skipif(
    not kernels.interleaves("cpu"), reason="weights held interleaved only on x86 with the kernels"
)
@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (8, 256)])
def test_owned_codes_are_interleaved_in_place(weight, bits, group):
    """A loader's own codes are interleaved where they are (no second copy of the weights);
    anyone else's are left as they were; both hold the same matrix."""
    m = quantize(weight, bits, group)  # 8 bits per 256: int8 with one scale a row
    before = m.codes.clone()
    shared = QuantizedWeight(m, torch.float32, CPU)
    assert torch.equal(m.codes, before) and shared.interleaved
    owned = QuantizedWeight(m, torch.float32, CPU, owned=True)
    assert owned.codes.data_ptr() == m.codes.data_ptr()
    assert torch.equal(owned.codes, shared.codes)
    assert torch.equal(owned.matrix().dequantize(), quantize(weight, bits, group).dequantize())


def test_embedding_rows(weight):
    ids = torch.tensor([[3, 0, 95]])
    for bits in (8, 4):
        m = quantize(weight, bits, 32)
        table = QuantizedWeight(m, torch.float32, CPU)
        assert torch.equal(table.rows(ids), m.dequantize()[ids])


@pytest.mark.parametrize(
    "width,group",
    [(64, 32), (96, 32), (320, 32), (352, 32), (288, 96), (384, 64)],
    ids=["one-pair", "odd-blocks", "pairs-tail", "odd-tail", "odd-group", "even-group"],
)
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_int4_product_at_every_block_layout(width, group, rows):
    # The int4 kernel takes blocks two at a time where each block has its own scale and
    # the count is even, one at a time otherwise; both, with 8-block tails, must agree.
    # Below 8 rows a weight row is decoded once for up to 4 activation rows (6 = 4 + 2),
    # each row summed as if it were alone.
    generator = torch.Generator().manual_seed(2)
    m = quantize(torch.randn(40, width, generator=generator), 4, group)
    # Zeros of their own (GGUF's Q4_1, Q4_K), in float16 as the kernels store them.
    m.zeros.copy_((torch.randn(m.zeros.shape, generator=generator) * 0.1).half())
    m.scales.copy_(m.scales.half())
    x = torch.randn(rows, width, generator=generator)
    expected = expected_product(x, m)
    layer = QuantizedWeight(m, torch.float32, CPU)
    out = linear(x, layer)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    # A row in a batch equals the row alone while the rows take the per-row kernels: below
    # 8 rows, below 4 where the integer GEMM runs AVX512-VNNI (int4: whole pairs of blocks).
    gemm_rows = 4 if kernels._avx512_vnni() and width % 64 == 0 else 8
    if kernels.native(x) is not None and rows < gemm_rows:
        assert torch.equal(out, torch.cat([linear(row[None], layer) for row in x]))


@pytest.mark.skipif(
    NATIVE is None or not kernels._avx512_vnni(),
    reason="this CPU (or its OS) does not allow AVX512-VNNI",
)
@pytest.mark.parametrize(
    "bits,group,zeros,width",
    [
        (8, 32, False, 256),
        (8, 256, False, 256),
        (8, 32, False, 224),  # an odd count of blocks: the last one alone
        (4, 32, False, 256),
        (4, 32, True, 256),
        (4, 128, True, 256),
        (4, 32, True, 224),  # an odd count of blocks: the AVX2 kernel's
    ],
)
@pytest.mark.parametrize("rows", [8, 16, 21, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx512_vnni_gemm_is_the_avx2_one_bit_for_bit(
    weight, bits, group, zeros, width, rows, dtype
):
    """The integer GEMM's AVX512-VNNI kernel (16 activation rows a vector, 8 weight rows a
    pass, blocks in pairs) gives exactly the AVX2 kernel's results (8 rows a vector, 4
    weight rows a pass): the same integer sums, the same float steps, the same rounding
    of the outputs. 93 weight rows leave a pass of 5."""
    m = quantize(weight[:93, :width], bits, group)
    if not zeros:
        m.zeros = None  # Q4_0: no zero points stored
    layer = QuantizedWeight(m, torch.float32, CPU)
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(2)).to(dtype)
    vnni = linear(x, layer)
    with kernel_off("set_avx512_vnni"):
        avx2 = linear(x, layer)
    assert torch.equal(vnni, avx2)


@pytest.mark.parametrize(
    "setter",
    [
        pytest.param(
            "set_avx_vnni",
            marks=pytest.mark.skipif(
                NATIVE is None or not NATIVE.cpu_avx_vnni(),
                reason="this CPU does not have AVX-VNNI",
            ),
        ),
        pytest.param(
            "set_i8mm",
            marks=pytest.mark.skipif(
                INTEGER_GEMM != "NEON int8 matrix multiply",
                reason="not an ARM CPU with the int8 matrix multiply (FEAT_I8MM)",
            ),
        ),
    ],
)
@pytest.mark.parametrize(
    "bits,group,zeros,width",
    [
        (8, 256, False, 256),
        (8, 32, False, 224),
        (4, 32, False, 256),  # Q4_0
        (4, 32, True, 224),
        (4, 128, True, 256),
    ],
)
@pytest.mark.parametrize("rows", [8, 21])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_integer_gemms_other_kernel_is_the_first_one_bit_for_bit(
    weight, setter, bits, group, zeros, width, rows, dtype
):
    """Where AVX512-VNNI's kernel does not run, the integer GEMM's AVX2 kernel takes
    AVX-VNNI's vpdpbusd where the CPU has it (integer_rows.inc's second build), and on ARM
    the dot-product kernel gives way to the int8 matrix multiply's (smmla): the same exact
    integer sums, the same float steps, so the same bits. 93 weight rows leave a pass of 1."""
    loaded = {"set_avx_vnni": INTEGER_GEMM == "AVX-VNNI", "set_i8mm": True}[setter]
    m = quantize(weight[:93, :width], bits, group)
    if not zeros:
        m.zeros = None
    layer = QuantizedWeight(m, torch.float32, CPU)
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(3)).to(dtype)
    with kernel_off("set_avx512_vnni", loaded=kernels._avx512_vnni()), kernel_off(setter, loaded):
        first = linear(x, layer)
        getattr(NATIVE, setter)(True)
        other = linear(x, layer)
    assert torch.equal(other, first)
    assert first.abs().max() > 0


@pytest.mark.skipif(
    NATIVE is None or not kernels._avx512_vnni(),
    reason="this CPU (or its OS) does not allow AVX512-VNNI",
)
@pytest.mark.parametrize("bits", [8, 4])
def test_avx512_vnni_gemm_takes_four_rows_or_more(weight, bits):
    """Where the integer GEMM runs AVX512-VNNI it takes 4 rows or more (its vector holds 16
    rows, so 4 cost about what 16 do): 4 and 5 rows give what the same rows give among 16,
    bit for bit (each row in its own lanes); 3 rows take the per-row kernels."""
    m = quantize(weight[:93, :256], bits, 32)
    layer = QuantizedWeight(m, torch.float32, CPU)
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(3))
    sixteen = linear(x, layer)
    for rows in (4, 5):
        assert torch.equal(linear(x[:rows], layer), sixteen[:rows])
    alone = torch.cat([linear(row[None], layer) for row in x[:3]])
    assert torch.equal(linear(x[:3], layer), alone)
    assert not torch.equal(alone, sixteen[:3])  # the two kernels sum in different orders


# Matrices held interleaved on x86: (bits, group (None: one a row), zeros).
INTERLEAVED = [(8, 32, False), (4, 32, False), (4, 32, True), (8, None, False)]


@pytest.mark.skipif(NATIVE is None, reason="no native kernels here")
@pytest.mark.parametrize("bits,group,zeros", [*INTERLEAVED, (8, 256, False), (4, 128, True)])
def test_rows_up_to_the_step_order_rows_get_the_bits_of_one(weight, bits, group, zeros):
    """Up to the kernels' step_order_rows, a row's product is the same beside other rows as
    alone, bit for bit (a drafting pass's rows are then decode steps): passes over the
    weights per row below the integer GEMM's rows, the interleaved kernel at any rows."""
    layer = QuantizedWeight(quantized(weight, bits, group, zeros), torch.float32, CPU)
    limit = NATIVE.step_order_rows(NATIVE.Matrix(layer.codes, layer.scales, layer.zeros, bits))
    rows = min(limit, 20)
    assert rows >= 3
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(1))
    alone = torch.cat([linear(x[i : i + 1], layer) for i in range(rows)])
    for count in range(2, rows + 1):
        assert torch.equal(linear(x[:count], layer), alone[:count])


def quantized(weight, bits, group, zeros):
    """``weight`` quantized: with zero points of their own in float16 (GGUF's Q4_1, Q4_K)
    or none (Q4_0's)."""
    m = quantize(weight, bits, group or weight.shape[1])
    if zeros:
        generator = torch.Generator().manual_seed(7)
        m.zeros.copy_((torch.randn(m.zeros.shape, generator=generator) * 0.1).half())
        m.scales.copy_(m.scales.half())
    else:
        m.zeros = None
    return m


@pytest.mark.skipif(
    not kernels.interleaves(CPU), reason="weights held interleaved only on x86 with the kernels"
)
@pytest.mark.parametrize("bits,group,zeros", INTERLEAVED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_interleaved_tables_look_up_the_dequantized_rows(bits, group, zeros, dtype):
    """A quantized embedding table held interleaved looks its rows up natively
    (quantize.cpp's interleaved_rows): bit for bit the rows torch dequantizes, negative
    scales (GGUF's Q4_0 has them) and every row of a 16-row group included."""
    generator = torch.Generator().manual_seed(11)
    m = quantized(torch.randn(64, 96, generator=generator), bits, group, zeros)
    m.scales[::3] *= -1
    table = QuantizedWeight(m, dtype, CPU)
    assert table.interleaved
    ids = torch.tensor([[63, 0, 17, 17], [5, 48, 31, 16]])
    looked_up = table.rows(ids)
    assert looked_up.shape == (2, 4, 96) and looked_up.dtype == dtype
    expected = table.matrix(ids.reshape(-1)).dequantize(dtype).view(2, 4, 96)
    assert torch.equal(looked_up.view(torch.uint8), expected.view(torch.uint8))
    every = table.rows(torch.arange(64))
    assert torch.equal(every.view(torch.uint8), table.matrix().dequantize(dtype).view(torch.uint8))


@pytest.mark.skipif(
    not kernels.interleaves(CPU), reason="weights held interleaved only on x86 with the kernels"
)
@pytest.mark.parametrize("width", [64, 96, 256])  # one pair of blocks, an odd count, more
@pytest.mark.parametrize("bits,group,zeros", INTERLEAVED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matrices_held_interleaved_give_the_plain_products(
    width, bits, group, zeros, dtype, monkeypatch
):
    """Q8_0, Q4_0, int4 with zero points (Q4_1, Q4_K, --quantize int4) and int8 with one
    scale a row (--quantize int8) on an x86 CPU are held interleaved by 16 rows
    (linear.cpp's x16_linear_of; int8 codes as code + 128): the matrix and embedding rows
    are the plain ones; the products are the plain integer GEMM's bit for bit (the same
    sums in the same order) at any number of rows, so a row's result is the row alone's,
    with AVX512-VNNI's passes and with AVX2's (where VNNI is turned off after loading)."""
    generator = torch.Generator().manual_seed(5)
    m = quantized(torch.randn(48, width, generator=generator), bits, group, zeros)
    layer = QuantizedWeight(m, torch.float32, CPU)
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "interleaves", lambda device: False)
        plain = QuantizedWeight(m, torch.float32, CPU)
    assert layer.interleaved and not plain.interleaved
    assert layer.codes.shape == (3, width // 32, bits, 16, 4)
    assert layer.scales.shape == (3, width // (group or width), 16)
    assert (layer.zeros is None) == (not zeros)
    if zeros:
        assert torch.equal(layer.matrix().zeros, plain.matrix().zeros)
    assert torch.equal(layer.matrix().codes, plain.codes)
    assert torch.equal(layer.matrix().scales, plain.matrix().scales)
    ids = torch.tensor([[47, 0, 16, 5]])
    assert torch.equal(layer.rows(ids), plain.rows(ids))

    x = torch.randn(40, width, generator=generator).to(dtype)
    gemm = linear(x, plain)  # the plain integer GEMM (8 rows or more)

    def the_gemms_bits():
        for rows in (40, 32, 21, 16, 9, 8, 5, 3, 2):  # AMX-INT8 tiles from 9 rows where they run
            assert torch.equal(linear(x[:rows], layer), gemm[:rows])
        for i in range(4):
            assert torch.equal(linear(x[i : i + 1], layer), gemm[i : i + 1])

    the_gemms_bits()
    if kernels._avx512_vnni():
        with kernel_off("set_avx512_vnni"):
            the_gemms_bits()


@pytest.mark.skipif(
    not kernels.interleaves(CPU) or not kernels._amx_int8(),
    reason="this CPU (or its OS) does not allow AMX-INT8 tiles",
)
# Blocks of 32 inputs: one (its sums scaled after the loop alone), a pair, an odd count
# (fewer than a pass unpacks ahead, 8), more, and twice round the 16 slots that one group
# of rows (9 or 16) unpacks them into.
@pytest.mark.parametrize("width", [32, 64, 96, 320, 1024])
@pytest.mark.parametrize("rows", [9, 16, 33, 47, 130])
@pytest.mark.parametrize("bits,group,zeros", INTERLEAVED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_products_are_the_vnni_ones_bit_for_bit(width, rows, bits, group, zeros, dtype):
    """Interleaved products of 9 rows or more (prompts, batches of sequences) run on
    AMX-INT8 tiles where the CPU and the OS allow them: the same integer sums as
    vpdpbusd's, scaled in the same float steps, so the same bits, whatever the rows past the
    last whole group of 16."""
    generator = torch.Generator().manual_seed(6)
    m = quantized(torch.randn(64, width, generator=generator), bits, group, zeros)
    layer = QuantizedWeight(m, torch.float32, CPU)
    assert layer.interleaved
    x = torch.randn(rows, width, generator=generator).to(dtype)
    tiles = linear(x, layer)
    with kernel_off("set_amx_int8"):
        vnni = linear(x, layer)
    assert torch.equal(tiles, vnni)
    assert tiles.abs().max() > 0
