"""Per-operation costs at a model's own dimensions, for `qwen3chat bench --ops/--profile`.

``--ops`` times each building block of a decoder layer alone (the model's own modules and
weights, its first layer of each kind), at several sequence lengths: where a whole-model
number is slow, this says which piece is. On a MoE model, feed_forward is a dense FFN with
the active experts' parameter count, the yardstick for moe_layer. ``--profile`` is the
other view: torch.profiler over one real prefill and one real decode step of the engine,
per aten op.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..engine import Engine
from ..kv_cache import KVCache
from ..model.layers import MLP, apply_rope
from ..model.moe import SparseMoE
from ..model.qwen3 import Qwen3Model
from ..quant import QuantizedExperts, QuantSpec
from ..weights.loader import place

SEQ_LENS = (1, 16, 128, 512)

# Each (op, sequence length) runs for about this long, and at least MIN_CALLS times: long
# enough for a stable median of microsecond ops, short enough for a 32B layer.
TIME_BUDGET_S = 0.05
MIN_CALLS = 3
MAX_CALLS = 1000

PROFILE_TOP_OPS = 15


@dataclass
class OpTiming:
    op: str
    seq_len: int
    median_us: float
    min_us: float
    calls: int


@dataclass
class SkippedOp:
    op: str
    reason: str


@dataclass
class ProfiledOp:
    name: str
    calls: int
    self_ms: float
    total_ms: float
    share: float  # of the whole step's self time


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a host clock reading covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class _Workbench:
    """The model's first attention layer, its RoPE tables, a cache and random inputs of
    any length; for a hybrid model also its first Gated DeltaNet layer and states for it;
    for a MoE model also its first sparse block and a dense feed-forward of the same active
    width (num_experts_per_tok x moe_intermediate_size), stored like the model's weights,
    to compare the two."""

    def __init__(self, model: Qwen3Model, max_seq_len: int):
        self.config = model.config
        self.layer = next(layer for layer in model.layers if hasattr(layer, "self_attn"))
        self.linear = next(
            (layer.linear_attn for layer in model.layers if hasattr(layer, "linear_attn")), None
        )
        self.moe = next((m for m in model.modules() if isinstance(m, SparseMoE)), None)
        self.dense_ffn = self.layer.mlp
        if isinstance(self.dense_ffn, SparseMoE):
            self.dense_ffn = _dense_like(self.dense_ffn, model.dtype, model.device)
        # A decode step at position max_seq_len needs one slot beyond it.
        self.cache: KVCache = model.new_cache(max_seq_len + 1)
        self.cos, self.sin = model.rope_cos, model.rope_sin
        self.dtype, self.device = model.dtype, model.device

    def hidden(self, seq: int) -> torch.Tensor:
        shape = (1, seq, self.config.hidden_size)
        return torch.randn(shape, dtype=self.dtype, device=self.device)

    def heads(self, count: int, seq: int) -> torch.Tensor:
        shape = (1, count, seq, self.config.head_dim)
        return torch.randn(shape, dtype=self.dtype, device=self.device)


def _rms_norm(bench: _Workbench, seq: int) -> Callable[[], object]:
    x, norm = bench.hidden(seq), bench.layer.input_layernorm
    return lambda: norm(x)


def _rope(bench: _Workbench, seq: int) -> Callable[[], object]:
    q = bench.heads(bench.config.num_attention_heads, seq)
    cos, sin = bench.cos[:seq], bench.sin[:seq]
    return lambda: apply_rope(q, cos, sin)


def _feed_forward(bench: _Workbench, seq: int) -> Callable[[], object]:
    x, mlp = bench.hidden(seq), bench.dense_ffn
    return lambda: mlp(x)


def _moe_layer(bench: _Workbench, seq: int) -> Callable[[], object]:
    x, block = bench.hidden(seq), bench.moe
    return lambda: block(x)


def _dense_like(block: SparseMoE, dtype: torch.dtype, device: torch.device) -> MLP:
    """A SwiGLU MLP as wide as ``block``'s active experts together, with random weights
    quantized as the experts are (same bits and group size), or float like them."""
    d = block.gate.weight.shape[1]
    mlp = MLP(d, block.top_k * block.width)
    experts = block.experts.gate_up_proj.weight
    quant = None
    if isinstance(experts, QuantizedExperts):
        quant = QuantSpec(experts[0].bits, experts[0].group_size)
    generator = torch.Generator().manual_seed(0)
    for name, param in list(mlp.named_parameters()):
        weight = torch.empty(param.shape, dtype=dtype).normal_(0, 0.02, generator=generator)
        place(mlp, name, weight, dtype, device, quant)
    return mlp


def _attention_prefill(bench: _Workbench, seq: int) -> Callable[[], object]:
    """Attention over ``seq`` new tokens at the start of the cache (a first prompt chunk)."""
    x, attn = bench.hidden(seq), bench.layer.self_attn
    cos, sin = bench.cos[:seq], bench.sin[:seq]
    return lambda: attn(x, cos, sin, None, bench.cache, 0)


def _attention_decode(bench: _Workbench, seq: int) -> Callable[[], object]:
    """One new token attending to ``seq`` cached positions (a decode step at depth seq)."""
    x, attn = bench.hidden(1), bench.layer.self_attn
    cos, sin = bench.cos[seq : seq + 1], bench.sin[seq : seq + 1]
    return lambda: attn(x, cos, sin, None, bench.cache, seq)


class _LinearStates:
    """One Gated DeltaNet layer's conv and delta states, reused by every timed call."""

    def __init__(self, linear, dtype: torch.dtype, device: torch.device):
        history = linear.conv1d.weight.shape[1] - 1
        self.conv = torch.zeros(1, linear.conv_dim, history, dtype=dtype, device=device)
        shape = (1, linear.num_v_heads, linear.head_k_dim, linear.head_v_dim)
        self.delta = torch.zeros(shape, dtype=torch.float32, device=device)

    def linear_state(self, layer: int, start: int, count: int):
        return self.conv, self.delta


