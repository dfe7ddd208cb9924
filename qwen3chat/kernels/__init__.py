"""Native CPU kernels, compiled on first use with torch's C++ extension builder.

linear.cpp holds the matrix products of every weight format (float, bfloat16, half,
int8, int4), quantize.cpp the quantization of weights at load, layer_ops.cpp the small
operations of a decoder layer (RMSNorm, q/k norm with RoPE and the cache write, decode
attention, SwiGLU), and decode_layer.cpp a decode step of the decoder layers built from
them, one call per token. They need an x86-64 CPU with AVX2 and a C++ compiler; without
either, ``native()`` returns None and callers run the plain torch code, which is correct
everywhere and is what the kernels are tested against.
The build is cached by torch (TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions).
"""

from __future__ import annotations

import functools
import logging
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCES = ("bindings.cpp", "linear.cpp", "quantize.cpp", "layer_ops.cpp", "decode_layer.cpp")
# Loading a cached build takes well under a second; a longer wait is a compile, which the
# user is told about rather than left facing a silent pause.
_NOTICE_AFTER_S = 2.0


@functools.cache
def _module():
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return None
    try:
        from torch.utils.cpp_extension import load

        here = Path(__file__).parent
        notice = threading.Timer(
            _NOTICE_AFTER_S,
            log.warning,
            ["compiling the native CPU kernels (once per install, about a minute)..."],
        )
        notice.start()
        try:
            return load(
                name="qwen3chat_kernels",
                sources=[str(here / name) for name in _SOURCES],
                extra_include_paths=[str(here)],
                extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                # Without OpenMP, at::parallel_for in an extension runs on one thread.
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        finally:
            notice.cancel()
    except Exception as e:  # no compiler, headers or ninja: the torch path still works
        log.warning("native CPU kernels unavailable, using the slower torch path: %s", e)
        return None


def native(x: torch.Tensor):
    """The kernel module for activations ``x``, or None where they cannot run (not on
    the CPU, a dtype they do not cover, or no build here)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    return _module()
