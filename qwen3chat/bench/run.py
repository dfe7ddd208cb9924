"""`qwen3chat bench`: load time, prefill and decode speed, time to first token, memory, and
how close decode comes to this machine's memory bandwidth.

Bench times what chat runs: the Engine's prefill and decode with greedy sampling, stop ids
disabled so that every requested token is generated, fed random token ids (as llama-bench
does; no tokenizer is needed). Each combination of --prompt-tokens, --gen-tokens and
--depth runs once to warm up, then --repeat times; every figure is the median over those
runs, with min and max. --depth N first fills the cache with N tokens of context (untimed),
like llama-bench's -d, so the prompt and the decode run after it.

Decode at batch 1 reads every weight once per token plus the cached keys and values, so
its speed is bounded by memory bandwidth / bytes read per token: the roofline. A short
probe (torch summing a 512 MiB tensor, best of a few) measures the bandwidth, and each
result reports its achieved GB/s and its share of the roofline (nanochat's MBU,
gpt-fast's GB/s).

Memory: the peak RSS is the process's own high-water mark, which never goes down; it is read
after each run, and the RSS right after loading is reported beside it. On CUDA the peak
of allocated GPU memory is reset before each run.
"""

from __future__ import annotations

import itertools
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from ..config import ModelConfig
from ..device import resolve_device, resolve_dtype
from ..distributed.driver import driving, follow
from ..distributed.split import Sharding
from ..distributed.world import World
from ..engine import Engine
from ..errors import QwenChatError
from ..kv_cache import kv_dtype
from ..loading import load_model, random_model
from ..model.moe import SparseMoE
from ..model.qwen3 import Qwen3Model
from ..presets import preset_config
from ..quant import QuantSpec
from ..sampling import SamplingSettings
from ..tokenizer import Tokenizer
from .ops import (
    OPS,
    OpBenchmarks,
    OpTiming,
    ProfiledOp,
    SkippedOp,
    profile_prefill_and_decode,
    synchronize,
)
from .plot import check_plot_path, plot_decode_speed

# Without --depth, --plot sweeps these depths: a curve needs more than one point.
DEFAULT_PLOT_DEPTHS = (0, 256, 512, 1024, 2048)
# Far larger than any CPU cache, small enough to allocate anywhere.
PROBE_MIB = 512
PROBE_TRIES = 5
GREEDY = SamplingSettings(temperature=0.0)
MIB = 2**20


def parse_counts(text: str, flag: str, minimum: int) -> list[int]:
    """A comma list of whole numbers, ``"128,512"`` -> ``[128, 512]``, each >= ``minimum``."""
    values = []
    for item in text.split(","):
        try:
            value = int(item)
        except ValueError:
            raise QwenChatError(
                f"{flag}: {item.strip()!r} is not a whole number; give a comma list such as 128,512"
            ) from None
        if value < minimum:
            raise QwenChatError(f"{flag}: {value} is too small; the minimum is {minimum}")
        values.append(value)
    return list(dict.fromkeys(values))  # a value given twice would run its tests twice


def parse_depths(text: str | None, plotting: bool) -> list[int]:
    if text is None:
        return list(DEFAULT_PLOT_DEPTHS) if plotting else [0]
    return parse_counts(text, "--depth", minimum=0)


@dataclass(frozen=True)
class Combination:
    prompt_tokens: int
    gen_tokens: int
    depth: int

    @property
    def context(self) -> int:
        """Cache positions the combination fills."""
        return self.depth + self.prompt_tokens + self.gen_tokens

    @property
    def label(self) -> str:
        """llama-bench's names: pp = prompt processing, tg = text generation, d = depth."""
        return f"pp{self.prompt_tokens} tg{self.gen_tokens} d{self.depth}"


