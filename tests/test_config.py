"""config.json parsing, defaults, shape completion, presets and RoPE scaling."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TOKENIZER_FIXTURE

from qwen3chat.config import ModelConfig, read_config_json
from qwen3chat.errors import QwenChatError
from qwen3chat.model import build_on_meta, num_parameters
from qwen3chat.presets import PRESETS, preset_config
from qwen3chat.weights.names import expected_shapes


def test_real_qwen3_0_6b_config_matches_preset():
    config, _ = read_config_json(TOKENIZER_FIXTURE / "config.json")
    preset = preset_config("qwen3-0.6b")
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "head_dim",
        "num_attention_heads",
        "num_key_value_heads",
        "tie_word_embeddings",
        "vocab_size",
        "rope_theta",
        "rms_norm_eps",
    ):
        assert getattr(config, field) == getattr(preset, field), field
    assert config.rope_scaling is None
    assert config.eos_token_ids == [151645]


def test_published_parameter_counts():
    # Qwen3 model cards: 0.6B has 0.6B parameters (0.44B without embeddings), 8B has 8.2B.
    assert round(num_parameters(PRESETS["qwen3-0.6b"]) / 1e9, 2) == 0.6
    assert round(num_parameters(PRESETS["qwen3-8b"]) / 1e9, 1) == 8.2
    assert round(num_parameters(PRESETS["qwen3-32b"]) / 1e9, 1) == 32.8


def test_defaults_for_missing_fields():
    config = ModelConfig.from_hf_dict({"architectures": ["Qwen3ForCausalLM"]})
    assert (config.rms_norm_eps, config.rope_theta) == (1e-6, 1e6)
    shapes = expected_shapes(build_on_meta(preset_config("tiny")))
    config.complete_from_shapes(shapes)
    tiny = preset_config("tiny")
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    ):
        assert getattr(config, field) == getattr(tiny, field), field


def test_other_architecture_is_rejected(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(QwenChatError, match=r"LlamaForCausalLM.*not supported"):
        read_config_json(path)


def test_bad_json_is_a_clear_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(QwenChatError, match="not valid JSON"):
        read_config_json(path)


def test_yarn_matches_transformers():
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    ours = ModelConfig(rope_scaling=dict(yarn), max_position_embeddings=131072)
    ref_config = Qwen3Config(
        head_dim=128,
        max_position_embeddings=131072,
        rope_parameters={**yarn, "rope_theta": 1e6},
    )
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](ref_config, "cpu")
    inv, scale = ours.rope_inv_freq_and_scale()
    assert torch.allclose(inv, ref_inv, rtol=1e-6)
    assert scale == pytest.approx(ref_scale)
    assert scale > 1.0


def test_unknown_preset_lists_choices():
    with pytest.raises(QwenChatError, match=r"qwen3-0\.6b"):
        preset_config("qwen9")
