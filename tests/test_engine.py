"""The generation engine: events, stopping, cancellation, prefix reuse, context limits."""

from __future__ import annotations

import pytest
import torch

from qwen3chat.engine import Engine
from qwen3chat.errors import ContextOverflowError
from qwen3chat.generation import FinishEvent, TextEvent
from qwen3chat.loading import load_model
from qwen3chat.sampling import SamplingSettings

GREEDY = SamplingSettings(temperature=0.0)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir[0], device="cpu", dtype="float32")


@pytest.fixture
def engine(loaded):
    return Engine(loaded.model, loaded.tokenizer, max_seq_len=128)


def run(engine, ids, max_tokens=16, sampling=GREEDY, **kwargs):
    events = list(engine.generate(ids, max_tokens, sampling, **kwargs))
    assert isinstance(events[-1], FinishEvent)
    assert all(isinstance(e, TextEvent) for e in events[:-1])
    return events[-1], events[:-1]


def prompt(engine, text="Hello there"):
    return engine.tokenizer.encode_chat([{"role": "user", "content": text}])


def test_length_limit_and_text_events(engine):
    finish, texts = run(engine, prompt(engine), max_tokens=12)
    assert finish.reason in ("length", "stop")
    assert len(finish.token_ids) <= 12
    shown = "".join(e.text for e in texts if not e.thinking)
    assert shown == finish.text
    assert finish.timings.ttft_s > 0


def test_stop_id_ends_the_reply_and_is_not_returned(engine):
    ids = prompt(engine)
    first, _ = run(engine, ids, max_tokens=6)
    # Declare the third generated token a stop id: the reply must end right before it.
    engine.tokenizer.stop_ids = [first.token_ids[2]]
    try:
        finish, _ = run(engine, ids, max_tokens=6)
    finally:
        engine.tokenizer.stop_ids = [151643, 151645]
    assert finish.reason == "stop"
    assert finish.token_ids == first.token_ids[:2]


def test_cancel_mid_stream_then_generate_again(engine):
    ids = prompt(engine)
    full, _ = run(engine, ids, max_tokens=20)
    calls = {"n": 0}

    def stop_after_five():
        calls["n"] += 1
        return calls["n"] > 5

    cancelled, _ = run(engine, ids, max_tokens=20, should_stop=stop_after_five)
    assert cancelled.reason == "cancelled"
    assert 0 < len(cancelled.token_ids) < 20
    assert cancelled.token_ids == full.token_ids[: len(cancelled.token_ids)]
    again, _ = run(engine, ids, max_tokens=20)
    assert again.token_ids == full.token_ids


def test_cancel_during_prefill(loaded):
    engine = Engine(loaded.model, loaded.tokenizer, max_seq_len=128, chunk_size=4)
    finish, texts = run(engine, prompt(engine), should_stop=lambda: True)
    assert finish.reason == "cancelled" and finish.token_ids == [] and texts == []
    again, _ = run(engine, prompt(engine))
    assert again.token_ids


def test_interrupt_inside_forward_leaves_cache_consistent(engine):
    ids = prompt(engine)
    expected, _ = run(engine, ids)
    engine.cache.trim(0)
    original = engine.model.forward
    calls = {"n": 0}

    def exploding_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    engine.model.forward = exploding_forward
    with pytest.raises(KeyboardInterrupt):
        run(engine, ids)
    engine.model.forward = original
    # The cache holds only what finished: the prompt and the first two decode steps.
    assert engine.cache.tokens == ids + expected.token_ids[:2]
    again, _ = run(engine, ids)
    assert again.token_ids == expected.token_ids


def test_prefix_reuse_prefills_only_new_tokens(engine):
    first_ids = prompt(engine, "First question")
    first, _ = run(engine, first_ids, max_tokens=8)
    assert first.cached_tokens == 0
    follow = first_ids + first.token_ids + engine.tokenizer.encode("<|im_end|>\nmore")
    second, _ = run(engine, follow, max_tokens=8)
    # Everything the cache held (prompt + fed-back reply tokens) is reused.
    assert second.cached_tokens == len(first_ids) + len(first.token_ids) - 1
    assert second.timings.prefill_tokens == len(follow) - second.cached_tokens
    # Reuse must not change the result.
    fresh = Engine(engine.model, engine.tokenizer, max_seq_len=128)
    third, _ = run(fresh, follow, max_tokens=8)
    assert third.token_ids == second.token_ids


