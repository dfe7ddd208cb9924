"""Named model shapes: the published Qwen3 configs, and `tiny` for tests and quick benches."""

from __future__ import annotations

import copy

from .config import ModelConfig
from .errors import QwenChatError

_QWEN3_EOS = [151645, 151643]


def _dense(hidden, inter, layers, heads, kv_heads, tied, max_pos=40960) -> ModelConfig:
    return ModelConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        max_position_embeddings=max_pos,
        eos_token_ids=list(_QWEN3_EOS),
    )


def _moe(hidden, inter, layers, heads, kv_heads, experts, top_k, moe_inter) -> ModelConfig:
    config = _dense(hidden, inter, layers, heads, kv_heads, tied=False)
    config.architecture = "Qwen3MoeForCausalLM"
    config.num_experts, config.num_experts_per_tok = experts, top_k
    config.moe_intermediate_size, config.norm_topk_prob = moe_inter, True
    return config


PRESETS: dict[str, ModelConfig] = {
    "qwen3-0.6b": _dense(1024, 3072, 28, 16, 8, tied=True),
    "qwen3-1.7b": _dense(2048, 6144, 28, 16, 8, tied=True),
    "qwen3-4b": _dense(2560, 9728, 36, 32, 8, tied=True),
    "qwen3-8b": _dense(4096, 12288, 36, 32, 8, tied=False),
    "qwen3-14b": _dense(5120, 17408, 40, 40, 8, tied=False),
    "qwen3-32b": _dense(5120, 25600, 64, 64, 8, tied=False),
    "qwen3-30b-a3b": _moe(2048, 6144, 48, 32, 4, experts=128, top_k=8, moe_inter=768),
    "qwen3-235b-a22b": _moe(4096, 12288, 94, 64, 4, experts=128, top_k=8, moe_inter=1536),
    "tiny": ModelConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        eos_token_ids=list(_QWEN3_EOS),
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
