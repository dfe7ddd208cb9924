"""qwen3chat: chat with Qwen3 models from the terminal."""

import os
import sys
import warnings

# torch's OpenMP workers sleep between torch's own operations rather than spin (for
# milliseconds, by default) on the cores the kernels' threads need (kernels/thread_pool.cpp):
# spinning, they took a quarter of Q4_0 decode's speed and 40% of its prefill's. It takes
# effect only where this package is imported before torch, as its commands are; a user's
# own setting wins. In a process of a program compared with this one (PEER set: see
# peer_environment) nothing is set.
PEER = "QWEN3CHAT_PEER"
OWN_ENVIRONMENT = tuple(
    name for name in ("OMP_WAIT_POLICY",) if name not in os.environ and PEER not in os.environ
)
if OWN_ENVIRONMENT:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in sys.modules:
        # Too late: OpenMP read its settings when torch loaded. Each sampling step's
        # operations over the vocabulary then leave a worker spinning through the next
        # kernels (0.6B Q4_0 decode 58.5 tok/s against 70.4, Zen 3, 2 threads).
        warnings.warn(
            "qwen3chat was imported after torch, so torch's OpenMP threads spin between "
            "operations on the cores decode needs (~20% slower): import qwen3chat first, or "
            "set OMP_WAIT_POLICY=PASSIVE",
            RuntimeWarning,
            stacklevel=2,
        )


def peer_environment() -> dict[str, str]:
    """The environment of a program compared with this one (benchmarks/): without what
    this package set in it, and with PEER, so that the benchmark scripts' workers for such
    programs, which import this package before torch, set nothing either. llama.cpp's
    OpenMP threads are its compute threads (and share torch's OpenMP library in a worker
    that imports both): made to sleep at each of a step's barriers, its decode ran at 0.4x
    (Zen 3, Q4_0)."""
    return {k: v for k, v in os.environ.items() if k not in OWN_ENVIRONMENT} | {PEER: "1"}


__version__ = "0.1.0"
