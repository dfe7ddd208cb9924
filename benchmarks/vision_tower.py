"""Qwen3-VL vision-tower time and peak memory for one image, random weights of a real
shape (default: Qwen3-VL-2B's tower, a 1024x1024 image), on this machine's CPU.

    python benchmarks/vision_tower.py --dtype bfloat16 --size 1024 --repeat 3
"""

from __future__ import annotations

import argparse
import resource
import time

import qwen3chat  # noqa: F401  before torch, so that torch's OpenMP threads sleep, not spin

# isort: split
import torch
from PIL import Image

from qwen3chat.model.vision import VisionConfig, VisionTower
from qwen3chat.vision.preprocess import VisionPreprocessing, preprocess_images

# Qwen3-VL-2B-Instruct's vision_config.
QWEN3_VL_2B = VisionConfig(
    depth=24,
    hidden_size=1024,
    intermediate_size=4096,
    num_heads=16,
    patch_size=16,
    out_hidden_size=2048,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[5, 11, 17],
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    with torch.device("meta"):
        tower = VisionTower(QWEN3_VL_2B)
    tower = tower.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0, 0.02, generator=generator)
    weights_mib = sum(p.nbytes for p in tower.parameters()) / 2**20
    image = Image.effect_noise((args.size, args.size), 64).convert("RGB")
    start = time.perf_counter()
    pixels, grid = preprocess_images([image], VisionPreprocessing())
    preprocess_s = time.perf_counter() - start
    before = peak_rss_mib()
    times = []
    with torch.inference_mode():
        for _ in range(args.repeat):
            start = time.perf_counter()
            embeds, _ = tower(pixels, grid)
            times.append(time.perf_counter() - start)
    print(
        f"{args.dtype}, {args.threads} threads: {args.size}x{args.size} image, grid "
        f"{grid.tolist()[0]}, {embeds.shape[0]} visual tokens; weights {weights_mib:.0f} MiB; "
        f"preprocess {preprocess_s:.2f} s; tower median {sorted(times)[len(times) // 2]:.2f} s "
        f"(runs {', '.join(f'{t:.2f}' for t in times)}); peak RSS {peak_rss_mib():.0f} MiB "
        f"({before:.0f} MiB before the tower)"
    )


if __name__ == "__main__":
    main()
