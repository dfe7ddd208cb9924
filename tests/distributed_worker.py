"""Run by test_distributed.py, under torchrun or alone: loads a model (a directory, or a
preset's random weights), this process's share of it under --split, runs --ids on process
0 with the others following (the first --prompt of them in one forward, then one decode
step each), and writes OUT/rank<r>.json (bytes of weights held, resident memory before and
after loading, whether the native decode step covers each layer it runs) and, on process
0, OUT/logits.safetensors (the logits at every position). With --image (a vision
model), process 0 asks about that picture instead: --ids are then taken from the chat
template, and --prompt counts the generated ones decoded after the prompt."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen3chat import kernels
from qwen3chat.bench.run import current_rss_mb
from qwen3chat.distributed.driver import driving, follow
from qwen3chat.distributed.split import Sharding
from qwen3chat.distributed.world import join
from qwen3chat.loading import load_model, load_preset
from qwen3chat.model import native as native_step
from qwen3chat.vision.preprocess import VisionPreprocessing
from qwen3chat.vision.prompt import VisionChat, user_message


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--preset")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--split", default="auto")
    parser.add_argument("--ids", default="1,2,3")
    parser.add_argument("--prompt", type=int, default=0, help="ids in the first forward (all)")
    parser.add_argument("--image")
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
    native = kernels.native(torch.zeros(1, dtype=model.dtype))
    fused = [
        native is not None and native_step.layer_weights(native, layer) is not None
        for layer in model.running
    ]
    facts = {"held_bytes": held, "rss_before_mb": before, "rss_after_mb": after, "fused": fused}
    (out / f"rank{rank}.json").write_text(json.dumps(facts))
    try:
        if rank:
            follow(model, world)
            return
        ids, visuals = [int(i) for i in args.ids.split(",")], []
        prompt = args.prompt or len(ids)
        if args.image:  # the picture's prompt, then --ids as generated tokens
            chat = VisionChat(VisionPreprocessing.from_model_dir(args.model))
            message = user_message("What is it?", [chat.image(args.image)])
            prompt_ids, visuals = chat.encode_chat(loaded.tokenizer, [message])
            ids, prompt = prompt_ids + ids, len(prompt_ids)
        layout = model.prompt_layout(ids[:prompt], visuals)
        ids = torch.tensor([ids])
        with driving(model, world), torch.inference_mode():
            cache = model.new_cache(ids.shape[1] + 1)
            layout.prepare(model, 0)
            extra = layout.rows(0, prompt, model.device)
            rows = [model(ids[:, :prompt], cache, 0, all_logits=True, **extra)[0]]
            cache.commit(ids[0, :prompt].tolist())  # a hybrid cache's states hold them
            for at in range(prompt, ids.shape[1]):
                extra = layout.rows(at, at + 1, model.device)
                rows.append(model(ids[:, at : at + 1], cache, at, **extra))
                cache.commit([int(ids[0, at])])
        logits = torch.cat(rows).float().contiguous()
        save_file({"logits": logits}, out / "logits.safetensors")
    finally:
        if world is not None:
            world.close()


if __name__ == "__main__":
    main()
