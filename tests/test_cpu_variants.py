"""Kernels chosen per CPU: the build this machine made (and caches) runs on a CPU with
fewer instruction sets, choosing only what that CPU allows. Checked by running it under
``qemu-x86_64 -cpu Haswell`` (AVX2, FMA, F16C; no AVX-512), where an AVX-512 instruction
would end the process with SIGILL: a home directory shared between machines reuses the
cached build the same way."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from qwen3chat import kernels

QEMU = shutil.which("qemu-x86_64")

# A tiny model (head_dim 32, so that the int8 cache applies) decoding natively and through
# the torch code, float and int4 weights, bf16 and int8 caches; what the kernels chose.
SCRIPT = """
import dataclasses, json, torch
from qwen3chat import kernels
from qwen3chat.loading import random_model
from qwen3chat.presets import preset_config
from qwen3chat.quant import QuantSpec

torch.manual_seed(0)
native = kernels.native(torch.zeros(1))
out = {"built": native is not None, "variants": kernels.variants(torch.device("cpu"))}
config = dataclasses.replace(preset_config("tiny"), head_dim=32)
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
    # Everything AVX2 (VNNI and AVX-512 refused), bf16 products widened.
    assert set(out["variants"].values()) == {"AVX2"}, out["variants"]
    assert max(out["errors"]) < 0.1, out["errors"]
