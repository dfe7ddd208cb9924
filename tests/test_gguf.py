"""GGUF files against transformers on the same (dequantized) weights, the tokenizer from
GGUF metadata, and broken files."""

from __future__ import annotations

import copy
import shutil
import warnings

import gguf
import numpy as np
import pytest
import torch
from conftest import build_reference_model
from gguf import GGMLQuantizationType as T
from gguf_files import hand_built_blocks, write_gguf
from test_parity import PROMPT, assert_logits_close, reference_greedy

from qwen3chat import kernels
from qwen3chat.engine import Engine
from qwen3chat.errors import QwenChatError
from qwen3chat.loading import load_model
from qwen3chat.quant import QuantizedWeight, quantize
from qwen3chat.sampling import SamplingSettings
from qwen3chat.weights import gguf_quants
from qwen3chat.weights.gguf import GGUFSource, open_gguf

STEPS = 24


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


_FILES: dict = {}


# K-quants come in super-blocks of 256 values: every matrix row must be a multiple of it.
K_SHAPES = dict(
    hidden_size=256,
    intermediate_size=512,
    head_dim=64,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def make_file(gguf_dir, tokenizer_dir, qtype, tie=True, seed=5):
    """A GGUF file of a tiny model and the reference holding the file's weights (cached:
    writing the 151k-token vocabulary takes a few seconds)."""
    key = (qtype, tie, seed)
    if key not in _FILES:
        shapes = K_SHAPES if qtype in (T.Q4_K, T.Q6_K) else {}
        reference = build_reference_model(tie=tie, seed=seed, **shapes)
        path = gguf_dir / f"tiny-{qtype.name}-{'tied' if tie else 'untied'}-{seed}.gguf"
        stored = write_gguf(reference, tokenizer_dir, path, qtype, seed=seed)
        reference.load_state_dict(stored, strict=False)
        _FILES[key] = (path, reference)
    return _FILES[key]


def ours_greedy(path, steps=STEPS):
    loaded = load_model(path, device="cpu", dtype="float32")
    loaded.tokenizer.stop_ids = []
    engine = Engine(loaded.model, loaded.tokenizer, max_seq_len=128)
    logits = engine.score(PROMPT)
    finish = list(engine.generate(PROMPT, steps, SamplingSettings(temperature=0.0)))[-1]
    return loaded, logits, finish.token_ids


# Types whose blocks map exactly onto our packed layouts (Q4_1's and Q4_K's zero points
# and Q4_K's scales are rounded to float16 there: close, not exact).
EXACT = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0}


@pytest.mark.parametrize(
    "qtype,tie",
    [
        (T.F32, True),
        (T.F16, True),
        (T.BF16, False),
        (T.Q8_0, False),
        (T.Q8_0, True),
        (T.Q4_0, True),
        (T.Q4_1, False),
        (T.Q4_K, False),
    ],
    ids=lambda v: v.name if isinstance(v, T) else ("tied" if v else "untied"),
)
def test_matches_reference_on_file_weights(gguf_dir, tokenizer_dir, qtype, tie, torch_matmuls):
    path, reference = make_file(gguf_dir, tokenizer_dir, qtype, tie)
    loaded, logits, ids = ours_greedy(path)
    with torch.no_grad():
        ref_logits = reference(torch.tensor([PROMPT])).logits[0]
    assert_logits_close(logits, ref_logits, rtol=1e-4 if qtype in EXACT else 5e-2)
    if qtype in EXACT:
        ref_ids, _ = reference_greedy(reference, PROMPT, STEPS)
        assert ids == ref_ids
    assert not any("held as int8 per 32" in n for n in loaded.notices)
    if qtype not in (T.F32, T.F16, T.BF16):
        qkv = loaded.model.layers[0].self_attn.qkv_proj.weight
        assert isinstance(qkv, QuantizedWeight)
        assert qkv.bits == (8 if qtype == T.Q8_0 else 4)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K])
