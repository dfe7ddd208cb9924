"""The batched engine on the hybrid generation (Qwen3.5 dense, Qwen3-Next MoE): each
running sequence moves its linear layers' states on in its own slot, and states kept at
block ends let a request that shares a system prompt or a conversation's history start
after it, as the prefix cache does for keys and values.

The batched engine's own tests run here on the hybrid models (imported, so they take this
module's ``loaded``): every sequence gets its greedy ids alone, whatever runs beside it,
through the native kernels and the torch path, preempted or not."""

from __future__ import annotations

import pytest
import torch
from conftest import build_hybrid_reference, chat_prompts, save_model_dir
from test_batch_engine import (
    GREEDY,
    MAX_SEQ_LEN,
    alone,
    run_all,
    test_batched_logits_match_the_single_sequence_forward,  # noqa: F401
    test_cancel_frees_blocks_at_once,  # noqa: F401
    test_each_sequence_gets_its_greedy_ids_alone,  # noqa: F401
    test_preempted_sequences_are_recomputed_to_the_same_ids,  # noqa: F401
    test_the_torch_path_too,  # noqa: F401
)

from qwen3chat.batch.engine import BLOCK_SIZE, BatchEngine
from qwen3chat.batch.state_slots import StateSlots
from qwen3chat.loading import load_model

SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 8}


@pytest.fixture(scope="module", params=["dense", "next"])
def loaded(request, tmp_path_factory, tokenizer_dir):
    model = build_hybrid_reference(request.param, seed=7)
    path = save_model_dir(model, tmp_path_factory.mktemp(request.param), tokenizer_dir)
    return load_model(path, device="cpu", dtype="float32")


def only(events):
    [finish] = [e[-1] for e in events.values()]
    return finish


def test_a_shared_system_prompt_is_resumed_from_its_kept_states(loaded):
    tok = loaded.tokenizer
    first = tok.encode_chat([SYSTEM, {"role": "user", "content": "Hi"}])
    second = tok.encode_chat([SYSTEM, {"role": "user", "content": "Name a colour"}])
    system_end = first.index(tok.turn_start_id, 1)  # where the user's turn starts
    engine = BatchEngine(loaded.model, tok, MAX_SEQ_LEN)
    assert only(run_all(engine, [(first, 4)])).cached_tokens == 0
    done = only(run_all(engine, [(second, 6)]))
    assert done.cached_tokens == system_end // BLOCK_SIZE * BLOCK_SIZE > 0
    assert done.timings.prefill_tokens == len(second) - done.cached_tokens
    assert done.token_ids == alone(loaded, second, 6).token_ids
    assert engine.blocks.in_use == 0


def test_a_conversation_s_next_turn_prefills_from_its_last_header(loaded):
    """A second turn's prompt repeats the first's up to its assistant header (the reply
    is rendered anew after it): it starts from the states kept at that header's block."""
    tok = loaded.tokenizer
    messages = [SYSTEM, {"role": "user", "content": "Hello there, how are you today?"}]
    first = tok.encode_chat(messages)
    engine = BatchEngine(loaded.model, tok, MAX_SEQ_LEN)
    reply = only(run_all(engine, [(first, 8)]))
    messages += [
        {"role": "assistant", "content": reply.text or "ok"},
        {"role": "user", "content": "And then?"},
    ]
    second = tok.encode_chat(messages)
    header = len(first) - 1 - first[::-1].index(tok.turn_start_id)
    assert second[:header] == first[:header]
    done = only(run_all(engine, [(second, 8)]))
    assert done.cached_tokens == header // BLOCK_SIZE * BLOCK_SIZE > 0
    assert done.token_ids == alone(loaded, second, 8).token_ids


