"""Qwen3.5's multimodal class (Qwen3_5ForConditionalGeneration: the hybrid decoder with
interleaved M-RoPE over its rotated quarter, and Qwen3-VL's vision tower without
DeepStack) against transformers on real PNG files."""

from __future__ import annotations

import pytest
from conftest import build_hybrid_reference
from test_vision_inputs import video_backend
from test_vision_tower import randomise
from test_vl_parity import (
    files,
    run_case,
    save_vl_dir,
    test_the_batched_engine_runs_pictures_beside_text,  # noqa: F401 (on this module's model)
)

from qwen3chat.loading import load_model

transformers = pytest.importorskip("transformers")

__all__ = ["files", "video_backend"]  # fixtures, used by name below


@pytest.fixture(scope="module", autouse=True)
def _reference_video_code(video_backend):
    """transformers' processor here builds its video processor even for images."""


def build_reference(seed: int = 0):
    """build_hybrid_reference's multimodal model (the Qwen3 tokenizer's picture ids stand in
    for Qwen3.5's, whose vocabulary is not public) with a random vision tower."""
    model = build_hybrid_reference("multimodal", seed=seed)
    randomise(model.model.visual, seed=seed + 1)
    return model


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory, tokenizer_dir):
    reference = build_reference()
    return save_vl_dir(reference, tmp_path_factory.mktemp("qwen3.5-vl"), tokenizer_dir), reference


@pytest.fixture(scope="module")
def loaded(vl_dir):
    return load_model(vl_dir[0], device="cpu", dtype="float32")


@pytest.mark.parametrize("names", [["a"], ["a", "b"]], ids=["one image", "two images"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_pictures_match_transformers(tmp_path, tokenizer_dir, files, names, chunk_size):
    reference = build_reference()
    path = save_vl_dir(reference, tmp_path / "m", tokenizer_dir)
    loaded = load_model(path, device="cpu", dtype="float32")
    assert "<function=" in loaded.tokenizer.chat_template  # Qwen3.5's own template
    pictures = [files[n] for n in names]
    run_case((path, reference), loaded, tokenizer_dir, pictures, [], chunk_size)
