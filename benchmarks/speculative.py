"""What speculative decoding by prompt lookup (``--draft ngram``) buys on a real shape.

Random weights guess nothing a draft could match, so this measures the two figures that,
with a workload's share of right drafts, give the speed-up:

1. ``--costs``: the time of a pass over the pending token and k drafts against a decode
   step's, at a context depth. Where each draft is right with probability a, a pass of k
   drafts yields (1 - a^(k+1)) / (1 - a) tokens on average (drafting stops at the first
   wrong one), so the speed-up is that many tokens over the pass's cost in decode steps.
2. ``--copy``: the speed of a reply that repeats text its prompt holds, every draft right,
   and of one whose prompt misleads every draft, with and without drafts (and llama.cpp's
   prompt lookup through llama-cpp-python's ``LlamaPromptLookupDecoding`` where it is
   installed, on the same file). The file is the
   shape's random checkpoint with each attention output projection zeroed: each token's
   logits then depend on the token before alone, so a greedy reply that reaches a token
   the prompt holds goes on as the prompt went on. Its matrices are the shape's, so a step
   costs what the shape's does.

    python benchmarks/speculative.py --costs --copy --streams 4 --qtype Q4_0
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import qwen3chat  # noqa: F401  before torch, so that torch's OpenMP threads sleep, not spin

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import ROOT, build_checkpoint

from qwen3chat import peer_environment
from qwen3chat.bench.run import cpu_model

SHARES = (0.3, 0.5, 0.7, 0.9)


def zeroed_attention_gguf(cache_dir: Path, shape: str, qtype: str) -> Path:
    """The shape's random checkpoint with attention outputs zeroed, as a GGUF file."""
    directory = cache_dir / shape
    path = directory / f"model-{qtype}-no-attention-output.gguf"
    if path.is_file():
        return path
    checkpoint = build_checkpoint(shape, directory)
    sys.path.insert(0, str(ROOT / "tests"))
    import gguf
    from gguf_files import write_gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    tmp = path.with_suffix(".tmp")
    write_gguf(model, checkpoint, tmp, gguf.GGMLQuantizationType[qtype])
    tmp.rename(path)
    return path


def pass_costs(path: Path, depth: int, max_rows: int, repeat: int) -> dict[int, float]:
    """Median seconds of a pass of 1..max_rows tokens after ``depth`` tokens of context, no
    more rows than the engines run (the model's step_order_rows: what keeps rows exact)."""
    from qwen3chat.engine import Engine
    from qwen3chat.loading import load_model

    loaded = load_model(path)
    max_rows = min(max_rows, loaded.model.step_order_rows())
    engine = Engine(loaded.model, loaded.tokenizer, depth + max_rows + 1)
    engine.prefill([1000 + i % 5000 for i in range(depth)], lambda: False)
    costs = {}
    for rows in range(1, max_rows + 1):
        ids = list(range(2000, 2000 + rows))
        times = []
        for _ in range(repeat + 1):  # the first warms up
            engine.cache.trim(depth)
            start = time.perf_counter()
            engine.decode_step(*ids)
            times.append(time.perf_counter() - start)
        costs[rows] = statistics.median(times[1:])
    return costs


def tokens_per_pass(share: float, drafts: int) -> float:
    return (1 - share ** (drafts + 1)) / (1 - share)


def prompts(chain: list[int], start: int) -> dict[str, list[int]]:
    """Prompts after which the greedy reply is ``chain``: "repeats" holds the chain once,
    a token that breaks it, then its start (every draft right); "misleads" holds each pair
    of the chain's consecutive tokens followed by another token (every draft wrong)."""
    pairs = zip([start, *chain], chain, strict=False)
    misleads = [t for i, (a, b) in enumerate(pairs) for t in (a, b, 5 + i)]
    return {"repeats": [start, *chain, 77, start], "misleads": [*misleads, 77, start]}


def ours_copy(path: Path, gen: int, draft_max: int) -> dict:
    from qwen3chat.engine import Engine
    from qwen3chat.loading import load_model
    from qwen3chat.sampling import SamplingSettings

    loaded = load_model(path)
    loaded.tokenizer.stop_ids = []
    greedy = SamplingSettings(temperature=0.0)
    engine = Engine(loaded.model, loaded.tokenizer, 4 * gen + 8)
    chain = list(engine.generate([1000], gen, greedy))[-1].token_ids
    out = {}
    for name, prompt in prompts(chain, 1000).items():
        for drafts in (0, draft_max):
            engine = Engine(loaded.model, loaded.tokenizer, len(prompt) + gen + 1, draft_max=drafts)
            list(engine.generate(prompt, 8, greedy))  # warm-up
            finish = list(engine.generate(prompt, gen, greedy))[-1]
            t = finish.timings
            out[name, "ngram" if drafts else "plain"] = {
                "decode_tok_s": round(t.decode_tok_s, 1),
                "as_plain": finish.token_ids == chain[: len(finish.token_ids)],
                "kept": f"{t.accepted_tokens}/{t.drafted_tokens}",
            }
    return out


