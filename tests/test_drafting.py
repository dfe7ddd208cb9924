"""Speculative decoding by prompt lookup (``--draft ngram``): the drafter, and the engine's
replies with drafts, which must be exactly those without them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import chat_prompts
from typer.testing import CliRunner

from qwen3chat.batch.engine import BLOCK_SIZE, BatchEngine
from qwen3chat.cli import app
from qwen3chat.drafting import NgramDrafter
from qwen3chat.engine import Engine
from qwen3chat.generation import FinishEvent
from qwen3chat.loading import load_model
from qwen3chat.sampling import SamplingSettings

GREEDY = SamplingSettings(temperature=0.0)


def test_drafts_follow_the_latest_occurrence_of_the_longest_ngram():
    drafter = NgramDrafter([1, 2, 3, 4, 5, 9, 2, 3, 6, 7, 8, 1, 2], max_draft=3)
    # "1 2" occurred at the start (then 3 4 5); "2" alone is not a size drafted from.
    assert drafter.propose(10) == [3, 4, 5]
    drafter.add(3)  # "1 2 3" ends the history: the longer match wins over "2 3" (then 6)
    assert drafter.propose(10) == [4, 5, 9]
    drafter.add(6)  # "2 3 6" is new, "3 6" occurred once: 7 8 1
    assert drafter.propose(2) == [7, 8]
    drafter.add(0)  # nothing ends in 0
    assert drafter.propose(10) == []
    assert NgramDrafter([5, 6, 5, 6], max_draft=4).propose(0) == []


def test_drafts_shrink_after_wrong_guesses_and_grow_after_right_ones():
    drafter = NgramDrafter([*range(20), 0, 1], max_draft=8)
    assert drafter.propose(20) == list(range(2, 10))
    drafter.kept(0)
    assert drafter.propose(20) == [2]
    drafter.kept(1)
    assert drafter.propose(20) == [2, 3, 4]
    drafter.kept(3)
    assert drafter.propose(20) == list(range(2, 9))
    drafter.kept(7)
    assert drafter.propose(20) == list(range(2, 10))


def test_a_drafter_never_finds_its_own_end():
    drafter = NgramDrafter([1, 2, 3], max_draft=4)
    assert drafter.propose(4) == []
    drafter.add(1)
    drafter.add(2)  # "1 2" occurred before: the continuation runs up to the history's end
    assert drafter.propose(4) == [3, 1, 2]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir[0], device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def markov(tiny_model_dir):
    """The tiny model with its attention outputs zeroed: each logit depends on the last
    token alone, so a greedy reply that reaches a token seen before repeats what followed
    it then, and every draft of that is right."""
    loaded = load_model(tiny_model_dir[0], device="cpu", dtype="float32")
    with torch.no_grad():
        for layer in loaded.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    return loaded


def generate(engine, ids, max_tokens=40, sampling=GREEDY, **kwargs):
    return list(engine.generate(ids, max_tokens, sampling, **kwargs))[-1]


def chain(loaded, start: int, length: int) -> list[int]:
    """The Markov model's greedy chain after ``start``."""
    engine = Engine(loaded.model, loaded.tokenizer, max_seq_len=256)
    return generate(engine, [start], length).token_ids


@pytest.mark.parametrize(
    "model,dtype,quantize",
    [
        ("tiny_model_dir", "float32", "none"),
        ("tiny_model_dir", "bfloat16", "none"),
        ("tiny_model_dir", "float16", "none"),
        ("tiny_model_dir", "float32", "int8"),
        ("tiny_model_dir", "bfloat16", "int4"),
        ("moe_dir", "float32", "none"),
        ("moe_dir", "bfloat16", "int4"),
    ],
)
def test_a_pass_gives_each_row_the_logits_of_a_step_bit_for_bit(request, model, dtype, quantize):
    """The pending token and as many drafts as the engine carries, in one pass: each row's
    logits are those the same token gets in a decode step of its own, bit for bit (every
    product of the pass adds a row as a one-row product does), in every weight format,
    dense and mixture-of-experts."""
    path = request.getfixturevalue(model)[0]
    loaded = load_model(path, device="cpu", dtype=dtype, quantize=quantize)
    engine = Engine(loaded.model, loaded.tokenizer, 128, draft_max=16)
    assert engine.draft_max == loaded.model.step_order_rows() - 1 >= 2
    prompt = chat_prompts(loaded.tokenizer, 1)[0]
    tokens = [1000 + 37 * i for i in range(engine.draft_max + 1)]
    engine.prefill(prompt, lambda: False)
    steps = torch.cat([engine.decode_step(token) for token in tokens])
    engine.cache.trim(len(prompt))
    assert torch.equal(engine.decode_step(*tokens), steps)


