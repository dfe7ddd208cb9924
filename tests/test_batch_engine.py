"""The batched engine (qwen3chat/batch/): continuous batching over a paged KV cache.

Every sequence of a batch gets the greedy ids it gets alone in the single-sequence
engine, whatever runs beside it: prompts of different lengths joining at different
steps, prefill chunks mixed with decode rows, blocks shared through the prefix cache,
and sequences preempted when blocks run out. Blocks are freed when a sequence ends."""

from __future__ import annotations

import pytest
import torch
from conftest import build_reference_model, chat_prompts, save_model_dir

from qwen3chat import kernels
from qwen3chat.batch.block_manager import BlockManager
from qwen3chat.batch.engine import BLOCK_SIZE, BatchEngine
from qwen3chat.batch.sequence import Sequence
from qwen3chat.engine import Engine
from qwen3chat.generation import FinishEvent, TextEvent
from qwen3chat.loading import load_model
from qwen3chat.model.qwen3 import TextLayout
from qwen3chat.sampling import SamplingSettings

GREEDY = SamplingSettings(temperature=0.0)
MAX_SEQ_LEN = 256


@pytest.fixture(scope="module", params=["dense", "moe"])
def loaded(request, tmp_path_factory, tokenizer_dir):
    model = build_reference_model(tie=True, seed=3, moe=request.param == "moe")
    path = save_model_dir(model, tmp_path_factory.mktemp(request.param), tokenizer_dir)
    return load_model(path, device="cpu", dtype="float32")


def alone(loaded, ids: list[int], max_tokens: int) -> FinishEvent:
    engine = Engine(loaded.model, loaded.tokenizer, MAX_SEQ_LEN)
    return list(engine.generate(ids, max_tokens, GREEDY))[-1]


def run_all(engine: BatchEngine, requests, join_every: int = 0) -> dict[Sequence, list]:
    """Add ``requests`` ((ids, max_tokens) pairs), one more every ``join_every`` steps (all
    at once with 0); step until all finish; each sequence's events."""
    pending = list(requests)
    events: dict[Sequence, list] = {}
    steps = 0
    while pending or engine.has_work:
        if pending and (join_every == 0 or steps % join_every == 0):
            batch = pending if join_every == 0 else pending[:1]
            for ids, max_tokens in batch:
                events[engine.add(ids, max_tokens, GREEDY)] = []
            pending = pending[len(batch) :]
        for seq, event in engine.step():
            events[seq].append(event)
        steps += 1
        assert steps < 10_000
    return events


@pytest.mark.parametrize("join_every", [0, 3])
def test_each_sequence_gets_its_greedy_ids_alone(loaded, join_every):
    check_alone(loaded, join_every)


def test_the_torch_path_too(loaded, torch_matmuls):
    """Where the native kernels do not run (another device, shapes they do not cover): the
    PagedBatch's own store and attention, one SDPA over the padded sequences."""
    check_alone(loaded, join_every=2)


def test_long_prompts_get_their_greedy_ids_alone(loaded):
    """Prompts long enough that the paged step attends over them through SDPA (LIMITS'
    prompt_sdpa_work), two in one step beside a short one, each as the chat engine runs
    it alone."""
    words = "the quick brown fox jumps over a lazy dog while seven cats watch it " * 12
    contents = [words[: 480 + 150 * i] for i in range(2)]
    prompts = [loaded.tokenizer.encode_chat([{"role": "user", "content": c}]) for c in contents]
    native = kernels.native(torch.zeros(1))
    if native is None:
        pytest.skip("no native kernels here: the paged step is the torch code's")
    assert all(len(ids) ** 2 >= native.LIMITS["prompt_sdpa_work"] for ids in prompts)
    requests = [(ids, 8) for ids in [*prompts, *chat_prompts(loaded.tokenizer, 1)]]
    events = run_all(BatchEngine(loaded.model, loaded.tokenizer, MAX_SEQ_LEN), requests)
    for (ids, max_tokens), seq in zip(requests, events, strict=True):
        assert events[seq][-1].token_ids == alone(loaded, ids, max_tokens).token_ids


def check_alone(loaded, join_every: int) -> None:
    requests = [(ids, 12 + 5 * (i % 3)) for i, ids in enumerate(chat_prompts(loaded.tokenizer, 6))]
    engine = BatchEngine(loaded.model, loaded.tokenizer, MAX_SEQ_LEN, token_budget=24)
    events = run_all(engine, requests, join_every)
    for (ids, max_tokens), seq in zip(requests, events, strict=True):
        finish = events[seq][-1]
        expected = alone(loaded, ids, max_tokens)
        assert finish.token_ids == expected.token_ids
        assert finish.reason == expected.reason
        text = "".join(e.text for e in events[seq] if isinstance(e, TextEvent))
        assert text == expected.thinking + expected.text or text
    assert engine.blocks.in_use == 0


def test_a_shared_prefix_is_computed_once(loaded):
    tok = loaded.tokenizer
    system = {"role": "system", "content": "You are a careful assistant. " * 8}
    first = tok.encode_chat([system, {"role": "user", "content": "Hi"}])
    second = tok.encode_chat([system, {"role": "user", "content": "Name a colour"}])
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    engine = BatchEngine(loaded.model, tok, MAX_SEQ_LEN)
    one = run_all(engine, [(first, 4)])
    two = run_all(engine, [(second, 6)])
    [done_one] = [e[-1] for e in one.values()]
    [done_two] = [e[-1] for e in two.values()]
    assert done_one.cached_tokens == 0
    assert done_two.cached_tokens == shared // BLOCK_SIZE * BLOCK_SIZE > 0
    assert done_two.timings.prefill_tokens == len(second) - done_two.cached_tokens
    assert done_two.token_ids == alone(loaded, second, 6).token_ids


