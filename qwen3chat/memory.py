"""What the process holds: the weights and KV caches in memory the OS backs with 2 MiB pages
(Linux's transparent huge pages), as every decode step streams them, and freed heap memory
given back.

With 4 KiB pages a stream of hundreds of MB takes a TLB miss every 4 KiB, a page walk that
a VM's nested page tables make long, and the reads queued behind it wait. Where the
kernel's THP setting is ``madvise`` (Debian's and Ubuntu's default), only memory advised
with ``MADV_HUGEPAGE`` gets 2 MiB pages, and torch's allocator advises none by default.
Each of the model's weights is a separate allocation of a few MB, too small for a page of
its own, so they are gathered into one advised mapping after loading.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import mmap
import weakref
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # each gathered tensor starts on a cache line, as the kernels' loads expect
HEADROOM = 1 << 30  # memory left free after copying a file's weights out
# A storage is copied this much at a time, each piece's source pages given back as it goes.
COPY_PIECE = 64 << 20


# The address ranges of ``empty``'s mappings still alive (start -> end): gather leaves
# what lies in them where it is.
_OWN_PAGES: dict[int, int] = {}


def _advised(nbytes: int, aligned: bool = True, track: bool = False) -> torch.Tensor | None:
    """``nbytes`` of zeros as a uint8 tensor over an anonymous mapping advised for 2 MiB
    pages, starting on a page boundary (``aligned``; else the mapping is ``nbytes`` long
    and its first and last partial pages are 4 KiB ones: no huge page half used past the
    end); None where the OS offers no such advice (not Linux, no THP) or the region is
    too small to hold a page."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < HUGE_PAGE:
        return None
    try:
        length = nbytes + HUGE_PAGE if aligned else nbytes
        mapping = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(advice)
    except (OSError, ValueError):
        return None
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive
    if track:  # until the mapping goes with the last tensor over it
        _OWN_PAGES[whole.data_ptr()] = whole.data_ptr() + nbytes
        weakref.finalize(mapping, _OWN_PAGES.pop, whole.data_ptr(), None)
    start = -whole.data_ptr() % HUGE_PAGE if aligned else 0
    return whole[start : start + nbytes]


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor for a weight being loaded: from 2 MiB up, a mapping of its own in
    2 MiB pages, which gather leaves where it is. torch's allocator hands out fresh memory
    that faults in 4 KiB at a time (~1.5 GB/s a thread, half a 5 GB model's load), and
    gather would then copy it once more."""
    advised = _advised(math.prod(shape) * dtype.itemsize, aligned=False, track=True)
    return torch.empty(shape, dtype=dtype) if advised is None else advised.view(dtype).view(shape)


def cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat into ``empty``'s memory."""
    shape = list(tensors[0].shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.cat(tensors, dim=dim, out=empty(tuple(shape), tensors[0].dtype))


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.zeros(shape)``, on the CPU in 2 MiB pages where the OS allows. A fresh
    mapping reads as zeros and is backed page by page as it is first written, so a large
    cache costs memory as it fills."""
    advised = (
        _advised(math.prod(shape) * dtype.itemsize) if torch.device(device).type == "cpu" else None
    )
    if advised is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return advised.view(dtype).view(shape)


def gather(model: nn.Module) -> None:
    """Move the CPU parameters and buffers of ``model`` into one mapping in 2 MiB pages.

    One storage at a time: each is copied, every tensor over it (tied weights, views)
    re-pointed at the copy with its own offset and strides, and the original freed, so the
    model is never held twice; a large storage's pages are given back as they are copied,
    so that loading peaks at the model plus a piece, not plus its largest tensor (the
    embedding table: 500 MB of Qwen3.5-0.8B's F16 file). The model's tensors must be the
    only ones over its storages, as a loader's are. Weights that are views of a
    checkpoint's mapped file (kept as stored) are copied only where the memory available
    holds them: a model larger than memory still runs from the file's pages. Nothing
    changes where the OS gives no such pages."""
    slots: dict[int, list[tuple[dict, str]]] = {}  # storage address -> where its tensors are
    sizes: dict[int, int] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or tensor.device.type != "cpu" or tensor.numel() == 0:
                    continue
                storage = tensor.untyped_storage()
                slots.setdefault(storage.data_ptr(), []).append((table, name))
                sizes[storage.data_ptr()] = storage.nbytes()
    if not hasattr(mmap, "MADV_HUGEPAGE"):  # not Linux: no /proc to read either
        return
    own = list(_OWN_PAGES.items())
    for address in [a for a in sizes if _in(a, own)]:  # in 2 MiB pages already (empty)
        del slots[address], sizes[address]
    files = _file_ranges()
    mapped = [a for a in sizes if _in(a, files)]
    if sum(sizes[a] for a in mapped) + HEADROOM > _available_bytes():
        for address in mapped:
            del slots[address], sizes[address]
    arena = _advised(sum(-(-n // ALIGN) * ALIGN for n in sizes.values()))
    if arena is None:
        return
    base = arena.storage_offset()
    heap = HeapTrimmer()  # the originals' memory back to the OS as they go, not at the end
    offset = 0
    for address, places in slots.items():
        nbytes = sizes[address]
        first_table, first_name = places[0]
        source = first_table[first_name].untyped_storage()
        _copy_releasing(
            arena[offset : offset + nbytes], torch.empty(0, dtype=torch.uint8).set_(source)
        )
        moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # tied weights stay one
        for table, name in places:
            old = table[name]
            if id(old) not in moved:
                new = torch.empty(0, dtype=old.dtype).set_(
                    arena.untyped_storage(),
                    (base + offset) // old.element_size() + old.storage_offset(),
                    old.shape,
                    old.stride(),
                )
                if isinstance(old, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=False)
                moved[id(old)] = (old, new)
            table[name] = moved[id(old)][1]
        del source, moved, old
        offset += -(-nbytes // ALIGN) * ALIGN
        heap.placed(nbytes)


def _copy_releasing(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy the bytes ``source`` into ``target`` a piece at a time, giving the OS back each
    whole page of the source once copied (MADV_DONTNEED: heap pages come back as zeros if
    touched again, a file's re-read from it)."""
    page = mmap.PAGESIZE
    start = source.data_ptr()
    released = -(-start // page) * page  # the first whole page
    for first in range(0, source.numel(), COPY_PIECE):
        last = min(first + COPY_PIECE, source.numel())
        target[first:last].copy_(source[first:last])
        done = (start + last) // page * page
        if done > released:
            _libc().madvise(
                ctypes.c_void_p(released), ctypes.c_size_t(done - released), mmap.MADV_DONTNEED
            )
            released = done


@functools.cache
def _libc():
    """The C library's functions (this process's own symbols)."""
    return ctypes.CDLL(None)


def _file_ranges() -> list[tuple[int, int]]:
    """The address ranges at which this process maps files."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[4] != "0":  # an inode: a file
                low, high = (int(a, 16) for a in fields[0].split("-"))
                ranges.append((low, high))
    return ranges


def _in(address: int, ranges: list[tuple[int, int]]) -> bool:
    return any(low <= address < high for low, high in ranges)


def _available_bytes() -> int:
    """The kernel's estimate of memory available without swapping (page cache included)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def describe_pages() -> str:
    """The pages the weights and KV cache get here, for bench and /show: what a user can
    change when they are 4 KiB (decode ran ~20% slower on them, Intel Xeon, 2 threads)."""
    try:
        setting = THP_SETTING.read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        setting = None
    if setting in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        return f"2 MiB for weights and KV cache (transparent huge pages: {setting})"
    if setting is None:
        return "4 KiB (no transparent huge pages on this OS)"
    return (
        f"4 KiB (transparent huge pages: {setting}; `echo madvise | sudo tee {THP_SETTING}` "
        "makes decode ~20% faster)"
    )


class HeapTrimmer:
    """Returns freed heap memory every ``TRIM_EVERY`` elements of weights placed (or bytes
    gathered), so that building a model peaks near its final size, not at the sum of the
    freed temporaries the allocator kept between the weights (trimming costs ~30 ms: not
    per tensor)."""

    TRIM_EVERY = 1 << 26

    def __init__(self):
        self.untrimmed = 0

    def placed(self, elements: int) -> None:
        self.untrimmed += elements
        if self.untrimmed >= self.TRIM_EVERY:
            return_freed_memory()
            self.untrimmed = 0


def return_freed_memory() -> None:
    """Give the heap's free memory back to the OS. Loading frees a tensor-sized temporary
    per weight; glibc keeps such blocks for reuse, which would leave hundreds of MB of
    resident memory the model never uses again."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        _libc().malloc_trim(0)