def test_blocks_decode_to_gguf_py_values(qtype, monkeypatch):
    """Each block type's codes land in our layout (int4 packed two per byte, taken from
    the file's bytes or re-paired) and dequantize to gguf-py's values: exactly, or within
    the float16 rounding of Q4_1's and Q4_K's zero points and scales; the kernels'
    one-pass split (or re-pairing) gives what torch's column copies give, bit for bit."""
    rng = np.random.default_rng(3)
    rows, cols = 6, 512
    if qtype == T.Q4_K:
        raw = hand_built_blocks(rows, cols, qtype, rng)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((rows, cols), np.float32), qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).reshape(rows, cols)
    matrix = gguf_quants.decode(raw, qtype, (rows, cols), torch.float32)
    assert matrix.shape == (rows, cols)
    assert matrix.codes.shape == (rows, cols if qtype == T.Q8_0 else cols // 2)
    tolerance = 0 if qtype in EXACT else 2e-3 * expected.abs().max().item()
    torch.testing.assert_close(matrix.dequantize(), expected, rtol=0, atol=tolerance)
    if kernels.native(torch.empty(0)) is None:
        return
    monkeypatch.setattr(kernels, "native", lambda x: None)
    plain = gguf_quants.decode(raw, qtype, (rows, cols), torch.float32)
    for field in ("codes", "scales", "zeros"):
        ours, torchs = getattr(matrix, field), getattr(plain, field)
        assert (ours is None and torchs is None) or torch.equal(ours, torchs), field


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_tensors_decode_into_memory_of_their_own(qtype, dtype, tmp_path):
    """A float tensor is read from the file's read-only pages, which are released after
    it (GGUFSource.read): converted straight from them or, in the file's own type, copied;
    never a view of them, and without torch's warning about non-writable arrays."""
    values = torch.randn(4, 64).to(gguf_quants.FLOAT_TYPES[qtype])
    words = values.view(torch.int16) if qtype == T.BF16 else values
    path = tmp_path / "tensor.bin"
    path.write_bytes(words.numpy().tobytes())
    stored = np.float32 if qtype == T.F32 else np.int16 if qtype == T.BF16 else np.float16
    pages = np.memmap(path, dtype=stored, mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = gguf_quants.decode(pages, qtype, (4, 64), dtype)
    assert tensor.dtype == dtype and torch.equal(tensor, values.to(dtype))
    start = pages.ctypes.data
    assert not start <= tensor.data_ptr() < start + pages.nbytes


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0])
def test_native_kernels_stay_close_on_quantized_files(gguf_dir, tokenizer_dir, qtype, monkeypatch):
    """The kernels' decode steps (int8 activations, as llama.cpp computes Q8_0/Q4_0)
    against the exact torch products, on the same file and the same tokens: the logits
    stay close and mostly pick the same token. (The quantization error of activations
    builds up through the cache; this tiny model's decisive weights amplify it.)"""
    path, _ = make_file(gguf_dir, tokenizer_dir, qtype, tie=True)
    model = load_model(path, device="cpu", dtype="float32").model
    tokens = PROMPT + list(range(100, 100 + STEPS))

    def decode_logits():
        cache = model.new_cache(64)
        with torch.no_grad():
            model(torch.tensor([PROMPT]), cache, 0)
            return torch.stack(
                [
                    model(torch.tensor([[t]]), cache, i)[0]
                    for i, t in enumerate(tokens[len(PROMPT) :], len(PROMPT))
                ]
            )

    ours = decode_logits()
    monkeypatch.setattr(kernels, "native", lambda x: None)
    exact = decode_logits()
    error = (ours - exact).norm(dim=-1) / exact.norm(dim=-1)
    agree = (ours.argmax(-1) == exact.argmax(-1)).float().mean()
    assert error.max() < 0.2 and agree >= 0.7, (error, agree)


def test_requantized_k_quant_error_is_small(gguf_dir, tokenizer_dir):
    """Q6_K has no exact packed form here: it is requantized to int8 g32 at load. The
    weights move by well under 1% (relative Frobenius norm), the logits stay close."""
    path, reference = make_file(gguf_dir, tokenizer_dir, T.Q6_K, tie=False)
    loaded, logits, _ = ours_greedy(path, steps=1)
    assert any("Q6_K (" in n and "held as int8 per 32" in n for n in loaded.notices)
    down = loaded.model.layers[0].mlp.down_proj.weight
    assert down.bits == 8
    exact = reference.model.layers[0].mlp.down_proj.weight
    error = (down.matrix().dequantize() - exact).norm() / exact.norm()
    assert error < 0.005
    with torch.no_grad():
        ref_logits = reference(torch.tensor([PROMPT])).logits[0]
    assert_logits_close(logits, ref_logits, rtol=5e-2)


