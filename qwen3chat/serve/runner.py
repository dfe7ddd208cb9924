"""Runs the server's requests on the engine, one at a time, in a worker thread.

The engine holds one KV cache, so requests take turns (as llama-server with one slot
does); a request that shares a prefix with the one before it reuses its keys and values.
Each request's events cross to the event loop through an asyncio queue; a request that is
cancelled (its client went away, a stop string matched, the server is stopping) ends at
the next token, or before its prefill when it has not started.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

from ..engine import Engine, FinishEvent
from ..sampling import SamplingSettings


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingSettings
    loop: asyncio.AbstractEventLoop
    constraint: object = None  # a grammar.GrammarConstraint, for response_format
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class Stats:
    """What /metrics reports (totals since the start, and what runs and waits now)."""

    running: int = 0
    waiting: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    decode_s: float = 0.0
    ttft_s_sum: float = 0.0
    ttft_count: int = 0


class Runner:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.stats = Stats()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: set[Job] = set()  # submitted and not finished
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="qwen3chat-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            self._jobs.add(job)
            self.stats.waiting += 1
        self._queue.put(job)

    def cancel_all(self) -> None:
        """Cancel every request; each still gets its finish event."""
        with self._lock:
            for job in self._jobs:
                job.cancelled.set()

    def close(self) -> None:
        """Cancel every request, then stop the worker."""
        self.cancel_all()
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                self.stats.waiting -= 1
                self.stats.running += 1
            try:
                for event in self.engine.generate(
                    job.prompt_ids,
                    job.max_tokens,
                    job.sampling,
                    should_stop=job.cancelled.is_set,
                    constraint=job.constraint,
                ):
                    if isinstance(event, FinishEvent):
                        self._count(event)
                    job.send(event)
            except Exception as e:  # that request's client gets a server error
                job.send(e)
            finally:
                with self._lock:
                    self.stats.running -= 1
                    self._jobs.discard(job)

    def _count(self, finish: FinishEvent) -> None:
        with self._lock:
            s = self.stats
            s.requests += 1
            s.prompt_tokens += finish.prompt_tokens
            s.cached_tokens += finish.cached_tokens
            s.generated_tokens += len(finish.token_ids)
            s.decode_s += finish.timings.decode_s
            if finish.token_ids:
                s.ttft_s_sum += finish.timings.ttft_s
                s.ttft_count += 1
