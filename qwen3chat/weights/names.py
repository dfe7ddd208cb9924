"""The one table of tensor names: Hugging Face and GGUF names -> our canonical names.

Canonical names are the Hugging Face names without the ``model.`` prefix. The model fuses
some of them (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) so that a decode
step runs one matmul where the checkpoint has several; FUSED says which and in what order.
"""

from __future__ import annotations

import re

from ..config import ModelConfig

# Fused parameter -> the checkpoint tensors concatenated along dim 0, in order.
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}

# Tensors some checkpoints carry that inference recomputes or does not use.
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# llama.cpp's names for Qwen3 tensors (its convert_hf_to_gguf.py, tensor_mapping.py).
_GGUF_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def canonical_from_hf(name: str) -> str:
    return name.removeprefix("model.")


def canonical_from_gguf(name: str) -> str | None:
    m = _GGUF_LAYER_RE.match(name)
    if m:
        layer, part, kind = m.groups()
        mapped = _GGUF_LAYER.get(part)
        return f"layers.{layer}.{mapped}.{kind}" if mapped else None
    stem, _, kind = name.rpartition(".")
    mapped = _GGUF_GLOBAL.get(stem)
    return f"{mapped}.{kind}" if mapped else None


def checkpoint_parts(param_name: str) -> list[str]:
    """The canonical checkpoint tensors that make up one of our parameters."""
    for fused, parts in FUSED.items():
        if f".{fused}." in param_name:
            return [param_name.replace(f".{fused}.", f".{part}.") for part in parts]
    return [param_name]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor a Qwen3 checkpoint must hold, with its shape."""
    d, hd = config.hidden_size, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (config.vocab_size, d),
        "norm.weight": (d,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (config.q_size, d),
                p + "self_attn.k_proj.weight": (config.kv_size, d),
                p + "self_attn.v_proj.weight": (config.kv_size, d),
                p + "self_attn.o_proj.weight": (d, config.q_size),
                p + "self_attn.q_norm.weight": (hd,),
                p + "self_attn.k_norm.weight": (hd,),
                p + "mlp.gate_proj.weight": (config.intermediate_size, d),
                p + "mlp.up_proj.weight": (config.intermediate_size, d),
                p + "mlp.down_proj.weight": (d, config.intermediate_size),
            }
        )
    return shapes
