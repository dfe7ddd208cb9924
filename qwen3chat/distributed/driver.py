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
state slots each sequence's row count and slot; with pictures each row's M-RoPE
positions and which rows are the tower's tokens). A longer payload follows in a second
broadcast, and a forward with pictures sends the tower's tokens and DeepStack features
(float32) in one more: process 0 alone holds and runs the vision tower. So a decode step
is one broadcast: each is a round trip between the processes (~0.75 ms on loopback here),
and a token's all-reduces wait behind it.
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
from ..model.qwen3 import VisualTokens
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
        tokens, cache, visual = given["tokens"], given["cache"], given["visual"]
        number = 0 if cache is None else self.number(cache)
        start, all_logits = given["start"], int(given["all_logits"])
        pictures, tensors = _pictures(given["positions"], visual)
        values = start, tokens.shape[1], all_logits, pictures
        self.send(FORWARD, number, *values, payload=[tokens, *tensors])
        self.send_features(visual)

    def announce_batch(self, tokens, batch, positions=None, visual=None):
        number = self.number(batch.cache)
        seqs, width = batch.block_tables.shape
        tensors = [tokens, batch.positions, batch.row_seq, batch.block_tables, batch.logit_rows]
        if batch.cache.state_slots:
            tensors += [torch.tensor(batch.counts), torch.tensor(batch.states)]
        pictures, more = _pictures(positions, visual)
        values = tokens.shape[0], seqs, width, batch.logit_rows.shape[0], pictures
        self.send(BATCH, number, *values, payload=[*tensors, *more])
        self.send_features(visual)
        return self.forward_batch(tokens, batch, positions, visual)

    def send_features(self, visual: VisualTokens | None) -> None:
        """The tower's tokens and DeepStack features of a forward with pictures, in float32
        (exact for every dtype they come in: each process rounds them alike)."""
        if visual is not None:
            self.world.broadcast(torch.stack([visual.embeds, *visual.deepstack]).float())

    def number(self, cache) -> int:
        """The cache's number among the followers, which make theirs when it is new (and
        drop theirs once process 0's is gone)."""
        while self.dropped:
            self.send(DROP_CACHE, self.dropped.pop())
        if cache not in self.numbers:
            number = self.numbers[cache] = next(self.counter)
            weakref.finalize(cache, self.dropped.append, number)
            int8 = int(cache.quantized)
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
                ids, rest = payload.split([b, length - b])
                pictures = _received_pictures(model, world, d, rest, b)
                model(ids.view(1, b), caches.get(number), a, all_logits=bool(c), **pictures)
            elif op == BATCH:
                cache = caches[number]
                sizes = [a, a, a, b * c, d, *((b, b) if cache.state_slots else ())]
                *tensors, rest = payload.split([*sizes, length - sum(sizes)])
                tokens, positions, row_seq, tables, logit_rows, *states = tensors
                pictures = _received_pictures(model, world, e, rest, a)
                tables = tables.view(b, c).to(torch.int32)
                counts, slots = (t.tolist() for t in states) if states else (None, None)
                batch = PagedBatch(cache, positions, row_seq, tables, logit_rows, counts, slots)
                model.forward_batch(tokens, batch, **pictures)
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


# A forward's pictures word: M-RoPE positions sent, tower tokens sent, and above these
# bits the number of DeepStack features.
POSITIONS, VISUAL, DEEPSTACK_SHIFT = 1, 2, 2


def _pictures(positions, visual: VisualTokens | None) -> tuple[int, list[torch.Tensor]]:
    """A forward's pictures as the message carries them: the word, and the payload's
    tensors after the op's own (positions ``[3, rows]``, the tower tokens' row mask)."""
    word, tensors = 0, []
    if positions is not None:
        word, tensors = POSITIONS, [positions]
    if visual is not None:
        word |= VISUAL | len(visual.deepstack) << DEEPSTACK_SHIFT
        tensors.append(visual.mask)
    return word, tensors


def _received_pictures(model, world: World, word: int, rest, rows: int) -> dict:
    """A follower's ``positions`` and ``visual`` arguments for a forward of ``rows`` rows
    from its pictures word, the payload after the op's own tensors, and the features
    broadcast after the message."""
    found = {}
    if word & POSITIONS:
        found["positions"], rest = rest[: 3 * rows].view(3, rows), rest[3 * rows :]
    if word & VISUAL:
        mask = rest.bool()
        layers = 1 + (word >> DEEPSTACK_SHIFT)
        size = (layers, int(mask.sum()), model.config.hidden_size)
        features = world.broadcast(torch.empty(size, dtype=torch.float32, device=model.device))
        found["visual"] = VisualTokens(mask, features[0], list(features[1:]))
    return found