def batched_copy(path: Path, gen: int, draft_max: int, streams: int) -> dict:
    """The server's engine: ``streams`` replies at once, each repeating its own prompt
    (chains from different start tokens); tokens per second over all of them."""
    from qwen3chat.batch.engine import BatchEngine
    from qwen3chat.engine import Engine
    from qwen3chat.loading import load_model
    from qwen3chat.sampling import SamplingSettings

    loaded = load_model(path)
    loaded.tokenizer.stop_ids = []
    greedy = SamplingSettings(temperature=0.0)
    single = Engine(loaded.model, loaded.tokenizer, 4 * gen + 8)
    starts = [1000 + 500 * i for i in range(streams)]
    chains = [list(single.generate([s], gen, greedy))[-1].token_ids for s in starts]
    requests = [prompts(c, s)["repeats"] for c, s in zip(chains, starts, strict=True)]
    out = {}
    for drafts in (0, draft_max):
        engine = BatchEngine(loaded.model, loaded.tokenizer, 4 * gen + 8, draft_max=drafts)
        engine.warm_up()
        seqs = [engine.add(ids, gen, greedy) for ids in requests]
        engine.step()  # the prompts
        start, tokens = time.perf_counter(), engine.tokens_sampled
        while engine.has_work:
            engine.step()
        seconds = time.perf_counter() - start
        copied = all(s.generation.generated == c for s, c in zip(seqs, chains, strict=True))
        label = "ngram" if drafts else "plain"
        out[label] = {
            "tok_s": round((engine.tokens_sampled - tokens) / seconds, 1),
            "as_plain": copied,
        }
    return out


def llamacpp_copy(path: Path, gen: int, draft_max: int, threads: int) -> dict:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    def llama(draft):
        # logits_all given: llama-cpp-python 0.3.36 takes it as set with a draft model but
        # sizes the logits for n_batch rows unless it is passed.
        return Llama(
            str(path),
            n_ctx=8 * gen,
            n_threads=threads,
            verbose=False,
            draft_model=draft,
            logits_all=draft is not None,
        )

    def reply(model, prompt, n):
        """The reply's tokens, and the seconds from its first token to its last."""
        model.reset()
        tokens = []
        for token in model.generate(prompt, temp=0.0, top_k=1):
            tokens.append(token)
            if len(tokens) == 1:
                first = time.perf_counter()
            if len(tokens) == n:
                break
        return tokens, time.perf_counter() - first

    plain = llama(None)
    chain, _ = reply(plain, [1000], gen)
    drafting = llama(LlamaPromptLookupDecoding(2, draft_max))
    out = {}
    for name, prompt in prompts(chain, 1000).items():
        for label, model in (("plain", plain), ("ngram", drafting)):
            reply(model, prompt, 8)
            tokens, seconds = reply(model, prompt, gen)
            out[name, label] = {
                "decode_tok_s": round((len(tokens) - 1) / seconds, 1),
                "as_plain": tokens == chain[: len(tokens)],
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--qtype", default="Q4_0")
    parser.add_argument("--costs", action="store_true")
    parser.add_argument("--copy", action="store_true")
    parser.add_argument("--streams", type=int, default=0, help="also the server's engine")
    parser.add_argument("--depth", type=int, default=512)
    parser.add_argument("--draft-max", type=int, default=7)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=str(ROOT / ".bench"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = zeroed_attention_gguf(Path(args.cache_dir), args.shape, args.qtype)
    if args.worker:  # llama.cpp in a process of its own: its threads and memory apart
        print(llamacpp_copy(path, args.gen_tokens, args.draft_max, args.threads))
        return
    print(f"{args.shape} {args.qtype}, {cpu_model()}, {args.threads} threads")
    if args.costs:
        costs = pass_costs(path, args.depth, args.draft_max + 1, args.repeat)
        step = costs[1]
        print(f"\npass cost at depth {args.depth} (decode step {step * 1e3:.1f} ms)")
        print("| drafts | pass ms | in decode steps | " + " | ".join(f"a={a}" for a in SHARES))
        for rows, cost in costs.items():
            ratio = cost / step
            gains = [tokens_per_pass(a, rows - 1) / ratio for a in SHARES]
            cells = " | ".join(f"{g:.2f}x" for g in gains)
            print(f"| {rows - 1} | {cost * 1e3:.1f} | {ratio:.2f} | {cells}")
    if args.copy:
        print(f"\nreplies of {args.gen_tokens} tokens, drafts of up to {args.draft_max}")
        for (name, label), row in ours_copy(path, args.gen_tokens, args.draft_max).items():
            print(f"qwen3chat {name} {label}: {row}")
        if args.streams:
            batched = batched_copy(path, args.gen_tokens, args.draft_max, args.streams)
            print(f"qwen3chat serve engine, {args.streams} replies repeating: {batched}")
        worker = [sys.executable, __file__, "--worker", "1", *sys.argv[1:]]
        done = subprocess.run(worker, capture_output=True, text=True, env=peer_environment())
        print(f"llama.cpp: {done.stdout.strip() or done.stderr.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
