"""The native CPU kernels against the torch code they replace (kernels/linear.cpp for the
float products, kernels/layer_ops.cpp for the small ops of a layer; the quantized
products are checked in test_quant.py). The torch code is itself checked against
transformers by the parity tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen3chat import kernels
from qwen3chat.kv_cache import KVCache
from qwen3chat.loading import random_model
from qwen3chat.model.layers import Attention, RMSNorm
from qwen3chat.presets import preset_config

native = kernels.native(torch.zeros(1))
pytestmark = pytest.mark.skipif(native is None, reason="no AVX2 CPU or no C++ compiler here")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 4, 7, 9, 15, 16, 20, 101])
@pytest.mark.parametrize("width", [512, 96, 288])  # AVX-512: whole steps of 64, and a last 32
def test_dense_linear(dtype, rows, width, product_kernels):
    """Up to 7 rows stream the weights, each weight row against up to four activation
    rows; up to 63 rows take three weight rows by four activation rows at a time, in the
    AVX-512 form where it runs (the last of each part full here); more take packed panels
    of weight rows, 16 weight rows six activation rows at a time with AVX2 (1202 = 75
    panels and 2 rows, 101 = 16 sixes and 5), 32 by 12 with AVX-512 (1202 = 37 panels and
    18 rows, 101 = 8 twelves and 5)."""
    weight = rand(1202, width, dtype=dtype)
    x = rand(rows, width, dtype=dtype, seed=1)
    out = native.dense_linear(x, weight)
    expected = x.float() @ weight.float().T
    assert out.dtype == dtype and out.shape == (rows, 1202)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert (out.float() - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_panel_rows_do_not_depend_on_the_rows_beside_them(dtype, product_kernels):
    """64 rows or more (32 with AVX-512): each output is one chain over the inputs in
    order, so a prompt's rows get the same bits in any chunk of 64 or more (float32
    outputs)."""
    weight = rand(200, 96, dtype=dtype)
    x = rand(101, 96, seed=1)
    whole = native.dense_linear(x, weight)
    assert torch.equal(native.dense_linear(x[:64], weight), whole[:64])
    assert torch.equal(native.dense_linear(x[37:], weight), whole[37:])


@pytest.mark.parametrize(
    "weights, rows",
    [(dtype, torch.float32) for dtype in DTYPES]
    # Rounded outputs too (not bf16 by bf16, which is oneDNN's where AVX512-BF16 runs).
    + [(torch.float16, torch.float16), (torch.float16, torch.bfloat16)],
)
def test_the_avx512_panels_give_the_avx2_panels_bits(weights, rows):
    """AVX-512's panels of 32 weight rows, 12 activation rows at a time, add each output in
    the order AVX2's panels of 16 by 6 do: the same bits, so a prompt's results do not
    depend on the CPU's vector width (200 weight rows: six panels and 8 rows of 32, twelve
    and 8 of 16; 101 rows: eight twelves and 5, sixteen sixes and 5)."""
    if not kernels._avx512():
        pytest.skip("this CPU (or its OS, or QWEN3CHAT_NO_AVX512) does not allow AVX-512")
    module = kernels._module()
    weight = rand(200, 96, dtype=weights)
    x = rand(101, 96, dtype=rows, seed=1)
    try:
        module.set_avx512_products(False)
        narrow = native.dense_linear(x, weight)
    finally:
        module.set_avx512_products(True)
    assert torch.equal(native.dense_linear(x, weight), narrow)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [512, 96])
def test_float_rows_up_to_the_step_order_rows_get_the_bits_of_one(dtype, width, product_kernels):
    """Up to step_order_rows rows (kChainMaxRows), a row's outputs are the one-row
    product's bit for bit whatever rows are beside it (a drafting pass's rows are then
    decode steps); float32 outputs, so that no rounding hides a difference."""
    weight = rand(1202, width, dtype=dtype)
    rows = native.step_order_rows(native.Matrix(weight))
    assert rows >= 3
    x = rand(rows, width, seed=1)
    alone = torch.cat([native.dense_linear(x[i : i + 1], weight) for i in range(rows)])
    for count in range(2, rows + 1):
        assert torch.equal(native.dense_linear(x[:count], weight), alone[:count])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_rounds_as_torch_does(dtype, torch_matmuls, row_kernels):
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = rand(64, dtype=dtype, seed=2)
    x = rand(3, 5, 64, dtype=dtype)
    expected = norm(x)
    torch.testing.assert_close(native.rms_norm(x, norm.weight, 1e-6), expected)


@pytest.mark.parametrize("dtype", DTYPES)
# The second and third shapes split across threads in the middle of a row; the third's
# width (112) is one the AVX-512 build takes, the others' (96, 56) are not.
@pytest.mark.parametrize("shape", [(2, 3, 192), (1, 1001, 112), (1, 777, 224)])
def test_silu_mul(dtype, shape, row_kernels):
    gate_up = rand(*shape, dtype=dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(native.silu_mul(gate_up), F.silu(gate) * up)


def attention(dtype):
    config = preset_config("tiny")
    layer = Attention(config, layer_idx=1)
    for i, p in enumerate(layer.parameters()):
        p.data = rand(*p.shape, seed=i).to(dtype)
    return config, layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start,seq", [(0, 6), (6, 1), (4, 3)])
def test_projection_and_cache_write(dtype, start, seq, monkeypatch, row_kernels):
    """One call splits qkv, norms and rotates q and k, and writes k and v into the cache:
    the same q, keys and values as the torch code, and the same cache contents."""
    config, layer = attention(dtype)
    x = rand(1, seq, config.hidden_size, dtype=dtype, seed=7)
    cos, sin = rand(seq, config.head_dim, dtype=dtype, seed=8), rand(seq, config.head_dim, seed=9)
    results = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(kernels, "native", lambda x: None)
        cache = KVCache(
            config.num_hidden_layers, config.num_key_value_heads, config.head_dim, 16, dtype
        )
        cache.k.fill_(3.0)  # earlier positions: what attention sees before start
        q, k, v = layer.project(x, cos, sin.to(dtype), cache, start)
        results.append((q, k, v, cache.k.clone(), cache.v.clone()))
        assert k.shape[2] == start + seq
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,length",
    [
        (16, 8, 128, 141),
        (4, 2, 16, 7),
        (8, 1, 64, 33),
        (2, 2, 8, 1),
        (12, 4, 32, 130),
        (10, 2, 128, 1025),
        (6, 2, 40, 9),
    ],
)
@pytest.mark.parametrize("rows", [1, 5])
def test_decode_attention(dtype, heads, kv_heads, head_dim, length, rows):
    """The queries of the last ``rows`` positions (one: a decode step) over a cache view
    (strided: the cache is longer than what is attended), each seeing the keys up to its
    own position, grouped query heads included."""
    rows = min(rows, length)
    q = rand(1, heads, rows, head_dim, dtype=dtype)
    keys = rand(1, kv_heads, length + 20, head_dim, dtype=dtype, seed=1)[:, :, :length]
    values = rand(1, kv_heads, length + 20, head_dim, dtype=dtype, seed=2)[:, :, :length]
    causal = torch.ones(rows, length, dtype=torch.bool).tril(length - rows)
    expected = F.scaled_dot_product_attention(
        q.float(), keys.float(), values.float(), attn_mask=causal, enable_gqa=True
    )
    out = native.decode_attention(q, keys, values)
    assert out.dtype == dtype and out.shape == (1, rows, heads * head_dim)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(
        out.float(), expected.transpose(1, 2).reshape(1, rows, -1), rtol=tolerance, atol=tolerance
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_model_with_kernels_matches_torch_code(dtype, quantize, monkeypatch):
    """A prefill and decode steps of a whole model: the kernels against the torch code."""
    from qwen3chat.quant import QuantSpec

    model = random_model(
        preset_config("tiny"), dtype, torch.device("cpu"), std=0.5, quant=QuantSpec.parse(quantize)
    )
    tokens = torch.tensor([[5, 17, 300, 42, 9, 1000, 77, 8, 15, 2, 6]])

    def run():
        cache = model.new_cache(32)
        with torch.no_grad():
            logits = [model(tokens[:, :7], cache, 0)]
            logits += [model(tokens[:, i : i + 1], cache, i) for i in range(7, tokens.shape[1])]
        return torch.cat(logits).float()

    ours = run()
    monkeypatch.setattr(kernels, "native", lambda x: None)
    theirs = run()
    # float weights: rounding only; quantized: decode steps see int8 activations.
    if quantize == "none" and dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max())
    else:
        error = (ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)
        agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
        assert error.max() < 0.1 and agree >= 0.75, (error, agree)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_decode_layer_is_the_per_operation_path(dtype, quantize, monkeypatch):
    """One native call per layer runs the same kernels in the same order as the layer's
    Python code calling them one by one: logits and cache contents bit for bit."""
    from qwen3chat.model import native as native_step
    from qwen3chat.quant import QuantSpec

    model = random_model(
        preset_config("tiny"), dtype, torch.device("cpu"), std=0.5, quant=QuantSpec.parse(quantize)
    )
    assert all(native_step.layer_weights(native, layer) is not None for layer in model.layers)

    # A prompt longer than LIMITS' prompt_kernel_rows: through the layers' Python code in
    # both runs (a few tokens would run natively in the first).
    prompt = torch.arange(100, 100 + native.LIMITS["prompt_kernel_rows"] + 4)[None]

    def run():
        cache = model.new_cache(32)
        end = prompt.shape[1]
        with torch.no_grad():
            logits = [model(prompt, cache, 0)]
            logits += [model(torch.tensor([[t]]), cache, end + i) for i, t in enumerate([7, 1000])]
        return torch.cat(logits), cache

    fused, fused_cache = run()
    monkeypatch.setattr(native_step, "layer_weights", lambda native, layer: None)
    per_op, per_op_cache = run()
    assert torch.equal(fused, per_op)
    assert torch.equal(fused_cache.k, per_op_cache.k) and torch.equal(fused_cache.v, per_op_cache.v)


def test_a_decode_step_is_one_native_call_for_all_layers():
    """Decode steps, and passes of a few tokens (drafts), skip the layers' Python modules
    (one call runs every layer's step); longer prompts still run through them."""
    model = random_model(preset_config("tiny"), torch.bfloat16, torch.device("cpu"), std=0.5)
    cache = model.new_cache(64)
    calls = []
    for layer in model.layers:
        layer.register_forward_hook(lambda *args: calls.append(1))
    longer = native.LIMITS["prompt_kernel_rows"] + 1
    with torch.no_grad():
        model(torch.arange(100, 100 + longer)[None], cache, 0)
        assert len(calls) == len(model.layers)
        model(torch.tensor([[7, 8, 9]]), cache, longer)
        model(torch.tensor([[7]]), cache, longer + 3)
    assert len(calls) == len(model.layers)


def test_a_layer_called_on_its_own_decodes_natively():
    """bench --ops times a layer's decode step alone: it must be the native step, not the
    layer's Python modules one by one."""
    model = random_model(preset_config("tiny"), torch.bfloat16, torch.device("cpu"), std=0.5)
    cache = model.new_cache(8)
    layer, calls = model.layers[0], []
    layer.self_attn.register_forward_hook(lambda *args: calls.append(1))
    x = rand(1, 1, model.config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x, model.rope_cos[:1], model.rope_sin[:1], None, cache, 0)
    assert calls == [] and out.shape == x.shape and torch.isfinite(out).all()


def test_a_converted_model_decodes_with_its_converted_weights(monkeypatch):
    """The native step's view of a layer's weights is built anew when the model's tensors
    are converted (model.float()), not read from the tensors it was built from. (torch
    converts a parameter in place unless told to make new ones, as here.)"""
    from qwen3chat.model import native as native_step

    monkeypatch.setattr(torch.__future__, "get_overwrite_module_params_on_conversion", lambda: True)

    model = random_model(preset_config("tiny"), torch.bfloat16, torch.device("cpu"), std=0.5)
    # Longer than a native pass takes: the prompt runs through the Python layers in both.
    tokens = torch.arange(100, 100 + native.LIMITS["prompt_kernel_rows"] + 1)[None]

    def decode():
        cache = model.new_cache(32)
        with torch.no_grad():
            model(tokens, cache, 0)
            return model(torch.tensor([[7]]), cache, tokens.shape[1])

    decode()
    model.float()
    assert native_step.layer_weights(native, model.layers[0]).input_norm.dtype == torch.float32
    fused = decode()
    monkeypatch.setattr(native_step, "layer_weights", lambda native, layer: None)
    assert torch.equal(fused, decode())