def test_a_prompt_stops_at_its_marks_and_keeps_them_once(loaded):
    tok = loaded.tokenizer
    prompt = tok.encode_chat([SYSTEM, {"role": "user", "content": "Hi"}])
    engine = BatchEngine(loaded.model, tok, MAX_SEQ_LEN)
    seq = engine.add(prompt, 2, GREEDY)
    assert seq.stops and all(s % BLOCK_SIZE == 0 and 0 < s < len(prompt) for s in seq.stops)
    [(chosen, count)] = engine.scheduler.schedule()
    assert chosen is seq and count == seq.stops[0]  # the first step ends at the first stop
    engine.cancel(seq)
    engine = BatchEngine(loaded.model, tok, MAX_SEQ_LEN)
    run_all(engine, [(prompt, 2)])
    kept = len(engine.states.snapshots)
    assert kept == len(seq.stops)
    run_all(engine, [(prompt, 2)])  # the same prompt again: nothing new to keep
    assert len(engine.states.snapshots) == kept
    assert sorted(engine.states.free) == list(range(engine.scheduler.max_running))


def test_a_decode_step_is_one_native_call_with_every_sequence_s_slot(loaded, monkeypatch):
    from qwen3chat import kernels
    from qwen3chat.model import native

    if kernels.native(torch.zeros(1)) is None:
        pytest.skip("the native kernels are not available here")
    calls = []
    real = native.paged_layers

    def recorded(*args):
        calls.append((args, real(*args)))
        return calls[-1][1]

    monkeypatch.setattr(native, "paged_layers", recorded)
    engine = BatchEngine(loaded.model, loaded.tokenizer, MAX_SEQ_LEN)
    events = run_all(engine, [(ids, 5) for ids in chat_prompts(loaded.tokenizer, 3)])
    whole = [(a, out) for a, out in calls if len(a[1]) == len(loaded.model.layers)]
    assert len(whole) == 4  # the four decode steps; the prompts' step runs layer by layer
    assert all(out is not None for _, out in calls)  # none fell back to torch
    assert all(a[-1] is not None for a, _ in whole)  # the state pools and row slots
    assert sorted(whole[0][0][-1][2].tolist()) == [0, 1, 2]
    layered = [a for a, _ in calls if len(a[1]) == 1]  # the prompts' attention layers
    assert len(layered) == sum(hasattr(layer, "self_attn") for layer in loaded.model.layers)
    assert all(len(e[-1].token_ids) == 5 for e in events.values())


def test_serve_answers_concurrent_requests_on_a_hybrid_model(loaded, tmp_path, tokenizer_dir):
    """The real server on a Qwen3.5 checkpoint: 8 clients at once each get the greedy
    reply their prompt gets alone, and a conversation's next turn is served from kept
    states (reported as cached)."""
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import Server

    if loaded.model.config.architecture != "Qwen3_5ForCausalLM":
        pytest.skip("one hybrid class is enough for the server")
    path = save_model_dir(build_hybrid_reference("dense", seed=7), tmp_path, tokenizer_dir)
    tok = loaded.tokenizer
    prompts = [[SYSTEM, {"role": "user", "content": f"Question number {i}?"}] for i in range(8)]
    server = Server(path)
    try:

        def ask(messages):
            return server.client().chat.completions.create(
                messages=messages, model="m", temperature=0, max_tokens=6
            )

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(ask, prompts))
        for messages, reply in zip(prompts, replies, strict=True):
            expected = alone(loaded, tok.encode_chat(messages), 6)
            assert reply.choices[0].message.content == (expected.text.strip() or None)
            assert reply.usage.completion_tokens == len(expected.token_ids)
        follow = [
            *prompts[0],
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "More"},
        ]
        again = ask(follow)
        first = tok.encode_chat(prompts[0])
        header = len(first) - 1 - first[::-1].index(tok.turn_start_id)
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert cached == header // BLOCK_SIZE * BLOCK_SIZE > 0
    finally:
        assert server.stop() == 0


def test_state_slots_hand_out_and_recycle():
    slots = StateSlots(running=2, snapshots=2)
    a, b = slots.take(), slots.take()
    assert {a, b} == {0, 1}
    slots.give_back(a)
    assert slots.take() == a
    assert slots.new_snapshot(b"x") == 3 and slots.new_snapshot(b"y") == 2
    assert slots.new_snapshot(b"x") is None  # kept already (and now the newest)
    assert slots.new_snapshot(b"z") == 2  # the least recently used, y, given up
    assert slots.resumable(b"x") and not slots.resumable(b"y")
    assert slots.snapshot_of(b"x") == 3
