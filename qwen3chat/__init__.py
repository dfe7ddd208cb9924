"""qwen3chat: chat with Qwen3 models from the terminal."""

import os

# torch's OpenMP workers sleep between torch's own operations rather than spin (for
# milliseconds, by default) on the cores the kernels' threads need (kernels/thread_pool.cpp):
# spinning, they took a quarter of Q4_0 decode's speed and 40% of its prefill's. It takes
# effect only where this package is imported before torch, as its commands are; a user's
# own setting wins.
OWN_ENVIRONMENT = tuple(name for name in ("OMP_WAIT_POLICY",) if name not in os.environ)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def peer_environment() -> dict[str, str]:
    """The environment without what this package set in it: where a program compared
    with this one runs (benchmarks/). llama.cpp's OpenMP threads are its compute threads:
    made to sleep at each of a step's barriers, its decode ran at 0.4x (Zen 3, Q4_0)."""
    return {k: v for k, v in os.environ.items() if k not in OWN_ENVIRONMENT}


__version__ = "0.1.0"
