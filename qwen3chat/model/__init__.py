"""The networks as plain nn.Modules over a config dataclass; they read no files and know no
text. MODELS is the one table from a checkpoint's architecture to its module: a new family
adds a file here and a row there."""

from __future__ import annotations

import torch

from ..config import HYBRID_ARCHITECTURES, HYBRID_MULTIMODAL, ModelConfig
from .qwen3 import Qwen3Model
from .qwen3_vl import Qwen3VLModel

MODELS: dict[str, type[Qwen3Model]] = {
    "Qwen3ForCausalLM": Qwen3Model,
    "Qwen3MoeForCausalLM": Qwen3Model,
    "Qwen3VLForConditionalGeneration": Qwen3VLModel,
    "Qwen3VLMoeForConditionalGeneration": Qwen3VLModel,
    # The hybrid generation: the same decoder, with Gated DeltaNet layers (config.layer_types).
    **dict.fromkeys(HYBRID_ARCHITECTURES, Qwen3Model),
    **dict.fromkeys(HYBRID_MULTIMODAL, Qwen3VLModel),
}


def build_on_meta(config: ModelConfig) -> Qwen3Model:
    """The model of ``config``'s architecture with its parameters on the meta device (no
    memory): what the loaders fill, and what shapes and counts are read from."""
    with torch.device("meta"):
        return MODELS[config.architecture](config)


def num_parameters(config: ModelConfig, active: bool = False) -> int:
    """Parameter count, embedding and (untied) lm_head included; with ``active``, only the
    experts a token runs through (num_experts_per_tok of num_experts) are counted."""
    total = 0
    for name, param in build_on_meta(config).named_parameters():
        count = param.numel()
        if active and ".mlp.experts." in name:
            count = count * config.num_experts_per_tok // config.num_experts
        total += count
    return total