def test_right_drafts_are_kept_and_the_reply_is_unchanged(markov):
    tokenizer = markov.tokenizer
    tokenizer_stops = tokenizer.stop_ids
    tokenizer.stop_ids = []
    try:
        c = chain(markov, 1000, 60)
        # The prompt holds the chain once, then its start again: the reply repeats it.
        ids = [1000, *c[:50], 77, 1000]
        plain = generate(Engine(markov.model, tokenizer, 256), ids)
        engine = Engine(markov.model, tokenizer, 256, draft_max=8)
        calls = []
        hook = engine.model.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[1]))
        drafted = generate(engine, ids)
    finally:
        tokenizer.stop_ids = tokenizer_stops
        hook.remove()
    assert plain.token_ids == c[:40]
    assert drafted.token_ids == plain.token_ids
    t = drafted.timings
    assert t.decode_tokens == 39 and t.accepted_tokens >= 30
    assert t.drafted_tokens - t.accepted_tokens <= 8
    # Passes of a pending token and up to 8 drafts, as many as keep a pass's rows exact
    # (6 with the kernels' float products), instead of one pass a token.
    assert engine.draft_max == min(8, markov.model.step_order_rows() - 1) >= 6
    assert max(calls[1:]) == engine.draft_max + 1 and len(calls) <= 1 + 39 - t.accepted_tokens
    # The cache holds the prompt and the reply but its last token, as without drafts.
    assert engine.cache.tokens == ids + drafted.token_ids[:-1]


def test_wrong_drafts_are_dropped(markov):
    c = chain(markov, 1000, 20)
    # After "1000 c0 c1" the prompt goes on with a continuation the model never chooses.
    ids = [1000, c[0], c[1], 5, 6, 7, 8, 9, 1000]
    plain = generate(Engine(markov.model, markov.tokenizer, 256), ids, 20)
    engine = Engine(markov.model, markov.tokenizer, 256, draft_max=8)
    drafted = generate(engine, ids, 20)
    assert drafted.token_ids == plain.token_ids
    assert drafted.timings.drafted_tokens > 0 and drafted.timings.accepted_tokens < 2 + 8
    assert engine.cache.tokens == ids + drafted.token_ids[:-1]


class OracleDrafter:
    """Drafts from the reply decoding without drafts gives (``expected``), the first
    ``right`` of each draft true and the rest wrong: the full model's attention over the
    cache is checked at every row (the Markov model's ignores it)."""

    right = 2

    def __init__(self, expected: list[int], max_draft: int):
        self.expected, self.max_draft, self.seen = expected, max_draft, 0

    def add(self, token: int) -> None:
        self.seen += 1

    def kept(self, count: int) -> None:
        pass

    def propose(self, limit: int) -> list[int]:
        truth = self.expected[self.seen : self.seen + min(limit, self.max_draft)]
        return truth[: self.right] + [t + 1 for t in truth[self.right :]]


@pytest.mark.parametrize("sampling", [GREEDY, SamplingSettings(temperature=1.0, seed=3)])
def test_drafting_leaves_replies_unchanged(loaded, sampling, monkeypatch):
    ids = loaded.tokenizer.encode_chat([{"role": "user", "content": "Hello there"}])
    plain = generate(Engine(loaded.model, loaded.tokenizer, 256), ids, 24, sampling)
    oracle = lambda ids, max_draft: OracleDrafter(plain.token_ids, max_draft)  # noqa: E731
    monkeypatch.setattr("qwen3chat.engine.NgramDrafter", oracle)
    engine = Engine(loaded.model, loaded.tokenizer, 256, draft_max=5)
    drafted = generate(engine, ids, 24, sampling)
    assert drafted.token_ids == plain.token_ids
    t = drafted.timings
    assert t.drafted_tokens > 20 and 0 < t.accepted_tokens < t.drafted_tokens
    # The next turn reuses the cache as without drafts, and answers the same.
    follow = ids + drafted.token_ids + loaded.tokenizer.encode("<|im_end|>\nmore")
    again = generate(engine, follow, 8, sampling)
    fresh = generate(Engine(loaded.model, loaded.tokenizer, 256), follow, 8, sampling)
    assert again.cached_tokens == len(ids) + len(drafted.token_ids) - 1
    assert again.token_ids == fresh.token_ids


