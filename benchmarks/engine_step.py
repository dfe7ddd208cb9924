"""Decode speed of the server's batched engine against the chat engine, in one process.

The same random-weight model (a preset shape) decodes with the single-sequence engine
(`qwen3chat chat`'s) and with the batched engine (`qwen3chat serve`'s) at 1, 4 and 16
sequences, rounds alternating so the ratios are same-run. No HTTP, no tokenizer work per
token beyond the engines' own: this isolates what batching and the paged cache cost or
gain; benchmarks/serve_bench.py measures the servers end to end.

    python benchmarks/engine_step.py --preset qwen3-0.6b --quantize int4 --tokens 64
    python benchmarks/engine_step.py --model .bench/qwen3-0.6b/model-Q4_0.gguf  # a file

Decode tokens/s counts tokens after each sequence's first, over the time from the first
sequence's first token to the last one's last (the aggregate over all sequences).
"""

from __future__ import annotations

import argparse
import statistics
import time

import qwen3chat  # noqa: F401  before torch, so that torch's OpenMP threads sleep, not spin

# isort: split
import torch

from qwen3chat.batch.engine import BatchEngine
from qwen3chat.bench.run import cpu_model
from qwen3chat.engine import Engine
from qwen3chat.generation import FinishEvent
from qwen3chat.kv_cache import kv_dtype
from qwen3chat.loading import load_model, load_preset
from qwen3chat.sampling import SamplingSettings

# Random weights: sampling over the whole vocabulary never meets the end token early, so
# every sequence decodes exactly --tokens tokens.
SAMPLING = SamplingSettings(temperature=1.0, top_p=1.0)


def prompt(loaded, index: int, length: int) -> list[int]:
    ids = loaded.tokenizer.encode(f"Request {index}: " + "tell me more " * length)
    return ids[:length]


def chat_engine(loaded, prompt_len: int, tokens: int, kv=None) -> float:
    engine = Engine(loaded.model, loaded.tokenizer, prompt_len + tokens + 8, kv_dtype=kv)
    engine.tokenizer.stop_ids = []
    [finish] = [
        e
        for e in engine.generate(prompt(loaded, 0, prompt_len), tokens, SAMPLING)
        if isinstance(e, FinishEvent)
    ]
    return finish.timings.decode_tok_s


def batch_engine(loaded, streams: int, prompt_len: int, tokens: int, kv=None) -> float:
    engine = BatchEngine(
        loaded.model, loaded.tokenizer, prompt_len + tokens + 8, streams, kv_dtype=kv
    )
    for i in range(streams):
        engine.add(prompt(loaded, i, prompt_len), tokens, SAMPLING)
    first = last = None
    counted = 0
    while engine.has_work:
        before = engine.tokens_sampled
        engine.step()
        now, sampled = time.perf_counter(), engine.tokens_sampled - before
        if first is None and sampled == streams:  # every sequence has its first token
            first = now
        elif first is not None:
            counted += sampled
            last = now
    return counted / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-0.6b")
    parser.add_argument("--model", help="a checkpoint directory or GGUF file instead of --preset")
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--streams", default="1,4,16")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-cache", default="auto", choices=["auto", "int8"])
    args = parser.parse_args()
    kv = kv_dtype(args.kv_cache)
    torch.manual_seed(0)
    if args.model:
        loaded = load_model(args.model, device="cpu", dtype=args.dtype, quantize=args.quantize)
    else:
        loaded = load_preset(args.preset, "cpu", args.dtype, args.quantize)
    loaded.tokenizer.stop_ids = []
    streams = [int(s) for s in args.streams.split(",")]
    results: dict[str, list[float]] = {}
    chat_engine(loaded, args.prompt, 4)  # warm up (kernel build, first-touch pages)
    for _ in range(args.rounds):
        speed = chat_engine(loaded, args.prompt, args.tokens, kv)
        results.setdefault("chat engine", []).append(speed)
        for n in streams:
            speed = batch_engine(loaded, n, args.prompt, args.tokens, kv)
            results.setdefault(f"batched, {n} streams", []).append(speed)
    base = statistics.median(results["chat engine"])
    print(
        f"{args.model or args.preset} {args.dtype} quantize={args.quantize} "
        f"kv-cache={args.kv_cache}, {torch.get_num_threads()} threads, "
        f"{cpu_model()}, medians of {args.rounds} rounds"
    )
    print("| engine | decode tok/s (aggregate) | / chat engine |")
    print("| --- | --- | --- |")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
