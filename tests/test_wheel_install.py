"""A wheel install ships everything the native kernels' first-use build needs: the wheel
is built, installed into a fresh virtual environment outside the checkout, and the
kernels are compiled from the installed files and run there."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from qwen3chat import kernels

ROOT = Path(__file__).parents[1]
# The compile alone takes a minute or two on two cores.
TIMEOUT_S = 900

# Run by the new environment's python, from outside the checkout.
SNIPPET = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    import torch.nn.functional as F

    import qwen3chat
    from qwen3chat import kernels

    here = Path(qwen3chat.__file__).resolve()
    assert here.is_relative_to(Path(sys.prefix).resolve()), here
    native = kernels._module()
    assert native is not None, "the native kernels did not build from the installed files"
    gate_up = torch.randn(4, 32)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(native.silu_mul(gate_up), F.silu(gate) * up)
    """
)


def _run(command: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, **kw)
    assert done.returncode == 0, (
        f"{' '.join(command)} failed ({done.returncode})\n"
        f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    return done


def test_the_installed_wheel_builds_and_runs_the_native_kernels(tmp_path):
    if kernels.native(torch.zeros(1)) is None:
        pytest.skip("the native kernels cannot be built here (no AVX2 or no C++ compiler)")

    # Build from a copy: setuptools builds in the source tree and never prunes its build/
    # folder, whose leftovers from an earlier build would end up in the wheel. Hidden
    # folders (.git, .venv, the emulated ARM system's root with its device files) are not
    # the package's.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__"),
    )
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)])
    (wheel,) = wheels.glob("qwen3chat-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    ).stdout.strip()
    # torch and the rest come from this environment, without downloading anything. This
    # interpreter is itself a venv, so --system-site-packages would reach only the base
    # python's packages. Plain path lines do not run this environment's .pth files, so
    # its editable install of the checkout stays out.
    Path(purelib, "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")  # a build, not a load
    # ninja, which torch runs by name, is installed beside this interpreter.
    env["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), env.get("PATH", "")])
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    _run([str(python), "-c", SNIPPET], cwd=cwd, env=env)