def test_stopping_inside_a_drafted_step_trims_the_cache(markov):
    c = chain(markov, 1000, 30)
    ids = [1000, *c[:25], 77, 1000]
    engine = Engine(markov.model, markov.tokenizer, 256, draft_max=8)
    polls = iter(range(100))
    stopped = generate(engine, ids, 30, should_stop=lambda: next(polls) >= 6)
    assert stopped.reason == "cancelled" and 1 < len(stopped.token_ids) < 9
    assert stopped.token_ids == c[: len(stopped.token_ids)]
    assert stopped.timings.accepted_tokens > 0  # stopped inside a drafted step
    assert engine.cache.tokens == ids + stopped.token_ids[:-1]
    again = generate(engine, ids, 12)
    assert again.token_ids == c[:12]


def test_drafts_stop_at_the_token_and_context_limits(markov):
    c = chain(markov, 1000, 30)
    ids = [1000, *c[:25], 77, 1000]
    engine = Engine(markov.model, markov.tokenizer, 256, draft_max=8)
    assert generate(engine, ids, 5).token_ids == c[:5]
    short = Engine(markov.model, markov.tokenizer, len(ids) + 7, draft_max=8)
    end = generate(short, ids, 30)
    assert end.reason == "length" and end.token_ids == c[:7]


def test_chat_drafts_with_the_flag_s_size_and_answers_as_without(tiny_model_dir, monkeypatch):
    from qwen3chat import engine as engine_module

    made = []

    def recording(ids, max_draft):
        made.append(max_draft)
        return NgramDrafter(ids, max_draft)

    monkeypatch.setattr(engine_module, "NgramDrafter", recording)
    args = ["chat", "-m", str(tiny_model_dir[0]), "-p", "one two one two one", "-n", "12"]
    args += ["--json", "--temperature", "0", "--dtype", "float32"]
    plain = CliRunner().invoke(app, args)
    assert plain.exit_code == 0, plain.output
    assert made == []
    drafted = CliRunner().invoke(app, [*args, "--draft", "ngram", "--draft-max", "3"])
    assert drafted.exit_code == 0, drafted.output
    assert made == [3]
    assert json.loads(drafted.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]


