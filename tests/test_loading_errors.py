"""Bad model files: each gives one clear error naming the file or tensor, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qwen3chat.cli import app
from qwen3chat.errors import QwenChatError
from qwen3chat.loading import load_model


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir[0], path)
    return path


def cli_error(path) -> str:
    result = CliRunner().invoke(app, ["chat", "-m", str(path), "-p", "hi", "-n", "2"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_missing_path():
    with pytest.raises(QwenChatError, match="no such file"):
        load_model("/nonexistent/model")
    assert "no such file" in cli_error("/nonexistent/model")


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    assert "config.json: not found" in cli_error(model_copy)


def test_missing_tokenizer(model_copy):
    (model_copy / "tokenizer.json").unlink()
    assert "tokenizer.json: not found" in cli_error(model_copy)


def test_no_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    assert "no *.safetensors files" in cli_error(model_copy)


def test_truncated_safetensors(model_copy):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = cli_error(model_copy)
    assert "model.safetensors" in message


def test_garbage_safetensors(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "model.safetensors" in cli_error(model_copy)


def test_wrong_shape_names_tensor(model_copy):
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, weights)
    message = cli_error(model_copy)
    assert "layers.1.mlp.down_proj.weight" in message and "shape" in message


def test_missing_tensor_named(model_copy):
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.0.self_attn.k_norm.weight"]
    save_file(tensors, weights)
    assert "layers.0.self_attn.k_norm.weight is missing" in cli_error(model_copy)


def test_unexpected_tensor_named(model_copy):
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mystery.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, weights)
    assert "unexpected tensor layers.0.mystery.weight" in cli_error(model_copy)


def test_shard_index_pointing_at_missing_shard(model_copy):
    index = {
        "metadata": {},
        "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"},
    }
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00002-of-00002.safetensors is missing" in cli_error(model_copy)


def test_config_for_another_architecture(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(config))
    assert "MistralForCausalLM" in cli_error(model_copy)


def test_config_shapes_disagree_with_weights(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["intermediate_size"] = 256
    (model_copy / "config.json").write_text(json.dumps(config))
    assert "expected [256, 64] from the config" in cli_error(model_copy)


def test_config_without_shapes_is_completed_from_tensors(model_copy, tiny_model_dir):
    config = json.loads((model_copy / "config.json").read_text())
    for key in (
        "num_hidden_layers",
        "intermediate_size",
        "num_key_value_heads",
        "num_attention_heads",
        "vocab_size",
        "hidden_size",
    ):
        del config[key]
    (model_copy / "config.json").write_text(json.dumps(config))
    loaded = load_model(model_copy, device="cpu", dtype="float32")
    assert loaded.config.num_hidden_layers == 2
    assert loaded.config.num_key_value_heads == 2
    assert loaded.config.intermediate_size == 128
