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

import torch
from torch import nn

# Fused parameter -> the checkpoint tensors concatenated along dim 0, in order.
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    # Gated DeltaNet: the conv's q, k, v, the output gate z, and b and a (per value head).
    "in_proj": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
}

# Embedding tables: their rows are looked up, so --quantize keeps them at 8 bits.
TABLES = re.compile(r"(^|\.)embed_tokens\.weight$")

# Tensors some checkpoints carry that inference recomputes or does not use (the
# hybrid generation's multi-token-prediction head: not run yet).
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|^mtp\.")

# Kept in full precision whatever the rest is quantized to: the MoE routers, since a
# quantized router picks different experts (a known cause of wrong, slow MoE runs), the
# Gated DeltaNet's short conv (a few values per channel, as llama.cpp keeps it), and the
# vision tower (run once per picture, as llama.cpp keeps its mmproj files in F16).
FULL_PRECISION = re.compile(r"\.mlp\.(shared_expert_)?gate\.weight$|\.conv1d\.weight$|^visual\.")

# Held in float32 whatever the compute dtype, as llama.cpp keeps them: Gated DeltaNet's
# decay rate and time-step bias (rounded to bfloat16 they would move every token's decay).
FLOAT32 = re.compile(r"\.linear_attn\.(A|dt_bias)$")

# A hybrid checkpoint's tensors that we hold as llama.cpp's converter writes them, so that
# GGUF files are read as they are: its RMSNorms are zero-centred (they multiply by 1 + w:
# we hold 1 + w; the Gated DeltaNet's output norm multiplies by w), A_log is held as the
# decay rate A = -exp(A_log) (llama.cpp's ssm_a), and the conv weight [C, 1, K] as [C, K].
_ZERO_CENTRED_NORM = re.compile(
    r"^(norm|layers\.\d+\.(input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm))"
    r"\.weight$"
)
_HYBRID_RENAMED = {"linear_attn.A_log": "linear_attn.A"}

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
    # The hybrid generation (qwen35, qwen35moe, qwen3next).
    "post_attention_norm": "post_attention_layernorm",
    "attn_qkv": "linear_attn.in_proj_qkv",
    "attn_gate": "linear_attn.in_proj_z",
    "ssm_beta": "linear_attn.in_proj_b",
    "ssm_alpha": "linear_attn.in_proj_a",
    "ssm_ba": "linear_attn.in_proj_ba",  # qwen3next: b and a per key head (_PER_KEY_HEAD)
    "ssm_conv1d": "linear_attn.conv1d",
    "ssm_norm": "linear_attn.norm",
    "ssm_out": "linear_attn.out_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# Tensors llama.cpp names without a .weight suffix, or with a .bias that is our whole name.
_GGUF_PLAIN = {"ssm_a": "linear_attn.A", "ssm_dt.bias": "linear_attn.dt_bias"}
_GGUF_GLOBAL = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_GGUF_PLAIN_RE = re.compile(r"^blk\.(\d+)\.(ssm_a|ssm_dt\.bias)$")


def canonical_from_hf(name: str) -> tuple[str, int | None]:
    """Our name for a checkpoint tensor, and the expert index when it is one expert's
    slice of a stacked tensor."""
    for prefix, ours in _HF_PREFIXES:
        if name.startswith(prefix):
            name = ours + name.removeprefix(prefix)
            break
    for theirs, ours in _HYBRID_RENAMED.items():
        if name.endswith(theirs):
            name = name.removesuffix(theirs) + ours
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


def hybrid_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape we hold a hybrid checkpoint's tensor in (see _ZERO_CENTRED_NORM)."""
    if name.endswith(".conv1d.weight") and len(shape) == 3:
        return (shape[0], shape[2])
    return shape


# Qwen3-Next fuses a Gated DeltaNet's projections per key head: the rows of in_proj_qkvz
# are, key head after key head, its q and k (dk each), then v and z (dv for each value head
# it serves); in_proj_ba's are b then a (one per value head). Each is read as the plain
# parts Qwen3.5 stores (FUSED's in_proj): tensor -> (its pieces in a head's rows, and
# canonical part -> the pieces it gathers over all key heads).
_PER_KEY_HEAD = {
    "linear_attn.in_proj_qkvz.weight": (
        ("q", "k", "v", "z"),
        {"linear_attn.in_proj_qkv.weight": ("q", "k", "v"), "linear_attn.in_proj_z.weight": ("z",)},
    ),
    "linear_attn.in_proj_ba.weight": (
        ("b", "a"),
        {"linear_attn.in_proj_b.weight": ("b",), "linear_attn.in_proj_a.weight": ("a",)},
    ),
}


class KeyHeadPart(NamedTuple):
    """One canonical part of a per-key-head fused tensor (_PER_KEY_HEAD)."""

    pieces: tuple[str, ...]  # the tensor's pieces in a key head's rows
    gathered: tuple[str, ...]  # those the part holds, in order
    widths: dict[str, int]  # rows of each piece per key head
    num_k_heads: int

    @property
    def rows(self) -> int:
        return self.num_k_heads * sum(self.widths[p] for p in self.gathered)

    def row_index(self) -> torch.Tensor:
        """The fused tensor's rows that make this part, in order."""
        rows = torch.arange(sum(self.widths[p] for p in self.pieces) * self.num_k_heads)
        groups = rows.unflatten(0, (self.num_k_heads, -1))
        split = groups.split([self.widths[p] for p in self.pieces], dim=1)
        by_piece = dict(zip(self.pieces, split, strict=True))
        return torch.cat([by_piece[p].flatten() for p in self.gathered])


def key_head_parts(name: str, config) -> dict[str, KeyHeadPart]:
    """For a per-key-head fused tensor (_PER_KEY_HEAD, through canonical_from_hf): its
    canonical parts; else {}."""
    m = _LAYER_RE.match(name)
    held = _PER_KEY_HEAD.get(m[2]) if m else None
    if held is None:
        return {}
    nk, ratio = (
        config.linear_num_key_heads,
        config.linear_num_value_heads // config.linear_num_key_heads,
    )
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    widths = {"q": dk, "k": dk, "v": ratio * dv, "z": ratio * dv, "b": ratio, "a": ratio}
    pieces, parts = held
    return {
        m[1] + part: KeyHeadPart(pieces, gathered, widths, nk) for part, gathered in parts.items()
    }


def hybrid_converts(name: str) -> bool:
    """Whether a hybrid checkpoint's tensor is held converted (hybrid_from_hf)."""
    return bool(_ZERO_CENTRED_NORM.match(name)) or name.endswith(
        ("linear_attn.A", ".conv1d.weight")
    )


def hybrid_from_hf(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A hybrid checkpoint's tensor as we hold it (unchanged where it is held as stored)."""
    if _ZERO_CENTRED_NORM.match(name):
        return tensor.float() + 1
    if name.endswith("linear_attn.A"):
        return -tensor.float().exp()
    if name.endswith(".conv1d.weight"):
        return tensor.reshape(tensor.shape[0], -1)
    return tensor


def fp8_scale_of(name: str) -> str | None:
    """The checkpoint weight whose block-FP8 scales the tensor ``name`` holds, or None."""
    if name.endswith(".weight" + _FP8_SCALE_SUFFIX):
        return name.removesuffix(_FP8_SCALE_SUFFIX)
    return None


def canonical_from_gguf(name: str) -> str | None:
    m = _GGUF_PLAIN_RE.match(name)
    if m:
        return f"layers.{m[1]}.{_GGUF_PLAIN[m[2]]}"
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
