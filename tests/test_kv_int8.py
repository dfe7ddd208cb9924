"""The int8 KV cache (``--kv-cache int8``): rows stored as q8_0 blocks, written and read by
the native kernels exactly as the torch code writes and reads them, at what cost against
the float cache (logit error and greedy agreement), through both engines and the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build_reference_model, chat_prompts, save_model_dir
from typer.testing import CliRunner

from qwen3chat import kernels
from qwen3chat.batch.engine import BatchEngine
from qwen3chat.cli import app
from qwen3chat.engine import Engine
from qwen3chat.kv_cache import KVCache, dequantize_rows, quantize_rows, row_bytes
from qwen3chat.loading import load_model, random_model
from qwen3chat.model import native as native_step
from qwen3chat.model.layers import Attention
from qwen3chat.presets import preset_config
from qwen3chat.quant import QuantSpec
from qwen3chat.sampling import SamplingSettings

native = kernels.native(torch.zeros(1))
needs_kernels = pytest.mark.skipif(native is None, reason="no AVX2 CPU or no C++ compiler here")
GREEDY = SamplingSettings(temperature=0.0)
INT8 = torch.int8


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def config_of(preset: str, head_dim: int = 32):
    """A tiny preset with head_dim a multiple of the int8 blocks (tiny's own is 16)."""
    return dataclasses.replace(preset_config(preset), head_dim=head_dim)


def test_rows_hold_each_value_to_half_a_step():
    x = rand(3, 5, 128, dtype=torch.bfloat16) * torch.logspace(-3, 2, 128)
    x[0, 0, :32] = 0  # an all-zero block stays zero
    rows = quantize_rows(x)
    assert rows.dtype == INT8 and rows.shape == (3, 5, row_bytes(128)) == (3, 5, 136)
    back = dequantize_rows(rows)
    step = x.float().unflatten(-1, (-1, 32)).abs().amax(-1, keepdim=True) / 127
    error = (back - x.float()).unflatten(-1, (-1, 32)).abs()
    # Half a step, plus the float16 rounding of the scale (2^-11 of up to 127 steps).
    assert (error <= step * (0.5 + 127 * 2**-11) + 1e-12).all()
    assert back[0, 0, :32].eq(0).all()


def test_an_int8_cache_is_about_half_a_bf16_one():
    args = (28, 8, 128, 64)
    ratio = KVCache(*args, INT8).nbytes / KVCache(*args, torch.bfloat16).nbytes
    assert ratio == 136 / 256


def test_head_dims_that_are_not_whole_blocks_are_refused():
    from qwen3chat.errors import QwenChatError

    with pytest.raises(QwenChatError, match="multiple of 32"):
        KVCache(2, 2, 16, 8, INT8)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start,seq", [(0, 6), (6, 1)])
def test_native_cache_writes_are_the_torch_quantization(dtype, start, seq, monkeypatch):
    """q/k norm, rotation and the cache write in one native call store the same bytes as
    quantize_rows of the torch code's keys and values."""
    config = config_of("tiny")
    layer = Attention(config, layer_idx=1)
    for i, p in enumerate(layer.parameters()):
        p.data = rand(*p.shape, seed=i).to(dtype)
    x = rand(1, seq, config.hidden_size, dtype=dtype, seed=7)
    cos, sin = rand(seq, 32, dtype=dtype, seed=8), rand(seq, 32, dtype=dtype, seed=9)
    caches = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(kernels, "native", lambda x: None)
        cache = KVCache(config.num_hidden_layers, config.num_key_value_heads, 32, 16, INT8)
        layer.project(x, cos, sin, cache, start)
        caches.append(cache)
    assert caches[0].k.abs().sum() > 0
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,length",
    [
        (16, 8, 128, 141),
        (8, 1, 64, 33),
        (2, 2, 32, 1),
        (6, 2, 96, 7),
        (10, 2, 128, 1025),
        (4, 2, 256, 37),
        (2, 1, 512, 6),
    ],
)
@pytest.mark.parametrize("integer_scores", [False, True])
@pytest.mark.parametrize("rows", [1, 5])
def test_decode_attention_reads_int8_rows(
    dtype, heads, kv_heads, head_dim, length, integer_scores, rows, attention_kernels
):
    """The queries of the last ``rows`` positions over int8 rows (a strided view of a
    longer cache), each up to its own position: SDPA over the rows dequantized, in float32
    (what a prompt's tokens after a cached conversation run natively). Integer scores
    (head_dim 64, 128, 256 or 512: AVX2's maddubs, AVX-512's VNNI) are those of the
    query scaled by 1/sqrt(head_dim) and quantized as a cache row, as llama.cpp's q8_0
    keys meet q8_0 queries; the values' sum stays in floats."""
    if integer_scores and attention_kernels and not kernels._avx512_vnni():
        pytest.skip("this CPU (or its OS) does not allow AVX512-VNNI")
    integer = integer_scores and head_dim in (64, 128, 256, 512)
    rows = min(rows, length)
    q = rand(1, heads, rows, head_dim, dtype=dtype)
    keys = quantize_rows(rand(1, kv_heads, length + 20, head_dim, seed=1))[:, :, :length]
    values = quantize_rows(rand(1, kv_heads, length + 20, head_dim, seed=2))[:, :, :length]
    causal = torch.ones(rows, length, dtype=torch.bool).tril(length - rows)
    # The kernel's scale: float32 square root and division.
    scale = 1 / torch.tensor(float(head_dim)).sqrt()
    query = q.float() * scale
    if integer:
        query = dequantize_rows(quantize_rows(query))
    expected = F.scaled_dot_product_attention(
        query,
        dequantize_rows(keys),
        dequantize_rows(values),
        attn_mask=causal,
        enable_gqa=True,
        scale=1.0,
    )
    native.set_integer_scores(integer_scores)
    try:
        out = native.decode_attention(q, keys, values)
    finally:
        native.set_integer_scores(not kernels._avx512() or kernels._avx512_vnni())
    assert out.dtype == dtype and out.shape == (1, rows, heads * head_dim)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(
        out.float(), expected.transpose(1, 2).reshape(1, rows, -1), rtol=tolerance, atol=tolerance
    )


