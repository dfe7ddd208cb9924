"""Shared fixtures: the real Qwen3 tokenizer, and tiny random Qwen3 models saved by
transformers (the reference implementation) as SafeTensors checkpoints."""

from __future__ import annotations

import copy
import lzma
import os
import shutil
from importlib import resources
from pathlib import Path

import pytest

import qwen3chat  # noqa: F401  before torch, so that torch's OpenMP threads sleep, not spin

# isort: split
import torch

from qwen3chat.config import SHAPE_FIELDS

# Under pytest-xdist the workers share the cores, and a child process (a CLI, a REPL, a
# server) running two OpenMP threads waits at every barrier for a thread another worker's
# process has descheduled: with three busy processes on two cores the ctrl-C REPL test took
# 172 s against 8 s with one thread each, and missed a 30 s expect in CI. The children take
# one thread; this process already has torch's, so the kernels' thread splits stay tested.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_FIXTURE = FIXTURES / "qwen3-tokenizer"
# The real tokenizer.json ships in the package (chat --preset needs it), xz-compressed.
TOKENIZER_JSON_XZ = resources.files("qwen3chat").joinpath("assets/qwen3-tokenizer.json.xz")
SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared/fixtures/qwen3-tokenizer"

# Large init scale: logits far apart, so greedy ids are decided by margins far above
# float32 rounding and the comparison with the reference is stable.
INIT_STD = 0.5

TINY = dict(
    vocab_size=151936,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    bos_token_id=151643,
    eos_token_id=151645,
)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real Qwen3 tokenizer files: tokenizer.json from the package's compressed copy,
    the rest from the fixture directory."""
    out = tmp_path_factory.mktemp("qwen3-tokenizer")
    (out / "tokenizer.json").write_bytes(lzma.decompress(TOKENIZER_JSON_XZ.read_bytes()))
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copy(TOKENIZER_FIXTURE / name, out / name)
    return out


@pytest.fixture
def torch_matmuls(monkeypatch):
    """Run the plain torch code instead of the native kernels: float32 products with the
    dequantized weights, which the reference reproduces to rounding. (For quantized
    weights the kernels quantize a decode step's activations to int8, as llama.cpp does;
    tests/test_kernels.py checks them against that.)"""
    from qwen3chat import kernels

    monkeypatch.setattr(kernels, "native", lambda x: None)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from qwen3chat.tokenizer import Tokenizer

    return Tokenizer.from_dir(tokenizer_dir)


# A tiny Qwen3-VL vision tower (two DeepStack mergers) and the interleaved M-RoPE of its
# text model, for the Qwen3-VL test models.
TINY_VISION = dict(
    depth=3,
    hidden_size=64,
    intermediate_size=96,
    num_heads=4,
    patch_size=16,
    out_hidden_size=64,
    num_position_embeddings=64,
    deepstack_visual_indexes=[0, 1],
)
TINY_MROPE = {
    "rope_type": "default",
    "rope_theta": 5e6,
    "mrope_section": [3, 3, 2],
    "mrope_interleaved": True,
}

# The text model of a tiny Qwen3-VL: TINY's shapes with the M-RoPE above.
TINY_VL_TEXT = {
    **{k: TINY[k] for k in (*SHAPE_FIELDS, "rms_norm_eps")},
    "rope_parameters": TINY_MROPE,
}

# The mixture-of-experts part of a tiny Qwen3MoeForCausalLM (with TINY's other shapes).
TINY_MOE = dict(
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)


def build_reference_model(tie: bool = True, seed: int = 0, moe: bool = False, **overrides):
    """A transformers Qwen3ForCausalLM (Qwen3MoeForCausalLM with ``moe``) with decisive
    random weights, in float32."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config_class, model_class = (
        (Qwen3MoeConfig, Qwen3MoeForCausalLM) if moe else (Qwen3Config, Qwen3ForCausalLM)
    )
    values = {**TINY, **(TINY_MOE if moe else {}), "tie_word_embeddings": tie, **overrides}
    config = config_class(**values)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, INIT_STD)
    return model


# A tiny hybrid model (Qwen3.5 / Qwen3.6 / Qwen3-Next): three Gated DeltaNet layers and
# a gated attention layer rotating a quarter of its 64-wide heads, two key heads serving
# four value heads; TINY's other shapes.
TINY_HYBRID = {
    **{k: v for k, v in TINY.items() if k != "rope_theta"},
    "num_hidden_layers": 4,
    "head_dim": 64,
    "tie_word_embeddings": False,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
}
# Routed experts beside a shared one (Qwen3.5-MoE, Qwen3-Next).
TINY_SHARED_EXPERTS = dict(
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
)