def test_requantized_types_take_int4_when_asked(gguf_dir, tokenizer_dir, torch_matmuls):
    """--quantize int4 on a file whose types have no exact form here (Q6_K) holds its
    linear layers as int4 per 32 instead of int8 (about half the bytes), the embedding
    table and LM head as int8 per 32: the file's weights rounded once, which the
    reference given those same rounded weights reproduces."""
    path, reference = make_file(gguf_dir, tokenizer_dir, T.Q6_K, tie=False)
    loaded = load_model(path, device="cpu", dtype="float32", quantize="int4")
    assert any("Q6_K (" in n and "requantized to int4 per 32" in n for n in loaded.notices)
    assert not any("already quantized" in n for n in loaded.notices)
    assert loaded.quantization.endswith("; float, Q6_K tensors int4 (group 32)")
    model = loaded.model
    down = model.layers[0].mlp.down_proj.weight
    assert (down.bits, down.group_size) == (4, 32)
    for table in (model.embed_tokens.weight, model.lm_head.weight):
        assert (table.bits, table.group_size) == (8, 32)
    exact = reference.model.layers[0].mlp.down_proj.weight
    assert (down.matrix().dequantize() - exact).norm() / exact.norm() > 0.01  # int4's step
    int8 = load_model(path, device="cpu", dtype="float32").model
    size = {m: sum(b.nbytes for b in m.layers.buffers()) for m in (model, int8)}
    assert size[model] < 0.62 * size[int8]  # 5 bits a weight (scale and zero) against 8.5
    rounded = copy.deepcopy(reference)
    with torch.no_grad():
        for name, weight in rounded.named_parameters():
            if weight.dim() == 2:
                table = "embed_tokens" in name or "lm_head" in name
                weight.copy_(quantize(weight, *((8, 32) if table else (4, 32))).dequantize())
        ref_logits = rounded(torch.tensor([PROMPT])).logits[0]
    logits = Engine(model, loaded.tokenizer, max_seq_len=64).score(PROMPT)
    assert_logits_close(logits, ref_logits)


