"""A step's rows through the model: the scheduled positions of every sequence as one
PagedBatch, one forward, the logits of the sequences whose last position ran.

What a sequence's prompt layout adds to ids (Qwen3-VL's M-RoPE positions and pictures'
tokens, model/qwen3_vl.py) is joined over the batch's rows."""

from __future__ import annotations

import torch

from ..kv_cache import PagedBatch, PagedKVCache
from ..model.qwen3 import VisualTokens
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache):
        self.model = model
        self.cache = cache

    @torch.inference_mode()
    def run(self, chosen: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Run ``count`` positions of each ``(sequence, count)`` from its first uncomputed
        one; the sequences to sample and their logits ``[rows, vocab]``, in order: one
        row each, or with drafts one more for each draft."""
        tokens: list[int] = []
        positions: list[int] = []
        row_seq: list[int] = []
        logit_rows: list[int] = []
        sampled: list[Sequence] = []
        extras: list[dict] = []
        width = max(len(seq.blocks) for seq, _ in chosen)
        tables = [seq.blocks + [0] * (width - len(seq.blocks)) for seq, _ in chosen]
        for index, (seq, count) in enumerate(chosen):
            first = seq.computed
            tokens += seq.ids[first : first + count]
            positions += range(first, first + count)
            row_seq += [index] * count
            extras.append(seq.layout.rows(first, first + count, self.cache.k.device))
            if first + count == len(seq.ids):
                # The last position's, or the pending token's and each draft's (a step runs
                # them together: Sequence.runnable).
                logit_rows += range(len(tokens) - 1 - len(seq.drafts), len(tokens))
                sampled.append(seq)
        device = self.cache.k.device

        def tensor(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=device)

        batch = PagedBatch(
            self.cache,
            tensor(positions),
            tensor(row_seq),
            tensor(tables, torch.int32),
            tensor(logit_rows),
            counts=[count for _, count in chosen],
            states=[seq.state for seq, _ in chosen],
        )
        kwargs = _joined(list(zip(extras, [count for _, count in chosen], strict=True)), batch)
        return sampled, self.model.forward_batch(tensor(tokens), batch, **kwargs)


def _joined(extras: list[tuple[dict, int]], batch: PagedBatch) -> dict:
    """The sequences' forward arguments ``(arguments, rows)``, each for its own rows in
    order, as the whole batch's."""
    kwargs = {}
    if any("positions" in e for e, _ in extras):
        parts, first = [], 0
        for e, count in extras:  # a text sequence's rows: every axis is the position
            parts.append(e.get("positions", batch.positions[first : first + count].expand(3, -1)))
            first += count
        kwargs["positions"] = torch.cat(parts, dim=1)
    if any("visual" in e for e, _ in extras):
        masks, embeds, deepstack = [], [], []
        for e, count in extras:
            visual = e.get("visual")
            if visual is None:
                masks.append(torch.zeros(count, dtype=torch.bool, device=batch.positions.device))
            else:
                masks.append(visual.mask)
                embeds.append(visual.embeds)
                deepstack.append(visual.deepstack)
        layers = [torch.cat(parts) for parts in zip(*deepstack, strict=True)]
        kwargs["visual"] = VisualTokens(torch.cat(masks), torch.cat(embeds), layers)
    return kwargs
