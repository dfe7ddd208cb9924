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
