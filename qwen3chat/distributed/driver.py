"""Process 0 drives, the others follow.

Everything a user sees (the REPL, the one-shot answer, bench's figures) runs on process 0
alone, and so does sampling. Each call of its model's forward is first sent to the other
processes: the ids (the sampled ones included, so every process sees the same sequence),
which of process 0's caches it runs in, and where it starts. The followers run the same
forward on their shares of the weights and their own caches, and the model's all-reduces
meet in between. A hybrid model's caches hold recurrent states that the engines also
move outside forwards (commit, checkpoint, trim; a paged cache's copy_state): those calls
are sent too, and each process repeats them on its own cache.

A message is MESSAGE int64 values: the op, a cache number, the op's five values, the
length of its payload, then the payload where it fits: the op's tensors flattened one
after the other (the ids; for a step of the server's batched engine also each row's
position and sequence, the block tables and the rows whose logits are taken, and with
state slots each sequence's row count and slot). A longer
payload follows in a second broadcast. So a decode step is one broadcast: each is a
round trip between the processes (~0.75 ms on loopback here), and a token's all-reduces
wait behind it.
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

FORWARD, BATCH, NEW_CACHE, NEW_PAGED_CACHE, DROP_CACHE, STOP, CALL = range(1, 8)
# A recurrent cache's calls that change its states beside forwards. Their arguments are
# ints (None sent as -1), but commit's, a list of ids (the payload).
MIRRORED = ("commit", "checkpoint", "trim", "copy_state")
HEADER = 8  # op, cache number (0: none), the op's five values, the payload's length
# 2 KiB: a batched step of 16 sequences of short block tables still fits.
MESSAGE = 256


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

    def send(self, op: int, cache: int = 0, *values: int, payload=()) -> None:
        flat = [t.reshape(-1).to("cpu", torch.int64) for t in payload]
        flat = torch.cat(flat) if flat else torch.empty(0, dtype=torch.int64)
        message = torch.zeros(MESSAGE, dtype=torch.int64)
        header = [op, cache, *values, *[0] * (HEADER - 3 - len(values)), flat.numel()]
        message[:HEADER] = torch.tensor(header)
        inline = flat.numel() <= MESSAGE - HEADER
        if inline:
            message[HEADER : HEADER + flat.numel()] = flat
        self.world.broadcast(message)
        if not inline:
            self.world.broadcast(flat)

    def announce(self, model, args, kwargs) -> None:
        call = self.signature.bind(*args, **kwargs)
        call.apply_defaults()
        given = call.arguments
        self.no_pictures(given["positions"], given["visual"])
        tokens, cache = given["tokens"], given["cache"]
        number = 0 if cache is None else self.number(cache)
        start, all_logits = given["start"], int(given["all_logits"])
        self.send(FORWARD, number, start, tokens.shape[1], all_logits, payload=[tokens])

    def announce_batch(self, tokens, batch, positions=None, visual=None):
        self.no_pictures(positions, visual)
        number = self.number(batch.cache)
        seqs, width = batch.block_tables.shape
        tensors = [tokens, batch.positions, batch.row_seq, batch.block_tables, batch.logit_rows]
        if batch.cache.state_slots:
            tensors += [torch.tensor(batch.counts), torch.tensor(batch.states)]
        values = tokens.shape[0], seqs, width, batch.logit_rows.shape[0]
        self.send(BATCH, number, *values, payload=tensors)
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
            keys = getattr(cache, "kv", cache).k  # a hybrid cache's attention layers' KVCache
            int8 = int(keys.dtype == torch.int8)
            if hasattr(cache, "block_size"):  # paged: sized in blocks, rotary tables as ours
                rope = self.model.rope_cos.shape[0]
                sizes = cache.num_blocks, cache.block_size, rope, int8, cache.state_slots
                self.send(NEW_PAGED_CACHE, number, *sizes)
            else:
                self.send(NEW_CACHE, number, cache.max_seq_len, int8)
            self.mirror(cache, number)
        return self.numbers[cache]

    def mirror(self, cache, number: int) -> None:
        """Make ``cache``'s state-changing calls (MIRRORED, where it has states) send
        themselves first. The wrappers hold the cache weakly, so that it is still freed
        (and dropped by the followers) when process 0 lets it go."""
        if not (getattr(cache, "recurrent", False) or getattr(cache, "state_slots", 0)):
            return
        held = weakref.ref(cache)
        for index, name in enumerate(MIRRORED):
            if not hasattr(cache, name):
                continue

            def call(*args, index=index, name=name):
                if name == "commit":
                    ids = torch.tensor(list(args[0]), dtype=torch.int64)
                    self.send(CALL, number, index, payload=[ids])
                else:
                    values = [-1 if a is None else int(a) for a in args]
                    self.send(CALL, number, index, len(values), *values)
                return getattr(type(held()), name)(held(), *args)

            setattr(cache, name, call)

    def stop(self) -> None:
        """Tell the followers to exit; quietly nothing where they are gone already."""
        self.handle.remove()
        del self.model.forward_batch  # the class's again
        with contextlib.suppress(QwenChatError):
            self.send(STOP)


def follow(model: torch.nn.Module, world: World) -> None:
    """A follower's loop: run process 0's forwards until it says stop."""
    caches: dict[int, object] = {}

    with torch.inference_mode():
        while True:
            # A new message each time: the last one's payload may still be referenced.
            message = world.broadcast(torch.empty(MESSAGE, dtype=torch.int64))
            op, number, a, b, c, d, e, length = message[:HEADER].tolist()
            payload = message[HEADER : HEADER + length]
            if length > MESSAGE - HEADER:
                payload = world.broadcast(torch.empty(length, dtype=torch.int64))
            payload = payload.to(model.device)
            if op == STOP:
                return
            if op == NEW_CACHE:
                caches[number] = model.new_cache(a, torch.int8 if b else None)
            elif op == NEW_PAGED_CACHE:
                caches[number] = model.new_paged_cache(a, b, c, torch.int8 if d else None, e)
            elif op == DROP_CACHE:
                caches.pop(number, None)
            elif op == FORWARD:
                model(payload.view(1, b), caches.get(number), a, all_logits=bool(c))
            elif op == BATCH:
                cache = caches[number]
                sizes = (a, a, a, b * c, d, *((b, b) if cache.state_slots else ()))
                tokens, positions, row_seq, tables, logit_rows, *states = payload.split(sizes)
                tables = tables.view(b, c).to(torch.int32)
                counts, slots = (t.tolist() for t in states) if states else (None, None)
                batch = PagedBatch(cache, positions, row_seq, tables, logit_rows, counts, slots)
                model.forward_batch(tokens, batch)
            elif op == CALL:
                name = MIRRORED[a]
                values = [None if v < 0 else v for v in (c, d)[:b]]
                args = [payload.tolist()] if name == "commit" else values
                getattr(caches[number], name)(*args)


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
