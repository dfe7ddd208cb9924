"""The paged-KV-cache kernels (kernels/layer_ops.cpp's paged attention and k/v write,
decode_layer.cpp's paged_layer) against torch references over the same keys, and against
the contiguous single-sequence decode step, which a one-sequence paged step reproduces bit
for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from qwen3chat import kernels
from qwen3chat.kv_cache import KVCache, dequantize_rows, quantize_rows
from qwen3chat.loading import random_model
from qwen3chat.model import native as native_step
from qwen3chat.model.layers import apply_rope
from qwen3chat.presets import preset_config
from qwen3chat.quant import QuantSpec

native = kernels.native(torch.zeros(1))
pytestmark = pytest.mark.skipif(native is None, reason="no AVX2 CPU or no C++ compiler here")

BLOCK = 16
NUM_BLOCKS = 12
# (cached positions before the step, rows in the step) per sequence: a prefill chunk of 7
# rows from position 20 (it spans two blocks), and decode rows at positions 4 and 36.
SEQUENCES = [(20, 7), (4, 1), (36, 1)]
# Prompts longer than the kernel takes row by row (LIMITS' prompt_kernel_rows and
# prompt_sdpa_work), which go to SDPA over their sequence's rows: 96 from position 0
# (plain causal), 24 after 400 cached.
PROMPTS = [(0, 96), (4, 1), (400, 24)]
CONTEXT = 448  # positions the model tests' rotary tables and caches hold


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


class Batch:
    """A step's rows over shuffled, non-contiguous block tables: rows of a sequence are
    consecutive, and the sequences' rows interleave in another order than their tables."""

    def __init__(self, sequences=SEQUENCES, order=(1, 0, 2), seed=0):
        self.sequences = sequences
        counts = [-(-(cached + rows) // BLOCK) for cached, rows in sequences]
        self.num_blocks = max(NUM_BLOCKS, sum(counts))  # the cache's
        blocks = torch.randperm(self.num_blocks, generator=torch.Generator().manual_seed(seed))
        max_blocks = max(counts)
        self.tables = torch.zeros(len(sequences), max_blocks, dtype=torch.int32)
        used = 0
        for s, (cached, rows) in enumerate(sequences):
            count = (cached + rows + BLOCK - 1) // BLOCK
            self.tables[s, :count] = blocks[used : used + count].to(torch.int32)
            used += count
        positions, row_seq = [], []
        for s in order:
            cached, rows = sequences[s]
            positions += range(cached, cached + rows)
            row_seq += [s] * rows
        self.positions = torch.tensor(positions)
        self.row_seq = torch.tensor(row_seq)

    def slot(self, s: int, p: int) -> int:
        return int(self.tables[s, p // BLOCK]) * BLOCK + p % BLOCK

    def slots(self, s: int, end: int) -> torch.Tensor:
        """Sequence s's slots of positions 0..end-1."""
        return torch.tensor([self.slot(s, p) for p in range(end)])

    def own_slots(self) -> torch.Tensor:
        """Each row's slot, of its own position."""
        pairs = zip(self.row_seq.tolist(), self.positions.tolist(), strict=True)
        return torch.tensor([self.slot(s, p) for s, p in pairs])

    def rows_of(self, s: int) -> torch.Tensor:
        return (self.row_seq == s).nonzero().flatten()

    def args(self):
        return self.positions, self.row_seq, self.tables, BLOCK


def cache(layers, kv_heads, head_dim, dtype, seed=1, blocks=NUM_BLOCKS):
    slots = blocks * BLOCK
    return (
        rand(layers, kv_heads, slots, head_dim, dtype=dtype, seed=seed),
        rand(layers, kv_heads, slots, head_dim, dtype=dtype, seed=seed + 1),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim", [(4, 2, 16), (6, 2, 64), (3, 3, 32), (4, 1, 96), (2, 2, 128)]
)
@pytest.mark.parametrize("sequences", [SEQUENCES, PROMPTS])
def test_paged_attention(dtype, heads, kv_heads, head_dim, sequences, attention_kernels):
    """Each row over its own sequence's keys 0..position through the block table (with
    AVX-512 and bf16: head sizes of one and two sweeps of 64 columns, a sweep of 32, and
    an odd number of query heads per KV head), long prompts' rows included."""
    batch = Batch(sequences)
    k_cache, v_cache = cache(2, kv_heads, head_dim, dtype, blocks=batch.num_blocks)
    q = rand(len(batch.positions), heads, head_dim, dtype=dtype, seed=3)
    out = native.paged_attention(q, k_cache, v_cache, 1, *batch.args())
    assert out.dtype == dtype and out.shape == (len(batch.positions), heads * head_dim)
    for i, (p, s) in enumerate(zip(batch.positions.tolist(), batch.row_seq.tolist(), strict=True)):
        slots = batch.slots(s, p + 1)
        keys, values = k_cache[1][:, slots].float(), v_cache[1][:, slots].float()
        expected = F.scaled_dot_product_attention(
            q[i, :, None].float(), keys, values, enable_gqa=True
        ).reshape(-1)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out[i].float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("head_dim", [32, 128])  # 128: integer scores where VNNI runs
@pytest.mark.parametrize("sequences", [SEQUENCES, PROMPTS])
def test_paged_attention_over_an_int8_cache_is_the_contiguous_ones(
    head_dim, sequences, attention_kernels
):
    """Over an int8 cache, each row is the single-sequence kernel's over the same rows
    gathered, bit for bit (integer scores included where the CPU runs them); a long
    prompt's rows SDPA's over them dequantized, to bf16 rounding."""
    heads, kv_heads = 4, 2
    batch = Batch(sequences)
    limits = native.LIMITS
    long = {
        s
        for s, (cached, rows) in enumerate(sequences)
        if rows > limits["prompt_kernel_rows"]
        and rows * (cached + rows) >= limits["prompt_sdpa_work"]
    }
    floats = cache(2, kv_heads, head_dim, torch.float32, blocks=batch.num_blocks)
    k_cache, v_cache = (quantize_rows(c) for c in floats)
    q = rand(len(batch.positions), heads, head_dim, dtype=torch.bfloat16, seed=3)
    out = native.paged_attention(q, k_cache, v_cache, 1, *batch.args())
    for i, (p, s) in enumerate(zip(batch.positions.tolist(), batch.row_seq.tolist(), strict=True)):
        slots = batch.slots(s, p + 1)
        keys, values = k_cache[1][None, :, slots], v_cache[1][None, :, slots]
        if s in long:
            expected = F.scaled_dot_product_attention(
                q[i, :, None].float(),
                dequantize_rows(keys[0]),
                dequantize_rows(values[0]),
                enable_gqa=True,
            )
            torch.testing.assert_close(out[i].float(), expected.reshape(-1), rtol=1e-2, atol=1e-2)
        else:
            expected = native.decode_attention(q[i][None, :, None], keys, values)
            assert torch.equal(out[i], expected.reshape(-1))


def norm_rope(x, weight, cos, sin, eps):
    """The torch code's q/k norm (float32, rounded, scaled) and rotation, [rows, heads, D]."""
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return apply_rope(weight * h, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64])  # 64: one the AVX-512 build takes
def test_paged_qk_norm_rope_writes_each_rows_slot(dtype, head_dim, row_kernels):
    """q normed and rotated by each row's cos/sin, k and v in the rows' slots, every other
    slot untouched; bit for bit the contiguous kernel's over the same rows."""
    heads, kv_heads, eps = 4, 2, 1e-6
    batch = Batch()
    n = len(batch.positions)
    qkv = rand(n, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=4)
    q_weight, k_weight = rand(head_dim, dtype=dtype, seed=5), rand(head_dim, dtype=dtype, seed=6)
    cos, sin = rand(n, head_dim, dtype=dtype, seed=7), rand(n, head_dim, dtype=dtype, seed=8)
    k_cache, v_cache = cache(2, kv_heads, head_dim, dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q = native.paged_qk_norm_rope(
        qkv, q_weight, k_weight, cos, sin, eps, heads, kv_heads, k_cache, v_cache, 1, *batch.args()
    )
    # The contiguous kernel: the same rows as one sequence of n tokens.
    k_rows = torch.empty(1, kv_heads, n, head_dim, dtype=dtype)
    v_rows = torch.empty_like(k_rows)
    q_rows = native.qk_norm_rope(
        qkv[None], q_weight, k_weight, cos, sin, eps, heads, kv_heads, k_rows, v_rows
    )
    assert q.shape == (n, heads, head_dim)
    assert torch.equal(q, q_rows[0].transpose(0, 1))
    slots = batch.own_slots()
    assert torch.equal(k_cache[1][:, slots], k_rows[0]) and torch.equal(
        v_cache[1][:, slots], v_rows[0]
    )
    untouched = torch.ones(k_cache.shape[2], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(k_cache[0], k_before[0]) and torch.equal(v_cache[0], v_before[0])
    assert torch.equal(k_cache[1][:, untouched], k_before[1][:, untouched])
    assert torch.equal(v_cache[1][:, untouched], v_before[1][:, untouched])
    # And the torch code's values.
    q_parts = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    expected_q = norm_rope(
        q_parts[0].view(n, heads, head_dim), q_weight, cos[:, None], sin[:, None], eps
    )
    expected_k = norm_rope(
        q_parts[1].view(n, kv_heads, head_dim), k_weight, cos[:, None], sin[:, None], eps
    )
    torch.testing.assert_close(q, expected_q)
    torch.testing.assert_close(k_cache[1][:, slots].transpose(0, 1), expected_k)
    assert torch.equal(v_cache[1][:, slots].transpose(0, 1), q_parts[2].view(n, kv_heads, head_dim))


def test_paged_cache_is_checked():
    batch = Batch()
    k_cache, v_cache = cache(1, 2, 16, torch.float32)
    q = rand(len(batch.positions), 4, 16)
    with pytest.raises(RuntimeError, match="block_size"):
        native.paged_attention(
            q, k_cache, v_cache, 0, batch.positions, batch.row_seq, batch.tables, 8
        )
    tables = batch.tables.clone()
    tables[2, 2] = NUM_BLOCKS
    with pytest.raises(RuntimeError, match="not one of the cache's"):
        native.paged_attention(
            q, k_cache, v_cache, 0, batch.positions, batch.row_seq, tables, BLOCK
        )
    with pytest.raises(RuntimeError, match="past its block table"):
        positions = batch.positions.clone()
        positions[0] = 4 * BLOCK
        native.paged_attention(
            q, k_cache, v_cache, 0, positions, batch.row_seq, batch.tables, BLOCK
        )


def model_of(preset, dtype, quantize="none"):
    return random_model(
        preset_config(preset), dtype, torch.device("cpu"), std=0.5, quant=QuantSpec.parse(quantize)
    )


def paged_cache_of(model, dtype, blocks=NUM_BLOCKS):
    c = model.config
    shape = (c.num_hidden_layers, c.num_key_value_heads, blocks * BLOCK, c.head_dim)
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
@pytest.mark.parametrize("sequences", [SEQUENCES, PROMPTS])
def test_paged_layers_match_each_sequence_through_the_torch_layers(
    preset, quantize, sequences, monkeypatch
):
    """A mixed step (a prefill chunk, or two long ones, and decode rows of three
    sequences): each sequence's rows as the model's layers compute them over a contiguous
    cache holding the same earlier keys (the torch code for float weights), and the rows'
    keys and values stored in their slots."""
    dtype = torch.float32
    model = model_of(preset, dtype, quantize)
    model.setup_rope(CONTEXT)
    batch = Batch(sequences)
    hidden = model.config.hidden_size
    k_cache, v_cache = paged_cache_of(model, dtype, batch.num_blocks)
    x = torch.empty(len(batch.positions), hidden)
    expected = torch.empty_like(x)
    expected_k, expected_v = {}, {}
    with monkeypatch.context() as m, torch.no_grad():
        if quantize == "none":
            m.setattr(kernels, "native", lambda x: None)
        for s, (cached, rows) in enumerate(batch.sequences):
            end = cached + rows
            inputs = rand(1, end, hidden, seed=10 + s)
            contiguous = model.new_cache(CONTEXT)
            h = inputs[:, :cached]
            for layer in model.layers if cached else []:  # the earlier positions, cached
                h = layer(h, model.rope_cos[:cached], model.rope_sin[:cached], None, contiguous, 0)
            indices = torch.arange(end)
            mask = indices[None, :] <= indices[cached:, None]
            h = inputs[:, cached:]
            for layer in model.layers:
                h = layer(
                    h,
                    model.rope_cos[cached:end],
                    model.rope_sin[cached:end],
                    mask,
                    contiguous,
                    cached,
                )
            rows_of = batch.rows_of(s)
            x[rows_of], expected[rows_of] = inputs[0, cached:], h[0]
            slots = batch.slots(s, end)
            k_cache[:, :, slots[:cached]] = contiguous.k[:, 0, :, :cached]
            v_cache[:, :, slots[:cached]] = contiguous.v[:, 0, :, :cached]
            expected_k[s], expected_v[s] = contiguous.k[:, 0, :, :end], contiguous.v[:, 0, :, :end]
    cos, sin = model.rope_cos[batch.positions], model.rope_sin[batch.positions]
    with torch.no_grad():
        out = native_step.paged_layers(x, model.layers, cos, sin, k_cache, v_cache, *batch.args())
    assert out is not None and out.shape == x.shape
    if quantize == "none":
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    else:
        # Quantized weights: the reference is the model's native path (its products
        # quantize activations to int8, the torch code's do not), which differs from the
        # paged step only in float rounding (SDPA's attention against the kernel's). The
        # int4 products turn that into 1-3% here: an input scaled by 1 + 1e-6 moves this
        # model's int4 output as much (int8's by 1e-7).
        error = (out - expected).norm(dim=-1) / expected.norm(dim=-1)
        assert error.max() < (1e-4 if quantize == "int8" else 0.1), error
    for s, (cached, rows) in enumerate(batch.sequences):
        slots = batch.slots(s, cached + rows)
        for stored, reference in ((k_cache, expected_k[s]), (v_cache, expected_v[s])):
            if quantize != "int4":
                torch.testing.assert_close(stored[:, :, slots], reference, rtol=1e-4, atol=1e-4)
            else:
                error = (stored[:, :, slots] - reference).norm() / reference.norm()
                assert error < 0.1


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize(
    "dtype,quantize", [(torch.float32, "none"), (torch.bfloat16, "none"), (torch.bfloat16, "int4")]
)
def test_one_decode_row_is_the_contiguous_decode_step(preset, dtype, quantize):
    """A single sequence's decode row over a paged cache: bit for bit the contiguous
    decode step over a KVCache holding the same keys (output and stored key/value)."""
    model = model_of(preset, dtype, quantize)
    model.setup_rope(CONTEXT)
    c = model.config
    position = 37  # three blocks, the last partly used and not a multiple of 4 keys
    batch = Batch(sequences=[(position, 1)], order=(0,), seed=3)
    contiguous = KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 64, dtype)
    contiguous.k[:, 0, :, :position] = rand(
        c.num_hidden_layers, c.num_key_value_heads, position, c.head_dim, dtype=dtype, seed=1
    )
    contiguous.v[:, 0, :, :position] = rand(
        c.num_hidden_layers, c.num_key_value_heads, position, c.head_dim, dtype=dtype, seed=2
    )
    k_cache, v_cache = paged_cache_of(model, dtype)
    slots = batch.slots(0, position + 1)
    k_cache[:, :, slots] = contiguous.k[:, 0, :, : position + 1]
    v_cache[:, :, slots] = contiguous.v[:, 0, :, : position + 1]
    x = rand(1, 1, c.hidden_size, dtype=dtype, seed=9)
    cos, sin = model.rope_cos[position : position + 1], model.rope_sin[position : position + 1]
    with torch.no_grad():
        ours = native_step.paged_layers(
            x[0], model.layers, cos, sin, k_cache, v_cache, *batch.args()
        )
        theirs = native_step.decode_layers(x, model.layers, cos, sin, contiguous, position)
    assert torch.equal(ours, theirs[0])
    assert torch.equal(k_cache[:, :, slots], contiguous.k[:, 0, :, : position + 1])
    assert torch.equal(v_cache[:, :, slots], contiguous.v[:, 0, :, : position + 1])


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("kv_dtype", [None, torch.int8])
@pytest.mark.parametrize("count", [9, 17])
def test_a_few_rows_of_one_sequence_run_natively_over_its_contiguous_cache(
    preset, kv_dtype, count, monkeypatch
):
    """The pending token and its drafts (9 rows) after 37 cached positions: the model's
    forward runs them in one native call over the contiguous cache (decode_layers; not
    more rows than LIMITS' prompt_kernel_rows) and gives the logits, keys and values its
    torch layers give. The cache's 60 positions are stored as 64, whole blocks."""
    config = dataclasses.replace(preset_config(preset), head_dim=32)  # whole int8 blocks
    model = random_model(config, torch.float32, torch.device("cpu"), std=0.5)
    model.setup_rope(CONTEXT)
    prefix, rows = torch.arange(100, 137)[None], torch.arange(200, 200 + count)[None]
    ran = []
    original = native_step.decode_layers

    def spy(*args):
        out = original(*args)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(native_step, "decode_layers", spy)

    def forward(with_kernels: bool):
        cache = model.new_cache(60, kv_dtype)
        with monkeypatch.context() as m, torch.no_grad():
            m.setattr(kernels, "native", lambda x: None)
            model(prefix, cache, 0)
            if with_kernels:
                m.undo()
            logits = model(rows, cache, 37, all_logits=True)
        return logits, cache

    (ours, cache), (theirs, reference) = forward(True), forward(False)
    # The prefix's forwards and the torch one's rows never reach the kernels.
    assert ran == [False, count <= native.LIMITS["prompt_kernel_rows"], False, False]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max())
    for stored, expected in ((cache.k, reference.k), (cache.v, reference.v)):
        if kv_dtype is None:
            torch.testing.assert_close(
                stored[..., : 37 + count, :], expected[..., : 37 + count, :], rtol=1e-4, atol=1e-4
            )
        else:  # int8 rows: a code may round the other way
            difference = stored[..., : 37 + count, :].int() - expected[..., : 37 + count, :].int()
            assert difference.abs().max() <= 1 and (difference != 0).float().mean() < 0.01


@pytest.fixture
def integer_gemm_from_8_rows():
    """The integer GEMM's AVX2 kernel, which takes 8 rows or more (AVX512-VNNI's takes 4)."""
    native = kernels.native(torch.zeros(1))
    if native is not None:
        native.set_avx512_vnni(False)
    yield
    if native is not None:
        native.set_avx512_vnni(kernels._avx512_vnni())


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_a_batch_of_decode_rows_gives_each_sequence_what_it_gets_alone(
    preset, quantize, product_kernels, integer_gemm_from_8_rows
):
    """Rows batched together (one weight read, experts gathered) compute as each alone: bit
    for bit where each row's products are its own (integer ones below 8 rows), to float32
    rounding where a few float rows are multiplied together (kernels/linear.cpp rows_dot,
    AVX2 or AVX-512). That one sums each output in one order whatever the rows beside it,
    so a dense model's row is the same bits in any batch of two or more. (Where
    AVX512-VNNI runs, the integer GEMM takes 4 rows or more: held at 8 here, that GEMM is
    test_quant.py's.)"""
    model = model_of(preset, torch.float32, quantize)
    model.setup_rope(CONTEXT)
    sequences = [(4, 1), (36, 1), (20, 1), (9, 1)]
    batch = Batch(sequences=sequences, order=(2, 0, 3, 1))
    k_cache, v_cache = paged_cache_of(model, torch.float32)
    k_cache.copy_(rand(*k_cache.shape, seed=1))
    v_cache.copy_(rand(*v_cache.shape, seed=2))
    x = rand(len(sequences), model.config.hidden_size, seed=3)
    cos, sin = model.rope_cos[batch.positions], model.rope_sin[batch.positions]
    # An MoE layer's router stays float when its experts are quantized.
    exact = quantize != "none" and preset == "tiny"

    def rows(index):
        return native_step.paged_layers(
            x[index],
            model.layers,
            cos[index],
            sin[index],
            k_cache.clone(),
            v_cache.clone(),
            batch.positions[index],
            batch.row_seq[index],
            batch.tables,
            BLOCK,
        )

    with torch.no_grad():
        together = native_step.paged_layers(
            x, model.layers, cos, sin, k_cache.clone(), v_cache.clone(), *batch.args()
        )
        for i in range(len(sequences)):
            alone = rows(slice(i, i + 1))
            if exact:
                assert torch.equal(together[i : i + 1], alone), i
            else:
                scale = alone.abs().max().item()
                torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-5 * scale)
        if preset == "tiny":  # experts' row counts would change with the neighbours
            pairs = torch.cat([rows(torch.tensor([1, 3])), rows(torch.tensor([2, 0]))])
            assert torch.equal(pairs, together[[1, 3, 2, 0]])
