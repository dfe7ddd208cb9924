"""Run by test_distributed.py, under torchrun or alone: loads a model (a directory, or a
preset's random weights), this process's share of it under --split, runs one forward of
--ids on process 0 with the others following, and writes OUT/rank<r>.json (bytes of
weights held, resident memory before and after loading) and, on process 0,
OUT/logits.safetensors (the logits at every position)."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen3chat.bench.run import current_rss_mb
from qwen3chat.distributed.driver import driving, follow
from qwen3chat.distributed.split import Sharding
from qwen3chat.distributed.world import join, leave
from qwen3chat.loading import load_model, load_preset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--preset")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--split", default="auto")
    parser.add_argument("--ids", default="1,2,3")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    world = join(torch.device("cpu"))
    sharding = None if world is None else Sharding(world, args.split)
    before = current_rss_mb()
    if args.preset:
        loaded = load_preset(args.preset, "cpu", args.dtype, args.quantize, sharding=sharding)
    else:
        loaded = load_model(args.model, dtype=args.dtype, quantize=args.quantize, sharding=sharding)
    after = current_rss_mb()
    model = loaded.model
    held = sum(
        t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers())
    )
    rank = 0 if world is None else world.rank
    out = Path(args.out)
    facts = {"held_bytes": held, "rss_before_mb": before, "rss_after_mb": after}
    (out / f"rank{rank}.json").write_text(json.dumps(facts))
    try:
        if rank:
            follow(model, world)
            return
        ids = torch.tensor([[int(i) for i in args.ids.split(",")]])
        with driving(model, world), torch.inference_mode():
            cache = model.new_cache(ids.shape[1] + 1)
            logits = model(ids, cache, 0, all_logits=True)
        save_file({"logits": logits[0].float().contiguous()}, out / "logits.safetensors")
    finally:
        leave()


if __name__ == "__main__":
    main()
