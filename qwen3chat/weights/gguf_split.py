"""The names of a GGUF model split into several files, as llama.cpp's gguf-split and its
converter's --split-max-size write them (the Hub holds files of at most 50 GB):
NAME-00001-of-00003.gguf, NAME-00002-of-00003.gguf, ... The first holds the metadata;
every file's split.no (from 0), split.count and split.tensors.count keys say where it
belongs (read in gguf.py). Only names here: download.py uses them without gguf-py."""

from __future__ import annotations

import re
from pathlib import Path

SPLIT_NO = "split.no"
SPLIT_COUNT = "split.count"
SPLIT_TENSORS = "split.tensors.count"

_SHARD = re.compile(r"^(?P<stem>.+)-(?P<number>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_paths(path: Path) -> list[Path]:
    """Every file of the split model ``path`` is one of (any of them), the first first;
    ``[path]`` for a name that is not a shard's."""
    match = _SHARD.match(path.name)
    if match is None or int(match["count"]) == 0:
        return [path]
    count = int(match["count"])
    names = (f"{match['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1))
    return [path.with_name(name) for name in names]


def shard_pattern(path: Path) -> str:
    """A glob for every file of ``path``'s split model (for --include)."""
    match = _SHARD.match(path.name)
    return f"{match['stem']}-*-of-{match['count']}.gguf" if match else path.name
