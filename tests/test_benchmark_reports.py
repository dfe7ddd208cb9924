"""The benchmark scripts' reports: a new run replaces a report's first section and keeps
the runs and notes written after it (docs/benchmarks.md, docs/serve_benchmark.md)."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import qwen3chat  # noqa: F401  before torch

ROOT = Path(__file__).resolve().parents[1]


def benchmark(name: str):
    """The script benchmarks/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_run_replaces_the_first_section_and_keeps_the_rest(tmp_path):
    write = benchmark("compare").write_section
    out = tmp_path / "docs/report.md"
    write(out, "Serving benchmark", "benchmarks/serve_bench.py", "## run 1\n\n| a |\n")
    assert out.read_text() == (
        "# Serving benchmark\n\nWritten by `benchmarks/serve_bench.py`; rerun it to "
        "refresh.\n\n## run 1\n\n| a |\n"
    )
    notes = "\n## An earlier run, by hand\n\nkept\n\n### its detail\n\nkept too\n"
    out.write_text(out.read_text() + notes)
    write(out, "Serving benchmark", "benchmarks/serve_bench.py", "## run 2\n\n| b |\n")
    text = out.read_text()
    assert "## run 2\n\n| b |\n" in text and "run 1" not in text
    assert text.endswith(notes)


def test_serve_bench_keeps_the_runs_written_after_its_table(tmp_path):
    """serve_bench.py once wrote its table over the whole of docs/serve_benchmark.md."""
    serve_bench = benchmark("serve_bench")
    out = tmp_path / "serve_benchmark.md"
    earlier = "\n## An earlier run on another CPU\n\n| its table |\n"
    out.write_text("# Serving benchmark\n\n## the last run\n\n| old |\n" + earlier)
    args = SimpleNamespace(
        preset="qwen3-0.6b",
        max_tokens=8,
        threads=2,
        rounds=1,
        loadavg="0.1",
        streams=[1, 4],
        weights=["int4"],
        kv_cache="auto",
        qwen3chat_weights="gguf",
        gguf_bf16="BF16",
        gguf_int4="Q4_0",
        out=str(out),
    )

    def run(aggregate):
        return [
            {
                "aggregate": aggregate,
                "per_stream": [aggregate],
                "ttft_ms": [100.0],
                "tokens": [8],
                "prompt_tokens": [62],
            }
        ]

    results = {
        ("qwen3chat", "int4", 1): run(40.0),
        ("llama.cpp", "int4", 1): run(20.0),
        ("qwen3chat", "int4", 4): run(120.0),
        ("llama.cpp", "int4", 4): run(80.0),
    }
    serve_bench.write_report(args, ["qwen3chat", "llama.cpp"], results, [])
    text = out.read_text()
    assert text.startswith("# Serving benchmark\n") and "| old |" not in text
    assert "| int4 | 1 | 2.00 |" in text and "| int4 | 4 | 1.50 |" in text
    assert text.endswith(earlier)
