"""Native CPU kernels, compiled on first use with torch's C++ extension builder.

linear.cpp holds the matrix products of every weight format (float, bfloat16, half,
int8, int4), quantize.cpp the quantization of weights at load, layer_ops.cpp the small
operations of a decoder layer (RMSNorm, q/k norm with RoPE and the cache write, decode
attention, SwiGLU), decode_layer.cpp a decode step of the decoder layers built from
them, one call per token (and a step of several sequences over a paged KV cache, one
call per step), and top_k.cpp the k largest logits that top-k sampling draws from.
They need a C++ compiler and an x86-64 CPU with AVX2, or a 64-bit ARM CPU and the SIMDe
headers (which translate the x86 intrinsics to NEON; the integer products use ARM's
dot-product instructions, and the integer GEMM its int8 matrix multiply, where the CPU has
them); without these, or when the build fails, ``native()`` returns None, a warning says
why (once), and callers run the plain torch code, which is correct everywhere and is what
the kernels are tested against.
The build is cached by torch (TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCES = (
    "bindings.cpp",
    "linear.cpp",
    "quantize.cpp",
    "gguf_blocks.cpp",
    "layer_ops.cpp",
    "delta_net.cpp",
    "decode_layer.cpp",
    "top_k.cpp",
    "subnormals.cpp",
    "thread_pool.cpp",
)
# Loading a cached build takes well under a second; a longer wait is a compile, which the
# user is told about rather than left facing a silent pause.
_NOTICE_AFTER_S = 2.0
# A build holds a lock file in its folder; one stopped without its cleanup (a closed
# terminal, a killed process) leaves it, and torch's next build waits on it forever. A
# build takes a minute or two, so a lock this old is such a one.
_STALE_LOCK_S = 600
# A failed build's message carries ninja's output, whose first line is a whole compiler
# command: the warning names the compiler's first error line (or else keeps this much of
# the first line); the whole output is logged at debug level.
_REASON_MAX_CHARS = 200


def _unavailable(reason: str) -> None:
    """Tell the user, once per process (``_module`` is cached), why the fast path is off:
    without it everything still works, only slower, which would otherwise go unexplained."""
    log.warning("native CPU kernels unavailable (%s), using the slower torch path", reason)


def _cause(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    line = next((x for x in lines if "error:" in x), lines[0] if lines else type(e).__name__)
    if len(line) > _REASON_MAX_CHARS:
        line = line[: _REASON_MAX_CHARS - 3] + "..."
    return line


# What the kernels run on this CPU, by kind of work (set where the module loads).
_CHOICES: dict[str, str] = {}


def variants(device: torch.device) -> dict[str, str]:
    """Which code runs each kind of work on ``device``, for bench and /show: on the CPU
    the native kernels' choices for this processor, or the torch path where they cannot
    run."""
    if device.type != "cpu":
        return {"all work": f"torch on {device.type}"}
    if _module() is None:
        return {"native kernels": "unavailable (torch path)"}
    return dict(_CHOICES)


def describe_variants(device: torch.device) -> str:
    return ", ".join(f"{work}: {code}" for work, code in variants(device).items())


# The kinds of work whose code depends on the CPU.
_WORK = (
    "one-row float/bf16/f16 products",
    "one-row int8/int4 products",
    "int8/int4 GEMMs (8+ rows, 4+ with VNNI)",
    "int8/int4 products (any rows, groups of 32)",
    "bf16 products of 4+ rows",
    "attention over a bf16 or int8 cache",
    "norms, rotary embedding, SwiGLU, delta rule",
)
# SIMDe's headers, where ARM builds look for them: the compiler's own paths, and Homebrew's.
_SIMDE_DIRS = ("/usr/include", "/usr/local/include", "/opt/homebrew/include")
_SIMDE_HINT = "install SIMDe (Debian/Ubuntu: libsimde-dev, Fedora: simde-devel, Homebrew: simde)"
# getauxval's bits (Linux) for ARM's dot-product instructions (AT_HWCAP) and its int8
# matrix multiply (AT_HWCAP2), and the sysctl names macOS gives them.
_DOTPROD = (16, 1 << 20, "hw.optional.arm.FEAT_DotProd")
_I8MM = (26, 1 << 13, "hw.optional.arm.FEAT_I8MM")


@dataclasses.dataclass(frozen=True)
class _Target:
    """What a build for this kind of CPU assumes: its name (one per architecture, so that
    a home directory that machines of both share keeps a build of each), the compiler
    flags, and the code each kind of work runs before the extensions (x86's AVX-512 and
    VNNI, ARM's dot product and int8 matrix multiply) are asked for."""

    name: str
    flags: tuple[str, ...]
    variants: dict[str, str]
    # ARM: the dot product and int8 matrix multiply asked for. x86: int8/int4 weights in
    # groups of 32 held interleaved by 16 rows (x16_linear_of: AVX2's maddubs or
    # AVX512-VNNI; ARM's dot products take rows).
    arm: bool = False


def _arm_has(feature: tuple[int, int, str]) -> bool:
    """Whether this ARM CPU has ``feature`` (_DOTPROD, _I8MM): on Linux as the kernel's
    hardware capabilities say, on macOS as sysctl does."""
    auxv, bit, sysctl = feature
    try:
        libc = ctypes.CDLL(None)
        if sys.platform == "darwin":
            value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
            found = libc.sysctlbyname(
                sysctl.encode(), ctypes.byref(value), ctypes.byref(size), None, 0
            )
            return found == 0 and value.value == 1
        return bool(libc.getauxval(auxv) & bit)
    except (OSError, AttributeError):
        return False


def _simde_flags() -> tuple[str, ...] | None:
    """The include flag that finds SIMDe (none where the compiler looks already), or None
    where it is not installed."""
    env = [
        d
        for var in ("CPATH", "CPLUS_INCLUDE_PATH")
        for d in os.environ.get(var, "").split(os.pathsep)
        if d
    ]
    for base in env + list(_SIMDE_DIRS):
        if (Path(base) / "simde/x86/avx2.h").is_file():
            return () if base in env or base.startswith("/usr/") else (f"-I{base}",)
    return None


def _target() -> _Target | str:
    """The build for this CPU, or why there is none."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        capability = torch.backends.cpu.get_cpu_capability()
        if capability not in ("AVX2", "AVX512"):
            return f"the CPU lacks AVX2: torch reports its capability as {capability}"
        variants = dict.fromkeys(_WORK, "AVX2")
        variants["int8/int4 products (any rows, groups of 32)"] = "AVX2, 16 rows interleaved"
        variants["attention over a bf16 or int8 cache"] = "AVX2; int8 scores in integers"
        variants["bf16 products of 4+ rows"] = "AVX2; packed panels from 64 rows"
        return _Target("qwen3chat_kernels", ("-mavx2", "-mfma", "-mf16c"), variants)
    if machine in ("aarch64", "arm64"):
        simde = _simde_flags()
        if simde is None:
            return f"SIMDe headers not found: {_SIMDE_HINT}"
        variants = dict.fromkeys(_WORK, "NEON (SIMDe)")
        return _Target("qwen3chat_kernels_arm64", ("-march=armv8-a", *simde), variants, arm=True)
    return f"no native kernels for {platform.machine()} CPUs"


def _clear_stale_lock(name: str) -> None:
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > _STALE_LOCK_S:
        lock.unlink(missing_ok=True)
        log.warning("removed %s, left by a kernel build that was stopped", lock)


@functools.cache
def _module():
    target = _target()
    if isinstance(target, str):
        _unavailable(target)
        return None
    if shutil.which("c++") is None and shutil.which("g++") is None:
        _unavailable("no C++ compiler found: install g++")
        return None
    try:
        from torch.utils.cpp_extension import load

        here = Path(__file__).parent
        _clear_stale_lock(target.name)
        notice = threading.Timer(
            _NOTICE_AFTER_S,
            log.warning,
            ["compiling the native CPU kernels (once per install, about a minute)..."],
        )
        notice.start()
        try:
            module = load(
                name=target.name,
                sources=[str(here / name) for name in _SOURCES],
                extra_include_paths=[str(here)],
                extra_cflags=["-O3", *target.flags, "-fopenmp"],
                # Without OpenMP, at::parallel_for in an extension runs on one thread
                # (subnormals.cpp's turn on each of torch's workers).
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        finally:
            notice.cancel()
        # torch's check covers what the OS allows, not only what cpuid reports (all False
        # off x86).
        wide, vnni = _avx512(), _avx512_vnni()
        bf16 = wide and _avx512_bf16()
        amx = vnni and _amx_int8()
        avx_vnni = not vnni and _avx_vnni(module)
        module.set_native_bf16_gemm(bf16)
        module.set_avx512_vnni(vnni)
        module.set_avx_vnni(avx_vnni)
        dotprod = target.arm and _arm_has(_DOTPROD)
        i8mm = dotprod and _arm_has(_I8MM)
        module.set_dotprod(dotprod)
        module.set_i8mm(i8mm)
        module.set_amx_int8(amx)
        module.set_avx512_attention(wide)
        module.set_avx512_rows(wide)
        # Integer scores: maddubs on AVX2, vpdpbusd with AVX-512; AVX-512 without VNNI
        # widens the keys to floats.
        module.set_integer_scores(not wide or vnni)
        module.set_avx512_products(wide)
        # From here on this thread, the parallel workers and threads started later (the
        # server's engine) flush subnormal floats to zero: see subnormals.cpp.
        module.flush_subnormals()
        _CHOICES.update(target.variants)
        if wide:
            _CHOICES["one-row float/bf16/f16 products"] = "AVX-512"
            _CHOICES["attention over a bf16 or int8 cache"] = "AVX-512"
            _CHOICES["norms, rotary embedding, SwiGLU, delta rule"] = "AVX-512"
            _CHOICES["bf16 products of 4+ rows"] = "AVX-512; packed panels from 32 rows"
        if avx_vnni:
            _CHOICES["int8/int4 GEMMs (8+ rows, 4+ with VNNI)"] = "AVX-VNNI"
        if dotprod:
            _CHOICES["one-row int8/int4 products"] = "NEON dot product"
            _CHOICES["int8/int4 GEMMs (8+ rows, 4+ with VNNI)"] = "NEON dot product"
        if i8mm:
            _CHOICES["int8/int4 GEMMs (8+ rows, 4+ with VNNI)"] = "NEON int8 matrix multiply"
        if vnni:
            _CHOICES["int8/int4 GEMMs (8+ rows, 4+ with VNNI)"] = "AVX512-VNNI"
            _CHOICES["int8/int4 products (any rows, groups of 32)"] = (
                "AVX512-VNNI, 16 rows interleaved"
            )
        if wide and vnni:
            _CHOICES["attention over a bf16 or int8 cache"] = "AVX-512; int8 scores AVX512-VNNI"
        if bf16:
            _CHOICES["bf16 products of 4+ rows"] = "oneDNN (AVX512-BF16)"
        if amx:
            _CHOICES["int8/int4 products (any rows, groups of 32)"] = (
                "AVX512-VNNI, 16 rows interleaved; AMX-INT8 from 9 rows"
            )
        return module
    except Exception as e:  # no headers, ninja or a compile error: the torch path still works
        log.debug("native CPU kernel build failed", exc_info=True)
        _unavailable(f"build failed: {_cause(e)}")
        return None


def _avx512() -> bool:
    """AVX-512 (F, BW, DQ, VL) as torch sees it, which checks that the OS saves the
    registers; QWEN3CHAT_NO_AVX512=1 turns it off."""
    return os.environ.get("QWEN3CHAT_NO_AVX512") != "1" and torch.cpu._is_avx512_supported()


def _avx512_bf16() -> bool:
    """AVX512-BF16 as torch sees it, where oneDNN's bf16 GEMM runs bf16 prompts (AMX-BF16
    where granted); QWEN3CHAT_NO_AVX512_BF16=1 turns it off (the products of CPUs with
    AVX-512 and no BF16, as Ice Lake and Cascade Lake servers)."""
    if os.environ.get("QWEN3CHAT_NO_AVX512_BF16") == "1":
        return False
    return torch.cpu._is_avx512_bf16_supported()


def _avx512_vnni() -> bool:
    """AVX512-VNNI and the AVX512-BW it needs, as torch sees them (cpuinfo, which checks
    that the OS saves the registers too); QWEN3CHAT_NO_AVX512_VNNI=1 turns them off (the
    tests compare both kernels)."""
    if os.environ.get("QWEN3CHAT_NO_AVX512_VNNI") == "1":
        return False
    return torch.cpu._is_vnni_supported() and torch.cpu._is_avx512_supported()


def _avx_vnni(module) -> bool:
    """AVX-VNNI (ymm vpdpbusd: Intel's client CPUs since Alder Lake, its E-core Xeons, AMD
    since Zen 5) as cpuid reports it, which the kernels ask themselves (torch does not);
    its registers are AVX's, which the OS saves wherever AVX2 runs. QWEN3CHAT_NO_AVX_VNNI=1
    turns it off (the tests compare both kernels)."""
    return os.environ.get("QWEN3CHAT_NO_AVX_VNNI") != "1" and module.cpu_avx_vnni()


def _amx_int8() -> bool:
    """AMX-INT8 tiles where cpuid reports them, the OS saves their state and grants it to
    this process (torch asks Linux for it: a VM may report the tiles and refuse them);
    QWEN3CHAT_NO_AMX=1 turns them off."""
    if os.environ.get("QWEN3CHAT_NO_AMX") == "1":
        return False
    return torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx()


def interleaves(device: torch.device | str) -> bool:
    """Whether int8 and int4 weights in groups of 32 (and int8 with one scale a row) are
    held interleaved by 16 rows on ``device`` (quant.py's QuantizedWeight), as linear.cpp's
    products of them read them (``x16_linear_of``): on an x86 CPU with a build here."""
    if torch.device(device).type != "cpu" or native(torch.empty(0)) is None:
        return False
    target = _target()
    return isinstance(target, _Target) and not target.arm


def native(x: torch.Tensor):
    """The kernel module for activations ``x``, or None where they cannot run (not on
    the CPU, a dtype they do not cover, or no build here)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    return _module()