@dataclass
class BenchSettings:
    model_path: str | None
    preset: str | None
    prompt_tokens: list[int]
    gen_tokens: list[int]
    depths: list[int]
    repeat: int = 3
    fmt: str = "auto"
    quantize: str = "none"
    kv_cache: str = "auto"  # or "int8"
    draft_max: int = 0  # tokens drafted by prompt lookup per step (--draft ngram)
    device: str = "auto"
    dtype: str = "auto"
    chunk_size: int | None = None
    threads: int | None = None
    ops: bool = False
    profile: bool = False
    plot: Path | None = None
    split: str = "auto"  # under torchrun (distributed/split.py)

    def __post_init__(self) -> None:
        """Flag combinations that cannot work: usage errors, raised before anything loads."""
        if self.model_path is not None and self.preset is not None:
            raise QwenChatError("-m and --preset exclude each other; give one of them")
        if self.model_path is None and self.preset is None:
            raise QwenChatError(
                "nothing to bench: give -m MODEL, or --preset NAME for random weights "
                "(e.g. --preset qwen3-0.6b, no download)"
            )
        if self.preset is not None:
            preset_config(self.preset)  # raises for an unknown name

    @property
    def combinations(self) -> list[Combination]:
        # Depth outermost: consecutive combinations share their context prefix in the cache.
        return [
            Combination(prompt, gen, depth)
            for depth, prompt, gen in itertools.product(
                self.depths, self.prompt_tokens, self.gen_tokens
            )
        ]

    @property
    def step_count(self) -> int:
        """Progress steps: load, every run (warm-ups too), probe, ops, profile."""
        runs = len(self.combinations) * (self.repeat + 1)
        return 2 + runs + (len(OPS) if self.ops else 0) + int(self.profile)


@dataclass
class Run:
    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float
    peak_rss_mb: float
    peak_gpu_mb: float | None
    draft_accepted: float | None = None  # the share of drafted tokens kept (--draft ngram)


@dataclass
class Spread:
    median: float
    min: float
    max: float


@dataclass
class Result:
    combination: Combination
    runs: list[Run]
    decode_bytes_per_token: float  # averaged over the decode steps (the KV part grows)

    def spread(self, metric: str) -> Spread | None:
        values = [getattr(run, metric) for run in self.runs]
        if values[0] is None:
            return None
        return Spread(statistics.median(values), min(values), max(values))


@dataclass
class Roofline:
    achieved_gb_s: float  # at the median decode speed
    tok_s: float  # the decode speed the probed bandwidth allows
    share: float  # median decode speed / tok_s


def roofline(result: Result, bandwidth_gb_s: float) -> Roofline:
    decode = result.spread("decode_tok_s").median
    bound = bandwidth_gb_s * 1e9 / result.decode_bytes_per_token
    return Roofline(decode * result.decode_bytes_per_token / 1e9, bound, decode / bound)


@dataclass
class BenchModel:
    model: Qwen3Model
    tokenizer: Tokenizer | IdsOnlyTokenizer
    name: str
    weights: str  # "random" or the file format
    load_s: float


@dataclass
class BenchReport:
    settings: BenchSettings
    model: BenchModel
    threads: int
    weight_bytes: int
    rss_after_load_mb: float | None
    results: list[Result]
    bandwidth_gb_s: float
    ops: list[OpTiming | SkippedOp] | None
    profile: dict[str, list[ProfiledOp]] | None
    processes: int = 1  # under torchrun: the figures are process 0's (its share's weights)


class IdsOnlyTokenizer:
    """Stands in for the tokenizer a preset does not have. The engine asks a tokenizer for
    stop and think ids (none here) and streams the reply's text, which bench never reads:
    every id counts as special, so nothing is decoded."""

    def __init__(self) -> None:
        self.stop_ids: list[int] = []
        self.think_start_id = self.think_end_id = self.turn_start_id = None

    def is_special(self, token_id: int) -> bool:
        return True

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return ""


