"""Our model against transformers' Qwen3ForCausalLM on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import build_reference_model, save_model_dir
from transformers import Qwen3ForCausalLM

from qwen3chat.engine import Engine
from qwen3chat.generation import FinishEvent
from qwen3chat.loading import load_model
from qwen3chat.model.uncached import UncachedModel
from qwen3chat.sampling import SamplingSettings

GREEDY = SamplingSettings(temperature=0.0)
STEPS = 40
PROMPT = [151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 151644, 77091, 198]


def reference_greedy(model, prompt, steps):
    """Greedy decode by re-running transformers on the whole sequence each step."""
    ids = list(prompt)
    all_logits = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            all_logits.append(logits)
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :], torch.stack(all_logits)


def engine_greedy(engine, prompt, steps, **generate_kwargs):
    """Greedy decode through the engine, recording the logits it sampled from."""
    recorded = []
    original = engine.model.forward

    def recording_forward(*args, **kwargs):
        out = original(*args, **kwargs)
        recorded.append(out.reshape(-1, out.shape[-1])[-1].float())
        return out

    engine.model.forward = recording_forward
    try:
        events = list(engine.generate(prompt, steps, GREEDY, **generate_kwargs))
    finally:
        engine.model.forward = original
    finish = events[-1]
    assert isinstance(finish, FinishEvent)
    # Prefill chunks before the last one give no sampled logits: keep the last STEPS.
    return finish, torch.stack(recorded[-steps:])


def assert_logits_close(ours, ref, rtol=1e-4):
    scale = ref.abs().max()
    err = (ours - ref).abs().max()
    assert err <= rtol * scale, f"max logit error {err:.3g} vs scale {scale:.3g}"


def check_against_reference(path, reference, engine_kwargs=None, dtype="float32", uncached=False):
    loaded = load_model(path, device="cpu", dtype=dtype)
    model = UncachedModel(loaded.model) if uncached else loaded.model
    engine = Engine(model, loaded.tokenizer, max_seq_len=256, **(engine_kwargs or {}))
    # No stop ids: force all STEPS tokens so every step is compared.
    engine.tokenizer.stop_ids = []
    ref_ids, ref_logits = reference_greedy(reference, PROMPT, STEPS)
    finish, logits = engine_greedy(engine, PROMPT, STEPS)
    assert finish.token_ids == ref_ids
    assert logits.shape[0] == STEPS
    return logits, ref_logits


def test_tied_float32_prefill_and_every_decode_step(tiny_model_dir):
    path, reference = tiny_model_dir
    logits, ref_logits = check_against_reference(path, reference)
    for step in range(STEPS):
        assert_logits_close(logits[step], ref_logits[step])


@pytest.mark.parametrize("chunk_size", [1, 5])
def test_chunked_prefill_matches(tiny_model_dir, chunk_size):
    path, reference = tiny_model_dir
    logits, ref_logits = check_against_reference(path, reference, {"chunk_size": chunk_size})
    assert_logits_close(logits, ref_logits)


def test_uncached_reference_mode_matches(tiny_model_dir):
    path, reference = tiny_model_dir
    logits, ref_logits = check_against_reference(path, reference, uncached=True)
    assert_logits_close(logits, ref_logits)


def test_untied_sharded_checkpoint(tmp_path, tokenizer_dir):
    reference = build_reference_model(tie=False, seed=1)
    path = save_model_dir(reference, tmp_path / "m", tokenizer_dir, shard="20MB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    logits, ref_logits = check_against_reference(path, reference)
    assert_logits_close(logits, ref_logits)


def test_bf16_stored_checkpoint(tmp_path, tokenizer_dir):
    reference = build_reference_model(tie=True, seed=2)
    path = save_model_dir(reference, tmp_path / "m", tokenizer_dir, dtype=torch.bfloat16)
    # The reference reads the same bf16 file and computes in float32, as we do here.
    reference = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    logits, ref_logits = check_against_reference(path, reference)
    assert_logits_close(logits, ref_logits)


def test_yarn_rope_scaling(tmp_path, tokenizer_dir):
    yarn = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
        "rope_theta": 1_000_000.0,
    }
    reference = build_reference_model(tie=True, seed=3, rope_parameters=yarn)
    path = save_model_dir(reference, tmp_path / "m", tokenizer_dir)
    logits, ref_logits = check_against_reference(path, reference)
    assert_logits_close(logits, ref_logits)


def test_score_returns_every_position(tiny_model_dir):
    path, reference = tiny_model_dir
    loaded = load_model(path, device="cpu", dtype="float32")
    engine = Engine(loaded.model, loaded.tokenizer, max_seq_len=64)
    ours = engine.score(PROMPT)
    with torch.no_grad():
        ref = reference(torch.tensor([PROMPT])).logits[0]
    assert ours.shape == ref.shape
    assert_logits_close(ours, ref)