def model_of(preset: str, dtype=torch.float32, quantize: str = "none", head_dim: int = 32):
    quant = QuantSpec.parse(quantize)
    config = config_of(preset, head_dim)
    return random_model(config, dtype, torch.device("cpu"), std=0.5, quant=quant)


def decode(model, kv_dtype, tokens: torch.Tensor, prompt: int, chunk: int | None = None):
    """Logits of a prefill of ``prompt`` tokens (in chunks of ``chunk``) and of decode steps
    over the rest, one row per step; and the cache."""
    cache = model.new_cache(64, kv_dtype)
    chunk = chunk or prompt
    with torch.no_grad():
        for first in range(0, prompt, chunk):
            logits = [model(tokens[:, first : min(prompt, first + chunk)], cache, first)]
        steps = [model(tokens[:, i : i + 1], cache, i) for i in range(prompt, tokens.shape[1])]
    return torch.cat(logits + steps).float(), cache


TOKENS = torch.tensor([[5, 17, 300, 42, 9, 1000, 77, 8, 15, 2, 6, 90, 91, 92, 3000, 12]])


@needs_kernels
@pytest.mark.parametrize("dtype,quantize", [(torch.float32, "none"), (torch.bfloat16, "int4")])
# Chunks of 4: each chunk's attention in the kernel, as a chat's next turn's; of 20 (more
# than LIMITS' prompt_kernel_rows): SDPA over the rows the kernels dequantize. (The MoE model's
# 20-row chunks go through the experts' batched products, which round otherwise than the
# torch code's, enough to move a few cache bytes.)
@pytest.mark.parametrize(
    "preset,prompt,chunk", [("tiny", 7, 4), ("tiny-moe", 7, 4), ("tiny", 40, 20)]
)
def test_a_model_over_an_int8_cache_natively_is_the_torch_code(
    preset, dtype, quantize, prompt, chunk, monkeypatch
):
    """A prefill in two chunks (the second attending over the first's cached rows too) and
    decode steps with the kernels (the one-call decode step included) store the bytes the
    torch code stores, and give its logits to rounding."""
    model = model_of(preset, dtype, quantize)
    tokens = torch.randint(0, 3000, (1, prompt + 6), generator=torch.Generator().manual_seed(2))
    ours, our_cache = decode(model, INT8, tokens, prompt, chunk)
    monkeypatch.setattr(kernels, "native", lambda x: None)
    theirs, their_cache = decode(model, INT8, tokens, prompt, chunk)
    if quantize == "none":  # int4 products quantize activations natively only
        assert torch.equal(our_cache.k, their_cache.k) and torch.equal(our_cache.v, their_cache.v)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max())
    else:
        error = (ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)
        assert error.max() < 0.1


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_dequantization_is_the_torch_codes(dtype):
    """An int8 cache's rows (a strided view of a longer cache) as SDPA reads them: each
    code times its scale in float32, rounded once to the activations' dtype."""
    rows = quantize_rows(rand(2, 3, 50, 64, seed=4))[:, :, 7:40]
    out = native_step.dequantize_kv(rows, dtype)
    assert out.dtype == dtype and out.shape == (2, 3, 33, 64)
    assert torch.equal(out, dequantize_rows(rows).to(dtype))


