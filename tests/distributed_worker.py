"""Run by test_distributed.py, under torchrun or alone: the jobs of a JSON file (--jobs),
one after another in one process group (starting Python, torch and a group for each case
was most of these tests' time). Each job loads its model (a directory, or a preset's
random weights), this process's share of it under its split, runs on process 0 with the
others following, and writes to its folder (``out``):

- ``rank<r>.json``: bytes of weights held, resident memory before and after loading,
  whether the native decode step covers each layer it runs;
- task "logits", on process 0: ``logits.safetensors``, the logits at every position of
  ``ids`` (the first ``prompt`` of them in one forward, then one decode step each). With
  ``image`` (a vision model) process 0 asks about that picture instead: ``ids`` then
  follow the chat template's prompt, and ``prompt`` counts nothing;
- task "reply", on process 0: ``reply.json``, the greedy one-shot answer to ``text`` as
  ``chat --json`` prints it (``vision-chat --json``'s, about ``image``; ``think`` false as
  with ``--no-think``)."""

from __future__ import annotations

import argparse
import io
import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen3chat import kernels
from qwen3chat.bench.run import current_rss_mb
from qwen3chat.chat.oneshot import run_oneshot
from qwen3chat.distributed.driver import driving, follow
from qwen3chat.distributed.split import Sharding
from qwen3chat.distributed.world import join
from qwen3chat.engine import Engine
from qwen3chat.loading import load_model, load_preset
from qwen3chat.model import native as native_step
from qwen3chat.sampling import SamplingSettings
from qwen3chat.vision.preprocess import VisionPreprocessing
from qwen3chat.vision.prompt import VisionChat, user_message


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", required=True, help="a JSON file: a list of jobs")
    jobs = json.loads(Path(parser.parse_args().jobs).read_text())
    world = join(torch.device("cpu"))
    try:
        for job in jobs:
            run(job, world)
    finally:
        if world is not None:
            world.close()


DEFAULTS = {"split": "auto", "dtype": "float32", "quantize": "none"}


def run(job: dict, world) -> None:
    split, dtype, quantize = (job.get(k, d) for k, d in DEFAULTS.items())
    sharding = None if world is None else Sharding(world, split)
    before = current_rss_mb()
    if "preset" in job:
        loaded = load_preset(job["preset"], "cpu", dtype, quantize, sharding=sharding)
    else:
        loaded = load_model(job["model"], dtype=dtype, quantize=quantize, sharding=sharding)
    after = current_rss_mb()
    model = loaded.model
    held = sum(
        t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers())
    )
    rank = 0 if world is None else world.rank
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    native = kernels.native(torch.zeros(1, dtype=model.dtype))
    fused = [
        native is not None and native_step.layer_weights(native, layer) is not None
        for layer in model.running
    ]
    facts = {"held_bytes": held, "rss_before_mb": before, "rss_after_mb": after, "fused": fused}
    (out / f"rank{rank}.json").write_text(json.dumps(facts))
    if rank:
        follow(model, world)
        return
    with driving(model, world):
        TASKS[job["task"]](loaded, job, out)


def logits(loaded, job: dict, out: Path) -> None:
    model = loaded.model
    ids, visuals = list(job["ids"]), []
    prompt = job.get("prompt") or len(ids)
    if "image" in job:  # the picture's prompt, then the ids as generated tokens
        chat = VisionChat(VisionPreprocessing.from_model_dir(job["model"]))
        message = user_message("What is it?", [chat.image(job["image"])])
        prompt_ids, visuals = chat.encode_chat(loaded.tokenizer, [message])
        ids, prompt = prompt_ids + ids, len(prompt_ids)
    layout = model.prompt_layout(ids[:prompt], visuals)
    ids = torch.tensor([ids])
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[1] + 1)
        layout.prepare(model, 0)
        extra = layout.rows(0, prompt, model.device)
        rows = [model(ids[:, :prompt], cache, 0, all_logits=True, **extra)[0]]
        cache.commit(ids[0, :prompt].tolist())  # a hybrid cache's states hold them
        for at in range(prompt, ids.shape[1]):
            extra = layout.rows(at, at + 1, model.device)
            rows.append(model(ids[:, at : at + 1], cache, at, **extra))
            cache.commit([int(ids[0, at])])
    save_file({"logits": torch.cat(rows).float().contiguous()}, out / "logits.safetensors")


def reply(loaded, job: dict, out: Path) -> None:
    """As `chat -p TEXT --temperature 0 -n MAX_TOKENS --json` (`vision-chat --image`)."""
    engine = Engine(loaded.model, loaded.tokenizer, 4096, None, None, 0)
    prompts, pictures = None, []
    if "image" in job:
        prompts = VisionChat(VisionPreprocessing.from_model_dir(job["model"]))
        pictures = [prompts.image(job["image"])]
    sampling = SamplingSettings(**{**loaded.generation_defaults, "temperature": 0.0})
    answer = io.StringIO()
    run_oneshot(
        engine,
        job["text"],
        None,
        sampling,
        job["max_tokens"],
        job.get("think", True),
        True,
        loaded.load_s,
        stdout=answer,
        stderr=io.StringIO(),
        prompts=prompts,
        pictures=pictures,
    )
    (out / "reply.json").write_text(answer.getvalue())


TASKS = {"logits": logits, "reply": reply}


if __name__ == "__main__":
    main()
