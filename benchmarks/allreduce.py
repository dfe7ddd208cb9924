"""Latency of the all-reduce a run across processes pays per block: one token's hidden
state (and a prompt chunk's), summed over the processes with torch.distributed.

    torchrun --standalone --nproc-per-node 2 benchmarks/allreduce.py

Each size is reduced ``--repeat`` times after a warm-up; process 0 prints the median and
the 90th percentile per call in microseconds. With gloo on one host this measures the
loopback path; across hosts, run it under torchrun's multi-node flags.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

# Hidden sizes: Qwen3-0.6B, Qwen3-30B-A3B, Qwen3-235B-A22B.
HIDDEN = (1024, 2048, 4096)


def timed(tensor: torch.Tensor, repeat: int) -> list[float]:
    """Seconds per call, back to back as a decode step's all-reduces come (no barrier
    between, which would add its own round trip)."""
    for _ in range(10):
        dist.all_reduce(tensor)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--tokens", default="1,128", help="rows of the hidden state")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    rows = []
    for hidden in HIDDEN:
        for tokens in (int(t) for t in args.tokens.split(",")):
            tensor = torch.ones(tokens, hidden, dtype=torch.float32)
            times = sorted(timed(tensor, args.repeat))
            median = statistics.median(times) * 1e6
            p90 = times[int(0.9 * len(times))] * 1e6
            rows.append((hidden, tokens, tensor.numel() * 4, median, p90))
    if rank == 0:
        host = os.uname().nodename
        print(f"gloo all-reduce, {size} processes on {host}, float32, medians of {args.repeat}")
        print("| hidden | tokens | bytes | median us | p90 us |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for hidden, tokens, nbytes, median, p90 in rows:
            print(f"| {hidden} | {tokens} | {nbytes:,} | {median:.0f} | {p90:.0f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
