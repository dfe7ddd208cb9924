"""Model hyper-parameters: one dataclass, filled from config.json, presets or tensor shapes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import QwenChatError
from .jsonfiles import read_json

VISION_ARCHITECTURES = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
# The hybrid generation: Gated DeltaNet layers between gated full-attention ones. The
# ConditionalGeneration classes of Qwen3.5 nest the text model's fields under
# text_config, beside a Qwen3-VL vision tower without DeepStack.
HYBRID_MULTIMODAL = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
HYBRID_ARCHITECTURES = (
    "Qwen3NextForCausalLM",
    "Qwen3_5ForCausalLM",
    "Qwen3_5MoeForCausalLM",
    *HYBRID_MULTIMODAL,
)
SUPPORTED_ARCHITECTURES = (
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    *VISION_ARCHITECTURES,
    *HYBRID_ARCHITECTURES,
)
# config.json's model_type, for configs that do not list their architecture.
_ARCHITECTURE_OF_TYPE = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_next": "Qwen3NextForCausalLM",
    "qwen3_5_text": "Qwen3_5ForCausalLM",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
}
# Every layer of a Qwen3.5-MoE model is sparse; its config has no decoder_sparse_step.
_ALL_SPARSE = ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")
LAYER_TYPES = ("full_attention", "linear_attention")
# transformers' default M-RoPE sections (time, height, width) when a config gives none:
# Qwen3-VL's, and Qwen3.5's over its rotated quarter of each head.
_MROPE_SECTION = ((24, 20, 20), (11, 11, 10))
# The vision tower's activations (model/vision.py's ACTIVATIONS implements them).
VISION_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "silu")
# Keys of a Qwen3-VL config.json that live beside text_config but describe the text model.
_VL_TOP_LEVEL_KEYS = ("tie_word_embeddings", "image_token_id", "video_token_id")


@dataclass
class VisionConfig:
    """Shape of a Qwen3-VL vision tower, with transformers' defaults for missing fields."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [8, 16, 24])
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per input patch row: ``C * T * P * P``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merged_hidden_size(self) -> int:
        """Width of one merged token before the merger's MLP: ``m * m`` patches side by side."""
        return self.hidden_size * self.spatial_merge_size**2

    @property
    def position_grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @classmethod
    def from_hf_dict(cls, raw: Mapping, source: str = "config.json") -> VisionConfig:
        """Read the ``vision_config`` of a Qwen3-VL ``config.json`` (or the whole file)."""
        raw = raw.get("vision_config", raw)
        values = {
            name: raw[name]
            for name in cls.__dataclass_fields__
            if name != "rope_theta" and raw.get(name) is not None
        }
        # Only transformers 5 writes the (axial) rope parameters; older files rely on 10000.
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_theta") is not None:
            values["rope_theta"] = float(rope["rope_theta"])
        values["deepstack_visual_indexes"] = list(
            values.get("deepstack_visual_indexes", cls().deepstack_visual_indexes)
        )
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: str = "config.json") -> None:
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise QwenChatError(
                f"{source}: vision hidden_act {self.hidden_act!r} is not supported; "
                f"expected one of {', '.join(VISION_ACTIVATIONS)}"
            )
        # The 2-D rotary embedding splits each head in halves for rows and columns, and
        # each half into cos/sin pairs.
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise QwenChatError(
                f"{source}: vision hidden_size {self.hidden_size} over {self.num_heads} heads "
                "must give a head size divisible by 4"
            )
        if self.position_grid_side**2 != self.num_position_embeddings:
            raise QwenChatError(
                f"{source}: vision num_position_embeddings ({self.num_position_embeddings}) "
                "must be a square"
            )
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise QwenChatError(
                f"{source}: deepstack_visual_indexes {bad} are outside the {self.depth} blocks"
            )


