"""Serving throughput of `qwen3chat serve` next to llama.cpp's `llama-server`, in one run.

Builds (once, cached as benchmarks/compare.py does) a random-weight checkpoint of a preset
shape with the real tokenizer, and GGUF files of the same weights: BF16 for the bf16 rows,
Q4_0 for the int4 rows. For each weights kind and each number of concurrent streams K,
each system is started as a server on loopback (qwen3chat: `serve --dtype bfloat16
[--quantize int4] --max-running K` on the checkpoint, or with `--qwen3chat-weights gguf`
on the very GGUF file llama.cpp reads; llama.cpp: `llama-server -np K`, a context of K slots
of prompt + max_tokens), warmed up with one request, sent K concurrent streaming chat
requests (different ~40-token prompts, `max_tokens` new tokens, the same sampling
settings and a per-request seed: random weights would make greedy decoding hit the end
token early, sampling over the 151k vocabulary almost never does), then stopped. The
systems alternate at every (round, weights, K), so the ratios are same-run.

    python benchmarks/serve_bench.py                    # 1, 4, 16 streams, bf16 and int4
    python benchmarks/serve_bench.py --streams 1,2 --max-tokens 8 --rounds 1 --out /tmp/x.md

Definitions (times are the client's, `time.perf_counter` when a streamed chunk arrives):

- tokens of a stream: `usage.completion_tokens` of its last chunk when the server sends
  it, else the number of streamed deltas with non-empty `content` or `reasoning_content`
  (one per token, except where a server holds back a partial UTF-8 character).
- TTFT: from sending the request to the first delta with text; median over all streams
  of all rounds.
- per-stream decode tok/s: (tokens - 1) / (t_last - t_first), t_first and t_last the
  arrival of its first and last delta with text; median over all streams of all rounds.
- aggregate decode tok/s: the sum over the K streams of (tokens - 1), divided by the
  time from the earliest first token of any stream to the latest last token of any
  stream; median over rounds. (A server that takes requests one at a time gets about
  its single-stream speed here, and TTFTs that grow with K.)

llama-server for this machine (no internet but PyPI): the llama-cpp-python sdist vendors
llama.cpp's sources. `pip download --no-binary :all: --no-deps llama-cpp-python`, unpack,
then `cmake -S vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
-DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
-DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=OFF` plus the instruction sets `lscpu` lists
(`-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON
-DGGML_AVX512_BF16=ON ...`) and `-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
-DGGML_AMX_BF16=OFF` where cpuid reports AMX that the VM refuses (SIGILL), and
`cmake --build build --target llama-server -j2`.

Writes a Markdown table (and ratios) to docs/serve_benchmark.md in place of its first
section, keeping the sections after it (earlier runs, notes), and prints it. The client
runs on the same CPUs as the server, but only parses a few hundred small events a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from compare import ROOT, build_checkpoint, build_gguf, write_section  # noqa: E402

from qwen3chat import peer_environment  # noqa: E402
from qwen3chat.bench.run import cpu_model  # noqa: E402
from qwen3chat.presets import PRESETS  # noqa: E402

SYSTEMS = ("qwen3chat", "llama.cpp")
# Both servers get the same explicit sampling settings, so that neither's defaults
# (llama.cpp: top-k 40, top-p 0.95, min-p 0.05) make its sampling cheaper or dearer.
SAMPLING = {"temperature": 1.0, "top_k": 40, "top_p": 1.0, "min_p": 0.0}
# Room for a prompt and the chat template around it, per request, in the servers' context.
PROMPT_BUDGET = 192
WORDS = (
    "river mountain signal garden engine window market silver planet music winter "
    "forest bridge number paper story orange camera letter animal summer ocean "
    "station yellow travel morning pocket circle little question system answer island "
    "cotton thunder pencil library kitchen harbor castle meadow rocket violin lantern "
    "compass feather marble canyon desert glacier meteor ribbon saddle tunnel velvet"
)


def prompt_text(seed: int) -> str:
    """A request of about 40 tokens, different for every seed (so no server reuses
    another request's prompt from its cache)."""
    rng = random.Random(seed)
    words = " ".join(rng.choices(WORDS.split(), k=32))
    return f"Request {seed}: write a short story using these words: {words}."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess, its output in a log file (read for readiness and errors)."""

    def __init__(self, name: str, cmd: list[str], env: dict | None = None):
        self.name = name
        self.log = Path(tempfile.mkstemp(prefix="serve_bench-", suffix=".log")[1])
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        self.base: str | None = None

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}"
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.unlink(missing_ok=True)


def wait_ready(server: Server, ready, timeout: float) -> Server:
    """Poll ``ready(server)`` until true; on a timeout, an exit or any error, stop it."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            server.check_alive()
            if ready(server):
                return server
            time.sleep(0.2)
        raise TimeoutError(f"{server.name} did not start in {timeout:.0f} s:\n{server.log_tail()}")
    except BaseException:
        server.stop()
        raise


def start_qwen3chat(args, files: dict, weights: str, k: int) -> Server:
    gguf = args.qwen3chat_weights == "gguf"
    model = files[weights] if gguf else files["checkpoint"]
    cmd = [sys.executable, "-m", "qwen3chat", "serve", "-m", str(model), "--port", "0"]
    cmd += ["--device", "cpu", "--dtype", "bfloat16", "--max-running", str(k)]
    cmd += ["--max-seq-len", str(PROMPT_BUDGET + args.max_tokens)]
    if weights == "int4" and not gguf:
        cmd += ["--quantize", "int4"]
    if args.kv_cache == "int8":
        cmd += ["--kv-cache", "int8"]
    if args.serve_has_threads:
        cmd += ["--threads", str(args.threads)]
    # torch's intra-op pool follows OMP_NUM_THREADS where serve has no --threads.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}

    def ready(server: Server) -> bool:  # it prints the address once the socket is bound
        for line in server.log.read_text(errors="replace").splitlines():
            if line.startswith("listening on "):
                server.base = line.removeprefix("listening on ").strip()
                return True
        return False

    return wait_ready(Server("qwen3chat", cmd, env), ready, args.start_timeout)


def start_llamacpp(args, gguf: Path, k: int) -> Server:
    port = free_port()
    # -np K slots, each with the context of one request (llama-server splits -c among them).
    ctx = k * (PROMPT_BUDGET + args.max_tokens)
    cmd = [args.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-np", str(k), "-c", str(ctx), "--threads", str(args.threads)]
    cmd += ["--threads-batch", str(args.threads), "--jinja", "--no-webui"]
    if args.kv_cache == "int8":  # a quantized V cache needs flash attention
        cmd += ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"]
    server = Server("llama-server", cmd, peer_environment())
    server.base = f"http://127.0.0.1:{port}"

    def ready(server: Server) -> bool:
        try:  # 503 while the model loads
            return httpx.get(f"{server.base}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    return wait_ready(server, ready, args.start_timeout)


async def one_stream(client: httpx.AsyncClient, base: str, prompt: str, seed: int, n: int):
    """One streaming chat request: its timings and token count."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": n,
        "seed": seed,
        **SAMPLING,
        "stream": True,
        "stream_options": {"include_usage": True},
        "chat_template_kwargs": {"enable_thinking": False},
    }
    sent = time.perf_counter()
    first = last = None
    deltas = 0
    usage = None
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    deltas += 1
    if first is None:
        raise RuntimeError("a stream ended without any text")
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") else deltas
    return {
        "sent": sent,
        "first": first,
        "last": last,
        "tokens": tokens,
        "prompt_tokens": (usage or {}).get("prompt_tokens"),
    }


async def measure(base: str, k: int, n: int, seed0: int) -> dict:
    """K concurrent streams (seeds seed0 .. seed0+K-1): aggregate and per-stream numbers."""
    limits = httpx.Limits(max_connections=k + 1, max_keepalive_connections=k + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        # Warm-up (first-request costs: allocation, kernel selection), not counted.
        await one_stream(client, base, prompt_text(seed0 + 10**6), seed0, min(n, 8))
        streams = await asyncio.gather(
            *(one_stream(client, base, prompt_text(seed0 + i), seed0 + i, n) for i in range(k))
        )
    window = max(s["last"] for s in streams) - min(s["first"] for s in streams)
    after_first = sum(s["tokens"] - 1 for s in streams)
    return {
        "aggregate": after_first / window if window > 0 else float("nan"),
        "per_stream": [
            (s["tokens"] - 1) / (s["last"] - s["first"])
            for s in streams
            if s["tokens"] > 1 and s["last"] > s["first"]
        ],
        "ttft_ms": [(s["first"] - s["sent"]) * 1000 for s in streams],
        "tokens": [s["tokens"] for s in streams],
        "prompt_tokens": [s["prompt_tokens"] for s in streams if s["prompt_tokens"]],
    }


def run_one(args, system: str, weights: str, k: int, seed0: int, files: dict) -> dict:
    if system == "qwen3chat":
        server = start_qwen3chat(args, files, weights, k)
    else:
        server = start_llamacpp(args, files[weights], k)
    try:
        return asyncio.run(measure(server.base, k, args.max_tokens, seed0))
    except Exception as e:
        raise RuntimeError(f"{system} {weights} x{k}: {e}\n{server.log_tail()}") from e
    finally:
        server.stop()


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_report(args, systems: list[str], results: dict, notes: list[str]) -> None:
    gguf_of = {"bf16": args.gguf_bf16, "int4": args.gguf_int4}
    compute = {"bf16": "bf16", "int4": "int4 (--quantize)"}
    if args.qwen3chat_weights == "gguf":
        compute = {weights: f"GGUF {qtype} (the same file)" for weights, qtype in gguf_of.items()}
    prompt_tokens = [p for r in results.values() for run in r for p in run["prompt_tokens"]]
    lines = [
        f"## {args.preset}, random weights, {args.max_tokens} new tokens per stream, "
        f"{args.threads} threads",
        "",
        f"Measured {date.today()} on {cpu_model()} ({os.cpu_count()} CPUs visible), "
        f"{args.threads} threads per server; prompts of {med(prompt_tokens):.0f} tokens "
        f"(median, chat template included). Medians of {args.rounds} round(s); in each "
        "round the systems alternate at every weights kind and stream count, each in a "
        f"fresh server. Load average before the run: {args.loadavg}. Sampling "
        f"{json.dumps(SAMPLING)}, a seed per request. Definitions: the "
        "docstring of `benchmarks/serve_bench.py`.",
        "",
        "| system | weights | streams | aggregate decode tok/s | per-stream decode tok/s "
        "| TTFT ms | tokens/stream |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for weights in args.weights:
        for k in args.streams:
            for system in systems:
                runs = results.get((system, weights, k))
                if not runs:
                    continue
                label = compute[weights] if system == "qwen3chat" else f"GGUF {gguf_of[weights]}"
                lines.append(
                    f"| {system} | {label} | {k} "
                    f"| {med([r['aggregate'] for r in runs]):.1f} "
                    f"| {med([v for r in runs for v in r['per_stream']]):.1f} "
                    f"| {med([v for r in runs for v in r['ttft_ms']]):.0f} "
                    f"| {med([v for r in runs for v in r['tokens']]):.0f} |"
                )

    def agg(system: str, weights: str, k: int) -> float:
        return med([r["aggregate"] for r in results.get((system, weights, k), [])])

    if "llama.cpp" in systems:
        lines += [
            "",
            "qwen3chat / llama.cpp (aggregate and per-stream: above 1 is qwen3chat faster; "
            "TTFT: below 1 is qwen3chat faster):",
            "",
            "| weights | streams | aggregate | per-stream | TTFT |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for weights in args.weights:
            for k in args.streams:
                ours = results.get(("qwen3chat", weights, k))
                theirs = results.get(("llama.cpp", weights, k))
                if not ours or not theirs:
                    continue
                ratios = [
                    med([v for r in ours for v in r[key]])
                    / med([v for r in theirs for v in r[key]])
                    for key in ("per_stream", "ttft_ms")
                ]
                aggregate = agg("qwen3chat", weights, k) / agg("llama.cpp", weights, k)
                lines.append(
                    f"| {weights} | {k} | {aggregate:.2f} | {ratios[0]:.2f} | {ratios[1]:.2f} |"
                )
    low, high = min(args.streams), max(args.streams)
    if low != high:
        lines += [
            "",
            f"Scaling, {high}-stream aggregate / {low}-stream aggregate:",
            "",
            "| system | weights | scaling |",
            "| --- | --- | ---: |",
        ]
        for weights in args.weights:
            for system in systems:
                if results.get((system, weights, low)) and results.get((system, weights, high)):
                    scale = agg(system, weights, high) / agg(system, weights, low)
                    lines.append(f"| {system} | {weights} | {scale:.2f} |")
    lines += [""] + [f"Note: {note}" for note in notes] + ([""] if notes else [])
    lines.append(
        "Command: `python benchmarks/serve_bench.py "
        f"--preset {args.preset} --streams {','.join(map(str, args.streams))} "
        f"--max-tokens {args.max_tokens} --rounds {args.rounds} "
        f"--weights {','.join(args.weights)} --threads {args.threads} "
        f"--kv-cache {args.kv_cache} --qwen3chat-weights {args.qwen3chat_weights}`"
    )
    table = "\n".join(lines) + "\n"
    print(table)
    write_section(Path(args.out), "Serving benchmark", "benchmarks/serve_bench.py", table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-0.6b", choices=sorted(PRESETS))
    parser.add_argument("--streams", default="1,4,16", help="concurrent streams, a comma list")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per stream")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--weights", default="bf16,int4", help="a comma list of bf16, int4")
    parser.add_argument("--threads", type=int, default=2, help="threads per server")
    parser.add_argument(
        "--kv-cache",
        default="auto",
        choices=["auto", "int8"],
        help="int8: both servers keep keys and values as q8_0 blocks",
    )
    parser.add_argument("--llama-server", default="/work/llamacpp/llama-server")
    parser.add_argument("--gguf-bf16", default="BF16", help="GGUF type of the bf16 rows")
    parser.add_argument("--gguf-int4", default="Q4_0", help="GGUF type of the int4 rows")
    parser.add_argument(
        "--qwen3chat-weights",
        default="checkpoint",
        choices=["checkpoint", "gguf"],
        help="gguf: qwen3chat serves the GGUF files llama.cpp reads (equal bits throughout, "
        "the LM head included; --quantize int4 keeps the LM head int8, a pure Q4_0 file "
        "has it in Q4_0)",
    )
    parser.add_argument("--cache-dir", default=str(ROOT / ".bench"))
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--out", default=str(ROOT / "docs/serve_benchmark.md"))
    args = parser.parse_args()
    args.streams = [int(k) for k in args.streams.split(",")]
    args.weights = args.weights.split(",")
    if any(w not in ("bf16", "int4") for w in args.weights):
        parser.error("--weights: a comma list of bf16, int4")
    if args.max_tokens < 2:
        parser.error("--max-tokens: at least 2 (decode speed needs a second token)")

    # A busy machine distorts this a lot (two spinning threads per server on two cores
    # collapse when a third process wants one): the report says how busy it was.
    loadavg = Path("/proc/loadavg")
    args.loadavg = " ".join(loadavg.read_text().split()[:3]) if loadavg.is_file() else "unknown"
    notes = []
    systems = list(SYSTEMS)
    if not Path(args.llama_server).is_file():
        systems.remove("llama.cpp")
        notes.append(f"no llama-server at {args.llama_server}: llama.cpp rows skipped.")
    help_text = subprocess.run(
        [sys.executable, "-m", "qwen3chat", "serve", "--help"], capture_output=True, text=True
    ).stdout
    args.serve_has_threads = "--threads" in help_text

    checkpoint = build_checkpoint(args.preset, Path(args.cache_dir) / args.preset)
    files = {"checkpoint": checkpoint}
    # GGUF files are built before anything is timed.
    if "llama.cpp" in systems or args.qwen3chat_weights == "gguf":
        for weights in args.weights:
            qtype = args.gguf_bf16 if weights == "bf16" else args.gguf_int4
            print(f"GGUF {qtype} ...", file=sys.stderr, flush=True)
            files[weights] = build_gguf(checkpoint, qtype)

    results: dict[tuple, list[dict]] = {}
    for round_index in range(args.rounds):
        for weights in args.weights:
            for k in args.streams:
                # The same prompts and seeds for both systems; new ones in every round, so
                # that no server's prompt cache serves a repeated prompt.
                seed0 = 1000 * (round_index * 100 + k)
                for system in systems:
                    print(
                        f"round {round_index + 1}/{args.rounds}: {system} {weights} x{k} ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    run = run_one(args, system, weights, k, seed0, files)
                    results.setdefault((system, weights, k), []).append(run)
    write_report(args, systems, results, notes)


if __name__ == "__main__":
    main()
