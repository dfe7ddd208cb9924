"""Decode/prefill speed and peak memory of qwen3chat next to transformers, in one run.

Builds a random-weight checkpoint of a real Qwen3 (or Qwen3.5/3.6/Qwen3-Next) shape once
(bf16 SafeTensors, the real tokenizer; GGUF files written from it the way llama.cpp's
converter writes them), then
runs each system in its own process on the same prompt, so peak RSS is per system.
Writes a Markdown table to docs/benchmarks.md in place of its first section (the
sections after it, earlier runs and notes written by hand, are kept).

    python benchmarks/compare.py                       # Qwen3-0.6B shape, the default rows
    python benchmarks/compare.py --runs qwen3chat:bfloat16,qwen3chat:gguf-Q4_0 --rounds 5

A run is SYSTEM:VARIANT: qwen3chat:{float32,bfloat16,int8,int4,gguf-F16,gguf-Q8_0,gguf-Q4_0}
(int8/int4: --quantize at load, bf16 activations), transformers:{float32,bfloat16}, or
llama.cpp:{F16,Q8_0,Q4_0} (through llama-cpp-python, when it is installed: `pip install
llama-cpp-python` builds llama.cpp from source for this machine; the same GGUF files).
A GGUF type may name the embedding table's own after a plus: Q4_0+Q8_0 is Q4_0 layers
with a Q8_0 table, the bytes `--quantize int4` reads (llama-quantize's
--token-embedding-type q8_0). A file llama-quantize wrote (model-Q4_K_M.gguf, …) found in
the cache is used as it is. ``gguf-TYPE/int4`` loads that file with ``--quantize int4``
(the types held in no exact form here requantized to int4 instead of int8).
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import qwen3chat  # noqa: F401  before torch, so that torch's OpenMP threads sleep, not spin

# isort: split
import torch

from qwen3chat import peer_environment
from qwen3chat.bench.run import cpu_model, peak_rss_mb
from qwen3chat.config import SHAPE_FIELDS
from qwen3chat.presets import PRESETS, preset_config

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests/fixtures/qwen3-tokenizer"
TOKENIZER_JSON_XZ = ROOT / "qwen3chat/assets/qwen3-tokenizer.json.xz"


def build_gguf(checkpoint: Path, qtype_name: str) -> Path:
    """The checkpoint as a GGUF file of ``qtype_name`` (F16, Q8_0, Q4_0, or LAYERS+TABLE
    such as Q4_0+Q8_0), built once."""
    path = checkpoint / f"model-{qtype_name}.gguf"
    if path.is_file():
        return path
    sys.path.insert(0, str(ROOT / "tests"))
    import gguf
    from gguf_files import write_gguf, write_hybrid_gguf
    from transformers import AutoModelForCausalLM

    tmp = path.with_suffix(".tmp")
    layers, _, table = qtype_name.partition("+")
    types = gguf.GGMLQuantizationType
    if (checkpoint / RANDOM_SHAPE).is_file():  # --random-gguf: no checkpoint, random blocks
        with torch.device("meta"):
            model = hf_model(preset_config((checkpoint / RANDOM_SHAPE).read_text()))
        write_hybrid_gguf(model, checkpoint, tmp, types[layers], random_weights=True)
        tmp.rename(path)
        return path
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    if model.config.model_type in ("qwen3", "qwen3_moe"):
        table_qtype = types[table] if table else None
        write_gguf(model, checkpoint, tmp, types[layers], table_qtype=table_qtype)
    else:  # the hybrid generation, as llama.cpp's converter writes it
        write_hybrid_gguf(model, checkpoint, tmp, types[layers])
    tmp.rename(path)
    return path


def hf_model(preset, dtype: torch.dtype = torch.bfloat16):
    """transformers' model of a preset's shape, randomly initialised (on the meta device
    when built under ``torch.device("meta")``)."""
    import transformers

    fields = (*SHAPE_FIELDS, "tie_word_embeddings", "max_position_embeddings")
    values = {f: getattr(preset, f) for f in fields}
    config_class, model_class = HF_CLASSES[preset.architecture]
    if preset.hybrid:
        values.update({f: getattr(preset, f) for f in HYBRID_FIELDS})
        values["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": preset.rope_theta,
            "partial_rotary_factor": preset.partial_rotary_factor,
        }
        if preset.num_experts:
            values.pop("intermediate_size")
            values.update({f: getattr(preset, f) for f in MOE_FIELDS})
    config = getattr(transformers, config_class)(eos_token_id=151645, **values)
    torch.manual_seed(0)
    return getattr(transformers, model_class)._from_config(config, dtype=dtype)


def with_tokenizer(directory: Path) -> None:
    (directory / "tokenizer.json").write_bytes(lzma.decompress(TOKENIZER_JSON_XZ.read_bytes()))
    shutil.copy(TOKENIZER / "tokenizer_config.json", directory / "tokenizer_config.json")


def build_checkpoint(shape: str, directory: Path) -> Path:
    """Random bf16 weights of ``shape`` saved by transformers, with the real tokenizer."""
    if (directory / "config.json").is_file():
        return directory
    model = hf_model(preset_config(shape))
    tmp = directory.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    with_tokenizer(tmp)
    tmp.rename(directory)
    return directory


# In a --random-gguf folder: the preset whose GGUF files build_gguf writes.
RANDOM_SHAPE = "random-shape"


def random_gguf_dir(shape: str, directory: Path) -> Path:
    """A folder for GGUF files of ``shape`` written straight from random blocks (shapes
    too large for a checkpoint in memory: the hybrid generation's only)."""
    if not preset_config(shape).hybrid:
        raise SystemExit(f"--random-gguf: {shape} is not a hybrid-generation shape")
    directory.mkdir(parents=True, exist_ok=True)
    with_tokenizer(directory)
    (directory / RANDOM_SHAPE).write_text(shape)
    return directory


# A preset's architecture -> transformers' config and model classes.
HF_CLASSES = {
    "Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM"),
    "Qwen3_5ForCausalLM": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM"),
    "Qwen3_5MoeForCausalLM": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM"),
    "Qwen3NextForCausalLM": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
}
HYBRID_FIELDS = (
    "layer_types",
    "linear_conv_kernel_dim",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_num_key_heads",
    "linear_num_value_heads",
)
MOE_FIELDS = (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)


