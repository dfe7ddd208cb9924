"""The weights and KV caches in memory advised for 2 MiB pages (memory.py)."""

import json
import mmap
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from torch import nn

from qwen3chat import memory
from qwen3chat.kv_cache import KVCache, PagedKVCache
from qwen3chat.loading import load_model
from qwen3chat.weights import gguf_quants

ADVISED = hasattr(mmap, "MADV_HUGEPAGE") and "4 KiB" not in memory.describe_pages()
needs_advice = pytest.mark.skipif(not ADVISED, reason="no transparent huge pages on this OS")


def advised_for_huge_pages(address: int) -> bool:
    """Whether the mapping holding ``address`` carries MADV_HUGEPAGE (smaps' ``hg``)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                return "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def tensors_of(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in [*model.parameters(), *model.buffers()] if t.numel()]


@needs_advice
def test_loaded_weights_share_one_advised_mapping_and_give_the_same_logits(
    tiny_model_dir, monkeypatch
):
    path, _ = tiny_model_dir
    gathered = load_model(path, device="cpu", dtype="float32").model
    monkeypatch.setattr(memory, "_advised", lambda *args, **kwargs: None)  # none: no gathering
    apart = load_model(path, device="cpu", dtype="float32").model
    storages = {t.untyped_storage().data_ptr() for t in tensors_of(gathered)}
    assert len(storages) == 1
    assert advised_for_huge_pages(storages.pop())
    assert len({t.untyped_storage().data_ptr() for t in tensors_of(apart)}) > 1
    for t in tensors_of(gathered):
        assert t.data_ptr() % memory.ALIGN == 0 and not t.requires_grad
    for (name, a), (_, b) in zip(
        gathered.state_dict().items(), apart.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 500, 7000, 42, 9]])
    with torch.no_grad():
        assert torch.equal(gathered(ids), apart(ids))


class Tied(nn.Module):
    """A tied parameter in two modules, a buffer viewing part of it as another dtype, and
    a small parameter of its own storage."""

    def __init__(self):
        super().__init__()
        table = nn.Parameter(torch.randn(1024, 1024), requires_grad=False)
        self.first, self.second = nn.Module(), nn.Module()
        self.first.weight = table
        self.second.weight = table
        self.first.register_buffer("bits", table.view(torch.int32)[8:16, 3:900:2])
        self.bias = nn.Parameter(torch.randn(5).to(torch.bfloat16), requires_grad=False)


@needs_advice
def test_gather_keeps_ties_views_and_values():
    model = Tied()
    table, bits, bias = (
        model.first.weight.clone(),
        model.first.bits.clone(),
        model.bias.clone(),
    )
    stride = model.first.bits.stride()
    memory.gather(model)
    assert model.first.weight is model.second.weight
    assert isinstance(model.first.weight, nn.Parameter)
    assert torch.equal(model.first.weight, table) and torch.equal(model.bias, bias)
    assert model.first.bits.stride() == stride and torch.equal(model.first.bits, bits)
    assert model.bias.dtype == torch.bfloat16
    model.first.weight.view(torch.int32)[8, 3] = 12345  # still a view of the table
    assert model.first.bits[0, 0] == 12345
    assert (
        model.bias.untyped_storage().data_ptr() == model.first.weight.untyped_storage().data_ptr()
    )
    assert advised_for_huge_pages(model.bias.data_ptr())


@needs_advice
def test_weights_loaded_into_their_own_huge_pages_stay_where_they_are():
    """memory.empty (a loader's weights of 2 MiB and more, and their fused concatenations)
    is a mapping advised for 2 MiB pages, exactly that long: gather leaves such weights in
    place (no second copy of a model at load) and gathers the rest."""
    model = nn.Linear(1, 1)
    big = memory.empty((1024, 1024), torch.float32).copy_(torch.arange(1 << 20).view(1024, 1024))
    fused = memory.cat([big, big[:16]], 0)
    assert fused.shape == (1040, 1024) and torch.equal(fused[1024:], big[:16])
    model.big = nn.Parameter(big, requires_grad=False)
    model.register_buffer("fused", fused)
    model.rest = nn.Parameter(torch.ones(1 << 20), requires_grad=False)  # torch's memory
    # Below a page: torch's own memory (resizable, unlike a mapping's), no mapping of ours.
    # Not "not advised": numpy advises the arrays of 4 MiB and more it takes from the heap,
    # and the heap hands those pages out again in small pieces.
    mappings = len(memory._OWN_PAGES)
    small = memory.empty((16,), torch.float32)
    assert small.untyped_storage().resizable() and len(memory._OWN_PAGES) == mappings
    address = big.data_ptr()
    memory.gather(model)
    assert model.big.data_ptr() == address and model.fused.data_ptr() == fused.data_ptr()
    assert advised_for_huge_pages(address) and advised_for_huge_pages(fused.data_ptr())
    assert torch.equal(model.big, torch.arange(1 << 20).view(1024, 1024).float())
    # The rest gathered into one mapping of such pages.
    assert model.rest.untyped_storage().data_ptr() == model.weight.untyped_storage().data_ptr()
    assert advised_for_huge_pages(model.rest.data_ptr()) and model.rest.sum() == 1 << 20


def in_own_pages(tensor: torch.Tensor) -> bool:
    address = tensor.data_ptr()
    return any(start <= address < end for start, end in memory._OWN_PAGES.items())


@needs_advice
@pytest.mark.parametrize(
    "qtype", [GGMLQuantizationType.F16, GGMLQuantizationType.Q4_0], ids=["F16", "Q4_0"]
)
def test_gguf_parts_the_loader_drops_stay_out_of_huge_pages(qtype):
    """A GGUF tensor the model keeps as decoded goes into 2 MiB pages of its own; one the
    loader fuses with others (or quantizes) and drops goes into torch's memory, whose
    pages fault in many times faster on a VM that hands free memory back to its host."""
    rows, cols = 4096, 1024
    if qtype == GGMLQuantizationType.F16:
        raw = np.ones((rows, cols), dtype=np.float16)
    else:  # Q4_0 blocks: a float16 scale, 16 bytes of codes
        raw = np.zeros((rows, cols // 32, 18), dtype=np.uint8)
    for kept in (True, False):
        decoded = gguf_quants.decode(raw, qtype, (rows, cols), torch.bfloat16, kept=kept)
        data = decoded if isinstance(decoded, torch.Tensor) else decoded.codes
        assert data.nbytes >= 2 << 20
        assert in_own_pages(data) == kept
        if kept:
            assert advised_for_huge_pages(data.data_ptr())


# A 256 MiB weight gathered in a fresh process: its resident memory before, the peak after.
PEAK = """
import json, torch
from torch import nn
from qwen3chat import memory
from qwen3chat.bench.run import current_rss_mb, peak_rss_mb
model = nn.Linear(1, 1)
model.table = nn.Parameter(torch.arange(1 << 26, dtype=torch.float32), requires_grad=False)
before = current_rss_mb()
memory.gather(model)
peak = peak_rss_mb()
same = bool(torch.equal(model.table, torch.arange(1 << 26, dtype=torch.float32)))
print(json.dumps({"growth": peak - before, "same": same}))
"""


@needs_advice
def test_gathering_a_large_weight_never_holds_it_twice():
    """The copy gives the source's pages back a piece at a time: the peak grows by about a
    piece or two (64 MiB each), not by the 256 MiB weight; the values arrive intact."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["same"]
    assert out["growth"] < 192, out  # held twice: 256 and more


@needs_advice
def test_caches_start_on_huge_pages_and_read_zero():
    cache = KVCache(2, 4, 64, 4096, torch.bfloat16)
    paged = PagedKVCache(2, 4, 64, 256, 16, torch.int8)
    for t in (cache.k, cache.v, paged.k, paged.v):
        assert t.data_ptr() % memory.HUGE_PAGE == 0 and advised_for_huge_pages(t.data_ptr())
        assert not t.any()
    cache.k[1, 0, 3, 4000, 5] = 1.5
    assert cache.k.sum() == 1.5 and not cache.v.any()


def test_small_or_other_devices_get_torch_zeros():
    small = memory.zeros((16, 16), torch.float32, "cpu")
    assert small.shape == (16, 16) and not small.any()
    meta = memory.zeros((1 << 22,), torch.float32, "meta")
    assert meta.device.type == "meta"


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        (
            "always [madvise] never\n",
            "2 MiB for weights and KV cache (transparent huge pages: madvise)",
        ),
        (
            "[always] madvise never\n",
            "2 MiB for weights and KV cache (transparent huge pages: always)",
        ),
        ("always madvise [never]\n", "4 KiB (transparent huge pages: never; `echo madvise"),
        (None, "4 KiB (no transparent huge pages on this OS)"),
    ],
)
def test_describe_says_what_pages_and_how_to_get_big_ones(tmp_path, monkeypatch, setting, says):
    path = tmp_path / "enabled"
    if setting is not None:
        path.write_text(setting)
    monkeypatch.setattr(memory, "THP_SETTING", path)
    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 14, raising=False)
    assert memory.describe_pages().startswith(says)
