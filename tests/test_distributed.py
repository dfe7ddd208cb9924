"""One model across processes: torchrun starts 2 or 4 local processes on gloo (loopback),
each holding its share under --split, and the answers must be the one process's."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, build_hybrid_reference, build_reference_model, save_model_dir
from gguf import GGMLQuantizationType as T
from safetensors.torch import load_file

from qwen3chat.config import ModelConfig, read_config_json
from qwen3chat.distributed.split import Part, check_split
from qwen3chat.errors import QwenChatError
from qwen3chat.quant import quantize
from qwen3chat.weights.safetensors import SafeTensorsSource

WORKER = Path(__file__).with_name("distributed_worker.py")
# One thread per process: 2 or 4 processes share this machine's cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(nproc: int, *args: str, env: dict | None = None, timeout: float = 240, **popen):
    """``python -m qwen3chat ARGS`` (or a script) in ``nproc`` processes on this host."""
    target = [str(a) for a in args]
    target = target if target[0].endswith(".py") else ["-m", "qwen3chat", *target]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", *target]
    kwargs = dict(capture_output=True, text=True, env={**ENV, **(env or {})})
    kwargs.update(stdin=subprocess.DEVNULL, timeout=timeout, **popen)
    return subprocess.run(command, **kwargs)


def one_process(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "qwen3chat", *[str(a) for a in args]]
    return subprocess.run(
        command, capture_output=True, text=True, env=ENV, stdin=subprocess.DEVNULL, timeout=240
    )


def run_jobs(tmp_path: Path, jobs: list[dict], processes: int = 1) -> list[Path]:
    """distributed_worker.py's ``jobs`` run in one process, or in ``processes`` under
    torchrun: the folder of each one's outputs, in order."""
    root = tmp_path / f"processes{processes}"
    root.mkdir()
    jobs = [{**job, "out": str(root / str(i))} for i, job in enumerate(jobs)]
    (root / "jobs.json").write_text(json.dumps(jobs))
    if processes == 1:
        command = [sys.executable, str(WORKER), "--jobs", str(root / "jobs.json")]
        run = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    else:
        run = torchrun(processes, WORKER, "--jobs", root / "jobs.json", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return [Path(job["out"]) for job in jobs]


def logits(folder: Path) -> torch.Tensor:
    return load_file(folder / "logits.safetensors")["logits"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer_dir):
    """A tiny dense model (tied embeddings), a tiny MoE one (8 experts, untied), one
    whose experts are wide enough that half of one is a whole column block for the native
    step (its greedy margins are not decisive in bfloat16: logits only), and the hybrid
    generation's dense and MoE (routed experts beside a shared one) tiny models, the
    dense one also as a qwen35 GGUF file (value heads tiled) and a Qwen3-Next one (its
    projections fused per key head)."""
    from gguf_files import write_hybrid_gguf

    # F16: quantized products would quantize activations, whose roundings a split's
    # last-bit differences flip (the int4 note below); the cut of blocks has its own test.
    gguf = tmp_path_factory.mktemp("hybrid-gguf") / "qwen35.gguf"
    write_hybrid_gguf(build_hybrid_reference("dense", seed=2), tokenizer_dir, gguf, T.F16)
    return {
        "dense": save_model_dir(
            build_reference_model(tie=True, seed=0), tmp_path_factory.mktemp("dense"), tokenizer_dir
        ),
        "moe": save_model_dir(
            build_reference_model(tie=False, seed=1, moe=True),
            tmp_path_factory.mktemp("moe"),
            tokenizer_dir,
        ),
        "wide-moe": save_model_dir(
            build_reference_model(tie=False, seed=1, moe=True, moe_intermediate_size=64),
            tmp_path_factory.mktemp("wide-moe"),
            tokenizer_dir,
        ),
        "hybrid": save_model_dir(
            build_hybrid_reference("dense", seed=2),
            tmp_path_factory.mktemp("hybrid"),
            tokenizer_dir,
        ),
        "hybrid-moe": save_model_dir(
            build_hybrid_reference("moe", seed=3),
            tmp_path_factory.mktemp("hybrid-moe"),
            tokenizer_dir,
        ),
        "hybrid-gguf": gguf,
        "next": save_model_dir(
            build_hybrid_reference("next", seed=4), tmp_path_factory.mktemp("next"), tokenizer_dir
        ),
    }


CHAT = ("chat", "-p", "Tell me about the sea.", "--temperature", "0", "-n", "10", "--json")


def answer(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_chat_across_processes_answers_as_one_process(model_dirs):
    """`chat` under torchrun, tensor split: the one process's greedy reply (the cases
    below run the same one-shot answer in distributed_worker.py, many in one group)."""
    flags = (*CHAT, "-m", model_dirs["dense"])
    alone = answer(one_process(*flags))
    together = answer(torchrun(2, *flags, "--split", "tensor"))
    assert together["token_ids"] == alone["token_ids"]
    assert together["text"] == alone["text"]


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory, tokenizer_dir):
    """A tiny Qwen3-VL model (DeepStack features after both of its layers) and a picture."""
    from test_vl_parity import build_vl_reference, picture, save_vl_dir

    path = save_vl_dir(build_vl_reference(), tmp_path_factory.mktemp("vl"), tokenizer_dir)
    return path, picture(path.parent / "photo.png", 96, 64, 1)


# kind, processes, split, weights.
REPLIES = [
    ("dense", 2, "tensor", "none"),
    ("dense", 4, "auto", "none"),  # 2 KV heads among 4: each held by two processes
    ("dense", 2, "tensor", "int4"),
    ("moe", 2, "auto", "none"),  # experts split
    ("moe", 2, "tensor", "none"),  # every expert's width split
    ("moe", 4, "expert", "none"),
    ("dense", 2, "pipeline", "none"),  # a layer each
    ("moe", 2, "pipeline", "int4"),
    ("hybrid", 2, "auto", "none"),  # Gated DeltaNet and attention heads split
    ("hybrid", 2, "tensor", "int4"),
    ("hybrid-moe", 2, "auto", "none"),  # experts (the shared one's width), heads split
    ("hybrid-moe", 2, "expert", "none"),  # the heads held whole
    ("hybrid-moe", 4, "pipeline", "int4"),
    # Process 0 alone runs the vision tower and sends its tokens and DeepStack features
    # (under the pipeline, the second stage adds the second layer's).
    ("vl", 2, "tensor", "none"),
    ("vl", 2, "pipeline", "none"),
]


@pytest.mark.parametrize("processes", [2, 4])
def test_greedy_replies_equal_one_process(model_dirs, vl_model, tmp_path, processes):
    """Each case's one-shot greedy reply in ``processes`` processes is the one process's.
    A split sums its shares in another order than one process: float weights run in
    float32, where that moves the logits by ~1e-6 (bfloat16 rounding could flip the tiny
    models' closer choices). int4 runs in bfloat16: its products quantize activations per
    block of 32, and in float32 the split's last-bit differences flip some of those
    roundings, which then grow; bfloat16 rounds them away first."""
    paths = {**model_dirs, "vl": vl_model[0]}

    def job(kind: str, quantize_as: str) -> dict:
        dtype = "bfloat16" if quantize_as == "int4" else "float32"
        found = {"task": "reply", "model": str(paths[kind]), "quantize": quantize_as}
        found.update(dtype=dtype, text="Tell me about the sea.", max_tokens=10)
        if kind == "vl":
            found.update(image=str(vl_model[1]), text="What is it?", max_tokens=8)
        return found

    cases = [case for case in REPLIES if case[1] == processes]
    kinds = sorted({(kind, weights) for kind, _, _, weights in cases})
    alone = dict(zip(kinds, run_jobs(tmp_path, [job(*k) for k in kinds]), strict=True))
    jobs = [{**job(kind, weights), "split": split} for kind, _, split, weights in cases]
    together = run_jobs(tmp_path, jobs, processes)
    wrong = []
    for (kind, _, split, weights), folder in zip(cases, together, strict=True):
        expected = json.loads((alone[kind, weights] / "reply.json").read_text())
        got = json.loads((folder / "reply.json").read_text())
        assert expected["token_ids"], (kind, weights)  # a reply to compare
        if (got["token_ids"], got["text"]) != (expected["token_ids"], expected["text"]):
            wrong.append((kind, split, weights, got["text"], expected["text"]))
    assert not wrong


# kind, split; each in two processes.
LOGITS = [
    ("dense", "tensor"),
    ("moe", "expert"),
    ("wide-moe", "tensor"),
    ("moe", "pipeline"),
    ("hybrid-moe", "expert"),
    ("hybrid", "tensor"),
    ("hybrid", "pipeline"),  # the delta rule's states moved a piece at a time
    ("hybrid-gguf", "tensor"),  # value heads tiled: each process's in two pieces
    ("next", "auto"),  # q, k, v, z fused per key head in the checkpoint
    ("vl", "tensor"),  # a picture's prompt, then decode steps
    ("vl", "pipeline"),
]


def test_logits_within_float_tolerance(model_dirs, vl_model, tmp_path):
    """A prompt's logits, then those of decode steps, in two processes against one: each
    step is the one native call over the layers, the all-reduces between blocks inside it
    (pipeline: no all-reduce; the prompt runs through the stages in pieces, the stages at
    work at once)."""
    # A prompt of 35 ids (through the pipeline: in two pieces), then 5 decode steps.
    ids = [9707 + 13 * i for i in range(40)]

    def job(kind: str) -> dict:
        if kind == "vl":
            found = {"model": str(vl_model[0]), "image": str(vl_model[1]), "ids": [9707, 11, 1879]}
        else:
            found = {"model": str(model_dirs[kind]), "ids": ids, "prompt": 35}
        return {"task": "logits", **found}

    kinds = sorted({kind for kind, _ in LOGITS})
    alone = dict(zip(kinds, run_jobs(tmp_path, [job(kind) for kind in kinds]), strict=True))
    together = run_jobs(tmp_path, [{**job(kind), "split": split} for kind, split in LOGITS], 2)
    wrong = []
    for (kind, split), folder in zip(LOGITS, together, strict=True):
        expected, got = logits(alone[kind]), logits(folder)
        scale = expected.abs().max()
        # float32 sums in another order: ~1e-6 of the scale, up to 1e-5 over 40 positions
        # of the hybrid MoE's recurrent states and routing.
        error = ((got - expected).abs().max() / scale).item()
        if error > (1e-5 if kind == "vl" else 5e-5) or not torch.equal(
            got.argmax(-1), expected.argmax(-1)
        ):
            wrong.append((kind, split, error))
        if kind == "vl":
            continue
        assert expected.shape == (40, TINY["vocab_size"])
        ranks = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]
        if not (all(ranks[0]["fused"]) and all(ranks[1]["fused"])):
            wrong.append((kind, split, "a decode step did not run natively"))
        # The second stage holds neither the embedding nor the head.
        if split == "pipeline" and ranks[1]["held_bytes"] >= 0.05 * ranks[0]["held_bytes"]:
            wrong.append((kind, split, "the second stage holds the embedding or the head"))
        if (kind, split) == ("moe", "expert"):
            _each_holds_half_the_head_and_the_experts(model_dirs["moe"], alone[kind], folder)
    assert not wrong


