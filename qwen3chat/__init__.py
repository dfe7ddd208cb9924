"""qwen3chat: chat with Qwen3 models from the terminal."""

import os

# torch's OpenMP workers sleep between torch's own operations rather than spin (for
# milliseconds, by default) on the cores the kernels' threads need (kernels/thread_pool.cpp):
# spinning, they took a quarter of Q4_0 decode's speed and 40% of its prefill's. It takes
# effect only where this package is imported before torch, as its commands are; a user's
# own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