def prompt_ids(n: int) -> list[int]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(1000, 100000, (n,), generator=generator).tolist()


def run_qwen3chat(path: Path, variant: str, prompt: list[int], gen: int, repeat: int) -> dict:
    from qwen3chat.engine import Engine
    from qwen3chat.loading import load_model
    from qwen3chat.sampling import SamplingSettings

    quantize = "none"
    if variant.startswith("gguf-"):
        file_type, _, asked = variant.removeprefix("gguf-").partition("/")
        path, dtype, quantize = build_gguf(path, file_type), "auto", asked or "none"
    elif variant in ("int8", "int4"):
        dtype, quantize = "auto", variant
    else:
        dtype = variant
    loaded = load_model(path, device="cpu", dtype=dtype, quantize=quantize)
    model = loaded.model
    weights_mb = sum(t.nbytes for t in [*model.parameters(), *model.buffers()]) / 2**20
    loaded.tokenizer.stop_ids = []  # random weights: always generate all tokens
    engine = Engine(loaded.model, loaded.tokenizer, max_seq_len=len(prompt) + gen + 8)
    greedy = SamplingSettings(temperature=0.0)
    runs = []
    for i in range(repeat + 1):  # the first run warms up and is not counted
        engine.cache.trim(0)
        finish = list(engine.generate(prompt, gen, greedy))[-1]
        if i:
            runs.append((finish.timings.prefill_tok_s, finish.timings.decode_tok_s))
    return {"load_s": loaded.load_s, "runs": runs, "weights_mb": weights_mb}


def run_transformers(path: Path, dtype: str, prompt: list[int], gen: int, repeat: int) -> dict:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    load_s = time.perf_counter() - start
    weights_mb = sum(t.nbytes for t in [*model.parameters(), *model.buffers()]) / 2**20
    ids = torch.tensor([prompt])
    common = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(new_tokens: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **common
            )
        assert out.shape[1] == len(prompt) + new_tokens
        return time.perf_counter() - start

    timed(2)
    runs = []
    for _ in range(repeat):
        prefill_s = timed(1)
        total_s = timed(gen)
        runs.append((len(prompt) / prefill_s, (gen - 1) / (total_s - prefill_s)))
    return {"load_s": load_s, "runs": runs, "weights_mb": weights_mb}


