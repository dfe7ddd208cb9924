"""The server's engine loop (serve/runner.py) on a fake engine: how requests join it."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from qwen3chat.generation import FinishEvent
from qwen3chat.sampling import SamplingSettings
from qwen3chat.serve import runner as runner_module
from qwen3chat.serve.runner import Job, Runner


class FakeEngine:
    """Each step finishes every sequence added before it; records how many those were."""

    def __init__(self):
        self.pending: list[object] = []
        self.steps: list[tuple[float, int]] = []  # (when, sequences in the step)
        self.scheduler = SimpleNamespace(running=[], waiting=[])
        self.blocks = SimpleNamespace(in_use=0)
        self.tokens_sampled = 0

    @property
    def has_work(self) -> bool:
        return bool(self.pending)

    def add(self, prompt_ids, *args):
        seq = object()
        self.pending.append(seq)
        return seq

    def cancel(self, seq):
        return []

    def step(self):
        if not self.pending:
            return []
        self.steps.append((time.monotonic(), len(self.pending)))
        done, self.pending = self.pending, []
        return [(seq, FinishEvent("stop", [1], 1, 0, "", "", 0)) for seq in done]


def submit_spaced(runner: Runner, count: int, gap_s: float) -> float:
    """``count`` jobs, ``gap_s`` apart (as an HTTP thread hands over requests sent
    together); when the first was submitted."""
    loop = asyncio.new_event_loop()
    first = time.monotonic()
    for i in range(count):
        runner.submit(Job([i], 4, SamplingSettings(), loop))
        time.sleep(gap_s)
    return first


def run_until_steps(runner: Runner, engine: FakeEngine, steps: int) -> None:
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while len(engine.steps) < steps and time.monotonic() < deadline:
        time.sleep(0.005)
    runner.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_requests_sent_together_start_in_one_step():
    """Requests that reach an idle engine a few ms apart are prefilled together: the first
    waits for the rest of its burst rather than stepping alone."""
    engine = FakeEngine()
    runner = Runner(engine)
    feeder = threading.Thread(target=submit_spaced, args=(runner, 6, 0.001))
    feeder.start()
    run_until_steps(runner, engine, 1)
    feeder.join()
    assert [count for _, count in engine.steps] == [6]


def test_a_lone_request_waits_one_gap_and_a_burst_no_longer_than_its_bound():
    engine = FakeEngine()
    runner = Runner(engine)
    first = submit_spaced(runner, 1, 0)
    run_until_steps(runner, engine, 1)
    assert engine.steps[0][0] - first < runner_module.BURST_GAP_S + 0.2  # slack: a busy CI
    # A steady trickle: the first step starts by BURST_MAX_S, with what came by then.
    engine, gap = FakeEngine(), runner_module.BURST_GAP_S / 4
    runner = Runner(engine)
    feeder = threading.Thread(target=submit_spaced, args=(runner, 60, gap))
    feeder.start()
    started = time.monotonic()
    run_until_steps(runner, engine, 2)
    feeder.join()
    assert engine.steps[0][0] - started < runner_module.BURST_MAX_S + 0.2
    assert 1 < engine.steps[0][1] < 60
