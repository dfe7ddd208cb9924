"""The package's floors: data flows one way (files -> config + weights -> model -> engine ->
chat / bench), so no module imports one on a floor above its own, and within the model
only native.py knows the native kernels."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qwen3chat"

# Lowest first; a module may import its own floor and those below.
FLOORS = (
    ("errors", "jsonfiles", "device", "memory", "kernels", "kv_cache", "hybrid_cache"),
    (
        "config",
        "presets",
        "quant",
        "chat_template",
        "tokenizer",
        "thinking",
        "sampling",
        "grammar",
        "drafting",
    ),
    # which share of the weights a process holds, and its collectives: below the weights'
    # readers and the model, which take shares
    ("distributed",),
    ("generation",),
    ("download", "weights", "vision.preprocess"),
    ("model",),
    ("loading", "engine", "batch", "distributed.driver"),
    ("chat", "vision.prompt", "bench", "serve", "cli", "__main__"),
)


def floor_of(module: str) -> int:
    """``module`` relative to the package, e.g. ``model.qwen3``; longest prefix wins."""
    best, length = None, -1
    for floor, names in enumerate(FLOORS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > length:
                best, length = floor, len(name)
    assert best is not None, f"qwen3chat.{module} is on no floor: add it to FLOORS"
    return best


def imports_of(module: str, source: str, is_package: bool = False) -> list[str]:
    """The package modules that ``source`` (the module ``module``) imports, relative to
    the package."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                found.append(".".join([*base, node.module]))
            else:  # from .. import kernels: the names are modules
                found += [".".join([*base, a.name]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qwen3chat."):
            found.append(node.module.removeprefix("qwen3chat."))
    return found


def modules():
    """(name relative to the package, its imports) of every module."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        if name:
            source = path.read_text(encoding="utf-8")
            yield name, imports_of(name, source, path.name == "__init__.py")


def test_no_import_runs_up_a_floor():
    upward = [
        f"{name} (floor {floor_of(name)}) imports {target} (floor {floor_of(target)})"
        for name, imported in modules()
        for target in imported
        if floor_of(target) > floor_of(name)
    ]
    assert upward == []


def test_only_native_py_knows_the_kernels_within_the_model():
    knowing = [
        name for name, imported in modules() if name.startswith("model") and "kernels" in imported
    ]
    assert knowing == ["model.native"]


def test_the_floor_check_sees_an_upward_import():
    imported = imports_of("config", "from .model.vision import VisionTower\n")
    assert imported == ["model.vision"] and floor_of("model.vision") > floor_of("config")
    assert imports_of("model", "from . import native\n", is_package=True) == ["model.native"]
