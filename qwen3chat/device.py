"""Picking the device and the compute dtype."""

from __future__ import annotations

import torch

from .errors import QwenChatError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise QwenChatError("--device cuda: no CUDA device is available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise QwenChatError("--device mps: MPS is not available here; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise QwenChatError(f"--device: unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 wherever it is usable: on CPUs without native bf16 the decode
    (matrix-vector, bandwidth bound) still runs about twice as fast as float32, and the
    prefill's matrix products run in float32 anyway (see model/layers.py)."""
    if name != "auto":
        try:
            return DTYPES[name]
        except KeyError:
            raise QwenChatError(
                f"--dtype: unknown dtype {name!r}; use auto, float32, bfloat16 or float16"
            ) from None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16


# On CPUs without native 16-bit matrix units (AVX2), torch's bf16/f16 GEMM runs at a few
# GFLOP/s against ~130 in float32, while 16-bit matrix-vector products are bandwidth bound
# and fast. So products with many rows (prefill) run in float32, single rows stay 16-bit.
CPU_FLOAT32_MIN_ROWS = 4


def matmul_dtype(rows: int, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a product of ``rows`` activation rows should be computed in."""
    if device.type == "cpu" and rows >= CPU_FLOAT32_MIN_ROWS:
        return torch.float32
    return dtype


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the host's
    MemAvailable (what Linux can give without swapping; elsewhere, the physical memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
