"""Choosing the next token: penalties, temperature, top-k/top-p/min-p, seeded sampling."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from . import kernels

# A row's top-k logits and their ids, most likely first.
TopK = tuple[torch.Tensor, torch.Tensor]


class Cdf(NamedTuple):
    """A row's cumulative distribution over the whole vocabulary (whole_vocabulary_rows)."""

    values: torch.Tensor


# What a batched step works out for a row before its sampler draws (prepare_rows).
Prepared = TopK | Cdf | None


@dataclass
class SamplingSettings:
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 42

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def distribution_names(cls) -> list[str]:
        """The settings that shape the distribution, all but the seed: the sampling flags,
        and the generation_config.json keys that replace our defaults."""
        return [name for name in cls.names() if name != "seed"]

    def validate(self) -> None:
        from .errors import QwenChatError

        checks = {
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "min_p": 0 <= self.min_p <= 1,
            "repetition_penalty": self.repetition_penalty > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise QwenChatError(
                    f"--{name.replace('_', '-')}: {getattr(self, name)} is out of range"
                )


class Sampler:
    """Per-reply state: which ids the penalties look at, and the seeded generator."""

    def __init__(
        self,
        settings: SamplingSettings,
        vocab_size: int,
        prompt_ids: list[int],
        device,
        constraint=None,
    ):
        """``constraint`` (a grammar.GrammarConstraint) masks what it does not allow."""
        self.settings = settings
        self.constraint = constraint
        self.generator = torch.Generator(device=device).manual_seed(settings.seed)
        # repetition_penalty (transformers/CTRL style) covers prompt and reply; presence and
        # frequency penalties (OpenAI style) count only generated tokens.
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if prompt_ids:
            self.seen[torch.tensor(prompt_ids, device=device).clamp_(max=vocab_size - 1)] = True
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def observe(self, token_id: int) -> None:
        self.seen[token_id] = True
        self.counts[token_id] += 1
        if self.constraint is not None:
            self.constraint.advance(token_id)

    def _raw(self) -> bool:
        """Whether the next id is drawn from the raw logits: no penalty or grammar changes
        them first, and the temperature is above 0."""
        s = self.settings
        plain = self.constraint is None and s.repetition_penalty == 1.0
        return plain and not (s.presence_penalty or s.frequency_penalty) and s.temperature > 0

    def raw_top_k(self) -> int:
        """k where the next id is drawn from the raw logits' top k, else 0."""
        k = self.settings.top_k
        return k if self._raw() and 0 < k < self.seen.numel() else 0

    def whole_vocabulary(self) -> bool:
        """Whether the next id is drawn from the softmax of all the raw logits (no top-k,
        top-p or min-p either)."""
        s = self.settings
        whole = s.top_k == 0 or s.top_k >= self.seen.numel()
        return self._raw() and whole and s.top_p >= 1.0 and s.min_p == 0.0

    def __call__(self, logits: torch.Tensor, prepared: Prepared = None) -> int:
        """The next id; ``prepared``: the logits' top ``raw_top_k()`` or, where the whole
        vocabulary is drawn from, their cumulative distribution, if already worked out."""
        if isinstance(prepared, Cdf):
            return int(draw(prepared.values, None, self.generator))
        if prepared is not None:
            return int(sample(logits, self.settings, self.generator, prepared))
        logits = self.penalize(logits.view(-1).float())
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        return int(sample(logits, self.settings, self.generator))

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if s.repetition_penalty != 1.0:
            scored = torch.where(
                logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty
            )
            logits = torch.where(self.seen, scored, logits)
        if s.presence_penalty or s.frequency_penalty:
            logits = (
                logits - s.presence_penalty * (self.counts > 0) - s.frequency_penalty * self.counts
            )
        return logits


def top_k(logits: torch.Tensor, k: int) -> TopK:
    """The k largest of ``logits`` ([rows, vocab] or [vocab]) as float32, and their ids,
    largest first: the native kernel where it runs (equal values in id order), else
    torch.topk (k = 40 of 16 rows of a 151k vocabulary on an Intel Xeon, 2 threads: the
    kernel 0.45 ms, torch.topk 3.4, 5% of an int4 decode step of 16 sequences)."""
    native = kernels.native(logits)
    if native is None:
        return torch.topk(logits.float(), k, dim=-1)
    values, ids = native.top_k(logits.reshape(-1, logits.shape[-1]), k)
    return values.view(*logits.shape[:-1], k), ids.view(*logits.shape[:-1], k)


def top_k_rows(samplers: list[Sampler], logits: torch.Tensor) -> list[TopK | None]:
    """Each row's top-k logits where its sampler draws from the raw logits' top k (else
    None), one top_k for all rows of a k: row by row, torch.topk over a 151k vocabulary
    took 6 ms of a 16-sequence int4 step of 70, all rows at once 2.3."""
    tops: list[TopK | None] = [None] * len(samplers)
    rows = defaultdict(list)
    for i, sampler in enumerate(samplers):
        if k := sampler.raw_top_k():
            rows[k].append(i)
    for k, members in rows.items():
        # All rows alike (the usual case): no copy of the [rows, vocab] logits.
        chosen = logits if len(members) == len(samplers) else logits[members]
        values, ids = top_k(chosen, k)
        for j, i in enumerate(members):
            tops[i] = (values[j], ids[j])
    return tops


def whole_vocabulary_rows(samplers: list[Sampler], logits: torch.Tensor) -> list[Cdf | None]:
    """Each row's cumulative distribution where its sampler draws from the whole
    vocabulary (Sampler.whole_vocabulary: an OpenAI request's defaults on a model without
    sampling defaults, for one), all such rows at once, else None: the same sums as
    sample()'s. Row by row, widening, scaling, softmax and cumulative sums of a 151k
    vocabulary took ~0.3 ms a row, 4.5 ms of a 16-sequence Q4_0 step of 50 (Intel Xeon, 2
    threads)."""
    cdfs: list[Cdf | None] = [None] * len(samplers)
    members = [i for i, sampler in enumerate(samplers) if sampler.whole_vocabulary()]
    if not members:
        return cdfs
    chosen = logits if len(members) == len(samplers) else logits[members]
    temperatures = [samplers[i].settings.temperature for i in members]
    scale = torch.tensor(temperatures, dtype=torch.float32, device=logits.device)[:, None]
    sums = torch.softmax(chosen.float() / scale, dim=-1).cumsum(-1)
    for j, i in enumerate(members):
        cdfs[i] = Cdf(sums[j])
    return cdfs


def prepare_rows(samplers: list[Sampler], logits: torch.Tensor) -> list[Prepared]:
    """What a batched step works out for all its rows at once before each sampler draws:
    top-k logits (top_k_rows) or whole-vocabulary distributions (whole_vocabulary_rows)."""
    tops = top_k_rows(samplers, logits)
    cdfs = whole_vocabulary_rows(samplers, logits)
    return [top if top is not None else cdf for top, cdf in zip(tops, cdfs, strict=True)]


# Top-p without top-k first looks for the nucleus among this many of the largest
# probabilities: where they hold top_p of the mass (a trained model's next-token
# distribution nearly always) only they are ranked, else the whole vocabulary is. Sorting
# a 151k vocabulary took 11 ms a token (Intel Xeon, 2 threads; `chat`'s defaults, top_p
# 0.9 and no top_k, on a GGUF file with no generation_config.json: decode 39 tok/s
# against 60); the native top-k of 256 takes ~0.2 ms.
NUCLEUS_CANDIDATES = 256


def sample(
    logits: torch.Tensor,
    s: SamplingSettings,
    generator: torch.Generator,
    top: TopK | None = None,
) -> torch.Tensor:
    """One id from 1-D float logits; temperature 0 is argmax. ``top``: their top
    ``s.top_k`` values and ids, where the caller took them already."""
    if s.temperature == 0:
        # The native sweep where it runs (the first of equal values, as argmax): torch's
        # argmax took 0.2 ms of 151,936 float32 logits, 1.5-2% of a decode step (Zen 3).
        return top_k(logits, 1)[1][0]
    ids = None  # with top_k: the ids of the k logits kept, most likely first
    if top is None and 0 < s.top_k < logits.numel():
        top = top_k(logits, s.top_k)
    if top is not None:
        # The rest of the vocabulary has no mass left: work on the k values alone.
        logits, ids = top
    logits = logits / s.temperature
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        if ids is None and probs.numel() > NUCLEUS_CANDIDATES:
            # The same cumulative sums as the full ranking's first entries: where they
            # reach top_p there, every id ranked after them is dropped either way.
            values, candidates = top_k(probs, NUCLEUS_CANDIDATES)
            if values.cumsum(0)[-1] >= s.top_p:
                probs, ids = values, candidates
        ranked, order = (probs, None) if ids is not None else probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        kept = ranked.masked_fill(ranked.cumsum(0) - ranked >= s.top_p, 0.0)
        probs = kept if order is None else probs.scatter(0, order, kept)
    if s.min_p > 0.0:
        probs = probs.masked_fill(probs < s.min_p * probs.max(), 0.0)
    # Inverse CDF with one uniform draw: the first id whose cumulative mass exceeds it (a
    # zero-probability id never does). torch.multinomial draws an exponential for every
    # id of the vocabulary, 2.7 ms a token at 151k ids on this class of CPU, where this
    # takes ~0.1 ms: with 16 sequences a step, a quarter of the step.
    return draw(probs.cumsum(0), ids, generator)


def draw(cdf: torch.Tensor, ids: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """The first id whose cumulative mass ``cdf`` exceeds one uniform draw (of ``ids``,
    where given)."""
    u = torch.rand((), generator=generator, device=cdf.device) * cdf[-1]
    choice = torch.searchsorted(cdf, u[None], right=True)[0].clamp_(max=cdf.numel() - 1)
    return choice if ids is None else ids[choice]