def test_a_recurrent_model_decodes_without_drafts_and_says_so():
    args = ["chat", "--preset", "tiny-hybrid", "-p", "hi", "-n", "4", "--json", "--draft", "ngram"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "decoding without drafts" in result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == 4


def test_bench_reports_the_share_of_drafts_kept():
    # float32: bf16 products of 4+ rows are oneDNN's where AVX512-BF16 runs, which keep
    # a pass of only 3 rows a step's bits.
    quick = ["bench", "--preset", "tiny", "-p", "8", "-n", "6", "-r", "2", "--json"]
    quick += ["--dtype", "float32"]
    plain = json.loads(CliRunner().invoke(app, quick).stdout)
    assert plain["draft"] == "none" and "draft_accepted" not in plain
    result = CliRunner().invoke(app, [*quick, "--draft", "ngram", "--draft-max", "4"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["draft"] == "ngram" and out["draft_max"] == 4
    kept = [run["draft_accepted"] for run in out["results"][0]["runs"]]
    assert len(kept) == 2 and all(0.0 <= k <= 1.0 for k in kept)
    # More than keep a pass's rows exact (float products: 7 rows): the report says how
    # many ran.
    drafts = ["--draft", "ngram", "--draft-max", "30"]
    result = CliRunner().invoke(app, [*quick, *drafts])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["draft_max"] == 6


def test_where_the_kernels_do_not_run_the_model_it_decodes_without_drafts(
    tiny_model_dir, torch_matmuls
):
    args = ["chat", "-m", str(tiny_model_dir[0]), "-p", "hi", "-n", "4", "--json"]
    result = CliRunner().invoke(app, [*args, "--draft", "ngram"])
    assert result.exit_code == 0, result.output
    assert "products do not give a pass's rows the results of single steps" in result.stderr
    assert "decoding without drafts" in result.stderr
    plain = CliRunner().invoke(app, args)
    assert json.loads(result.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]


def batched(engine: BatchEngine, requests, sampling=GREEDY, join_every: int = 0):
    """Each request's finish event, adding one request every ``join_every`` steps (all at
    once with 0), and the number of steps taken."""
    pending, finishes, seqs, steps = list(requests), {}, [], 0
    while pending or engine.has_work:
        if pending and (join_every == 0 or steps % join_every == 0):
            joining = pending if join_every == 0 else pending[:1]
            seqs += [engine.add(ids, max_tokens, sampling) for ids, max_tokens in joining]
            pending = pending[len(joining) :]
        for seq, event in engine.step():
            if isinstance(event, FinishEvent):
                finishes[seq] = event
        steps += 1
        assert steps < 10_000
    assert engine.blocks.in_use == 0
    return [finishes[seq] for seq in seqs], steps


@pytest.mark.parametrize("sampling", [GREEDY, SamplingSettings(temperature=1.0, seed=3)])
def test_batched_drafts_leave_every_reply_unchanged(loaded, sampling, monkeypatch):
    """Sequences joining at different steps, a step's budget too small for every draft
    (some are dropped), each drafting from its own expected reply: each gets the reply the
    single-sequence engine gives it alone without drafts."""
    prompts = chat_prompts(loaded.tokenizer, 5)
    requests = [(ids, 10 + 3 * i) for i, ids in enumerate(prompts)]
    expected = {
        tuple(ids): generate(Engine(loaded.model, loaded.tokenizer, 256), ids, n, sampling)
        for ids, n in requests
    }
    oracle = lambda ids, max_draft: OracleDrafter(expected[tuple(ids)].token_ids, max_draft)  # noqa: E731
    monkeypatch.setattr("qwen3chat.batch.engine.NgramDrafter", oracle)
    engine = BatchEngine(loaded.model, loaded.tokenizer, 256, token_budget=24, draft_max=5)
    finishes, _ = batched(engine, requests, sampling, join_every=2)
    for (ids, _), finish in zip(requests, finishes, strict=True):
        assert finish.token_ids == expected[tuple(ids)].token_ids
        assert 0 < finish.timings.accepted_tokens < finish.timings.drafted_tokens


def test_preempted_drafting_sequences_get_their_replies(loaded, monkeypatch):
    requests = [(ids, 40) for ids in chat_prompts(loaded.tokenizer, 4)]
    expected = {
        tuple(ids): generate(Engine(loaded.model, loaded.tokenizer, 256), ids, n).token_ids
        for ids, n in requests
    }
    oracle = lambda ids, max_draft: OracleDrafter(expected[tuple(ids)], max_draft)  # noqa: E731
    monkeypatch.setattr("qwen3chat.batch.engine.NgramDrafter", oracle)
    longest = max(len(ids) for ids, _ in requests) + 40
    blocks = 2 * -(-longest // BLOCK_SIZE) + 1  # room for about two at their full length
    engine = BatchEngine(loaded.model, loaded.tokenizer, 256, num_blocks=blocks, draft_max=5)
    preempted = []
    original = engine.scheduler._preempt
    engine.scheduler._preempt = lambda seq: (preempted.append(seq), original(seq))
    finishes, _ = batched(engine, requests)
    assert preempted
    assert [f.token_ids for f in finishes] == [expected[tuple(ids)] for ids, _ in requests]


def test_batched_right_drafts_take_fewer_steps(markov):
    tokenizer = markov.tokenizer
    chains = {start: chain(markov, start, 40) for start in (1000, 2000, 3000)}
    requests = [([s, *c[:36], 77, s], 32) for s, c in chains.items()]
    plain, plain_steps = batched(BatchEngine(markov.model, tokenizer, 256), requests)
    engine = BatchEngine(markov.model, tokenizer, 256, draft_max=7)
    drafted, steps = batched(engine, requests)
    assert [f.token_ids for f in drafted] == [f.token_ids for f in plain]
    assert [f.token_ids for f in plain] == [c[:32] for c in chains.values()]
    # 7 tokens a step where every guess is right (6 drafts: what keeps the rows exact)
    assert engine.draft_max == min(7, markov.model.step_order_rows() - 1) == 6
    assert steps <= plain_steps // 3
    assert all(f.timings.accepted_tokens >= 20 for f in drafted)


def test_a_hybrid_server_engine_does_not_draft():
    from qwen3chat.loading import load_preset

    hybrid = load_preset("tiny-hybrid", "cpu", "float32")
    assert BatchEngine(hybrid.model, hybrid.tokenizer, 64, draft_max=7).draft_max == 0
