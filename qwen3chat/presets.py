"""Named model shapes: the published Qwen3 configs, and `tiny` for tests and quick benches."""

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
    "tiny": _TINY,
    "tiny-moe": _with_experts(_TINY, experts=4, top_k=2, width=32),
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
