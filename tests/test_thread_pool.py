"""The kernels' own threads (kernels/thread_pool.cpp): any number of them gives the same
bits, callers on several threads at once each get their own answer, and a forked child,
which has none of its parent's threads, still runs the kernels."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from qwen3chat import kernels

native = kernels.native(torch.zeros(1))
pytestmark = pytest.mark.skipif(native is None, reason="no native kernels on this machine")


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


WEIGHT = rand(3001, 256)
# One row streams the weights, 20 take the float GEMM, 200 the tiles over many chunks.
INPUTS = [rand(rows, 256, seed=rows) for rows in (1, 20, 200)]


def products(inputs=INPUTS):
    return [native.dense_linear(x, WEIGHT) for x in inputs]


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_any_number_of_threads_gives_the_same_bits(threads):
    threads(1)
    alone = products()
    for count in (2, 3, 5, 2):  # the pool is rebuilt for each new count
        threads(count)
        for got, expected in zip(products(), alone, strict=True):
            assert torch.equal(got, expected), count


def test_callers_on_several_threads_at_once_each_get_their_answer(threads):
    threads(2)
    expected = products()
    wrong = []

    def caller():
        for _ in range(10):
            if not all(map(torch.equal, products(), expected)):
                wrong.append(threading.current_thread().name)

    callers = [threading.Thread(target=caller) for _ in range(4)]
    for c in callers:
        c.start()
    for c in callers:
        c.join(timeout=120)
    assert not any(c.is_alive() for c in callers) and not wrong


def test_a_forked_child_runs_the_kernels_on_threads_of_its_own(threads):
    """The products the kernels run alone, compared in numpy: 200 rows call torch's GEMM,
    and torch's OpenMP threads hang in a forked child of a process that used them."""
    threads(2)
    ours = INPUTS[:2]
    expected = products(ours)  # the parent's pool exists before the fork
    pid = os.fork()
    if pid == 0:  # the child: no pytest from here, only an exit status
        try:
            torch.set_num_threads(3)  # a new count: the parent's threads are not here to stop
            same = [
                (a.numpy() == b.numpy()).all()
                for a, b in zip(products(ours), expected, strict=True)
            ]
            os._exit(0 if all(same) else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    if done == (0, 0):
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in the kernels")
    assert os.waitstatus_to_exitcode(done[1]) == 0
