"""`qwen3chat bench`: the JSON contract, medians over runs, one result per combination,
the roofline accounting, --ops, --profile, --plot, -m, and one-line errors. Only what is
measured and how it is reported is checked, never how fast anything runs."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qwen3chat import kernels
from qwen3chat.bench.ops import OPS, SEQ_LENS
from qwen3chat.bench.run import DEFAULT_PLOT_DEPTHS, cpu_model
from qwen3chat.cli import app
from qwen3chat.model import num_parameters
from qwen3chat.presets import PRESETS, preset_config

# Small enough to keep every run in milliseconds on the tiny preset.
QUICK = ["--preset", "tiny", "-p", "8", "-n", "4", "-r", "2"]
CONTRACT_KEYS = ("load_s", "prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb")


def bench(*args):
    return CliRunner().invoke(app, ["bench", *map(str, args)])


def bench_json(*args) -> dict:
    result = bench(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # the whole of stdout is one object


@pytest.fixture(scope="module")
def report() -> dict:
    return bench_json(*QUICK)


def test_json_has_the_contract_keys_as_positive_numbers(report):
    for key in CONTRACT_KEYS:
        assert isinstance(report[key], float), key
        assert report[key] > 0, key
    assert "peak_gpu_mb" not in report  # a CPU run has no GPU memory to report
    assert report["model"] == "tiny"
    assert report["weights"] == "random"
    assert report["parameters"] == num_parameters(preset_config("tiny"))


def test_it_says_which_kernels_ran_and_they_are_ones_this_cpu_allows(report):
    """bench names the code each kind of work ran on; where AVX-512 is chosen, the OS
    allows it (torch's check), and the tests of those kernels ran against the AVX2 ones."""
    from qwen3chat import kernels

    ran = report["kernels"]
    if kernels.native(torch.zeros(1)) is None:
        assert ran == {"native kernels": "unavailable (torch path)"}
        return
    allowed = {
        "one-row float/bf16/f16 products": "AVX-512" if kernels._avx512() else "AVX2",
        "one-row int8/int4 products": "AVX2",
        "int8/int4 GEMMs (8+ rows, 4+ with VNNI)": "AVX512-VNNI"
        if kernels._avx512_vnni()
        else "AVX2",
        "int8/int4 products (any rows, groups of 32)": (
            "AVX512-VNNI, 16 rows interleaved; AMX-INT8 from 9 rows"
            if kernels._avx512_vnni() and kernels._amx_int8()
            else "AVX512-VNNI, 16 rows interleaved"
            if kernels._avx512_vnni()
            else "AVX2, 16 rows interleaved"
        ),
        "attention over a bf16 or int8 cache": (
            "AVX-512; int8 scores AVX512-VNNI"
            if kernels._avx512() and kernels._avx512_vnni()
            else "AVX-512"
            if kernels._avx512()
            else "AVX2; int8 scores in integers"
        ),
        "norms, rotary embedding, SwiGLU, delta rule": "AVX-512" if kernels._avx512() else "AVX2",
        "bf16 products of 4+ rows": (
            "oneDNN (AVX512-BF16)"
            if kernels._avx512() and kernels._avx512_bf16()
            else "AVX-512; packed panels from 32 rows"
            if kernels._avx512()
            else "AVX2; packed panels from 64 rows"
        ),
    }
    assert ran == allowed


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
processor\t: 1
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


def test_the_cpu_is_named_with_its_family_and_model(report, tmp_path, monkeypatch):
    """Figures are quoted beside the CPU; a VM's model name alone is often generic."""
    info = tmp_path / "cpuinfo"
    info.write_text(X86_CPUINFO)
    assert cpu_model(info) == "Intel(R) Xeon(R) Processor (family 6, model 207)"
    info.write_text(ARM_CPUINFO)  # no model name: what Python's platform module says
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert cpu_model(info) == platform.machine()
    assert cpu_model(tmp_path / "missing") == platform.machine()
    assert report["cpu"] == cpu_model()


def test_top_level_figures_are_medians_of_the_runs(report):
    (result,) = report["results"]
    assert len(result["runs"]) == 2
    for metric in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb"):
        values = [run[metric] for run in result["runs"]]
        assert result[metric] == {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
        assert report[metric] == statistics.median(values)


def test_peak_rss_is_the_process_peak_so_it_is_at_least_the_rss_after_load(report):
    assert report["peak_rss_mb"] >= report["rss_after_load_mb"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="getrusage's exec rule")
def test_peak_rss_is_not_inherited_from_a_larger_parent():
    # getrusage's maximum survives exec: a bench started by a larger process (the
    # comparison script) would report its parent's peak instead of its own.
    ballast = b"\x01" * (1 << 30)
    child = subprocess.run(
        [sys.executable, "-c", "from qwen3chat.bench.run import peak_rss_mb; print(peak_rss_mb())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(ballast) and 0 < float(child.stdout) < 1000


def test_decode_bytes_count_every_weight_and_the_cached_keys_and_values(report):
    (result,) = report["results"]
    config = preset_config("tiny")
    bf16_bytes = 2
    kv_per_position = (
        2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * bf16_bytes
    )
    # Decode steps 1..3 of 4 tokens see 8 + k positions: 8 + 4/2 on average.
    expected = report["weight_bytes"] + kv_per_position * (8 + 4 / 2)
    assert report["dtype"] == "bfloat16"
    assert result["decode_bytes_per_token"] == pytest.approx(expected)
    decode = result["decode_tok_s"]["median"]
    assert result["decode_gb_s"] == pytest.approx(decode * expected / 1e9)
    assert result["roofline_tok_s"] == pytest.approx(report["bandwidth_gb_s"] * 1e9 / expected)
    assert result["roofline_share"] == pytest.approx(decode / result["roofline_tok_s"])
    assert report["roofline_share"] == result["roofline_share"]


def test_every_combination_of_the_lists_gets_one_result():
    out = bench_json("--preset", "tiny", "-p", "4,8", "-n", "2,3", "-d", "0,5", "-r", "1")
    combinations = [(r["prompt_tokens"], r["gen_tokens"], r["depth"]) for r in out["results"]]
    assert sorted(combinations) == sorted((p, g, d) for p in (4, 8) for g in (2, 3) for d in (0, 5))
    assert all(len(r["runs"]) == 1 for r in out["results"])
    by_combination = dict(zip(combinations, out["results"], strict=True))
    # Five more tokens of context: five more positions of keys and values read per token.
    deeper = by_combination[(4, 2, 5)]["decode_bytes_per_token"]
    assert deeper > by_combination[(4, 2, 0)]["decode_bytes_per_token"]
    # The summary is the first combination's.
    assert out["decode_tok_s"] == out["results"][0]["decode_tok_s"]["median"]


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-hybrid"])
def test_ops_times_every_op_at_every_length(preset):
    out = bench_json("--preset", preset, "-p", "8", "-n", "4", "-r", "1", "--ops")
    ops = out["ops"]
    assert {o["op"] for o in ops} == set(OPS)
    timed = set(OPS)
    skipped = {"moe_layer": "dense model"} if preset != "tiny-moe" else {}
    if preset != "tiny-hybrid":
        skipped |= dict.fromkeys(("linear_attention_prefill", "linear_attention_decode"), "hybrid")
    for op, reason in skipped.items():
        (entry,) = [o for o in ops if o["op"] == op]
        assert entry["skipped"] is True
        assert reason in entry["reason"]
        timed.discard(op)
    for op in timed:
        timings = [o for o in ops if o["op"] == op]
        assert [o["seq_len"] for o in timings] == list(SEQ_LENS), op
        for o in timings:
            assert o["skipped"] is False
            assert 0 < o["min_us"] <= o["median_us"], op
            assert o["calls"] >= 3


def test_moe_decode_bytes_count_only_the_routed_experts():
    out = bench_json("--preset", "tiny-moe", "-p", "8", "-n", "4", "-r", "1")
    (result,) = out["results"]
    config = preset_config("tiny-moe")
    bf16_bytes = 2
    experts = 3 * config.hidden_size * config.moe_intermediate_size * config.num_experts
    idle = experts * (1 - config.num_experts_per_tok / config.num_experts) * bf16_bytes
    kv_per_position = (
        2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * bf16_bytes
    )
    expected = out["weight_bytes"] - idle * config.num_hidden_layers
    expected += kv_per_position * (8 + 4 / 2)
    assert result["decode_bytes_per_token"] == pytest.approx(expected)


def test_profile_lists_the_top_ops_of_a_prefill_and_a_decode_step():
    out = bench_json(*QUICK, "--profile")
    assert set(out["profile"]) == {"prefill", "decode"}
    for rows in out["profile"].values():
        assert rows
        assert any(row["name"].startswith("aten::") for row in rows)
        assert all(0 <= row["share"] <= 1 and row["calls"] >= 1 for row in rows)
        selfs = [row["self_ms"] for row in rows]
        assert selfs == sorted(selfs, reverse=True)


@pytest.mark.skipif(
    kernels.native(torch.zeros(1)) is None, reason="no AVX2 CPU or no C++ compiler here"
)
def test_profile_shows_the_time_inside_the_native_kernels():
    # A CPU decode step is one native call per layer: without the kernels' own profiler
    # scopes the table would list only the few aten ops around them.
    out = bench_json(*QUICK, "--profile")
    decode = {row["name"]: row for row in out["profile"]["decode"]}
    layers = preset_config("tiny").num_hidden_layers
    assert decode["qwen3chat::decode_layer"]["calls"] == layers
    assert decode["qwen3chat::dense_linear"]["calls"] >= 4 * layers  # qkv, o, gate/up, down
    # The layers' kernels run inside the layer calls: their time is counted in the layer's total
    # and not in its self time. (How large a share they take on the tiny model is timing, which
    # a loaded machine skews; that they are nested is structure.)
    layer = decode["qwen3chat::decode_layer"]
    assert layer["total_ms"] > layer["self_ms"]
    prefill = {row["name"] for row in out["profile"]["prefill"]}
    assert "qwen3chat::dense_linear" in prefill


def test_plot_writes_a_png_of_decode_speed_by_depth(tmp_path):
    path = tmp_path / "speed.png"
    out = bench_json(*QUICK, "-d", "0,16", "--plot", path)
    assert out["plot"] == str(path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # the whole file decodes
    assert [p.name for p in tmp_path.iterdir()] == ["speed.png"]  # no temporary left


def test_plot_without_depths_sweeps_the_default_depths(tmp_path):
    out = bench_json(
        "--preset", "tiny", "-p", "4", "-n", "2", "-r", "1", "--plot", tmp_path / "p.png"
    )
    assert [r["depth"] for r in out["results"]] == list(DEFAULT_PLOT_DEPTHS)


def test_a_model_directory_is_benched_like_a_preset(tiny_model_dir):
    path, reference = tiny_model_dir
    out = bench_json("-m", path, "-p", "8", "-n", "6", "-r", "1", "--dtype", "float32")
    assert out["weights"] == "safetensors"
    assert out["dtype"] == "float32"
    assert out["model"] == str(path)
    parameters = sum(p.numel() for p in reference.parameters())
    assert out["parameters"] == parameters
    assert out["weight_bytes"] == 4 * parameters  # float32, the checkpoint's own dtype
    # Stop ids are off: all 6 tokens are generated (else the bench would have failed).
    assert out["decode_tok_s"] > 0


def test_the_human_report_is_a_table_with_one_row_per_combination():
    result = bench(*QUICK, "-d", "0,3")
    assert result.exit_code == 0, result.output
    assert "prefill t/s" in result.stdout
    assert "decode t/s" in result.stdout
    assert "pp8 tg4 d0" in result.stdout
    assert "pp8 tg4 d3" in result.stdout
    assert result.stderr == ""  # no progress display when stderr is not a terminal


def test_quantized_presets_are_built_quantized(report):
    int8 = bench_json(*QUICK, "--quantize", "int8")
    int4 = bench_json(*QUICK, "--quantize", "int4")
    assert int8["quantize"] == "int8" and int4["quantize"] == "int4"
    assert int4["weight_bytes"] < int8["weight_bytes"] < report["weight_bytes"]
    assert int8["decode_tok_s"] > 0 and int4["decode_tok_s"] > 0


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["--preset", "nope"], 2, "unknown preset 'nope'"),
        (["--preset", "tiny", "--quantize", "int3"], 2, "--quantize"),
        (["--preset", "tiny", "-p", "8,x"], 2, "--prompt-tokens: 'x' is not a whole number"),
        (["--preset", "tiny", "-n", "1"], 2, "--gen-tokens"),
        (["--preset", "tiny", "-d", "-1"], 2, "--depth"),
        (["--preset", "tiny", "-m", "somewhere"], 2, "exclude each other"),
        ([], 2, "nothing to bench"),
        (["--preset", "tiny", "--plot", "/nonexistent-dir/p.png"], 1, "--plot"),
    ],
)
def test_errors_are_one_line(args, code, fragment):
    result = bench(*args)
    assert result.exit_code == code
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]


def test_help_names_every_preset():
    result = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    for name in PRESETS:
        assert f" {name}," in result.stdout or f" {name}." in result.stdout, name


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_peer_environment_leaves_out_only_what_the_package_set(given):
    """The benchmarks run llama.cpp in peer_environment(): without the OMP_WAIT_POLICY
    qwen3chat sets for itself (inherited, it slowed llama.cpp's decode 2.5x), with the
    user's own."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = (
        "import os, qwen3chat; "
        "print(os.environ['OMP_WAIT_POLICY'], qwen3chat.peer_environment().get('OMP_WAIT_POLICY'))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == (["PASSIVE", "None"] if given is None else [given, given])
