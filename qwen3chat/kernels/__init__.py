"""Native CPU kernels, compiled on first use with torch's C++ extension builder.

They need an x86-64 CPU with AVX2 and a C++ compiler; without either, ``q8_linear``
returns None and callers fall back to plain torch (correct, slower). The build is cached
by torch (TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions).
"""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@functools.cache
def _module():
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="qwen3chat_q8_linear",
            sources=[str(Path(__file__).with_name("q8_linear.cpp"))],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            # Without OpenMP, at::parallel_for in an extension runs on one thread.
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, headers or ninja: the torch path still works
        log.warning("native int8 kernel unavailable, using the slower path: %s", e)
        return None


def q8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor):
    """``x [M, K] float32 @ (codes * scales).T`` for group-wise int8 (groups a multiple
    of 32), or None where the kernel is unavailable."""
    module = _module()
    if module is None:
        return None
    return module.q8_linear(x, codes, scales)