def test_same_prompt_twice_reruns_one_token(engine):
    ids = prompt(engine)
    first, _ = run(engine, ids)
    second, _ = run(engine, ids)
    assert second.cached_tokens == len(ids) - 1
    assert second.token_ids == first.token_ids


def test_prompt_too_long_is_a_clear_error(engine):
    with pytest.raises(ContextOverflowError, match="--max-seq-len"):
        list(engine.generate(list(range(1000, 1128)), 4, GREEDY))


def test_reply_stops_at_context_end(loaded):
    engine = Engine(loaded.model, loaded.tokenizer, max_seq_len=24)
    engine.tokenizer.stop_ids = []
    try:
        ids = prompt(engine)
        finish, _ = run(engine, ids, max_tokens=100)
    finally:
        engine.tokenizer.stop_ids = [151643, 151645]
    assert finish.reason == "length"
    assert len(ids) + len(finish.token_ids) == 24


def test_seeded_sampling_is_reproducible(engine):
    ids = prompt(engine)
    settings = SamplingSettings(temperature=1.0, top_p=0.95, seed=7)
    a, _ = run(engine, ids, sampling=settings)
    b, _ = run(engine, ids, sampling=settings)
    c, _ = run(engine, ids, sampling=SamplingSettings(temperature=1.0, top_p=0.95, seed=8))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_bfloat16_close_to_float32(loaded, tiny_model_dir):
    """bf16 compute (prefill via float32 matmuls, decode in bf16) stays near float32."""
    bf16 = load_model(tiny_model_dir[0], device="cpu", dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16
    ids = prompt(Engine(loaded.model, loaded.tokenizer, 64))
    exact = Engine(loaded.model, loaded.tokenizer, 64).score(ids)
    approx = Engine(bf16.model, bf16.tokenizer, 64).score(ids)
    assert (approx - exact).abs().max() < 0.05 * exact.abs().max()
    finish, _ = run(Engine(bf16.model, bf16.tokenizer, 64), ids, max_tokens=8)
    assert len(finish.token_ids) == 8 or finish.reason == "stop"


def test_uncached_reference_gives_the_cached_path_s_ids_and_logits(loaded):
    """The reference mode (UncachedModel: every pass re-runs the whole sequence, no KV
    cache) under the same engine: the same greedy ids and logits as the cached path,
    over two turns, the second reusing the first's prefix and prefilled in chunks."""
    from qwen3chat.model.uncached import UncachedModel

    reference = UncachedModel(loaded.model)
    first_ids = prompt(Engine(loaded.model, loaded.tokenizer, 128), "First question")
    turns = []
    for model, chunk in ((loaded.model, 3), (reference, 3)):
        engine = Engine(model, loaded.tokenizer, max_seq_len=128, chunk_size=chunk)
        first, _ = run(engine, first_ids, max_tokens=8)
        follow = first_ids + first.token_ids + engine.tokenizer.encode("<|im_end|>\nmore")
        second, _ = run(engine, follow, max_tokens=8)
        engine.cache.trim(len(follow) - 1)
        logits = engine.prefill(follow, lambda: False)
        turns.append((first.token_ids, second.token_ids, second.cached_tokens, logits))
    cached, uncached = turns
    assert cached[:3] == uncached[:3] and len(cached[1]) == 8
    torch.testing.assert_close(uncached[3], cached[3], rtol=1e-4, atol=1e-4)


def test_uncached_reference_takes_text_prompts_only(loaded):
    from qwen3chat.model.uncached import UncachedModel

    engine = Engine(UncachedModel(loaded.model), loaded.tokenizer, max_seq_len=32)
    with pytest.raises(ValueError, match="text prompts only"):
        engine.model(torch.tensor([[1]]), engine.cache, 0, positions=torch.zeros(3, 1))
