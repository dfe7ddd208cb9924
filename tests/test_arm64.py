"""The kernels on 64-bit ARM Linux, emulated: torch's extension builder in an arm64 Python
under qemu-aarch64 compiles them with Debian's cross compiler (which it runs natively),
through SIMDe, with ARM's dot-product and int8 matrix multiply instructions in functions
compiled for them, and the kernel tests run there against the torch code. Three CPUs:
qemu's ``max`` (dot product and int8 matrix multiply, as Graviton 3), a Neoverse-N1 (dot
product alone, as Graviton 2) and a Cortex-A72 (NEON alone, as a Raspberry Pi 4), all
three running one build, which chooses what runs from what the CPU has. The emulated
system is made by .ci/arm64-env (CI does); without it these are skipped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARM = Path(os.environ.get("QWEN3CHAT_ARM64_ENV", REPO / ".arm64"))
QEMU = shutil.which("qemu-aarch64")
CROSS = shutil.which("aarch64-linux-gnu-g++")

pytestmark = pytest.mark.skipif(
    not (ARM / "ready").exists() or QEMU is None or CROSS is None,
    reason=f"no emulated ARM system at {ARM}: make it with .ci/arm64-env {ARM}",
)

# On the CPU with the int8 matrix multiply: the products (every weight format, one row and
# many), the per-layer operations, attention over contiguous, paged and int8 caches, paged
# decode steps of whole models against the contiguous ones (and its integer GEMM against
# the dot-product one, bit for bit), and GGUF blocks converted at load against gguf-py.
# Without those only the integer products differ. Left to x86: the float products' widths
# that test AVX-512's last steps (512, 288), attention over 1025 keys (130 and 141 take the
# same path, asking for rows ahead) and long prompts' paged attention (torch's SDPA): under
# emulation they were half of the tests' time (~110 of 216 s).
PRODUCTS = ["tests/test_quant.py", "-k", "linear_matches or int4_product or native_quantization"]
EVERYTHING = [
    "tests/test_quant.py",
    "tests/test_kernels.py::test_dense_linear",
    "tests/test_kernels.py::test_decode_attention",
    "tests/test_kernels.py::test_projection_and_cache_write",
    "tests/test_kv_int8.py::test_native_cache_writes_are_the_torch_quantization",
    "tests/test_kv_int8.py::test_decode_attention_reads_int8_rows",
    "tests/test_paged_kernels.py::test_paged_attention",
    "tests/test_paged_kernels.py::test_one_decode_row_is_the_contiguous_decode_step",
    "tests/test_gguf_blocks.py",
    "-k",
    "not (test_dense_linear and (512 or 288)) and not 1025"
    " and not (test_paged_attention and sequences1)",
]

# What the build chose, on the first line, then the tests, in one process: importing torch
# takes ~20 s emulated. The checkout's addopts are pytest-xdist's, which the emulated
# system does without.
VARIANTS_THEN_TESTS = """
import json, platform, sys, pytest, torch
from qwen3chat import kernels
build = getattr(kernels.native(torch.zeros(1)), "__name__", None)
print(json.dumps([platform.machine(), build, kernels.variants(torch.device("cpu"))]), flush=True)
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", *sys.argv[1:]]))
"""


def emulated(cpu: str, *args: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "QEMU_LD_PREFIX": str(ARM / "root"),
        "QEMU_CPU": cpu,
        "PYTHONPATH": f"{ARM / 'site'}:{REPO}",
        "CXX": CROSS,
        "CPATH": f"{ARM / 'include'}:{ARM / 'root/usr/include/python3.11'}",
        "TORCH_EXTENSIONS_DIR": str(ARM / "extensions"),
    }
    python = str(ARM / "root/usr/bin/python3.11")
    return subprocess.run(
        [QEMU, python, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500
    )


@pytest.mark.parametrize(
    "cpu,int_products,integer_gemm,tests",
    [
        ("max", "NEON dot product", "NEON int8 matrix multiply", EVERYTHING),
        ("neoverse-n1", "NEON dot product", "NEON dot product", PRODUCTS),
        ("cortex-a72", "NEON (SIMDe)", "NEON (SIMDe)", PRODUCTS),
    ],
)
def test_the_kernels_build_and_pass_their_tests_on_arm(cpu, int_products, integer_gemm, tests):
    result = emulated(cpu, "-c", VARIANTS_THEN_TESTS, *tests)
    lines = result.stdout.strip().splitlines()
    assert lines and lines[0].startswith("["), result.stdout[-2000:] + result.stderr[-2000:]
    machine, build, variants = json.loads(lines[0])
    assert (machine, build) == ("aarch64", "qwen3chat_kernels_arm64"), result.stderr[-2000:]
    assert variants["one-row int8/int4 products"] == int_products
    assert variants["int8/int4 GEMMs (8+ rows, 4+ with VNNI)"] == integer_gemm
    assert set(variants.values()) <= {int_products, integer_gemm, "NEON (SIMDe)"}, variants
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in lines[-1] and "failed" not in lines[-1], lines[-1]