def run_llamacpp(path: Path, qtype: str, prompt: list[int], gen: int, repeat: int) -> dict:
    """llama.cpp on the same checkpoint as a GGUF file: prefill the prompt in one batch,
    then decode greedily one token at a time, as a chat would."""
    import numpy as np
    from llama_cpp import Llama

    gguf = build_gguf(path, qtype)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    llm = Llama(
        model_path=str(gguf),
        n_ctx=len(prompt) + gen + 8,
        n_batch=len(prompt),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load_s = time.perf_counter() - start
    vocab = llm.n_vocab()

    def greedy() -> int:  # the last position's logits, as llama.cpp leaves them
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    runs = []
    for i in range(repeat + 1):  # the first run warms up and is not counted
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill_s = time.perf_counter() - start
        token = greedy()
        start = time.perf_counter()
        for _ in range(gen - 1):
            llm.eval([token])
            token = greedy()
        decode_s = time.perf_counter() - start
        if i:
            runs.append((len(prompt) / prefill_s, (gen - 1) / decode_s))
    return {"load_s": load_s, "runs": runs, "weights_mb": gguf.stat().st_size / 2**20}


WORKERS = {"qwen3chat": run_qwen3chat, "transformers": run_transformers, "llama.cpp": run_llamacpp}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    result = WORKERS[args.worker](
        Path(args.model),
        args.worker_dtype,
        prompt_ids(args.prompt_tokens),
        args.gen_tokens,
        args.repeat,
    )
    print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3-0.6b", choices=sorted(PRESETS))
    parser.add_argument(
        "--runs",
        default="qwen3chat:float32,transformers:float32,qwen3chat:bfloat16,"
        "transformers:bfloat16,qwen3chat:gguf-Q8_0,qwen3chat:gguf-Q4_0",
    )
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per system")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--random-gguf",
        action="store_true",
        help="write the GGUF files from random blocks, with no checkpoint (large hybrid "
        "shapes; GGUF and llama.cpp runs only)",
    )
    parser.add_argument("--cache-dir", default=str(ROOT / ".bench"))
    parser.add_argument("--out", default=str(ROOT / "docs/benchmarks.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-dtype", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    if args.random_gguf:
        path = random_gguf_dir(args.shape, Path(args.cache_dir) / f"{args.shape}-random")
    else:
        path = build_checkpoint(args.shape, Path(args.cache_dir) / args.shape)
    weight_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    for run in args.runs.split(","):  # build GGUF files before timing anything
        system, variant = run.split(":")
        if system == "llama.cpp" or variant.startswith("gguf-"):
            build_gguf(path, variant.removeprefix("gguf-").partition("/")[0])
    runs = args.runs.split(",")
    results: dict[str, list[dict]] = {run: [] for run in runs}
    # Rounds interleave the systems, so that the drift of a shared machine over the
    # minutes of a comparison falls on all of them alike, not on whichever ran last.
    for round_index in range(args.rounds):
        for run in runs:
            print(f"round {round_index + 1}/{args.rounds}: {run} ...", file=sys.stderr, flush=True)
            results[run].append(run_worker(args, path, run))
    rows = []
    for run in runs:
        system, variant = run.split(":")
        per_round = results[run]
        rows.append(
            (
                system,
                variant,
                {
                    "load_s": statistics.median(r["load_s"] for r in per_round),
                    "runs": [point for r in per_round for point in r["runs"]],
                    "weights_mb": per_round[0]["weights_mb"],
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in per_round),
                },
            )
        )
    write_table(args, rows, weight_bytes)


def run_worker(args, path: Path, run: str) -> dict:
    """One system in its own process (so that its peak RSS is its own): its result."""
    system, variant = run.split(":")
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        system,
        "--worker-dtype",
        variant,
        "--model",
        str(path),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--gen-tokens",
        str(args.gen_tokens),
        "--repeat",
        str(args.repeat),
        "--threads",
        str(args.threads),
    ]
    # The peers run in the environment their users give them, not in the one qwen3chat
    # sets for itself (see qwen3chat.peer_environment).
    env = None if system == "qwen3chat" else peer_environment()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_table(args, rows, weight_bytes) -> None:
    lines = [
        f"## {args.shape}, random weights, {args.prompt_tokens}-token prompt, "
        f"{args.gen_tokens} new tokens, {args.threads} threads",
        "",
        f"Measured {date.today()} on {cpu_model()} (torch {torch.__version__}); "
        + (
            f"checkpoint {weight_bytes / 2**30:.2f} GiB bf16. "
            if weight_bytes
            else "GGUF files of random blocks (--random-gguf). "
        )
        + f"Median (min-max) of {args.rounds} rounds x {args.repeat} timed runs, each after a "
        "warm-up run; in each round every system runs in turn in its own process (peak "
        "RSS: the highest of its rounds).",
        "",
        "| system | weights / compute | load s | prefill tok/s | decode tok/s | weights MiB "
        "| peak RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for system, dtype, r in rows:
        prefill = [p for p, _ in r["runs"]]
        decode = [d for _, d in r["runs"]]
        lines.append(
            f"| {system} | {dtype} | {r['load_s']:.2f} | {fmt(prefill)} | {fmt(decode)} "
            f"| {r['weights_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    lines.append("")
    lines.append(
        "Command: `python benchmarks/compare.py "
        f"--shape {args.shape} --runs {args.runs} "
        f"--prompt-tokens {args.prompt_tokens} --gen-tokens {args.gen_tokens} "
        f"--repeat {args.repeat} --rounds {args.rounds} --threads {args.threads}"
        f"{' --random-gguf' if args.random_gguf else ''}`"
    )
    table = "\n".join(lines) + "\n"
    print(table)
    write_section(Path(args.out), "Benchmarks", "benchmarks/compare.py", table)


def write_section(out: Path, title: str, script: str, table: str) -> None:
    """Writes ``table`` (one ``## `` section) to ``out`` in place of its first section. The
    sections after it (earlier runs, notes) are written by hand: kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# {title}\n\nWritten by `{script}`; rerun it to refresh.\n\n"
    notes = ""
    if out.is_file():
        previous = out.read_text(encoding="utf-8")
        second = previous.find("\n## ", previous.find("\n## ") + 1)
        notes = previous[second:] if second != -1 else ""
    out.write_text(header + table + notes, encoding="utf-8")


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


if __name__ == "__main__":
    main()
