"""The LM head across processes: each process holds its share of the vocabulary's rows and
computes their logits; process 0, which samples, gathers them. The head is the largest
single matrix a token reads (Qwen3-235B-A22B's: 0.62 B weights), so held whole it would
cost every process the whole read each token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import QuantizedWeight
from .split import Part
from .world import World


class VocabSplit:
    """This process's rows of a head of ``vocab`` rows; ``gather`` puts the logits together."""

    def __init__(self, world: World, vocab: int):
        self.world = world
        self.vocab = vocab
        self.part = Part(-2, world.rank, world.size)
        self.start, self.end = self.part.bounds(vocab)
        self.widths = [Part(-2, r, world.size).size(vocab) for r in range(world.size)]

    def rows(self, head):
        """This share's rows of a whole head (a tied embedding table, held whole for the
        lookup): a view of the float weights; a quantized one's codes viewed too (copied
        where they are held interleaved, quant.py's QuantizedWeight)."""
        if isinstance(head, torch.Tensor):
            return head[self.start : self.end]
        share = head.matrix(slice(self.start, self.end))
        return QuantizedWeight(share, head.dtype, head.codes.device)

    def gather(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Every process's ``logits [..., share]`` side by side on process 0 (exactly the
        whole head's: each row is its own product); None on the others. Shares of
        uneven width are padded to the widest for the collective."""
        widest = max(self.widths)
        padded = F.pad(logits, (0, widest - logits.shape[-1])).contiguous()
        pieces = self.world.gather(padded)
        if pieces is None:
            return None
        return torch.cat([p[..., :w] for p, w in zip(pieces, self.widths, strict=True)], dim=-1)
