"""The bench report: one JSON object (``--json``) or Rich tables on stdout."""

from __future__ import annotations

from dataclasses import asdict

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import memory
from ..kernels import describe_variants, variants
from ..model import num_parameters
from .ops import OpTiming, ProfiledOp, SkippedOp
from .run import (
    PROBE_MIB,
    PROBE_TRIES,
    BenchReport,
    Result,
    Spread,
    cpu_model,
    roofline,
    setup_line,
)

# Metrics of a run, in report order; peak_gpu_mb is None off CUDA, draft_accepted without
# --draft.
METRICS = (
    "prefill_tok_s",
    "decode_tok_s",
    "ttft_s",
    "peak_rss_mb",
    "peak_gpu_mb",
    "draft_accepted",
)
REPORT_WIDTH = 120


def report_json(report: BenchReport) -> dict:
    """The report as one JSON object. The top-level speed and memory keys are the medians of
    the first combination; ``results`` holds every combination with min, max and runs."""
    s, first = report.settings, report.results[0]
    first_roofline = roofline(first, report.bandwidth_gb_s)
    out = {
        "model": report.model.name,
        "weights": report.model.weights,
        "device": report.model.model.device.type,
        "dtype": str(report.model.model.dtype).removeprefix("torch."),
        "quantize": s.quantize,
        "kv_cache": s.kv_cache,
        "draft": "ngram" if s.draft_max else "none",
        "draft_max": s.draft_max,
        "threads": report.threads,
        "processes": report.processes,
        "split": s.split,
        "cpu": cpu_model(),
        "kernels": variants(report.model.model.device),
        "memory_pages": memory.describe_pages(),
        "chunk_size": s.chunk_size,
        "repeat": s.repeat,
        "parameters": num_parameters(report.model.model.config),
        "weight_bytes": report.weight_bytes,
        "load_s": report.model.load_s,
        **{m: spread.median for m in METRICS if (spread := first.spread(m)) is not None},
        "rss_after_load_mb": report.rss_after_load_mb,
        "bandwidth_gb_s": report.bandwidth_gb_s,
        "decode_gb_s": first_roofline.achieved_gb_s,
        "roofline_share": first_roofline.share,
        "results": [_result_json(r, report.bandwidth_gb_s) for r in report.results],
    }
    if report.ops is not None:
        out["ops"] = [{**asdict(o), "skipped": isinstance(o, SkippedOp)} for o in report.ops]
    if report.profile is not None:
        out["profile"] = {
            phase: [asdict(row) for row in rows] for phase, rows in report.profile.items()
        }
    if s.plot is not None:
        out["plot"] = str(s.plot)
    return out


def _result_json(result: Result, bandwidth_gb_s: float) -> dict:
    bound = roofline(result, bandwidth_gb_s)
    return {
        **asdict(result.combination),
        **{m: asdict(spread) for m in METRICS if (spread := result.spread(m)) is not None},
        "decode_bytes_per_token": result.decode_bytes_per_token,
        "decode_gb_s": bound.achieved_gb_s,
        "roofline_tok_s": bound.tok_s,
        "roofline_share": bound.share,
        "runs": [{m: v for m, v in asdict(run).items() if v is not None} for run in result.runs],
    }


def print_report(report: BenchReport) -> None:
    console = Console()
    if not console.is_terminal:
        # Piped or redirected: no terminal width to fit, and Rich's 80-column fallback
        # would squeeze the results table into ellipses.
        console.width = REPORT_WIDTH
    console.print(_summary(report))
    console.print(_results_table(report))
    if report.ops is not None:
        console.print(_ops_table(report.ops))
    for phase, rows in (report.profile or {}).items():
        console.print(_profile_table(phase, rows))
    if report.settings.plot is not None:
        console.print(Text(f"decode speed by depth plotted to {report.settings.plot}"))


def _processes_row(report: BenchReport) -> list[tuple[str, str]]:
    if report.processes == 1:
        return []
    split = report.settings.split
    return [("processes", f"{report.processes} (--split {split}); weights and RSS: process 0's")]