@needs_kernels
def test_a_few_new_tokens_over_an_int8_cache_take_the_kernels():
    """Up to LIMITS' prompt_kernel_rows new tokens' attention over an int8 cache runs
    natively; more, or over a float cache, in SDPA."""
    limit = native.LIMITS["prompt_kernel_rows"]
    keys = quantize_rows(rand(1, 2, 100, 32, seed=1))
    floats = rand(1, 2, 100, 32, seed=2)
    for rows, cache, runs in ((1, floats, True), (5, floats, False), (limit, keys, True)):
        out = native_step.cached_attention(rand(1, 4, rows, 32), cache, cache)
        assert (out is not None) == runs, (rows, cache.dtype)
    assert native_step.cached_attention(rand(1, 4, limit + 1, 32), keys, keys) is None


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_chunked_prefill_over_an_int8_cache_is_whole_prefill(preset):
    model = model_of(preset)
    whole, whole_cache = decode(model, INT8, TOKENS, 12)
    chunked, chunked_cache = decode(model, INT8, TOKENS, 12, chunk=5)
    assert torch.equal(whole_cache.k, chunked_cache.k)
    torch.testing.assert_close(whole[-4:], chunked[-4:], rtol=1e-5, atol=1e-5)


# What the int8 cache costs against the float one on these models over 40 decode steps
# (measured: docs/kv_cache.md): the logits' relative error and the share of steps whose
# greedy token is the same.
@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
# head_dim 128: integer scores (AVX2's and AVX512-VNNI's), whose rounding of the query moved
# 3 of the dense model's 41 greedy choices (docs/kv_cache.md).
@pytest.mark.parametrize("head_dim,agreement", [(32, 0.95), (128, 0.85)])
def test_int8_cache_against_the_float_cache(preset, head_dim, agreement):
    model = model_of(preset, head_dim=head_dim)
    tokens = torch.randint(0, 151936, (1, 48), generator=torch.Generator().manual_seed(1))
    int8, _ = decode(model, INT8, tokens, 8)
    floats, _ = decode(model, None, tokens, 8)
    error = (int8 - floats).norm(dim=-1) / floats.norm(dim=-1)
    agree = (int8.argmax(-1) == floats.argmax(-1)).float().mean()
    assert error.median() < 0.03 and error.max() < 0.1 and agree >= agreement, (error, agree)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tokenizer_dir):
    """A tiny reference checkpoint with head_dim 32, loaded in float32."""
    model = build_reference_model(seed=3, head_dim=32)
    path = save_model_dir(model, tmp_path_factory.mktemp("tiny-d32"), tokenizer_dir)
    return load_model(path, device="cpu", dtype="float32")


def test_the_batched_engine_over_an_int8_cache_gives_each_sequence_its_own_ids(loaded):
    """Six sequences decoded together over a paged int8 cache: each gets the ids the chat
    engine gives it alone over a contiguous int8 cache."""
    requests = chat_prompts(loaded.tokenizer, 6)
    engine = BatchEngine(loaded.model, loaded.tokenizer, 256, kv_dtype=INT8)
    assert engine.cache.k.dtype == INT8
    events = {engine.add(ids, 12, GREEDY): ids for ids in requests}
    finished = {}
    while engine.has_work:
        for seq, event in engine.step():
            if hasattr(event, "token_ids"):
                finished[seq] = event.token_ids
    for seq, ids in events.items():
        alone = Engine(loaded.model, loaded.tokenizer, 256, kv_dtype=INT8)
        assert finished[seq] == list(alone.generate(ids, 12, GREEDY))[-1].token_ids
    assert engine.blocks.in_use == 0


def test_chat_takes_kv_cache_int8(loaded):
    args = ["chat", "-m", str(loaded.path), "-p", "hi", "--json", "--temperature", "0"]
    result = CliRunner().invoke(app, [*args, "-n", "8", "--dtype", "float32", "--kv-cache", "int8"])
    assert result.exit_code == 0, result.output
    engine = Engine(loaded.model, loaded.tokenizer, 2048, kv_dtype=INT8)
    prompt = loaded.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    expected = list(engine.generate(prompt, 8, GREEDY))[-1].token_ids
    assert json.loads(result.stdout)["token_ids"] == expected


def test_kv_cache_int8_on_a_model_it_cannot_hold_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["chat", "--preset", "tiny", "-p", "hi", "--kv-cache", "int8"])
    assert result.exit_code != 0
    # (after the line that says a preset's words are noise)
    last = result.stderr.splitlines()[-1]
    assert last == "error: --kv-cache int8 needs a head_dim that is a multiple of 32"
    assert "Traceback" not in result.stderr
    bad = CliRunner().invoke(app, ["chat", "--preset", "tiny", "-p", "hi", "--kv-cache", "q4"])
    assert bad.exit_code == 2 and "--kv-cache" in bad.stderr
