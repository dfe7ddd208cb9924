"""The pipeline split: each process runs a range of the layers, one after another."""

from __future__ import annotations

import torch

from .split import Part
from .world import World


class Stage:
    """Layers ``first..end-1`` of a model of ``num_layers``, this process's range. Hidden
    states come in from the stage before and go on to the next; the last stage hands the
    final ones back to process 0 (the first stage), which takes the logits. Nothing is
    summed: every value is the one process's."""

    def __init__(self, world: World, num_layers: int):
        self.world = world
        self.first, self.end = Part(0, world.rank, world.size).bounds(num_layers)

    def receive(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden states this stage starts from: the previous stage's (``x``, the
        embedded ids, for the first)."""
        if self.world.rank > 0:
            self.world.receive(x, self.world.rank - 1)
        return x

    def pass_on(self, x: torch.Tensor) -> torch.Tensor | None:
        """Send this stage's output on; for process 0, the last stage's output (None for
        the others, who take no logits)."""
        rank, size = self.world.rank, self.world.size
        self.world.send(x.contiguous(), (rank + 1) % size)
        if rank > 0:
            return None
        return self.world.receive(torch.empty_like(x), size - 1)