def test_preempted_sequences_are_recomputed_to_the_same_ids(loaded):
    requests = [(ids, 40) for ids in chat_prompts(loaded.tokenizer, 4)]
    longest = max(len(ids) for ids, _ in requests) + 40
    # Room for about two of the four at their full length: the newest are preempted.
    blocks = 2 * -(-longest // BLOCK_SIZE) + 1
    engine = BatchEngine(loaded.model, loaded.tokenizer, MAX_SEQ_LEN, num_blocks=blocks)
    preempted = []
    original = engine.scheduler._preempt
    engine.scheduler._preempt = lambda seq: (preempted.append(seq), original(seq))
    events = run_all(engine, requests)
    assert preempted
    for (ids, max_tokens), seq in zip(requests, events, strict=True):
        assert events[seq][-1].token_ids == alone(loaded, ids, max_tokens).token_ids
    assert engine.blocks.in_use == 0


def test_cancel_frees_blocks_at_once(loaded):
    engine = BatchEngine(loaded.model, loaded.tokenizer, MAX_SEQ_LEN)
    [ids] = chat_prompts(loaded.tokenizer, 1)
    seq = engine.add(ids, 100, GREEDY)
    other = engine.add(ids[:-1], 100, GREEDY)
    for _ in range(3):
        engine.step()
    assert engine.blocks.in_use > 0
    [finish] = [e for _, e in engine.cancel(seq) if isinstance(e, FinishEvent)]
    assert finish.reason == "cancelled" and len(finish.token_ids) == 3  # one a step
    engine.cancel(other)
    assert engine.blocks.in_use == 0 and not engine.has_work


def test_batched_logits_match_the_single_sequence_forward(loaded):
    """Two sequences decoding beside a prefill chunk: each row's logits equal what the
    single-sequence path gives at that position."""
    model = loaded.model
    ids = chat_prompts(loaded.tokenizer, 3)
    engine = BatchEngine(model, loaded.tokenizer, MAX_SEQ_LEN, token_budget=1000)
    seqs = [engine.add(p, 8, GREEDY) for p in ids[:2]]
    engine.step()  # both prompts, whole
    late = engine.add(ids[2], 8, GREEDY)
    chosen = engine.scheduler.schedule()
    assert [count for _, count in chosen] == [1, 1, len(ids[2])]
    sampled, logits = engine.run(chosen)
    assert sampled == [*seqs, late]
    for seq, row in zip(sampled, logits, strict=True):
        cache = model.new_cache(MAX_SEQ_LEN)
        with torch.inference_mode():
            expected = model(torch.tensor([seq.ids]), cache, 0)[0]
        # Within 1e-4 of the largest logit, as test_parity.py's: float32 sums in another
        # order differ by 1.5e-4 at logits of 20 (Qwen3-Next's shape, AVX-512).
        assert (row - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_block_manager_shares_evicts_and_counts():
    blocks = BlockManager(num_blocks=4, block_size=2)

    def seq(keys):
        return Sequence(list(keys), TextLayout(keys), generation=None)

    a = seq([1, 2, 3, 4, 5])
    assert blocks.adopt_prefix(a) == 0
    assert blocks.grow(a, 5) and len(a.blocks) == 3 and blocks.in_use == 3
    a.computed = 5
    blocks.register(a)
    assert a.hashed == 2  # the third block is not full
    b = seq([1, 2, 3, 4, 9])
    assert blocks.adopt_prefix(b) == 4 and b.blocks == a.blocks[:2]
    assert blocks.in_use == 3  # shared, not copied
    c = seq([1, 2, 3, 4])  # its last position runs: only the first block is adopted
    assert blocks.adopt_prefix(c) == 2
    blocks.release(a)
    blocks.release(c)
    assert blocks.in_use == 2  # b still holds the two shared blocks
    assert not blocks.grow(seq([7] * 7), 7)  # 4 blocks needed, 2 free: nothing taken
    assert blocks.in_use == 2
    blocks.release(b)
    assert blocks.in_use == 0
    # Freed full blocks stay findable until their block is needed again.
    d = seq([1, 2, 3, 4, 8])
    assert blocks.adopt_prefix(d) == 4
    blocks.release(d)
    e = seq([6] * 8)
    assert blocks.grow(e, 8) and blocks.in_use == 4
    assert blocks.adopt_prefix(seq([1, 2, 3, 4, 8])) == 0  # evicted for e


def test_a_step_is_one_native_call_for_all_layers(loaded, monkeypatch):
    from qwen3chat import kernels
    from qwen3chat.model import native

    if kernels.native(torch.zeros(1)) is None:
        pytest.skip("the native kernels are not available here")
    calls, results = [], []
    real = native.paged_layers

    def recorded(*args):
        calls.append(args)
        results.append(real(*args))
        return results[-1]

    monkeypatch.setattr(native, "paged_layers", recorded)
    engine = BatchEngine(loaded.model, loaded.tokenizer, MAX_SEQ_LEN)
    events = run_all(engine, [(ids, 5) for ids in chat_prompts(loaded.tokenizer, 3)])
    assert len(calls) == 5  # a step: the prompts, then four decode steps
    assert all(len(call[1]) == len(loaded.model.layers) for call in calls)
    assert all(result is not None for result in results)  # none fell back to torch
    assert all(len(e[-1].token_ids) == 5 for e in events.values())
