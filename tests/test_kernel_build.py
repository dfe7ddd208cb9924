"""Building the native kernels: a first use that compiles says so instead of pausing
silently, and a quick load from torch's cache says nothing."""

from __future__ import annotations

import logging
import time

import pytest
import torch.utils.cpp_extension

from qwen3chat import kernels


@pytest.fixture
def fake_build(monkeypatch):
    """``kernels._module`` with the build replaced by a wait of ``seconds``."""
    monkeypatch.setattr(kernels.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(kernels.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(kernels, "_NOTICE_AFTER_S", 0.2)
    built = object()

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


def test_a_cached_load_is_silent(fake_build, caplog):
    with caplog.at_level(logging.WARNING, logger="qwen3chat.kernels"):
        fake_build(0.0)
        time.sleep(0.4)  # past the notice's delay: it was cancelled, not just late
    assert not caplog.records
