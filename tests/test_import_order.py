"""qwen3chat imported before torch, so that torch's OpenMP threads sleep between operations
(qwen3chat/__init__.py): a warning where it comes too late, and the benchmarks in order."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def warnings_of(code: str, **env: str) -> str:
    """What a fresh interpreter running ``code`` prints to stderr, without the variable
    this package sets (as a user's shell has it) unless ``env`` gives it."""
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True
    )
    return done.stderr


def test_importing_qwen3chat_after_torch_warns_what_to_do():
    late = warnings_of("import torch\nfrom qwen3chat.sampling import sample")
    assert "RuntimeWarning: qwen3chat was imported after torch" in late
    assert "import qwen3chat first, or set OMP_WAIT_POLICY=PASSIVE" in late
    assert warnings_of("import qwen3chat, torch, os\nprint(os.environ['OMP_WAIT_POLICY'])") == ""
    # A user's own policy is theirs to choose.
    assert warnings_of("import torch, qwen3chat", OMP_WAIT_POLICY="ACTIVE") == ""


def test_a_peers_process_sets_nothing():
    """The benchmarks' workers for llama.cpp and transformers import qwen3chat before torch
    too: in peer_environment() the import leaves OpenMP as those programs' users run it
    (llama.cpp's threads share torch's OpenMP library there; made passive, its Q4_0 decode
    read 25.8 tok/s against 44.9, Zen 3)."""
    code = (
        "import os, qwen3chat, torch\n"
        "env = qwen3chat.peer_environment()\n"
        "print(env.get('OMP_WAIT_POLICY'), env[qwen3chat.PEER])\n"
        "import subprocess, sys\n"
        "inner = 'import os, qwen3chat; print(os.environ.get(\"OMP_WAIT_POLICY\"))'\n"
        "print(subprocess.run([sys.executable, '-c', inner], env=env, capture_output=True,"
        " text=True).stdout)"
    )
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True
    )
    assert done.stdout.split() == ["None", "1", "None"]
    assert warnings_of("import torch, qwen3chat", QWEN3CHAT_PEER="1") == ""


def module_imports(path: Path) -> list[str]:
    """The top-level modules a file imports at module level, in order."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("script", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_import_qwen3chat_before_torch(script):
    """A benchmark that runs qwen3chat in its own process measures it as its commands run:
    with torch imported first, Q4_0 decode of the 0.6B shape read 58.5 tok/s, not 70.4."""
    names = module_imports(script)
    if "qwen3chat" in names and "torch" in names:
        assert names.index("qwen3chat") < names.index("torch"), script.name
