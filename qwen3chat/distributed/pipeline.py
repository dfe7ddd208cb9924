"""The pipeline split: each process runs a range of the layers, one after another."""

from __future__ import annotations

import torch

from .split import Part
from .world import World

PIECES_PER_STAGE = 4
MIN_ROWS = 16


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

    def prompt(self, x: torch.Tensor, run) -> torch.Tensor | None:
        """A prompt's hidden states ``x [1, T, hidden]`` (the embedded ids; a buffer on a
        later stage) through this stage a piece of its tokens at a time, each piece sent
        on once done, so that while a stage runs a piece the stage before runs the next
        (one after another, a stage would idle while the others work): ``run(piece, first,
        end)`` runs this stage's layers on tokens first..end-1. Process 0 gets the last
        stage's output (the others None)."""
        rank, size = self.world.rank, self.world.size
        sends, outputs = [], []
        for first, end in pieces(x.shape[1], size):
            piece = x[:, first:end].contiguous()
            if rank > 0:
                self.world.receive(piece, rank - 1)
            outputs.append(run(piece, first, end).contiguous())  # kept until sent
            sends.append(self.world.sending(outputs[-1], (rank + 1) % size))
        last = None
        if rank == 0:
            received = [self.world.receive(torch.empty_like(out), size - 1) for out in outputs]
            last = torch.cat(received, dim=1)
        self.world.wait(sends)
        return last

    def pass_on(self, x: torch.Tensor) -> torch.Tensor | None:
        """Send this stage's output on; for process 0, the last stage's output (None for
        the others, who take no logits)."""
        rank, size = self.world.rank, self.world.size
        self.world.send(x.contiguous(), (rank + 1) % size)
        if rank > 0:
            return None
        return self.world.receive(torch.empty_like(x), size - 1)


def pieces(tokens: int, stages: int) -> list[tuple[int, int]]:
    """A prompt's pieces through the pipeline: about PIECES_PER_STAGE a stage (the more,
    the less the stages wait for each other at its start and end), of at least MIN_ROWS
    tokens (fewer rows multiply less well)."""
    count = max(1, min(tokens // MIN_ROWS, PIECES_PER_STAGE * stages))
    return [(tokens * i // count, tokens * (i + 1) // count) for i in range(count)]
