"""A SafeTensors checkpoint's weights kept as stored are read as views of their file's
pages, one mapping per file, and stay so where memory cannot hold a copy (memory.py
copies them into 2 MiB pages otherwise); weights converted at load (fused, another dtype)
own their memory, and no brief mapping of a file outlives the load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_reference_model, save_model_dir

from qwen3chat import memory
from qwen3chat.loading import load_model

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/maps").exists(), reason="reads the process's mappings from /proc"
)

FUSED = ("qkv_proj", "gate_up_proj")


def mappings_of(files: list[Path]) -> list[tuple[int, int]]:
    """Address ranges at which this process maps any of ``files``."""
    names = {str(f.resolve()) for f in files}
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] in names:
                low, high = (int(a, 16) for a in fields[0].split("-"))
                ranges.append((low, high))
    return ranges


def mapping_holding(tensor: torch.Tensor, ranges: list[tuple[int, int]]):
    address = tensor.data_ptr()
    return next(((lo, hi) for lo, hi in ranges if lo <= address < hi), None)


def test_kept_weights_share_one_mapping_per_file(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(memory, "_available_bytes", lambda: 0)  # a model beyond memory
    directory = save_model_dir(build_reference_model(), tmp_path, tokenizer_dir, shard="15MB")
    files = sorted(directory.glob("*.safetensors"))
    assert len(files) >= 2
    model = load_model(directory, device="cpu", dtype="float32").model
    ranges = mappings_of(files)
    holding = {}
    for name, param in model.named_parameters():
        mapping = mapping_holding(param, ranges)
        if any(part in name for part in FUSED):
            assert mapping is None, f"{name} is fused at load and must own its memory"
        else:
            assert mapping is not None, f"{name} is kept as stored but was copied"
            holding[name] = mapping
    assert len(set(holding.values())) == len(files)
    # The fused parts were read through brief mappings, all gone: only the kept remain.
    assert set(ranges) == set(holding.values())


def test_converted_weights_own_their_memory(tiny_model_dir):
    directory, _ = tiny_model_dir
    model = load_model(directory, device="cpu", dtype="bfloat16").model
    ranges = mappings_of(sorted(directory.glob("*.safetensors")))
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    for name, param in model.named_parameters():
        assert mapping_holding(param, ranges) is None, f"{name} still points into the file"