def _each_holds_half_the_head_and_the_experts(path: Path, alone: Path, together: Path):
    """Under the expert split each of 2 processes holds half of the untied LM head's rows
    (and half the experts), exactly; process 0's logits are the whole head's (above)."""
    config = _config(path)
    head = config.vocab_size * config.hidden_size * 4  # float32
    experts = config.num_hidden_layers * config.num_experts * 3 * config.hidden_size * 32 * 4
    whole = json.loads((alone / "rank0.json").read_text())["held_bytes"]
    for rank in range(2):
        held = json.loads((together / f"rank{rank}.json").read_text())["held_bytes"]
        assert whole - held == (head + experts) // 2


def test_each_process_holds_its_share(tmp_path):
    """Qwen3-0.6B's shape in bfloat16, tensor split in two: each process holds the tied
    embedding (replicated) and half of the rest, and its resident memory grows by that,
    not by the whole model (measured from /proc, before and after loading)."""
    job = {"task": "logits", "preset": "qwen3-0.6b", "dtype": "bfloat16", "ids": [1, 2]}
    (alone,), (together,) = run_jobs(tmp_path, [job]), run_jobs(tmp_path, [job], 2)
    whole = json.loads((alone / "rank0.json").read_text())
    embedding = 151936 * 1024 * 2
    for rank in range(2):
        share = json.loads((together / f"rank{rank}.json").read_text())
        expected = embedding + (whole["held_bytes"] - embedding) / 2
        assert abs(share["held_bytes"] - expected) < 0.01 * expected
        grew = (share["rss_after_mb"] - share["rss_before_mb"]) * 2**20
        assert grew < 1.1 * share["held_bytes"] + 48 * 2**20
        whole_grew = (whole["rss_after_mb"] - whole["rss_before_mb"]) * 2**20
        assert grew < 0.75 * whole_grew


