"""Kernels chosen per CPU: the build this machine made (and caches) runs on a CPU with
fewer instruction sets, choosing only what that CPU allows. Checked by running it under
``qemu-x86_64 -cpu Haswell`` (AVX2, FMA, F16C; no AVX-512), where an AVX-512 instruction
would end the process with SIGILL: a home directory shared between machines reuses the
cached build the same way."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3chat import kernels

QEMU = shutil.which("qemu-x86_64")

# A tiny model (head_dim 32, so that the int8 cache applies) decoding natively and through
# the torch code, float and int4 weights, bf16 and int8 caches; what the kernels chose. Its
# vocabulary is cut to 1024 ids: drawing the full one's embedding took 24 s emulated.
SCRIPT = """
import dataclasses, json, torch
from qwen3chat import kernels
from qwen3chat.loading import random_model
from qwen3chat.presets import preset_config
from qwen3chat.quant import QuantSpec

torch.manual_seed(0)
native = kernels.native(torch.zeros(1))
out = {"built": native is not None, "variants": kernels.variants(torch.device("cpu"))}
config = dataclasses.replace(preset_config("tiny"), head_dim=32, vocab_size=1024)
tokens = torch.tensor([[5, 17, 300, 42, 9, 1000, 77, 8, 15, 2, 6, 90]])
errors = []
for quantize, kv in (("none", None), ("int4", torch.int8)):
    model = random_model(config, torch.bfloat16, torch.device("cpu"), std=0.5,
                         quant=QuantSpec.parse(quantize))
    def run():
        cache = model.new_cache(32, kv)
        with torch.no_grad():
            logits = [model(tokens[:, :9], cache, 0)]
            logits += [model(tokens[:, i : i + 1], cache, i) for i in range(9, 12)]
        return torch.cat(logits).float()
    ours = run()
    kernels.native = lambda x: None
    theirs = run()
    kernels.native = lambda x, module=native: module
    errors.append(((ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)).max().item())
out["errors"] = errors
print(json.dumps(out))
"""


@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 is not installed (Debian: qemu-user)")
@pytest.mark.skipif(kernels.native(torch.zeros(1)) is None, reason="no native kernels here")
def test_this_build_runs_on_an_avx2_only_cpu():
    result = subprocess.run(
        [QEMU, "-cpu", "Haswell", sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["built"]
    # Everything AVX2 (VNNI and AVX-512 refused), bf16 products on packed panels.
    assert {re.split("[,;]", code)[0] for code in out["variants"].values()} == {"AVX2"}, out[
        "variants"
    ]
    assert max(out["errors"]) < 0.1, out["errors"]


GEMMS = "int8/int4 GEMMs (8+ rows, 4+ with VNNI)"


@pytest.mark.skipif(kernels.native(torch.zeros(1)) is None, reason="no native kernels here")
@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo to check")
def test_integer_gemms_take_avx_vnni_where_the_cpu_has_it_and_avx512_vnni_is_off():
    """cpuid's AVX-VNNI, as the kernels read it, is what Linux reports; with AVX512-VNNI
    turned off the integer GEMMs run AVX-VNNI exactly where the CPU has it (and AVX2 when
    that too is turned off), and `bench` and /show say so."""
    flags = next(
        line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
    ).split()
    has = "avx_vnni" in flags
    assert kernels.native(torch.zeros(1)).cpu_avx_vnni() == has
    script = (
        "import json, torch; from qwen3chat import kernels; "
        f"print(json.dumps(kernels.variants(torch.device('cpu'))[{GEMMS!r}]))"
    )
    for off, expected in (("0", "AVX-VNNI" if has else "AVX2"), ("1", "AVX2")):
        env = {**os.environ, "QWEN3CHAT_NO_AVX512_VNNI": "1", "QWEN3CHAT_NO_AVX_VNNI": off}
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


# bf16 activations by bf16 weights, 101 rows: oneDNN's GEMM where AVX512-BF16 runs,
# packed panels otherwise (the AVX-512 form's bits and the AVX2 form's compared).
BF16_ROWS = """
import json, torch
from qwen3chat import kernels
native = kernels._module()
g = torch.Generator().manual_seed(0)
w = torch.randn(200, 96, generator=g).bfloat16()
x = torch.randn(101, 96, generator=g).bfloat16()
wide = native.dense_linear(x, w)
native.set_avx512_products(False)
out = {"variant": kernels.variants(torch.device("cpu"))["bf16 products of 4+ rows"],
       "same": torch.equal(native.dense_linear(x, w), wide)}
print(json.dumps(out))
"""


@pytest.mark.skipif(not kernels._avx512(), reason="this CPU (or its OS) does not allow AVX-512")
def test_without_avx512_bf16_bf16_prompts_take_the_avx512_panels():
    """QWEN3CHAT_NO_AVX512_BF16=1 (the products of AVX-512 CPUs without BF16, as Ice Lake
    and Cascade Lake servers): bf16 prompts leave oneDNN for the AVX-512 panels, which
    give the AVX2 panels' bits, and `bench` and /show say so."""
    env = {**os.environ, "QWEN3CHAT_NO_AVX512_BF16": "1"}
    result = subprocess.run(
        [sys.executable, "-c", BF16_ROWS], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"variant": "AVX-512; packed panels from 32 rows", "same": True}


# 1e-30 * 1e-10 is a subnormal float (1e-40), or 0 where they are flushed: over 4M values
# torch's multiply runs on every worker thread.
SUBNORMALS = """
import json, threading, torch
torch.set_num_threads(2)
def kept():
    return (torch.full((1 << 22,), 1e-30) * 1e-10).ne(0).sum().item()
before = kept()
from qwen3chat import kernels
kernels.native(torch.zeros(1))
out = {"before": before, "after": kept()}
thread = threading.Thread(target=lambda: out.update(thread=kept()))
thread.start()
thread.join()
print(json.dumps(out))
"""


@pytest.mark.skipif(kernels.native(torch.zeros(1)) is None, reason="no native kernels here")
@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="subnormals are flushed on x86 only"
)
def test_subnormals_are_flushed_on_every_thread_once_the_kernels_load():
    """x86 computes subnormal floats ~100x slower (the hybrid generation's decays make
    thousands): once the kernels load, the loading thread, torch's worker threads and
    threads started later flush them to zero, which they did not before."""
    result = subprocess.run(
        [sys.executable, "-c", SUBNORMALS], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"before": 1 << 22, "after": 0, "thread": 0}
