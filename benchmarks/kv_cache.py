"""Decode speed over the float KV cache and the int8 one (`--kv-cache int8`), in one process.

One random-weight model (a preset shape), two chat engines on it, one per cache; at each
depth both hold the same context (filled once, untimed) and decode --tokens new tokens
after an 8-token prompt, the two alternating round after round, so that the ratios are
same-run on a machine whose speed drifts by 20-30% over minutes (separate `bench`
processes a few minutes apart did not agree on which cache was faster). The time to the
first token of that prompt, a chat's next turn after a conversation of that depth, is
printed too.

    python benchmarks/kv_cache.py --preset qwen3-0.6b --quantize int4 --depths 0,1024,4096
    python benchmarks/kv_cache.py --model model-Q4_0.gguf --quantize none   # a file's weights
"""

from __future__ import annotations

import argparse
import statistics

import qwen3chat  # noqa: F401  before torch, so that torch's OpenMP threads sleep, not spin

# isort: split
import torch

from qwen3chat.bench.run import cpu_model, random_ids, timed_run
from qwen3chat.engine import Engine
from qwen3chat.kv_cache import kv_dtype
from qwen3chat.loading import load_model, load_preset

PROMPT = 8
CACHES = ("auto", "int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-0.6b")
    parser.add_argument("--model", help="a checkpoint folder or GGUF file instead of --preset")
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--depths", default="0,1024,4096", help="context lengths, a comma list")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per timed run")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    depths = sorted(int(d) for d in args.depths.split(","))
    torch.manual_seed(0)
    if args.model:
        loaded = load_model(args.model, device="cpu", dtype=args.dtype, quantize=args.quantize)
    else:
        loaded = load_preset(args.preset, "cpu", args.dtype, args.quantize)
    loaded.tokenizer.stop_ids = []  # random weights: always decode every token
    ids = random_ids(depths[-1] + PROMPT, loaded.model.config.vocab_size)
    length = depths[-1] + PROMPT + args.tokens + 8
    engines = {
        c: Engine(loaded.model, loaded.tokenizer, length, kv_dtype=kv_dtype(c)) for c in CACHES
    }
    print(
        f"{args.model or args.preset} {args.dtype} quantize={args.quantize}, "
        f"{torch.get_num_threads()} "
        f"threads, {cpu_model()}; {PROMPT}-token prompt, {args.tokens} new tokens, "
        f"medians of {args.rounds} rounds"
    )
    print(
        "| depth | float cache, decode tok/s | int8 cache, decode tok/s | int8 / float "
        "| float cache, first token ms | int8 cache, first token ms |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for depth in depths:
        context, prompt = ids[:depth], ids[depth : depth + PROMPT]
        speeds: dict[str, list[float]] = {c: [] for c in CACHES}
        first: dict[str, list[float]] = {c: [] for c in CACHES}
        for engine in engines.values():
            if context:  # untimed; the engine reuses the shorter depth's prefix
                engine.prefill(context, lambda: False)
            timed_run(engine, context, prompt, 4)  # warm-up
        for _ in range(args.rounds):
            for cache, engine in engines.items():
                run = timed_run(engine, context, prompt, args.tokens)
                speeds[cache].append(run.decode_tok_s)
                first[cache].append(run.ttft_s * 1e3)
        ratio = statistics.median(
            b / a for a, b in zip(speeds["auto"], speeds["int8"], strict=True)
        )
        print(
            f"| {depth} | {statistics.median(speeds['auto']):.1f} "
            f"| {statistics.median(speeds['int8']):.1f} | {ratio:.2f} "
            f"| {statistics.median(first['auto']):.0f} | {statistics.median(first['int8']):.0f} |"
        )


if __name__ == "__main__":
    main()