def test_a_killed_process_ends_the_run(model_dirs):
    """A process killed mid-reply: every process ends, non-zero, within seconds."""
    flags = ("chat", "-m", model_dirs["dense"], "-p", "Hi", "-n", "4000", "--max-seq-len", "4096")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    launcher = subprocess.Popen(
        [*command, "-m", "qwen3chat", *map(str, flags), "--temperature", "0", "--no-think"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        assert _first_output(launcher)  # process 0 is answering
        workers = _children(launcher.pid)
        assert len(workers) == 2
        os.kill(max(workers), signal.SIGKILL)
        killed = time.monotonic()
        launcher.wait(timeout=60)
        assert time.monotonic() - killed < 30
        assert launcher.returncode != 0
        for pid in workers:  # none left behind
            assert not Path(f"/proc/{pid}").exists() or _state(pid) == "Z"
    finally:
        _stop(launcher)


def _first_output(process: subprocess.Popen, timeout: float = 120) -> bytes:
    """What ``process`` has written to stdout once it writes, within ``timeout`` seconds
    (a run that hangs fails the test, not hangs it)."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    return os.read(process.stdout.fileno(), 64)


def _stop(launcher: subprocess.Popen) -> None:
    """torchrun and whatever it started (a failed test must not leave workers holding
    its pipes)."""
    for pid in [*_children(launcher.pid), launcher.pid]:  # workers have sessions of their own
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    launcher.communicate()


def _children(pid: int) -> list[int]:
    found = []
    if not Path(f"/proc/{pid}/task").exists():
        return found
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_process_of_another_host_that_dies_is_reported_in_one_line(model_dirs):
    """Without torchrun's agent to stop the rest (processes on other hosts), process 0
    finds its peer gone at the next all-reduce and says so in one line."""
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29651"}
    flags = ("-m", "qwen3chat", "chat", "-m", model_dirs["dense"], "-p", "Hi", "-n", "4000")
    flags += ("--max-seq-len", "4096", "--temperature", "0", "--no-think")
    started = [
        subprocess.Popen(
            [sys.executable, *map(str, flags)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env={**env, "RANK": str(rank), "LOCAL_RANK": "0"},
        )
        for rank in range(2)
    ]
    driver, follower = started
    try:
        assert _first_output(driver)
        follower.kill()
        _, err = driver.communicate(timeout=60)
        assert driver.returncode == 1
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("error: process 0: another process of the run stopped")
    finally:
        for process in started:
            process.kill()
            process.communicate()


def test_a_rendezvous_that_cannot_form_is_an_error(model_dirs):
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT="29652", QWEN3CHAT_DIST_TIMEOUT="3")
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "qwen3chat", *CHAT, "-m", str(model_dirs["dense"])],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert time.monotonic() - start < 60
    assert run.returncode == 1
    assert run.stderr.startswith("error: the processes of the run could not form a group")
    assert len(run.stderr.strip().splitlines()) == 1
    env["QWEN3CHAT_DIST_TIMEOUT"] = "soon"
    command = [sys.executable, "-m", "qwen3chat", *CHAT, "-m", str(model_dirs["dense"])]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1
    assert run.stderr == "error: QWEN3CHAT_DIST_TIMEOUT='soon': expected a number of seconds > 0\n"


def test_a_split_that_does_not_divide_is_named(model_dirs):
    run = torchrun(3, *CHAT, "-m", model_dirs["dense"])
    assert run.returncode != 0
    assert "--split auto: num_attention_heads = 4 does not divide among 3 processes" in run.stderr


CLOSE_WORLD = """
import os
import torch
import torch.distributed as dist
from qwen3chat.distributed.world import World

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
world = World(0, 1, dist.group.WORLD, dist.new_group(backend="gloo"))
world.broadcast(torch.arange(8))
world.all_reduce(torch.ones(8))
during = threads()
world.close()
print(before, during, threads(), dist.is_initialized())
"""


def test_closing_the_world_ends_the_groups_threads():
    """World.close destroys both groups and lets go of them, so gloo's worker threads end
    while Python runs: left to interpreter exit, a worker still letting go of a
    collective's tensors took the GIL there and aborted the process."""
    run = subprocess.run(
        [sys.executable, "-c", CLOSE_WORLD], capture_output=True, text=True, env=ENV
    )
    assert run.returncode == 0, run.stderr[-2000:]
    before, during, after, initialized = run.stdout.split()
    assert int(during) > int(before)  # the groups' threads ran
    assert (after, initialized) == (before, "False")


def test_check_split(model_dirs):
    config = _config(model_dirs["dense"])
    check_split(config, "tensor", 2)
    check_split(config, "tensor", 4)  # KV heads held twice each
    with pytest.raises(QwenChatError, match="num_attention_heads = 4 does not divide among 3"):
        check_split(config, "tensor", 3)
    check_split(config, "pipeline", 2)
    with pytest.raises(QwenChatError, match="--split pipeline: 2 layers among 3 processes"):
        check_split(config, "pipeline", 3)
    hybrid = _config(model_dirs["hybrid"])
    check_split(hybrid, "tensor", 2)
    with pytest.raises(QwenChatError, match="linear_num_key_heads = 2 does not divide among 4"):
        check_split(hybrid, "auto", 4)
    check_split(hybrid, "pipeline", 4)


def test_parts_cut_tensors_and_quantized_matrices_alike():
    w = torch.randn(6, 128)
    assert torch.equal(Part(-2, 1, 3).take(w), w[2:4])
    assert torch.equal(Part(-1, 1, 2).take(w), w[:, 64:])
    assert Part(0, 2, 3).bounds(8) == (5, 8)
    for bits in (8, 4):
        q = quantize(w, bits, 32)
        for part in (Part(-2, 1, 2), Part(-1, 1, 4)):
            assert torch.equal(part.take(q).dequantize(), part.take(q.dequantize()))
    with pytest.raises(ValueError, match="split a group of 32"):
        Part(-1, 1, 8).take(quantize(w, 4, 32))
    # Sections (q, k and v rows; tiled value heads): each cut alike, the pieces in order.
    w = torch.randn(12, 256)
    rows = Part(-2, 1, 2, (4, 4, 2, 2))
    assert rows.ranges(12) == [(2, 4), (6, 8), (9, 10), (11, 12)]
    assert torch.equal(rows.take(w), w[[2, 3, 6, 7, 9, 11]])
    columns = Part(-1, 0, 2, (128, 128))
    assert torch.equal(columns.take(w), torch.cat([w[:, :64], w[:, 128:192]], dim=1))
    for bits in (8, 4):
        q = quantize(w, bits, 32)
        for part in (rows, columns):
            assert torch.equal(part.take(q).dequantize(), part.take(q.dequantize()))
    with pytest.raises(ValueError, match="do not add up to 12"):
        Part(-2, 0, 2, (4, 4)).take(w)


def test_a_source_reads_only_the_share(model_dirs):
    """SafeTensors shares equal the whole tensor cut: rows, columns (also in sections),
    and a range of the experts of a stack read expert by expert."""
    path = Path(model_dirs["moe"])
    source = SafeTensorsSource(path, config=_config(path))
    columns = source.shapes()["layers.0.self_attn.o_proj.weight"][1]
    for name, part in [
        ("layers.0.self_attn.q_proj.weight", Part(-2, 1, 2)),
        ("layers.0.self_attn.q_proj.weight", Part(-2, 1, 2, (columns // 2,) * 2)),
        ("layers.0.self_attn.o_proj.weight", Part(-1, 0, 2)),
        ("layers.0.self_attn.o_proj.weight", Part(-1, 1, 2, (columns // 2,) * 2)),
        ("layers.1.mlp.experts.gate_proj.weight", Part(0, 1, 3)),
        ("layers.1.mlp.experts.down_proj.weight", Part(-1, 1, 2)),
    ]:
        whole = source.read(name, torch.float32)
        assert torch.equal(source.read(name, torch.float32, part=part), part.take(whole))


@pytest.mark.parametrize("qtype", [T.F16, T.Q8_0, T.Q4_0, T.Q6_K])
def test_a_gguf_source_cuts_the_stored_blocks(tmp_path, tokenizer_dir, qtype):
    """GGUF shares, cut from the stored blocks before decoding (a range of experts,
    rows, columns in whole blocks, also in sections; Q6_K's 256-wide blocks cannot give
    32 of 64 columns, so that share is cut once decoded), equal the whole tensor decoded
    and cut."""
    from gguf_files import write_gguf

    from qwen3chat.weights.gguf import GGUFSource, open_gguf_files

    # Experts 64 wide and o_proj 128, so that half of one and a quarter of the other are
    # whole blocks of 32; Q6_K's blocks are 256 wide, so every input is a multiple of 256
    # there.
    shapes = dict(moe_intermediate_size=64, head_dim=32)
    if qtype == T.Q6_K:
        shapes = dict(
            hidden_size=256, head_dim=64, intermediate_size=512, moe_intermediate_size=256
        )
    path = tmp_path / "moe.gguf"
    write_gguf(build_reference_model(moe=True, **shapes), tokenizer_dir, path, qtype)
    source = GGUFSource(open_gguf_files(path))
    columns = source.shapes()["layers.0.self_attn.o_proj.weight"][1]
    for name, part in [
        ("layers.1.mlp.experts.gate_proj.weight", Part(0, 1, 3)),
        ("layers.1.mlp.experts.down_proj.weight", Part(-1, 1, 2)),
        ("layers.0.self_attn.q_proj.weight", Part(-2, 1, 2)),
        ("layers.0.self_attn.q_proj.weight", Part(-2, 1, 2, (columns // 2,) * 2)),
        ("layers.0.self_attn.o_proj.weight", Part(-1, 0, 2)),
        ("layers.0.self_attn.o_proj.weight", Part(-1, 1, 2, (columns // 2,) * 2)),
    ]:
        whole = part.take(source.read(name, torch.float32))
        share = source.read(name, torch.float32, part=part)
        if isinstance(whole, torch.Tensor):
            assert torch.equal(share, whole)
        else:
            assert torch.equal(share.dequantize(), whole.dequantize())


def _config(path: Path) -> ModelConfig:
    return read_config_json(Path(path) / "config.json")[0]


@pytest.mark.parametrize(
    "kind, split",
    [("moe", "auto"), ("moe", "pipeline"), ("hybrid-moe", "auto"), ("vl", "pipeline")],
)
def test_serve_across_processes(model_dirs, vl_model, tmp_path, kind, split):
    """`serve` in two processes (experts split, or a layer each): concurrent requests get
    the one-process greedy replies (a hybrid model's state slots copied alike on every
    process; a vision model's pictures, run by process 0's tower, in half of them);
    SIGTERM to process 0 stops the server and every process, exit 0."""
    import base64
    import concurrent.futures

    import httpx

    model_dirs = {**model_dirs, "vl": vl_model[0]}
    photo = vl_model[1]
    picture = {"url": "data:image/png;base64," + base64.b64encode(photo.read_bytes()).decode()}

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["-m", "qwen3chat", "serve", "-m", str(model_dirs[kind]), "--port", "0"]
    launcher = subprocess.Popen(
        [
            *command,
            "--dtype",
            "float32",
            "--no-think",
            "--served-model-name",
            "m",
            "--split",
            split,
        ],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    try:
        url = None
        for line in launcher.stderr:
            if line.startswith("listening on "):
                url = line.split()[-1]
                break
        assert url, "the server did not start"
        prompts = [f"Tell me about the number {i}." for i in range(4)]
        pictured = [kind == "vl" and i % 2 == 0 for i in range(4)]

        def ask(prompt: str, with_picture: bool) -> str:
            content = [{"type": "text", "text": prompt}]
            if with_picture:
                content.insert(0, {"type": "image_url", "image_url": picture})
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8}
            body.update(temperature=0, model="m")
            reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["message"]["content"]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(ask, prompts, pictured))
        jobs = [
            {"task": "reply", "model": str(model_dirs[kind]), "text": prompt, "max_tokens": 8}
            | {"think": False, **({"image": str(photo)} if with_picture else {})}
            for prompt, with_picture in zip(prompts, pictured, strict=True)
        ]
        for reply, alone in zip(replies, run_jobs(tmp_path, jobs), strict=True):
            assert reply == json.loads((alone / "reply.json").read_text())["text"]
        workers = _children(launcher.pid)
        os.kill(min(workers), signal.SIGTERM)  # process 0 (started first)
        assert launcher.wait(timeout=60) == 0, launcher.stderr.read()[-3000:]
    finally:
        _stop(launcher)


@contextlib.contextmanager
def two_hosts():
    """Two network namespaces joined by a veth pair, 10.77.0.1 and 10.77.0.2: processes
    in them share no network stack, as on two machines. Skips where namespaces cannot be
    made (not root, no `ip`)."""
    names = (f"qwen3chat-a{os.getpid()}", f"qwen3chat-b{os.getpid()}")
    ends = (f"qa{os.getpid()}", f"qb{os.getpid()}")

    def ip(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", *args], capture_output=True, text=True)

    try:
        if ip("netns", "add", names[0]).returncode:
            pytest.skip("network namespaces cannot be made here (needs root and iproute2)")
        ip("netns", "add", names[1])
        ip("link", "add", ends[0], "type", "veth", "peer", "name", ends[1])
        for name, end, address in zip(names, ends, ("10.77.0.1", "10.77.0.2"), strict=True):
            ip("link", "set", end, "netns", name)
            for args in (
                ("addr", "add", f"{address}/24", "dev", end),
                ("link", "set", end, "up"),
                ("link", "set", "lo", "up"),
            ):
                done = ip("netns", "exec", name, "ip", *args)
                assert done.returncode == 0, done.stderr
        yield [("ip", "netns", "exec", name) for name in names], ends
    except FileNotFoundError:
        pytest.skip("no `ip` command (iproute2)")
    finally:
        for name in names:
            ip("netns", "del", name)


def test_two_hosts_through_network_namespaces(model_dirs):
    """Process 0 and 1 in namespaces of their own, meeting over a veth pair at process
    0's address (as `torchrun --nnodes 2 --rdzv-endpoint` would): the one-process reply."""
    flags = (*CHAT, "-m", str(model_dirs["moe"]))
    alone = answer(one_process(*flags))
    with two_hosts() as (hosts, ends):
        env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "10.77.0.1", "MASTER_PORT": "29653"}
        started = [
            subprocess.Popen(
                [*host, sys.executable, "-m", "qwen3chat", *flags],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                env={**env, "RANK": str(rank), "LOCAL_RANK": "0", "GLOO_SOCKET_IFNAME": end},
            )
            for rank, (host, end) in enumerate(zip(hosts, ends, strict=True))
        ]
        try:
            outputs = [p.communicate(timeout=180) for p in started]
        finally:
            for p in started:
                p.kill()
    assert [p.returncode for p in started] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert json.loads(outputs[0][0])["token_ids"] == alone["token_ids"]
    assert outputs[1][0] == ""  # process 1 only computes