def _linear_attention_prefill(bench: _Workbench, seq: int) -> Callable[[], object]:
    """Gated DeltaNet over ``seq`` new tokens (the chunked form of the delta rule)."""
    x, states = bench.hidden(seq), _LinearStates(bench.linear, bench.dtype, bench.device)
    return lambda: bench.linear(x, states, 0)


def _linear_attention_decode(bench: _Workbench, seq: int) -> Callable[[], object]:
    """One token through Gated DeltaNet (the recurrent form): its cost is the same at
    every depth ``seq``, the state being of fixed size."""
    x, states = bench.hidden(1), _LinearStates(bench.linear, bench.dtype, bench.device)
    return lambda: bench.linear(x, states, seq)


def _transformer_block(bench: _Workbench, seq: int) -> Callable[[], object]:
    x, layer = bench.hidden(seq), bench.layer
    cos, sin = bench.cos[:seq], bench.sin[:seq]
    return lambda: layer(x, cos, sin, None, bench.cache, 0)


def _causal_mask(bench: _Workbench, seq: int) -> Callable[[], object]:
    """The mask Qwen3Model.forward builds for a chunk of ``seq`` tokens after ``seq`` cached
    ones (a first chunk needs none: SDPA's is_causal covers it)."""
    device = bench.device

    def build() -> torch.Tensor:
        positions = torch.arange(2 * seq, device=device)
        return positions[None, :] <= positions[seq:, None]

    return build


def _kv_cache(bench: _Workbench, seq: int) -> Callable[[], object]:
    kv_heads = bench.config.num_key_value_heads
    k, v = bench.heads(kv_heads, seq), bench.heads(kv_heads, seq)
    layer = bench.layer.self_attn.layer_idx
    return lambda: bench.cache.update(layer, 0, k, v)


_MEASURED: dict[str, Callable[[_Workbench, int], Callable[[], object]]] = {
    "rms_norm": _rms_norm,
    "rope": _rope,
    "feed_forward": _feed_forward,
    "moe_layer": _moe_layer,
    "attention_prefill": _attention_prefill,
    "attention_decode": _attention_decode,
    "linear_attention_prefill": _linear_attention_prefill,
    "linear_attention_decode": _linear_attention_decode,
    "transformer_block": _transformer_block,
    "causal_mask": _causal_mask,
    "kv_cache": _kv_cache,
}
OPS = (
    "rms_norm",
    "rope",
    "feed_forward",
    "moe_layer",
    "attention_prefill",
    "attention_decode",
    "linear_attention_prefill",
    "linear_attention_decode",
    "transformer_block",
    "causal_mask",
    "kv_cache",
)


def time_per_call(fn: Callable[[], object], device: torch.device) -> list[float]:
    """Seconds of each call of ``fn``, after one warm-up call (allocation, kernel choice)."""
    fn()
    synchronize(device)
    samples: list[float] = []
    deadline = time.perf_counter() + TIME_BUDGET_S
    while len(samples) < MIN_CALLS or (len(samples) < MAX_CALLS and time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return samples


class OpBenchmarks:
    """Times the named ops of ``OPS`` at ``seq_lens``, sharing one workbench."""

    def __init__(self, model: Qwen3Model, seq_lens: tuple[int, ...] = SEQ_LENS):
        self.seq_lens = seq_lens
        self.bench = _Workbench(model, max(seq_lens))

    @torch.inference_mode()
    def run(self, op: str) -> list[OpTiming | SkippedOp]:
        if op == "moe_layer" and self.bench.moe is None:
            return [SkippedOp(op, "a dense model has no mixture-of-experts layer")]
        if op.startswith("linear_attention") and self.bench.linear is None:
            return [SkippedOp(op, "only the hybrid generation has Gated DeltaNet layers")]
        timings: list[OpTiming | SkippedOp] = []
        for seq in self.seq_lens:
            samples = time_per_call(_MEASURED[op](self.bench, seq), self.bench.device)
            timings.append(
                OpTiming(
                    op, seq, statistics.median(samples) * 1e6, min(samples) * 1e6, len(samples)
                )
            )
        return timings


def profile_prefill_and_decode(
    engine: Engine, prompt_ids: list[int], top: int = PROFILE_TOP_OPS
) -> dict[str, list[ProfiledOp]]:
    """The ``top`` ops by self time of one prefill of ``prompt_ids`` and one decode step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    engine.cache.trim(0)
    with profile(activities=activities) as prefill:
        logits = engine.prefill(prompt_ids, lambda: False)
        synchronize(engine.device)
    token = int(logits.argmax())
    with profile(activities=activities) as decode:
        engine.decode_step(token)
        synchronize(engine.device)
    on_gpu = engine.device.type == "cuda"
    return {
        "prefill": _top_ops(prefill, top, on_gpu),
        "decode": _top_ops(decode, top, on_gpu),
    }


def _top_ops(prof, top: int, on_gpu: bool) -> list[ProfiledOp]:
    # On a GPU the host only queues kernels: device time is the cost that matters there.
    def self_us(event) -> float:
        return event.self_device_time_total if on_gpu else event.self_cpu_time_total

    def total_us(event) -> float:
        return event.device_time_total if on_gpu else event.cpu_time_total

    events = sorted(prof.key_averages(), key=self_us, reverse=True)
    step_us = sum(self_us(e) for e in events) or 1.0
    return [
        ProfiledOp(e.key, e.count, self_us(e) / 1e3, total_us(e) / 1e3, self_us(e) / step_us)
        for e in events[:top]
    ]