def build_hybrid_reference(kind: str = "dense", seed: int = 0, **overrides):
    """A transformers hybrid model with decisive random weights, in float32: ``kind``
    dense (Qwen3_5ForCausalLM), moe (Qwen3_5MoeForCausalLM), next (Qwen3NextForCausalLM)
    or multimodal (Qwen3_5ForConditionalGeneration, a tiny vision tower beside)."""
    import transformers as tf

    values = {**TINY_HYBRID, **overrides}
    if kind == "dense":
        model = tf.Qwen3_5ForCausalLM, tf.Qwen3_5TextConfig(**values)
    elif kind == "moe":
        values.pop("intermediate_size")
        model = tf.Qwen3_5MoeForCausalLM, tf.Qwen3_5MoeTextConfig(**values, **TINY_SHARED_EXPERTS)
    elif kind == "next":
        config = tf.Qwen3NextConfig(**values, **TINY_SHARED_EXPERTS, norm_topk_prob=True)
        model = tf.Qwen3NextForCausalLM, config
    else:
        vision = {**TINY_VISION, "deepstack_visual_indexes": []}
        # M-RoPE over the 8 rotated frequencies of a 64-wide head.
        rope = {**values["rope_parameters"], "mrope_section": [3, 3, 2], "mrope_interleaved": True}
        values = {**values, "rope_parameters": rope}
        ids = dict(image_token_id=151655, video_token_id=151656)  # the Qwen3 tokenizer's
        ids.update(vision_start_token_id=151652, vision_end_token_id=151653)
        config = tf.Qwen3_5Config(text_config=values, vision_config=vision, **ids)
        model = tf.Qwen3_5ForConditionalGeneration, config
    model_class, config = model
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight") or ("norm" in name and "visual" in name):
                p.uniform_(0.5, 1.5)
            elif "norm" in name:
                p.uniform_(-0.5, 0.5)  # zero-centred: the norm multiplies by 1 + w
            elif not name.endswith(("A_log", "dt_bias")):  # the reference's own init
                p.normal_(0.0, INIT_STD)
    return model


def save_model_dir(model, directory: Path, tokenizer_dir: Path, dtype=torch.float32, shard=None):
    """Save as a Hugging Face model directory with the real tokenizer files beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    # A copy, so the float32 reference (and its float32 rotary buffers) stays untouched.
    copy.deepcopy(model).to(dtype).save_pretrained(
        directory, safe_serialization=True, **({"max_shard_size": shard} if shard else {})
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory, tokenizer_dir):
    """Three layers, the middle one dense (mlp_only_layers), top-2 of 8 experts."""
    reference = build_reference_model(
        tie=False, seed=11, moe=True, num_hidden_layers=3, mlp_only_layers=[1]
    )
    path = save_model_dir(reference, tmp_path_factory.mktemp("moe"), tokenizer_dir)
    return path, reference


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """Tied embeddings, one float32 file; returns (directory, reference model)."""
    model = build_reference_model(tie=True, seed=0)
    path = save_model_dir(model, tmp_path_factory.mktemp("tiny-tied"), tokenizer_dir)
    return path, model


def _both_kernels(request, setter: str):
    """Run a test with the AVX-512 and the AVX2 form of a kernel (``setter`` of the native
    module chooses), the AVX-512 one only where the CPU and OS allow it."""
    from qwen3chat import kernels

    native = kernels._module()  # not kernels.native, which torch_matmuls replaces
    if native is None:
        pytest.skip("no AVX2 CPU or no C++ compiler here")
    wide = request.param == "avx512"
    if wide and not kernels._avx512():
        pytest.skip("this CPU (or its OS, or QWEN3CHAT_NO_AVX512) does not allow AVX-512")
    getattr(native, setter)(wide)
    yield wide
    getattr(native, setter)(kernels._avx512())


@pytest.fixture(params=["avx512", "avx2"])
def attention_kernels(request):
    """Attention over bf16 and int8 caches, in both forms."""
    yield from _both_kernels(request, "set_avx512_attention")


@pytest.fixture(params=["avx512", "avx2"])
def row_kernels(request):
    """RMSNorm, q/k norm with RoPE and SwiGLU, in both forms."""
    yield from _both_kernels(request, "set_avx512_rows")


@pytest.fixture(params=["avx512", "avx2"])
def product_kernels(request):
    """One-row products of float weights, in both forms."""
    yield from _both_kernels(request, "set_avx512_products")


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    """``n`` different short chat prompts."""
    words = "the quick brown fox jumps over a lazy dog while seven cats watch it"
    return [
        tokenizer.encode_chat([{"role": "user", "content": words[: 9 + i * 11 % 57]}])
        for i in range(n)
    ]
