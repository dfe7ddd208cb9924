"""The one table of tensor names: Hugging Face and GGUF names -> our canonical names.

Canonical names are the Hugging Face names without the ``model.`` prefix, except that the
per-expert matrices of a mixture-of-experts layer (``mlp.experts.7.up_proj.weight``) are
one stacked tensor per projection (``mlp.experts.up_proj.weight``, ``[experts, out, in]``),
as GGUF stores them. Qwen3-VL checkpoints nest the text model under
``model.language_model.`` (stripped like ``model.``) and the vision tower under
``model.visual.`` (ours: ``visual.``). The model fuses some tensors (q/k/v into
``qkv_proj``, gate/up into ``gate_up_proj``) so that a decode step runs one matmul where
the checkpoint has several; FUSED says which and in what order (rows concatenated, per
expert for stacks). Qwen3-VL-MoE checkpoints keep their experts already stacked, but
often transposed and with gate/up joined: EXPERT_STACKS says how they map to ours.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from torch import nn

# Fused parameter -> the checkpoint tensors concatenated along dim 0, in order.
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}

# Embedding tables: their rows are looked up, so --quantize keeps them at 8 bits.
TABLES = re.compile(r"(^|\.)embed_tokens\.weight$")

# Tensors some checkpoints carry that inference recomputes or does not use.
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# The MoE router: kept in full precision whatever the rest is quantized to, since a
# quantized router picks different experts (a known cause of wrong, slow MoE runs).
FULL_PRECISION = re.compile(r"\.mlp\.gate\.weight$")

# Checkpoint prefixes -> ours, first match wins.
_HF_PREFIXES = (("model.language_model.", ""), ("model.visual.", "visual."), ("model.", ""))

# A block-FP8 checkpoint stores beside each float8 ``X.weight`` its inverse scales, one
# per block, as ``X.weight_scale_inv``.
_FP8_SCALE_SUFFIX = "_scale_inv"

# One expert's matrix in a Hugging Face checkpoint: (layer prefix, expert, projection).
_HF_EXPERT_RE = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+\.weight)$")


# Checkpoint tensors (by the name after ``layers.N.``) that hold whole expert stacks:
# Qwen3-VL-MoE's experts, two 3-D tensors per layer with no ``.weight`` suffix. Each maps
# to the canonical stacks it holds, in order, as equal slices of its output dim, and says
# whether the hidden size is its input (gate/up read the hidden state) or its output
# (down writes it). They come in two orientations, which safetensors.py tells apart by
# where the hidden size is:
# - the hub's (Qwen3-VL-30B-A3B, saved by transformers 4.57), multiplied as ``x @ W``:
#   ``gate_up_proj [experts, hidden, 2 * moe_inter]``, gate columns then up columns, and
#   ``down_proj [experts, moe_inter, hidden]``: read transposed;
# - transformers 5's (it transposes hub files as it loads them, and saves what it holds):
#   nn.Linear's ``[experts, out, in]``, gate rows then up rows: read as they are.
# (The FP8 releases store one matrix per expert instead, which _HF_EXPERT_RE stacks.)
class ExpertStacks(NamedTuple):
    parts: tuple[str, ...]
    hidden_is_input: bool


EXPERT_STACKS = {
    "mlp.experts.gate_up_proj": ExpertStacks(
        ("mlp.experts.gate_proj.weight", "mlp.experts.up_proj.weight"), hidden_is_input=True
    ),
    "mlp.experts.down_proj": ExpertStacks(("mlp.experts.down_proj.weight",), False),
}
_LAYER_RE = re.compile(r"^(layers\.\d+\.)(.+)$")

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
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_GGUF_GLOBAL = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def canonical_from_hf(name: str) -> tuple[str, int | None]:
    """Our name for a checkpoint tensor, and the expert index when it is one expert's
    slice of a stacked tensor."""
    for prefix, ours in _HF_PREFIXES:
        if name.startswith(prefix):
            name = ours + name.removeprefix(prefix)
            break
    m = _HF_EXPERT_RE.match(name)
    if m:
        return f"{m[1]}.{m[3]}", int(m[2])
    return name, None


def expert_stacks(name: str) -> ExpertStacks | None:
    """For a checkpoint tensor (already through canonical_from_hf) holding whole expert
    stacks (EXPERT_STACKS): the canonical stacks it holds, in order; else None."""
    m = _LAYER_RE.match(name)
    stacks = EXPERT_STACKS.get(m[2]) if m else None
    if stacks is None:
        return None
    return stacks._replace(parts=tuple(m[1] + part for part in stacks.parts))


def fp8_scale_of(name: str) -> str | None:
    """The checkpoint weight whose block-FP8 scales the tensor ``name`` holds, or None."""
    if name.endswith(".weight" + _FP8_SCALE_SUFFIX):
        return name.removesuffix(_FP8_SCALE_SUFFIX)
    return None


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


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor a checkpoint of ``model`` (built on the meta device) must
    hold, with its shape: the model's parameters, each fused one split back into the
    checkpoint's parts by the rows its module's ``split`` gives them."""
    shapes = {}
    for name, param in model.named_parameters():
        parts = checkpoint_parts(name)
        if len(parts) == 1:
            shapes[name] = tuple(param.shape)
            continue
        split = model.get_submodule(name.rpartition(".")[0]).split
        for part, rows in zip(parts, split, strict=True):
            shapes[part] = (*param.shape[:-2], rows, param.shape[-1])
    return shapes