@dataclass
class ModelConfig:
    """Shape and numerics of a Qwen3 decoder, with Qwen3's documented defaults."""

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # HF's rope_scaling / rope_parameters dict, e.g. {"rope_type": "yarn", "factor": 4.0,
    # "original_max_position_embeddings": 32768}; None for plain RoPE.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    architecture: str = "Qwen3ForCausalLM"
    eos_token_ids: list[int] = field(default_factory=list)
    # Mixture of experts (Qwen3MoeForCausalLM); num_experts 0 is a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # Qwen3-VL: the vision tower, the pad ids its tokens replace, and the interleaved
    # M-RoPE split of the rotary frequencies over (time, height, width); None when text-only.
    vision: VisionConfig | None = None
    mrope_section: list[int] | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    # The hybrid generation (HYBRID_ARCHITECTURES): each layer's kind (LAYER_TYPES; None:
    # every layer full attention, as Qwen3), the Gated DeltaNet layers' shape, the
    # rotated share of an attention head (the rest passes through), and the shared
    # expert beside the routed ones (0: none).
    layer_types: list[str] | None = None
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    partial_rotary_factor: float = 1.0
    shared_expert_intermediate_size: int = 0
    # Which key head a value head reads: j // (value heads per key head) in Hugging Face
    # checkpoints; j % key heads in llama.cpp's qwen35 files ("tiled", which its converter
    # reorders the value heads into).
    linear_value_heads_tiled: bool = False

    @property
    def hybrid(self) -> bool:
        """Gated DeltaNet and gated attention layers (Qwen3-Next, Qwen3.5/3.6)."""
        return self.layer_types is not None

    def is_linear_layer(self, layer_idx: int) -> bool:
        return self.hybrid and self.layer_types[layer_idx] == "linear_attention"

    def layer_slot(self, layer_idx: int) -> int:
        """A layer's index among the layers of its kind (their cache's stacks)."""
        kind = self.is_linear_layer(layer_idx)
        return sum(self.is_linear_layer(i) == kind for i in range(layer_idx))

    @property
    def rotary_dim(self) -> int:
        """Columns of an attention head that RoPE rotates (the first ones)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether a layer's feed-forward is the sparse expert block (else a dense MLP)."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise QwenChatError(
                f"config: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if getattr(self, name) <= 0:
                raise QwenChatError(f"config: {name} must be positive")
        dense_layers = not all(map(self.is_moe_layer, range(self.num_hidden_layers)))
        if dense_layers and self.intermediate_size <= 0:
            raise QwenChatError("config: intermediate_size must be positive")
        if self.attention_bias:
            raise QwenChatError("config: attention_bias=true is not a Qwen3 layout")
        if self.head_dim % 2:
            raise QwenChatError(f"config: head_dim ({self.head_dim}) must be even for RoPE")
        if self.mrope_section and sum(self.mrope_section) != self.rotary_dim // 2:
            raise QwenChatError(
                f"config: mrope_section {self.mrope_section} must add up to half the rotated "
                f"columns of a head ({self.rotary_dim // 2})"
            )
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise QwenChatError(
                    f"config: num_experts_per_tok ({self.num_experts_per_tok}) must be "
                    f"between 1 and num_experts ({self.num_experts})"
                )
            if self.moe_intermediate_size <= 0 or self.decoder_sparse_step <= 0:
                raise QwenChatError(
                    "config: moe_intermediate_size and decoder_sparse_step must be positive"
                )
        if self.hybrid:
            self._validate_hybrid()

    def _validate_hybrid(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise QwenChatError(
                f"config: layer_types lists {len(self.layer_types)} layers, "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise QwenChatError(
                f"config: layer_types has {unknown[0]!r}; expected {' or '.join(LAYER_TYPES)}"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise QwenChatError(
                f"config: linear_num_value_heads ({self.linear_num_value_heads}) is not a "
                f"multiple of linear_num_key_heads ({self.linear_num_key_heads})"
            )
        rot = self.rotary_dim
        if rot <= 0 or rot % 2 or rot > self.head_dim:
            raise QwenChatError(
                f"config: partial_rotary_factor {self.partial_rotary_factor} gives {rot} "
                f"rotated columns of {self.head_dim}; expected an even count, at least 2"
            )

    @classmethod
    def from_hf_dict(cls, raw: Mapping, source: str = "config.json") -> ModelConfig:
        """Read a Hugging Face ``config.json``; missing shape fields stay None-free defaults
        only where Qwen3 documents them, the rest are completed from tensor shapes later."""
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        arch = archs[0] if archs else _ARCHITECTURE_OF_TYPE.get(model_type)
        if arch not in SUPPORTED_ARCHITECTURES:
            found = arch or model_type or "nothing"
            raise QwenChatError(
                f"{source}: architecture {found!r} is not supported; "
                f"expected one of {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        vision = None
        if arch in VISION_ARCHITECTURES or arch in HYBRID_MULTIMODAL:
            vision_raw = dict(raw.get("vision_config") or {})
            if arch in HYBRID_MULTIMODAL:  # Qwen3.5's tower has no DeepStack mergers
                vision_raw.setdefault("deepstack_visual_indexes", [])
            vision = VisionConfig.from_hf_dict(vision_raw, source)
            # The text model's fields are in text_config; a few stay at the top level.
            top = {k: raw[k] for k in _VL_TOP_LEVEL_KEYS if raw.get(k) is not None}
            raw = {**(raw.get("text_config") or {}), **top}
        # transformers 5 writes rope_parameters (rope_theta inside); 4.x writes rope_scaling.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = raw.get("rope_theta", rope.pop("rope_theta", cls.rope_theta))
        # Qwen3-VL's M-RoPE is always interleaved (mrope_interleaved); the section alone
        # says how many frequencies follow height and width.
        mrope_section = rope.pop("mrope_section", None)
        rope.pop("mrope_interleaved", None)
        # The hybrid models rotate a quarter of each head unless the config says otherwise
        # (transformers' default for them).
        partial = rope.pop("partial_rotary_factor", raw.get("partial_rotary_factor"))
        if partial is None:
            partial = 0.25 if arch in HYBRID_ARCHITECTURES else 1.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        eos = raw.get("eos_token_id")
        values = {
            "architecture": arch,
            "vision": vision,
            # transformers' default when a VL config leaves the section out.
            "mrope_section": list(mrope_section or _MROPE_SECTION[arch in HYBRID_MULTIMODAL])
            if vision
            else None,
            # transformers 5 writes the expert count as num_local_experts.
            "num_experts": raw.get("num_experts", raw.get("num_local_experts", 0)) or 0,
            "rope_theta": float(rope_theta),
            "rope_scaling": None if rope_type == "default" else rope,
            "eos_token_ids": [eos] if isinstance(eos, int) else list(eos or []),
            "partial_rotary_factor": float(partial),
        }
        # transformers 5 writes layer_types for Qwen3 too (its sliding-window layout, unused).
        values["layer_types"] = None
        if arch in HYBRID_ARCHITECTURES:
            values["layer_types"] = hybrid_layer_types(raw)
            if arch in _ALL_SPARSE:
                values.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
        if arch == "Qwen3VLMoeForConditionalGeneration":
            # Its router always renormalises the top-k weights (transformers 4.57 and 5.x
            # alike); the hub's configs say so, transformers 5 writes no such field.
            values["norm_topk_prob"] = True
        for f in dataclasses.fields(cls):
            if f.name in raw and f.name not in values and raw[f.name] is not None:
                values[f.name] = raw[f.name]
        # Partial configs get their shapes from the tensors; mark them unknown for now.
        for name in SHAPE_FIELDS:
            if raw.get(name) is None:
                values[name] = None
        return cls(**values)

    def complete_from_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Fill shape fields that config.json left out, from the checkpoint's tensor shapes.

        ``shapes`` maps our canonical tensor names (see weights/names.py) to shapes.
        """
        embed = shapes.get("embed_tokens.weight")
        layer_ids = {int(n.split(".")[1]) for n in shapes if n.startswith("layers.")}
        known = {
            "vocab_size": embed[0] if embed else None,
            "hidden_size": embed[1] if embed else None,
            "num_hidden_layers": max(layer_ids) + 1 if layer_ids else None,
        }
        q_norm = shapes.get("layers.0.self_attn.q_norm.weight")
        q_proj = shapes.get("layers.0.self_attn.q_proj.weight")
        k_proj = shapes.get("layers.0.self_attn.k_proj.weight")
        head_dim = q_norm[0] if q_norm else (self.head_dim or 128)
        known["head_dim"] = head_dim
        if q_proj:
            known["num_attention_heads"] = q_proj[0] // head_dim
        if k_proj:
            known["num_key_value_heads"] = k_proj[0] // head_dim
        dense = [n for n in shapes if n.endswith(".mlp.gate_proj.weight")]
        if dense:
            known["intermediate_size"] = shapes[dense[0]][0]
        elif any(n.endswith(".mlp.experts.gate_proj.weight") for n in shapes):
            known["intermediate_size"] = 0  # every layer is sparse: no dense width needed
        for name in SHAPE_FIELDS:
            if getattr(self, name) is None:
                if known.get(name) is None:
                    raise QwenChatError(
                        f"config: {name} is missing and cannot be inferred from the weights"
                    )
                setattr(self, name, int(known[name]))
        self.validate()

    def rope_inv_freq_and_scale(self):
        """Inverse frequencies and the cos/sin scale (YaRN's attention factor, else 1)."""
        import torch

        dim = self.rotary_dim
        base = self.rope_theta
        exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
        pos_freqs = base**exponents
        inv_freq = 1.0 / pos_freqs
        scaling = self.rope_scaling or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "default":
            return inv_freq, 1.0
        factor = float(scaling["factor"])
        if rope_type == "linear":
            return inv_freq / factor, 1.0
        if rope_type != "yarn":
            raise QwenChatError(f"config: rope scaling type {rope_type!r} is not supported")
        # YaRN (arXiv 2309.00071) as Qwen3 documents it for contexts beyond 32k.
        original = scaling.get("original_max_position_embeddings") or self.max_position_embeddings
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        return inv_freq, float(attention_factor)


def hybrid_layer_types(raw: Mapping) -> list[str]:
    """A hybrid config's layer_types, or transformers' default when it lists none: every
    ``full_attention_interval``-th layer (default 4) full attention, the rest linear."""
    if raw.get("layer_types") is not None:
        return list(raw["layer_types"])
    interval = raw.get("full_attention_interval") or 4
    layers = raw.get("num_hidden_layers") or 0
    return [
        "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)
    ]


SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


def read_config_json(path: Path) -> tuple[ModelConfig, dict]:
    """The model's config and config.json's raw fields (the loaders read what is not
    the model's shape, such as FP8 block sizes, from those)."""
    raw = read_json(path, needed_for="a model directory needs config.json")
    return ModelConfig.from_hf_dict(raw, source=str(path)), raw