# ---------------------------------------------------------------------------------------
# Measuring


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor, as figures are quoted beside it: /proc/cpuinfo's model name and, for
    x86, its family and model numbers (a VM's name is often generic: "Intel(R) Xeon(R)
    Processor"); elsewhere what Python's platform module says."""
    fields: dict[str, str] = {}
    with suppress(OSError):
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    numbers = ("cpu family", "model")
    if all(key in fields for key in numbers):
        return f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
    return fields["model name"]


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux the memory map's high-water mark:
    getrusage's maximum survives exec, so a process started by a larger one would
    report its parent's peak."""
    with suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes there, KiB here


def current_rss_mb() -> float | None:
    """This process's resident memory now (Linux only; None elsewhere)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_gpu_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / MIB


def probe_bandwidth(device: torch.device) -> float:
    """GB/s of reading memory as torch does it (a sum over a tensor far beyond the caches):
    the roof that a decode step, which streams every weight once, can at best reach."""
    data = torch.ones(PROBE_MIB * MIB // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(PROBE_TRIES):
        synchronize(device)
        start = time.perf_counter()
        data.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def weight_bytes(model: Qwen3Model) -> int:
    """Bytes of every parameter and buffer (quantized weights keep theirs in buffers)."""
    return sum(t.nbytes for t in itertools.chain(model.parameters(), model.buffers()))


def decode_bytes_per_token(engine: Engine, context: float) -> float:
    """Bytes one decode step reads with ``context`` cached positions: every weight once, the
    LM head included, but of an untied embedding table only the one row it looks up, and
    of each MoE layer's experts only the num_experts_per_tok that the token is routed to;
    the keys and values of every cached position; a hybrid model's linear-layer states,
    read and written."""
    model = engine.model
    weights = weight_bytes(model)
    if model.lm_head is not None:
        table = model.embed_tokens.weight
        weights -= table.nbytes - table.nbytes / model.config.vocab_size
    for module in model.modules():
        if isinstance(module, SparseMoE):
            idle = 1 - module.top_k / module.num_experts
            weights -= idle * sum(t.nbytes for t in module.experts.state_dict().values())
    cache = engine.cache
    kv_per_position = (cache.nbytes - cache.state_nbytes) / cache.max_seq_len
    return weights + 2 * cache.state_nbytes + kv_per_position * context


def random_ids(count: int, vocab_size: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count,), generator=generator).tolist()


def timed_run(engine: Engine, context: list[int], prompt: list[int], gen_tokens: int) -> Run:
    """One generate call after ``context``: the cache keeps the context, forgets the rest,
    so the engine's prefix reuse runs exactly ``prompt`` as the prefill."""
    engine.cache.trim(len(context))
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    *_, finish = engine.generate(context + prompt, gen_tokens, GREEDY)
    t = finish.timings
    if len(finish.token_ids) != gen_tokens or t.prefill_tokens != len(prompt):
        raise RuntimeError(
            f"bench: asked for a {len(prompt)}-token prefill and {gen_tokens} new tokens, "
            f"the engine ran {t.prefill_tokens} and gave {len(finish.token_ids)}"
        )
    accepted = t.accepted_tokens / max(t.drafted_tokens, 1) if engine.draft_max else None
    return Run(
        t.prefill_tok_s,
        t.decode_tok_s,
        t.ttft_s,
        peak_rss_mb(),
        peak_gpu_mb(engine.device),
        accepted,
    )


# ---------------------------------------------------------------------------------------
# Running


class _Steps:
    """One progress bar over the whole bench on stderr, shown only on a terminal (stdout
    carries the report alone, so `bench --json | jq` stays valid either way)."""

    def __init__(self, total: int):
        console = Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.task = self.progress.add_task("", total=total)

    def __enter__(self) -> _Steps:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        self.progress.update(self.task, description=description)
        yield
        self.progress.advance(self.task)


def check_buildable(settings: BenchSettings) -> ModelConfig | None:
    """What can fail before anything loads; the preset's config when there is one."""
    QuantSpec.parse(settings.quantize)
    if settings.plot is not None:
        check_plot_path(settings.plot)
    if settings.preset is None:
        return None
    return preset_config(settings.preset)


def load_bench_model(
    settings: BenchSettings, preset: ModelConfig | None, world: World | None = None
) -> BenchModel:
    """The model benched (with a ``world``, this process's share of it)."""
    sharding = None if world is None else Sharding(world, settings.split)
    if preset is None:
        loaded = load_model(
            settings.model_path,
            settings.fmt,
            settings.device,
            settings.dtype,
            settings.quantize,
            sharding=sharding,
        )
        loaded.tokenizer.stop_ids = []  # so every run generates all of --gen-tokens
        return BenchModel(
            loaded.model, loaded.tokenizer, str(loaded.path), loaded.format, loaded.load_s
        )
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    start = time.perf_counter()
    # A quantized preset is drawn directly quantized: it never exists in float.
    quant = QuantSpec.parse(settings.quantize)
    model = random_model(preset, dtype, device, quant=quant, sharding=sharding)
    synchronize(device)
    return BenchModel(
        model, IdsOnlyTokenizer(), settings.preset, "random", time.perf_counter() - start
    )


def bench_combination(
    engine: Engine, ids: list[int], combination: Combination, repeat: int, steps: _Steps
) -> Result:
    c = combination
    context, prompt = ids[: c.depth], ids[c.depth : c.depth + c.prompt_tokens]
    with steps.step(f"{c.label}: warm-up"):
        if context:  # untimed; the engine reuses whatever prefix the cache already holds
            engine.prefill(context, lambda: False)
        timed_run(engine, context, prompt, c.gen_tokens)
    runs = []
    for i in range(repeat):
        with steps.step(f"{c.label}: run {i + 1}/{repeat}"):
            runs.append(timed_run(engine, context, prompt, c.gen_tokens))
    # Decode step k (1 .. gen-1) reads depth + prompt + k cached positions: gen/2 on average.
    mean_context = c.depth + c.prompt_tokens + c.gen_tokens / 2
    return Result(c, runs, decode_bytes_per_token(engine, mean_context))


def run_bench(settings: BenchSettings, world: World | None = None) -> BenchReport | None:
    """The report; under torchrun (a ``world``) process 0's, the others following its
    runs (None for them)."""
    preset = check_buildable(settings)
    if world is not None and settings.ops:
        raise QwenChatError(
            "--ops times each operation alone, in one process: run without torchrun"
        )
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if world is not None and not world.driver:
        follow(load_bench_model(settings, preset, world).model, world)
        return None
    with _Steps(settings.step_count) as steps:
        with steps.step(f"loading {settings.model_path or settings.preset}"):
            bench_model = load_bench_model(settings, preset, world)
        rss_after_load = current_rss_mb()
        with driving(bench_model.model, world):
            report = _run(settings, bench_model, rss_after_load, steps)
    if world is not None:
        report.processes = world.size
    if settings.plot is not None:
        plot_depth_sweep(report, settings.plot)
    return report


def _run(settings: BenchSettings, bench_model: BenchModel, rss_after_load, steps) -> BenchReport:
    """The timed runs of every combination, the bandwidth probe, ops and profile."""
    combinations = settings.combinations
    max_context = max(c.context for c in combinations)
    engine = Engine(
        bench_model.model,
        bench_model.tokenizer,
        max_context,
        settings.chunk_size,
        kv_dtype(settings.kv_cache),
        settings.draft_max,
    )
    ids = random_ids(max_context, bench_model.model.config.vocab_size)
    results = [bench_combination(engine, ids, c, settings.repeat, steps) for c in combinations]
    # After the runs: the probe's 512 MiB must not count in their peak RSS.
    with steps.step("memory bandwidth probe"):
        bandwidth = probe_bandwidth(engine.device)
    ops = run_ops(bench_model.model, steps) if settings.ops else None
    profile = None
    if settings.profile:
        with steps.step("profiling one prefill and one decode step"):
            profile = profile_prefill_and_decode(engine, ids[: settings.prompt_tokens[0]])
    return BenchReport(
        replace(settings, draft_max=engine.draft_max),  # the drafts that ran
        bench_model,
        torch.get_num_threads(),
        weight_bytes(bench_model.model),
        rss_after_load,
        results,
        bandwidth,
        ops,
        profile,
    )


def run_ops(model: Qwen3Model, steps: _Steps) -> list[OpTiming | SkippedOp]:
    benchmarks = OpBenchmarks(model)
    timings: list[OpTiming | SkippedOp] = []
    for op in OPS:
        with steps.step(f"op {op}"):
            timings += benchmarks.run(op)
    return timings


def plot_depth_sweep(report: BenchReport, path: Path) -> None:
    """Decode speed against depth, one line per prompt/gen pair."""
    series: dict[str, list[tuple[int, float]]] = {}
    for result in report.results:
        c = result.combination
        points = series.setdefault(f"pp{c.prompt_tokens} tg{c.gen_tokens}", [])
        points.append((c.depth, result.spread("decode_tok_s").median))
    for points in series.values():
        points.sort()
    title = f"{report.model.name}: decode speed by context depth ({setup_line(report)})"
    plot_decode_speed(series, path, title)


def setup_line(report: BenchReport) -> str:
    model = report.model.model
    dtype = str(model.dtype).removeprefix("torch.")
    return f"{model.device.type}, {dtype}, {report.threads} threads"
