"""Named model shapes: the published Qwen3, Qwen3.5/3.6 and Qwen3-Next configs, and `tiny`
(`tiny-moe`, `tiny-hybrid`) for tests and quick benches."""

from __future__ import annotations

import copy
import dataclasses

from .config import ModelConfig
from .errors import QwenChatError


def _dense(hidden, inter, layers, heads, kv_heads, tied, max_pos=40960) -> ModelConfig:
    return ModelConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        max_position_embeddings=max_pos,
    )


def _with_experts(config: ModelConfig, experts: int, top_k: int, width: int) -> ModelConfig:
    """``config`` with every feed-forward a mixture of ``experts`` (Qwen3-MoE)."""
    return dataclasses.replace(
        config,
        architecture="Qwen3MoeForCausalLM",
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=width,
        norm_topk_prob=True,
    )


def _hybrid(config: ModelConfig, architecture: str, value_heads: int, **more) -> ModelConfig:
    """``config`` as the hybrid generation builds it: three Gated DeltaNet layers to each
    gated full-attention one, a quarter of each 256-wide head rotated, 16 key heads of
    128 (``value_heads`` value heads), the 248,320-id vocabulary and rope_theta 1e7 of
    the published configs."""
    values = dict(
        architecture=architecture,
        head_dim=256,
        partial_rotary_factor=0.25,
        rope_theta=10_000_000.0,
        vocab_size=248320,
        max_position_embeddings=262144,
        layer_types=[
            "full_attention" if (i + 1) % 4 == 0 else "linear_attention"
            for i in range(config.num_hidden_layers)
        ],
        linear_num_key_heads=16,
        linear_num_value_heads=value_heads,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
    )
    return dataclasses.replace(config, **{**values, **more})


def _shared_experts(config: ModelConfig, architecture: str, experts: int, top_k: int):
    """``config`` with every feed-forward 512-wide routed experts beside a shared one."""
    moe = _with_experts(config, experts, top_k, 512)
    return dataclasses.replace(
        moe, architecture=architecture, shared_expert_intermediate_size=512, intermediate_size=0
    )


_TINY = ModelConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
)

PRESETS: dict[str, ModelConfig] = {
    "qwen3-0.6b": _dense(1024, 3072, 28, 16, 8, tied=True),
    "qwen3-1.7b": _dense(2048, 6144, 28, 16, 8, tied=True),
    "qwen3-4b": _dense(2560, 9728, 36, 32, 8, tied=True),
    "qwen3-8b": _dense(4096, 12288, 36, 32, 8, tied=False),
    "qwen3-14b": _dense(5120, 17408, 40, 40, 8, tied=False),
    "qwen3-32b": _dense(5120, 25600, 64, 64, 8, tied=False),
    "qwen3-30b-a3b": _with_experts(_dense(2048, 6144, 48, 32, 4, tied=False), 128, 8, 768),
    "qwen3-235b-a22b": _with_experts(_dense(4096, 12288, 94, 64, 4, tied=False), 128, 8, 1536),
    "qwen3.5-0.8b": _hybrid(_dense(1024, 3584, 24, 8, 2, tied=True), "Qwen3_5ForCausalLM", 16),
    "qwen3.5-9b": _hybrid(_dense(4096, 12288, 32, 16, 4, tied=False), "Qwen3_5ForCausalLM", 32),
    "qwen3.6-35b-a3b": _hybrid(
        _shared_experts(_dense(2048, 0, 40, 16, 2, tied=False), "Qwen3_5MoeForCausalLM", 256, 8),
        "Qwen3_5MoeForCausalLM",
        32,
    ),
    "qwen3-next-80b-a3b": _hybrid(
        _shared_experts(_dense(2048, 0, 48, 16, 2, tied=False), "Qwen3NextForCausalLM", 512, 10),
        "Qwen3NextForCausalLM",
        32,
        vocab_size=151936,
    ),
    "tiny": _TINY,
    "tiny-moe": _with_experts(_TINY, experts=4, top_k=2, width=32),
    # The hybrid layers at test size: three Gated DeltaNet layers, then gated attention.
    "tiny-hybrid": dataclasses.replace(
        _TINY,
        architecture="Qwen3_5ForCausalLM",
        num_hidden_layers=4,
        head_dim=64,
        partial_rotary_factor=0.25,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    ),
}


def preset_config(name: str) -> ModelConfig:
    """A fresh copy of a named preset (callers may change it)."""
    try:
        base = PRESETS[name.lower()]
    except KeyError:
        raise QwenChatError(
            f"--preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}"
        ) from None
    return copy.deepcopy(base)
