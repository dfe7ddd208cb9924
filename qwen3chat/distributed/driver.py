"""Process 0 drives, the others follow.

Everything a user sees (the REPL, the one-shot answer, bench's figures) runs on process 0
alone, and so does sampling. Each call of its model's forward is first sent to the other
processes: the ids (the sampled ones included, so every process sees the same sequence),
which of process 0's caches it runs in, and where it starts. The followers run the same
forward on their shares of the weights and their own caches, and the model's all-reduces
meet in between. A message is a header of int64 values, then the op's tensors (the ids;
for a step of the server's batched engine also each row's position and sequence, the
block tables and the rows whose logits are taken).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import weakref
from collections.abc import Iterator

import torch

from ..errors import QwenChatError
from ..kv_cache import PagedBatch
from .world import World

FORWARD, BATCH, NEW_CACHE, NEW_PAGED_CACHE, DROP_CACHE, STOP = range(1, 7)
HEADER = 6  # op, cache number (0: none), then the op's four values


class Driver:
    """Process 0's side: sends each forward of ``model`` before it runs (a pre-hook), and
    each ``forward_batch`` (the server's engine steps; the method is wrapped while it
    drives)."""

    def __init__(self, model: torch.nn.Module, world: World):
        self.model = model
        self.world = world
        self.signature = inspect.signature(model.forward)
        self.numbers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.counter = itertools.count(1)
        self.dropped: list[int] = []  # caches process 0 no longer holds
        self.handle = model.register_forward_pre_hook(self.announce, with_kwargs=True)
        self.forward_batch = model.forward_batch
        model.forward_batch = self.announce_batch

    def send(self, op: int, cache: int = 0, *values: int) -> None:
        header = [op, cache, *values, *[0] * (HEADER - 2 - len(values))]
        self.world.broadcast(torch.tensor(header, dtype=torch.int64))

    def send_tensors(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self.world.broadcast(t.to("cpu", torch.int64))

    def announce(self, model, args, kwargs) -> None:
        call = self.signature.bind(*args, **kwargs)
        call.apply_defaults()
        given = call.arguments
        self.no_pictures(given["positions"], given["visual"])
        tokens, cache = given["tokens"], given["cache"]
        number = 0 if cache is None else self.number(cache)
        self.send(FORWARD, number, given["start"], tokens.shape[1], int(given["all_logits"]))
        self.send_tensors(tokens)

    def announce_batch(self, tokens, batch, positions=None, visual=None):
        self.no_pictures(positions, visual)
        number = self.number(batch.cache)
        seqs, width = batch.block_tables.shape
        self.send(BATCH, number, tokens.shape[0], seqs, width, batch.logit_rows.shape[0])
        self.send_tensors(tokens, batch.positions, batch.row_seq, batch.block_tables)
        self.send_tensors(batch.logit_rows)
        return self.forward_batch(tokens, batch)

    @staticmethod
    def no_pictures(positions, visual) -> None:
        if positions is not None or visual is not None:
            raise QwenChatError("pictures do not run across processes yet; run one process")

    def number(self, cache) -> int:
        """The cache's number among the followers, which make theirs when it is new (and
        drop theirs once process 0's is gone)."""
        while self.dropped:
            self.send(DROP_CACHE, self.dropped.pop())
        if cache not in self.numbers:
            number = self.numbers[cache] = next(self.counter)
            weakref.finalize(cache, self.dropped.append, number)
            int8 = int(cache.k.dtype == torch.int8)
            if hasattr(cache, "block_size"):  # paged: sized in blocks, rotary tables as ours
                rope = self.model.rope_cos.shape[0]
                self.send(NEW_PAGED_CACHE, number, cache.num_blocks, cache.block_size, rope, int8)
            else:
                self.send(NEW_CACHE, number, cache.max_seq_len, int8)
        return self.numbers[cache]

    def stop(self) -> None:
        """Tell the followers to exit; quietly nothing where they are gone already."""
        self.handle.remove()
        del self.model.forward_batch  # the class's again
        with contextlib.suppress(QwenChatError):
            self.send(STOP)


def follow(model: torch.nn.Module, world: World) -> None:
    """A follower's loop: run process 0's forwards until it says stop."""
    caches: dict[int, object] = {}
    header = torch.empty(HEADER, dtype=torch.int64)

    def receive(*shape: int, dtype=torch.int64) -> torch.Tensor:
        return world.broadcast(torch.empty(shape, dtype=torch.int64)).to(model.device, dtype)

    with torch.inference_mode():
        while True:
            op, number, a, b, c, d = world.broadcast(header).tolist()
            if op == STOP:
                return
            if op == NEW_CACHE:
                caches[number] = model.new_cache(a, torch.int8 if b else None)
            elif op == NEW_PAGED_CACHE:
                caches[number] = model.new_paged_cache(a, b, c, torch.int8 if d else None)
            elif op == DROP_CACHE:
                caches.pop(number, None)
            elif op == FORWARD:
                model(receive(1, b), caches.get(number), a, all_logits=bool(c))
            elif op == BATCH:
                tokens, positions, row_seq = receive(a), receive(a), receive(a)
                tables, logit_rows = receive(b, c, dtype=torch.int32), receive(d)
                batch = PagedBatch(caches[number], positions, row_seq, tables, logit_rows)
                model.forward_batch(tokens, batch)


@contextlib.contextmanager
def driving(model: torch.nn.Module, world: World | None) -> Iterator[None]:
    """Process 0's forwards of ``model`` sent to the followers while the block runs, who
    are told to stop at its end, however it ends (nothing for a run of one process)."""
    if world is None:
        yield
        return
    driver = Driver(model, world)
    try:
        yield
    finally:
        driver.stop()