def test_tokenizer_from_metadata_equals_tokenizer_json(gguf_dir, tokenizer_dir, tokenizer):
    from test_tokenizer import SAMPLES

    path, _ = make_file(gguf_dir, tokenizer_dir, T.F32)
    loaded = load_model(path, device="cpu", dtype="float32")
    rebuilt = loaded.tokenizer
    assert rebuilt.vocab_size == tokenizer.vocab_size
    corpus = [
        *SAMPLES,
        "<|im_start|>user\nhi<|im_end|>",
        "<think>\nx\n</think>",
        "<tool_call>{}</tool_call>",
        "  \n\n  x\t\ty   ",
    ]
    for text in corpus:
        assert rebuilt.encode(text) == tokenizer.encode(text), text
        assert rebuilt.decode(rebuilt.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    assert rebuilt.stop_ids == tokenizer.stop_ids
    assert (rebuilt.think_start_id, rebuilt.think_end_id) == (151667, 151668)
    messages = [{"role": "user", "content": "Hi"}]
    assert rebuilt.render(messages, False) == tokenizer.render(messages, False)


def test_files_of_one_tokenizer_share_its_rebuild(gguf_dir, tokenizer_dir):
    """Two files with the same tokenizer metadata (one model's F32 and Q8_0 files) rebuild
    it once: their models share it."""
    first, second = (make_file(gguf_dir, tokenizer_dir, qtype)[0] for qtype in (T.F32, T.Q8_0))
    loaded = [load_model(path, device="cpu", dtype="float32") for path in (first, second)]
    assert loaded[0].tokenizer.backend is loaded[1].tokenizer.backend


def test_vocabulary_fields_are_dropped_before_the_weights_load(
    gguf_dir, tokenizer_dir, monkeypatch
):
    # gguf-py keeps two array views per vocabulary string (~90 MiB for Qwen3's): built
    # into the tokenizer, they must not stay in memory beside the weights.
    still_held = []
    read = GGUFSource.read

    def spy(self, *args, **kwargs):
        still_held.append("tokenizer.ggml.tokens" in self.reader.fields)
        return read(self, *args, **kwargs)

    monkeypatch.setattr(GGUFSource, "read", spy)
    path, _ = make_file(gguf_dir, tokenizer_dir, T.Q8_0)
    load_model(path, device="cpu", dtype="float32")
    assert still_held and not any(still_held)


def test_tokenizer_json_beside_the_file_wins(gguf_dir, tokenizer_dir, tmp_path):
    path, _ = make_file(gguf_dir, tokenizer_dir, T.F32)
    local = tmp_path / path.name
    shutil.copy(path, local)
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    loaded = load_model(local, device="cpu", dtype="float32")
    assert loaded.tokenizer.template_is_builtin  # no tokenizer_config.json beside it


def test_sampling_values_in_the_metadata_are_the_defaults(tokenizer_dir, tmp_path):
    """The general.sampling.* keys (llama.cpp's converter copies generation_config.json's
    values there, and llama.cpp takes them as defaults) replace our defaults as a
    generation_config.json does; one beside the file wins over them."""
    path = tmp_path / "sampling.gguf"
    sampling = {"temp": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.0}
    write_gguf(build_reference_model(tie=True), tokenizer_dir, path, T.F32, sampling=sampling)
    loaded = load_model(path, device="cpu", dtype="float32")
    assert loaded.generation_defaults == {
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        "min_p": 0.0,
    }
    (tmp_path / "generation_config.json").write_text('{"temperature": 1.0}')
    assert load_model(path, device="cpu", dtype="float32").generation_defaults == {
        "temperature": 1.0
    }


def test_quantized_memory_is_smaller(gguf_dir, tokenizer_dir):
    """Weights stay quantized in memory: count the bytes the decoder layers hold."""
    sizes = {}
    for qtype in (T.F32, T.Q8_0, T.Q4_0):
        path, _ = make_file(gguf_dir, tokenizer_dir, qtype, tie=False)
        layers = load_model(path, device="cpu", dtype="float32").model.layers
        sizes[qtype] = sum(t.nbytes for t in [*layers.buffers(), *layers.parameters()])
    assert sizes[T.Q8_0] < 0.35 * sizes[T.F32]  # 8.5 bits per weight against 32
    assert sizes[T.Q4_0] < 0.6 * sizes[T.Q8_0]  # 4.5 bits (int4, f16 scale) against 8.5


def test_bad_files(tmp_path, gguf_dir, tokenizer_dir):
    good, _ = make_file(gguf_dir, tokenizer_dir, T.Q8_0)
    data = good.read_bytes()
    cases = {
        "magic.gguf": b"GGUX" + data[4:],
        "truncated-header.gguf": data[:200],
        "truncated-data.gguf": data[: len(data) - 1000],
        "empty.gguf": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(QwenChatError, match=name):
            load_model(path, device="cpu", dtype="float32")


def write_split(folder, tokenizer_dir, tie=True, small_first_shard=False) -> list:
    """The Q8_0 model make_file writes, split as gguf-split writes it (7 tensors a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    reference = build_reference_model(tie=tie, seed=5)
    write_gguf(
        reference,
        tokenizer_dir,
        folder / "tiny.gguf",
        T.Q8_0,
        seed=5,
        split_max_tensors=7,
        small_first_shard=small_first_shard,
    )
    return sorted(folder.glob("*.gguf"))


@pytest.mark.parametrize(
    "small_first_shard", [False, True], ids=["tensors-first", "metadata-first"]
)
def test_split_model_loads_as_the_single_file(gguf_dir, tokenizer_dir, tmp_path, small_first_shard):
    """A model split into NAME-0000i-of-0000n.gguf files (the Hub's large quants) loads
    from any of its files and computes what the single file does, bit for bit; with
    gguf-split's --no-tensor-first-split the first file holds the metadata alone."""
    single, _ = make_file(gguf_dir, tokenizer_dir, T.Q8_0)
    _, logits, ids = ours_greedy(single)
    shards = write_split(tmp_path, tokenizer_dir, small_first_shard=small_first_shard)
    assert len(shards) >= 3 and shards[0].name == f"tiny-00001-of-{len(shards):05d}.gguf"
    for path in (shards[0], shards[-1]) if small_first_shard else (shards[1],):
        loaded, split_logits, split_ids = ours_greedy(path)
        assert torch.equal(split_logits, logits)
        assert split_ids == ids
        assert loaded.quantization == load_model(single, dtype="float32").quantization


def test_split_model_errors(tokenizer_dir, tmp_path):
    shards = write_split(tmp_path / "tiny", tokenizer_dir)
    count = len(shards)

    def error(path=shards[0]) -> str:
        with pytest.raises(QwenChatError) as raised:
            load_model(path, device="cpu", dtype="float32")
        return str(raised.value)

    moved = shards[1].rename(tmp_path / "elsewhere.gguf")
    assert error() == (
        f"{shards[1]}: missing; {shards[0].name} is one of the {count} files of a split "
        f"model: put them all in one folder (download: --include 'tiny-*-of-{count:05d}.gguf')"
    )
    moved.rename(shards[1])

    last = shards[-1].read_bytes()
    shards[-1].write_bytes(shards[1].read_bytes())
    assert f"its metadata says file 2 of {count}, not {count} of {count}" in error(shards[1])
    # The untied model has one more tensor (output.weight) in its last file.
    untied = write_split(tmp_path / "untied", tokenizer_dir, tie=False)
    assert len(untied) == count
    shards[-1].write_bytes(untied[-1].read_bytes())
    assert "files hold" in error() and "(split.tensors.count)" in error()
    shards[-1].write_bytes(last)

    renamed = shards[0].rename(tmp_path / "tiny" / "tiny.gguf")
    assert "not named NAME-0000i-of-" in error(renamed)

    # A tensor in two of the files.
    first = open_gguf(shards[1])
    with pytest.raises(QwenChatError, match=f"{shards[2]}: tensor .* is also in {shards[1].name}"):
        GGUFSource({shards[1]: first, shards[2]: first})
