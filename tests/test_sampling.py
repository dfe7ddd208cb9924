"""Sampling filters and penalties on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from qwen3chat import kernels, sampling
from qwen3chat.errors import QwenChatError
from qwen3chat.sampling import Sampler, SamplingSettings, top_k, top_k_rows

LOGITS = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])


def draws(settings, logits=LOGITS, n=400, prompt=(), observed=()):
    sampler = Sampler(settings, logits.numel(), list(prompt), "cpu")
    for t in observed:
        sampler.observe(t)
    return {sampler(logits.clone()) for _ in range(n)}


def test_greedy_is_argmax():
    """Temperature 0 picks the largest logit, the first of equal ones (as torch.argmax),
    over a whole vocabulary (the native sweep where it runs)."""
    assert draws(SamplingSettings(temperature=0.0), n=5) == {0}
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        logits = (torch.randn(151_936, generator=generator) * 4).round()  # many equal maxima
        assert draws(SamplingSettings(temperature=0.0), logits, n=1) == {int(logits.argmax())}


def test_unfiltered_sampling_reaches_the_tail():
    assert len(draws(SamplingSettings(temperature=1.0, top_p=1.0), n=2000)) >= 5


def test_top_k():
    assert draws(SamplingSettings(temperature=5.0, top_p=1.0, top_k=2)) == {0, 1}


def test_top_p_keeps_smallest_prefix_reaching_mass():
    probs = torch.softmax(LOGITS, 0)  # 0.64, 0.23, 0.09, ...
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert draws(SamplingSettings(temperature=1.0, top_p=0.8)) == {0, 1}
    assert draws(SamplingSettings(temperature=1.0, top_p=0.5)) == {0}


def test_top_p_over_a_large_vocabulary_draws_from_the_nucleus():
    """Top-p without top-k over more ids than NUCLEUS_CANDIDATES: where the largest of
    them hold top_p of the mass, the draws follow the nucleus renormalized; where they do
    not (a flat distribution), ids ranked past them are drawn as the full ranking keeps."""
    generator = torch.Generator().manual_seed(11)
    order = torch.randperm(4096, generator=generator)
    peaked = torch.full((4096,), -30.0)
    peaked[order[:3]] = torch.tensor([3.0, 2.0, 1.0])  # 0.67, 0.24, 0.09 of the mass
    sampler = Sampler(SamplingSettings(temperature=1.0, top_p=0.85), 4096, [], "cpu")
    counts = torch.bincount(
        torch.tensor([sampler(peaked.clone()) for _ in range(6000)]), minlength=4096
    )
    kept = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    torch.testing.assert_close(counts[order[:2]] / 6000, kept, atol=0.02, rtol=0)
    assert counts.sum() == counts[order[:2]].sum()  # the third (0.91 with it) is dropped

    flat = torch.linspace(1.0, 0.0, 4096)[torch.argsort(order)]  # rank r at id order[r]
    rank = torch.empty(4096, dtype=torch.long)
    rank[order] = torch.arange(4096)
    probs = torch.softmax(flat, 0)[order]
    last = int((probs.cumsum(0) - probs < 0.5).sum())  # ranks the full ranking keeps
    assert last > 2 * sampling.NUCLEUS_CANDIDATES
    sampler = Sampler(SamplingSettings(temperature=1.0, top_p=0.5), 4096, [], "cpu")
    ranks = rank[torch.tensor([sampler(flat.clone()) for _ in range(3000)])]
    assert ranks.max() < last
    assert (ranks >= sampling.NUCLEUS_CANDIDATES).float().mean() > 0.4


def test_min_p():
    # p(i)/p(0) = e^-i: min_p 0.3 keeps ids 0 and 1 (e^-1 = 0.37), drops e^-2 = 0.14.
    assert draws(SamplingSettings(temperature=1.0, top_p=1.0, min_p=0.3)) == {0, 1}


def test_repetition_penalty_covers_prompt():
    s = SamplingSettings(temperature=0.0, repetition_penalty=10.0)
    assert draws(s, n=1, prompt=[0]) == {1}
    # A negative logit is pushed further down, not up.
    neg = torch.tensor([-1.0, -1.5])
    assert draws(s, logits=neg, n=1, prompt=[0]) == {1}


def test_presence_and_frequency_penalties_count_generated_tokens():
    presence = SamplingSettings(temperature=0.0, presence_penalty=1.5)
    assert draws(presence, n=1, observed=[0]) == {1}
    assert draws(presence, n=1, prompt=[0]) == {0}  # the prompt does not count
    frequency = SamplingSettings(temperature=0.0, frequency_penalty=0.6)
    assert draws(frequency, n=1, observed=[0]) == {0}  # 4 - 0.6 > 3
    assert draws(frequency, n=1, observed=[0, 0]) == {1}  # 4 - 1.2 < 3


def test_seed_reproducible():
    s = SamplingSettings(temperature=1.0, top_p=1.0, seed=3)
    a = Sampler(s, 6, [], "cpu")
    b = Sampler(s, 6, [], "cpu")
    assert [a(LOGITS) for _ in range(30)] == [b(LOGITS) for _ in range(30)]


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", 2.0)],
)
def test_out_of_range_values_are_rejected(field, value):
    with pytest.raises(QwenChatError, match=f"--{field.replace('_', '-')}"):
        SamplingSettings(**{field: value}).validate()


@pytest.mark.parametrize(
    "settings, expected",
    [
        (SamplingSettings(temperature=1.0, top_p=1.0), torch.softmax(LOGITS, 0)),
        # top_k 3 then top_p 0.9: the third (cumulative 0.91 before it) is dropped.
        (
            SamplingSettings(temperature=1.0, top_p=0.9, top_k=3),
            torch.tensor([1.0, torch.e**-1, 0, 0, 0, 0]) / (1 + torch.e**-1),
        ),
    ],
)
def test_draws_follow_the_distribution(settings, expected):
    sampler = Sampler(settings, LOGITS.numel(), [], "cpu")
    counts = torch.bincount(
        torch.tensor([sampler(LOGITS.clone()) for _ in range(20_000)]), minlength=LOGITS.numel()
    )
    torch.testing.assert_close(counts / counts.sum(), expected, atol=0.015, rtol=0)


def test_top_k_taken_for_all_rows_at_once_draws_what_each_row_draws_alone():
    """The batched engine takes every row's top k in one call (top_k_rows); each seeded
    sampler then draws the ids it draws from its own row. bfloat16 logits tie often, so
    the k kept must be the same ones too, in the same order. Rows with a penalty or at
    temperature 0 are left to their samplers."""
    vocab, rows = 5000, 6
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(4)).bfloat16()
    settings = [SamplingSettings(temperature=1.0, top_k=40, top_p=1.0, seed=i) for i in range(rows)]
    settings[2] = SamplingSettings(temperature=0.7, top_k=7, top_p=0.8, seed=2)
    settings[4] = SamplingSettings(temperature=1.0, top_k=40, presence_penalty=0.5, seed=4)
    settings[5] = SamplingSettings(temperature=0.0, top_k=40)

    def samplers():
        return [Sampler(s, vocab, [1, 2, 3], "cpu") for s in settings]

    batched, alone = samplers(), samplers()
    for step in range(20):
        tops = top_k_rows(batched, logits)
        assert [top is None for top in tops] == [False, False, False, False, True, True]
        for i in range(rows):
            if tops[i] is not None:
                values, ids = tops[i]
                assert torch.equal(values, torch.topk(logits[i].float(), settings[i].top_k).values)
                assert torch.equal(ids, top_k(logits[i], settings[i].top_k)[1])
            got, want = batched[i](logits[i], tops[i]), alone[i](logits[i])
            assert got == want, (step, i)
            batched[i].observe(got)
            alone[i].observe(want)


def test_whole_vocabulary_rows_at_once_draw_what_each_row_draws_alone():
    """Rows drawing from the whole vocabulary get their distributions in one softmax and
    one cumulative sum for all of them (prepare_rows): each seeded sampler then draws, seed
    for seed, the ids it draws from its own row alone. Rows with a top-k, top-p, min-p or
    penalty, or at temperature 0, get a top k or nothing."""
    vocab, rows = 151936, 7
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(6)).bfloat16()
    temperatures = [1.0, 0.6, 1.3, 0.7, 2.0]
    settings = [
        SamplingSettings(temperature=t, top_p=1.0, seed=i) for i, t in enumerate(temperatures)
    ]
    settings += [
        SamplingSettings(temperature=1.0, top_p=0.9, seed=5),
        SamplingSettings(temperature=1.0, top_p=1.0, min_p=0.1, seed=6),
    ]
    settings[3].top_k = vocab  # a top k of the whole vocabulary keeps it all

    def samplers():
        return [Sampler(s, vocab, [1, 2, 3], "cpu") for s in settings]

    batched, alone = samplers(), samplers()
    for step in range(12):
        prepared = sampling.prepare_rows(batched, logits)
        kinds = [type(p).__name__ for p in prepared]
        assert kinds == ["Cdf"] * 5 + ["NoneType"] * 2, kinds
        for i in range(rows):
            got, want = batched[i](logits[i], prepared[i]), alone[i](logits[i])
            assert got == want, (step, i)
            batched[i].observe(got)
            alone[i].observe(want)
    # The draws are spread as the softmax is (not one id over and over).
    assert len({alone[0](logits[0]) for _ in range(20)}) > 10


def test_top_k_of_all_rows_alike_is_each_row_s():
    logits = torch.randn(5, 3000, generator=torch.Generator().manual_seed(5)).bfloat16().float()
    samplers = [
        Sampler(SamplingSettings(temperature=1.0, top_k=20, seed=i), 3000, [], "cpu")
        for i in range(5)
    ]
    for i, (values, ids) in enumerate(top_k_rows(samplers, logits)):
        expected = top_k(logits[i], 20)
        assert torch.equal(ids, expected[1]) and torch.equal(values, expected[0])
        assert torch.equal(values, torch.topk(logits[i], 20).values)


@pytest.mark.skipif(kernels.native(torch.zeros(1)) is None, reason="no native kernels here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,k", [(5003, 40), (5003, 1), (37, 37), (16, 3)])
def test_native_top_k_keeps_the_largest_in_order(dtype, vocab, k):
    """The kernel's top k of each row: the k largest values, largest first, equal values
    in id order (a sort by value, then id), with ties that straddle the k-th place, a row
    of -inf and a row with NaNs in the batch (never kept: a row with fewer than k other
    values is padded with -inf at id 0); also as one row alone."""
    generator = torch.Generator().manual_seed(7)
    logits = (torch.randn(5, vocab, generator=generator) * 2).round() / 2  # many ties
    logits[1] = float("-inf")
    logits[2, ::3] = float("nan")
    logits = logits.to(dtype)
    values, ids = top_k(logits, k)
    assert values.dtype == torch.float32 and ids.dtype == torch.int64
    for row in range(5):
        wide = logits[row].float()
        keys = sorted(
            (-v, i) for i, v in enumerate(wide.tolist()) if v == v
        )  # value descending, then id; NaN left out
        want = keys[:k] + [(float("inf"), 0)] * (k - len(keys))  # padded: -inf at id 0
        assert values[row].tolist() == [-v for v, _ in want]
        assert ids[row].tolist() == [i for _, i in want]
    alone = top_k(logits[3], k)
    assert torch.equal(alone[0], values[3]) and torch.equal(alone[1], ids[3])
