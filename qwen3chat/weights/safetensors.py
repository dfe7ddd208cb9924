"""SafeTensors checkpoints: one file or shards with model.safetensors.index.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import QwenChatError
from .names import IGNORED, canonical_from_hf

INDEX_NAME = "model.safetensors.index.json"


class SafeTensorsSource:
    """Canonical tensor name -> tensor, read lazily from memory-mapped files.

    Each read opens its file briefly, so the pages of a tensor that gets converted (say
    bf16 -> float32) leave memory with it: loading peaks at the final weights plus one
    tensor, never at the file plus the weights.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self._file_of: dict[str, Path] = {}
        self._hf_name: dict[str, str] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        for file in self._files():
            try:
                with safe_open(file, framework="pt") as f:
                    for hf_name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                        if IGNORED.search(hf_name):
                            continue
                        name = canonical_from_hf(hf_name)
                        self._file_of[name] = file
                        self._hf_name[name] = hf_name
                        self._shape[name] = tuple(f.get_slice(hf_name).get_shape())
            except (SafetensorError, OSError) as e:
                raise QwenChatError(f"{file}: not a readable safetensors file ({e})") from None

    def _files(self) -> list[Path]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted({self.directory / f for f in weight_map.values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise QwenChatError(f"{index}: not a valid shard index ({e})") from None
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise QwenChatError(
                    f"{index}: shard {missing[0]} is missing; download the whole model again"
                )
            return files
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise QwenChatError(f"{self.directory}: no *.safetensors files found")
        return files

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shape)

    def file_of(self, name: str) -> str:
        return self._file_of[name].name

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor converted to ``dtype``, in memory of its own (not the file's)."""
        file = self._file_of[name]
        try:
            with safe_open(file, framework="pt") as f:
                tensor = f.get_tensor(self._hf_name[name])
                return tensor.to(dtype=dtype, copy=True)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise QwenChatError(f"{file}: cannot read tensor {self._hf_name[name]} ({e})") from None
