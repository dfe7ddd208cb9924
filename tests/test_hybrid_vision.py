"""Qwen3.5's multimodal class (Qwen3_5ForConditionalGeneration: the hybrid decoder with
interleaved M-RoPE over its rotated quarter, and Qwen3-VL's vision tower without
DeepStack) against transformers on real PNG files."""

from __future__ import annotations

import pytest
from conftest import build_hybrid_reference
from PIL import Image
from test_parity import assert_logits_close, engine_greedy
from test_vision_inputs import video_backend
from test_vision_tower import randomise
from test_vl_parity import STEPS, files, reference_greedy, reference_processor, save_vl_dir

from qwen3chat.engine import Engine
from qwen3chat.loading import load_model
from qwen3chat.vision.preprocess import VisionPreprocessing
from qwen3chat.vision.prompt import VisionChat, user_message

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


@pytest.mark.parametrize("names", [["a"], ["a", "b"]], ids=["one image", "two images"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_pictures_match_transformers(tmp_path, tokenizer_dir, files, names, chunk_size):
    reference = build_reference()
    path = save_vl_dir(reference, tmp_path / "m", tokenizer_dir)
    loaded = load_model(path, device="cpu", dtype="float32")
    assert "<function=" in loaded.tokenizer.chat_template  # Qwen3.5's own template
    settings = VisionPreprocessing.from_model_dir(path)
    chat = VisionChat(settings)
    messages = [user_message("Describe.", [chat.image(files[n]) for n in names])]
    ids, visuals = chat.encode_chat(loaded.tokenizer, messages)

    processor = reference_processor(tokenizer_dir, settings)
    images = [Image.open(files[n]).convert("RGB") for n in names]
    inputs = processor(text=[loaded.tokenizer.render(messages)], images=images, return_tensors="pt")
    assert ids == inputs["input_ids"][0].tolist()

    engine = Engine(loaded.model, loaded.tokenizer, 512, chunk_size)
    engine.tokenizer.stop_ids = []
    finish, logits = engine_greedy(engine, ids, STEPS, visuals=visuals)
    ref_ids, ref_logits = reference_greedy(reference, inputs, STEPS)
    assert finish.token_ids == ref_ids
    assert_logits_close(logits, ref_logits, rtol=2e-4)
    assert finish.timings.vision_s > 0
