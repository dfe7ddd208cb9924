"""Building the native kernels: a first use that compiles says so instead of pausing
silently, a quick load from torch's cache says nothing, and where the kernels cannot be
had the user is told why, once."""

from __future__ import annotations

import logging
import os
import time
import types

import pytest
import torch.utils.cpp_extension

from qwen3chat import kernels


@pytest.fixture
def fake_build(monkeypatch):
    """``kernels._module`` with the build replaced by a wait of ``seconds``."""
    monkeypatch.setattr(kernels.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(kernels.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(kernels, "_NOTICE_AFTER_S", 0.2)
    # A built module as far as loading goes: it takes the CPU's kernel choices.
    built = types.SimpleNamespace(
        set_native_bf16_gemm=lambda enabled: None,
        set_avx512_vnni=lambda enabled: None,
        set_avx_vnni=lambda enabled: None,
        cpu_avx_vnni=lambda: False,
        set_dotprod=lambda enabled: None,
        set_i8mm=lambda enabled: None,
        flush_subnormals=lambda: None,
        set_amx_int8=lambda enabled: None,
        set_avx512_attention=lambda enabled: None,
        set_avx512_rows=lambda enabled: None,
        set_integer_scores=lambda enabled: None,
        set_avx512_products=lambda enabled: None,
    )

    def run(seconds: float):
        monkeypatch.setattr(
            torch.utils.cpp_extension, "load", lambda **kw: time.sleep(seconds) or built
        )
        kernels._module.cache_clear()
        try:
            assert kernels._module() is built
        finally:
            kernels._module.cache_clear()  # the next caller loads the real module

    return run


def test_a_compile_is_announced(fake_build, caplog):
    with caplog.at_level(logging.WARNING, logger="qwen3chat.kernels"):
        fake_build(0.6)
    assert any("compiling the native CPU kernels" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("age_s,cleared", [(3600, True), (30, False)])
def test_a_lock_left_by_a_stopped_build_is_cleared(
    fake_build, monkeypatch, tmp_path, caplog, age_s, cleared
):
    """torch waits forever on a build's lock file that a killed build left behind; one far
    older than a build takes is removed (with a warning), a recent one is another build's."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "qwen3chat_kernels/lock"
    lock.parent.mkdir()
    lock.touch()
    os.utime(lock, (time.time() - age_s,) * 2)
    with caplog.at_level(logging.WARNING, logger="qwen3chat.kernels"):
        fake_build(0.0)
    assert lock.exists() != cleared
    assert (
        any("left by a kernel build that was stopped" in r.getMessage() for r in caplog.records)
        == cleared
    )


def test_a_cached_load_is_silent(fake_build, caplog):
    with caplog.at_level(logging.WARNING, logger="qwen3chat.kernels"):
        fake_build(0.0)
        time.sleep(0.4)  # past the notice's delay: it was cancelled, not just late
    assert not caplog.records


@pytest.fixture
def warnings_of_two_loads(monkeypatch, caplog):
    """The warnings of two ``kernels._module()`` calls from a clean cache, which both give
    None; the monkeypatching that makes the kernels unavailable is the test's."""

    def run() -> list[logging.LogRecord]:
        kernels._module.cache_clear()
        try:
            with caplog.at_level(logging.DEBUG, logger="qwen3chat.kernels"):
                assert kernels._module() is None
                assert kernels._module() is None
        finally:
            kernels._module.cache_clear()  # the next caller loads the real module
        return [r for r in caplog.records if r.levelno == logging.WARNING]

    return run


def _the_one_reason(warnings: list[logging.LogRecord]) -> str:
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "native CPU kernels unavailable" in message
    assert "slower torch path" in message
    assert "\n" not in message
    return message


def test_a_cpu_without_avx2_is_reported_once(monkeypatch, warnings_of_two_loads):
    monkeypatch.setattr(kernels.torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    message = _the_one_reason(warnings_of_two_loads())
    assert "AVX2" in message and "DEFAULT" in message


def test_a_missing_compiler_is_reported_once_with_the_fix(monkeypatch, warnings_of_two_loads):
    monkeypatch.setattr(kernels.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    message = _the_one_reason(warnings_of_two_loads())
    assert "no C++ compiler" in message and "install g++" in message


def test_a_failed_build_is_reported_once_in_one_line(monkeypatch, caplog, warnings_of_two_loads):
    monkeypatch.setattr(kernels.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(kernels.shutil, "which", lambda name: "/usr/bin/" + name)
    # What torch raises for a failed compile: ninja's output, a long command line first.
    command = "[1/5] c++ -MMD " + " ".join(f"-I/include/{i}" for i in range(100))
    failure = "Error building extension 'qwen3chat_kernels': " + command
    failure += "\nFAILED: layer_ops.o\nfatal error: kernels.h: No such file or directory"

    def load(**kw):
        raise RuntimeError(failure)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    message = _the_one_reason(warnings_of_two_loads())
    assert "build failed: fatal error: kernels.h: No such file or directory" in message
    assert "c++ -MMD" not in message
    assert len(message) < 400
    assert "fatal error: kernels.h: No such file or directory" in caplog.text  # at debug


def test_a_build_error_without_a_message_is_named_by_its_type(monkeypatch, warnings_of_two_loads):
    monkeypatch.setattr(kernels.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(kernels.shutil, "which", lambda name: "/usr/bin/" + name)

    def load(**kw):
        raise ImportError()

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    assert "build failed: ImportError" in _the_one_reason(warnings_of_two_loads())


def test_arm_without_simde_is_reported_once_with_the_fix(monkeypatch, warnings_of_two_loads):
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(kernels, "_simde_flags", lambda: None)
    message = _the_one_reason(warnings_of_two_loads())
    assert "SIMDe headers not found" in message and "libsimde-dev" in message


def test_other_cpus_are_reported_once_by_name(monkeypatch, warnings_of_two_loads):
    monkeypatch.setattr(kernels.platform, "machine", lambda: "riscv64")
    assert "no native kernels for riscv64 CPUs" in _the_one_reason(warnings_of_two_loads())


@pytest.mark.parametrize("features", [(), ("dotprod",), ("dotprod", "i8mm")])
def test_one_arm_build_serves_every_arm_cpu(monkeypatch, tmp_path, features):
    """An ARM build assumes ARMv8-A alone, whatever the CPU it is made on has (its dot
    product and int8 matrix multiply kernels are compiled for those alone and chosen at run
    time): a build cached in a home that ARM machines share runs on each of them. Its name
    is not x86's, so a home shared with x86 machines keeps one of each."""
    (tmp_path / "simde/x86").mkdir(parents=True)
    (tmp_path / "simde/x86/avx2.h").touch()
    monkeypatch.setenv("CPATH", str(tmp_path))
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    has = {kernels._DOTPROD: "dotprod", kernels._I8MM: "i8mm"}
    monkeypatch.setattr(kernels, "_arm_has", lambda feature: has[feature] in features)
    target = kernels._target()
    assert (target.name, target.arm) == ("qwen3chat_kernels_arm64", True)
    assert "-march=armv8-a" in target.flags
    assert not any(flag.startswith(("-mavx", "-I")) for flag in target.flags)  # CPATH finds SIMDe
    assert set(target.variants.values()) == {"NEON (SIMDe)"}  # until the CPU's are asked for


def test_simde_outside_the_compilers_paths_is_passed_to_it(monkeypatch, tmp_path):
    (tmp_path / "simde/x86").mkdir(parents=True)
    (tmp_path / "simde/x86/avx2.h").touch()
    monkeypatch.delenv("CPATH", raising=False)
    monkeypatch.delenv("CPLUS_INCLUDE_PATH", raising=False)
    monkeypatch.setattr(kernels, "_SIMDE_DIRS", ("/nonexistent", str(tmp_path)))
    assert kernels._simde_flags() == (f"-I{tmp_path}",)
    monkeypatch.setattr(kernels, "_SIMDE_DIRS", ("/nonexistent",))
    assert kernels._simde_flags() is None
