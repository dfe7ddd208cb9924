"""Runs the server's requests on the batched engine.

``run`` is the engine's loop; the server runs it on the main thread, the HTTP server on
another (OpenMP, which runs the native kernels' parallel parts, wakes its workers several
times slower for a thread that is not the first to use it: a decode step took 1.4x as
long). Requests arrive from the event loop (``submit``) and join the engine between
steps; every step's events cross back to each request's asyncio queue. A request that is
cancelled (its client went away, a stop string matched, the server is stopping) leaves
at the next step boundary, and its blocks are freed then.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field

from ..batch.engine import BatchEngine
from ..batch.sequence import Sequence
from ..errors import QwenChatError
from ..generation import FinishEvent
from ..sampling import SamplingSettings
from .protocol import APIError

# /metrics' tokens per second are those of the steps of the last this many seconds.
RATE_WINDOW_S = 10.0
# How long the idle loop waits for a request at a time. A signal (Ctrl-C, SIGTERM) that
# the kernel hands to another thread (the HTTP server's, a torch worker's) runs its Python
# handler only once the main thread runs Python again: a wait without end missed it.
IDLE_WAIT_S = 0.25
# A request that finds the engine idle waits for the rest of its burst: until none follows
# within BURST_GAP_S, BURST_MAX_S at most. Requests sent together reach the engine a few
# ms apart (the HTTP thread renders and tokenizes each), and a first step taken with the
# first prompt alone had the others' prompts wait for it, then that first stream wait
# for their prefill: 16 bf16 streams of the 0.6B shape decoded at 67 tok/s in all when
# that happened, 82-87 when one step took every prompt (Intel Xeon, 2 threads).
BURST_GAP_S = 0.01
BURST_MAX_S = 0.1


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingSettings
    loop: asyncio.AbstractEventLoop
    constraint: object = None  # a grammar.GrammarConstraint, for response_format
    top_logprobs: int | None = None  # alternatives per token, when logprobs are asked for
    visuals: list = field(default_factory=list)  # the prompt's pictures (a vision model)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class Stats:
    """What /metrics reports (totals since the start, and what runs and waits now)."""

    running: int = 0
    waiting: int = 0
    blocks_in_use: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    ttft_s_sum: float = 0.0
    ttft_count: int = 0
    tokens_per_second: float = 0.0  # sampled over the last RATE_WINDOW_S


class Runner:
    def __init__(self, engine: BatchEngine):
        self.engine = engine
        self.stats = Stats()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[Sequence, Job] = {}  # in the engine
        self._live: set[Job] = set()  # submitted and not finished (in the engine or not yet)
        self._lock = threading.Lock()
        self._stopping = False
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # steps
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> None:
        with self._lock:
            self.stats.waiting += 1
            self._live.add(job)
        self._queue.put(job)

    def cancel_all(self) -> None:
        """Cancel every request; each still gets its finish event."""
        with self._lock:
            for job in self._live:
                job.cancelled.set()

    def start(self) -> None:
        """``run`` in a thread of its own (an app served in-process, e.g. by tests)."""
        self._thread = threading.Thread(target=self.run, name="qwen3chat-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End ``run`` once what runs has finished (cancel_all first to end it now)."""
        self._queue.put(None)

    def close(self) -> None:
        """Cancel every request, then stop the loop (and its thread, if ``start`` made one)."""
        self.cancel_all()
        self.stop()
        if self._thread is not None:
            self._thread.join()

    def run(self) -> None:
        """The engine's loop: admit new requests, drop cancelled ones, step; until ``stop``."""
        while not self._stopping or self._jobs:
            self._admit(idle=not self.engine.has_work and not self._stopping)
            for seq, job in list(self._jobs.items()):
                if job.cancelled.is_set():
                    self._dispatch(self.engine.cancel(seq))
            try:
                events = self.engine.step()
            except Exception as e:  # every request in the step gets a server error
                for seq, job in list(self._jobs.items()):
                    self.engine.cancel(seq)
                    self._end(job, e, seq)
                continue
            self._dispatch(events)
            self._update()

    def _admit(self, idle: bool) -> None:
        """Move submitted jobs into the engine; when ``idle``, wait for one and the rest of
        its burst."""
        timeout = IDLE_WAIT_S if idle else None
        burst_end = None
        while True:
            try:
                job = self._queue.get(block=timeout is not None, timeout=timeout)
            except queue.Empty:
                return
            if job is None:
                self._stopping = True
                idle, timeout = False, None
                continue
            if idle:
                burst_end = burst_end or time.monotonic() + BURST_MAX_S
                left = burst_end - time.monotonic()
                timeout = min(BURST_GAP_S, left) if left > 0 else None
            try:
                seq = self.engine.add(
                    job.prompt_ids,
                    job.max_tokens,
                    job.sampling,
                    job.constraint,
                    job.top_logprobs,
                    job.visuals,
                )
            except QwenChatError as e:  # e.g. picture tokens typed as text
                self._end(job, APIError(400, str(e), "messages"))
                continue
            except Exception as e:  # that request's client gets a server error
                self._end(job, e)
                continue
            with self._lock:
                self._jobs[seq] = job

    def snapshot(self) -> Stats:
        with self._lock:
            return dataclasses.replace(self.stats)

    def _dispatch(self, events) -> None:
        """A step's events to their jobs, in one wake-up of the event loop (one each cost
        the server a tenth of its 16-stream throughput on two cores)."""
        out: list[tuple[Job, object]] = []
        for seq, event in events:
            job = self._jobs.get(seq)
            if job is None:
                continue
            if isinstance(event, FinishEvent):
                self._count(event)
                self._leave(job, seq)
            out.append((job, event))
        if out:
            out[0][0].loop.call_soon_threadsafe(_deliver, out)

    def _end(self, job: Job, error: Exception, seq: Sequence | None = None) -> None:
        """``job`` ends with ``error`` and leaves the runner."""
        self._leave(job, seq)
        job.send(error)

    def _leave(self, job: Job, seq: Sequence | None) -> None:
        with self._lock:
            self._live.discard(job)
            self._jobs.pop(seq, None)

    def _update(self) -> None:
        now, recent = time.monotonic(), self._recent
        recent.append((now, self.engine.tokens_sampled))
        while now - recent[0][0] > RATE_WINDOW_S:
            recent.popleft()
        with self._lock:
            s, scheduler = self.stats, self.engine.scheduler
            span = now - recent[0][0]
            s.tokens_per_second = (recent[-1][1] - recent[0][1]) / span if span else 0.0
            s.running = len(scheduler.running)
            s.waiting = len(scheduler.waiting) + self._queue.qsize()
            s.blocks_in_use = self.engine.blocks.in_use

    def _count(self, finish: FinishEvent) -> None:
        with self._lock:
            s = self.stats
            s.requests += 1
            s.prompt_tokens += finish.prompt_tokens
            s.cached_tokens += finish.cached_tokens
            s.generated_tokens += len(finish.token_ids)
            if finish.token_ids:
                s.ttft_s_sum += finish.timings.ttft_s
                s.ttft_count += 1


def _deliver(events: list[tuple[Job, object]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)