def _summary(report: BenchReport) -> Table:
    m = report.model
    config = m.model.config
    weights = "random weights" if m.weights == "random" else m.weights
    after_load = report.rss_after_load_mb
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows = [
        ("model", f"{m.name} ({weights})"),
        (
            "size",
            f"{_count(num_parameters(config))} parameters, "
            f"{report.weight_bytes / 2**30:.2f} GiB of weights",
        ),
        (
            "setup",
            setup_line(report)
            + f", quantize {report.settings.quantize}, kv cache {report.settings.kv_cache}"
            + (f", draft ngram (up to {d})" if (d := report.settings.draft_max) else ""),
        ),
        ("cpu", cpu_model()),
        ("kernels", describe_variants(report.model.model.device)),
        ("pages", memory.describe_pages()),
        *_processes_row(report),
        (
            "load",
            f"{m.load_s:.2f} s" + ("" if after_load is None else f", RSS {after_load:,.0f} MiB"),
        ),
        (
            "memory",
            f"{report.bandwidth_gb_s:.1f} GB/s (torch sum over {PROBE_MIB} MiB, "
            f"best of {PROBE_TRIES})",
        ),
    ]
    for name, value in rows:
        grid.add_row(name, Text(value))
    return grid


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _results_table(report: BenchReport) -> Table:
    repeat = report.settings.repeat
    on_gpu = report.results[0].spread("peak_gpu_mb") is not None
    drafting = report.results[0].spread("draft_accepted") is not None
    caption = f"median of {repeat} runs after a warm-up" + (
        " (min-max below)" if repeat > 1 else ""
    )
    table = Table(title="qwen3chat bench", caption=caption)
    for name in ("test", "prefill t/s", "decode t/s", "TTFT ms", "peak RSS MiB"):
        table.add_column(name, justify="left" if name == "test" else "right")
    if on_gpu:
        table.add_column("peak GPU MiB", justify="right")
    if drafting:
        table.add_column("drafts kept", justify="right")
    table.add_column("decode GB/s", justify="right")
    table.add_column("of roofline", justify="right")
    for result in report.results:
        bound = roofline(result, report.bandwidth_gb_s)
        cells = [
            _spread_cell(result.spread("prefill_tok_s"), "{:.1f}"),
            _spread_cell(result.spread("decode_tok_s"), "{:.2f}"),
            _spread_cell(result.spread("ttft_s"), "{:.1f}", scale=1e3),
            f"{result.spread('peak_rss_mb').max:,.0f}",  # the process peak: it only grows
        ]
        if on_gpu:
            cells.append(_spread_cell(result.spread("peak_gpu_mb"), "{:,.0f}"))
        if drafting:
            cells.append(_spread_cell(result.spread("draft_accepted"), "{:.0%}"))
        cells += [f"{bound.achieved_gb_s:.1f}", f"{bound.share:.0%} of {bound.tok_s:.1f} t/s"]
        table.add_row(result.combination.label, *cells)
    return table


def _spread_cell(spread: Spread, fmt: str, scale: float = 1.0) -> Text:
    text = Text(fmt.format(spread.median * scale))
    if spread.min != spread.max:
        low, high = fmt.format(spread.min * scale), fmt.format(spread.max * scale)
        text.append(f"\n{low}-{high}", style="dim")
    return text


def _ops_table(ops: list[OpTiming | SkippedOp]) -> Table:
    timed = [o for o in ops if isinstance(o, OpTiming)]
    seq_lens = sorted({o.seq_len for o in timed})
    skipped = [f"{o.op}: skipped, {o.reason}" for o in ops if isinstance(o, SkippedOp)]
    caption = "median time per call at the model's dimensions (layer 0); "
    caption += "attention_decode: one token over seq cached positions"
    if any(o.op == "moe_layer" for o in timed):
        caption += "; feed_forward: a dense FFN as wide as the active experts"
    table = Table(title="ops", caption="\n".join([caption, *skipped]))
    table.add_column("op")
    for seq in seq_lens:
        table.add_column(f"seq {seq}", justify="right")
    by_op: dict[str, dict[int, OpTiming]] = {}
    for o in timed:
        by_op.setdefault(o.op, {})[o.seq_len] = o
    for op, timings in by_op.items():
        table.add_row(op, *(_duration(timings[seq].median_us) for seq in seq_lens))
    return table


def _duration(us: float) -> str:
    return f"{us:.1f} µs" if us < 1000 else f"{us / 1000:.2f} ms"


def _profile_table(phase: str, rows: list[ProfiledOp]) -> Table:
    table = Table(title=f"profile: one {phase} step, top ops by self time")
    table.add_column("op")
    for name in ("calls", "self ms", "total ms", "share"):
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(
            Text(row.name),
            str(row.calls),
            f"{row.self_ms:.3f}",
            f"{row.total_ms:.3f}",
            f"{row.share:.1%}",
        )
    return table
