"""`qwen3chat chat` as scripts use it: one-shot, pipes, --json, the think budget, and every
error of the contract (one line on stderr, a non-zero exit, usage errors exit 2)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import torch
from typer.testing import CliRunner

from qwen3chat.chat.oneshot import run_oneshot
from qwen3chat.cli import app
from qwen3chat.engine import Engine
from qwen3chat.loading import load_model
from qwen3chat.sampling import SamplingSettings
from qwen3chat.thinking import EARLY_STOP_THINKING

GREEDY = SamplingSettings(temperature=0.0)
# A flag set that makes the CLI compute exactly what the in-process engine below computes.
EXACT = ["--temperature", "0", "--dtype", "float32"]


def chat(model, *args, input=None):
    return CliRunner().invoke(app, ["chat", "-m", str(model), *map(str, args)], input=input)


def reply(loaded, content: str, max_tokens: int, sampling=GREEDY):
    """The reply the engine gives to one user message, computed in-process."""
    engine = Engine(loaded.model, loaded.tokenizer, 2048)
    prompt = loaded.tokenizer.encode_chat([{"role": "user", "content": content}])
    return list(engine.generate(prompt, max_tokens, sampling))[-1], prompt


def model_copy(src: Path, dst: Path, replace: dict[str, str | None]) -> Path:
    """The tiny model's directory again, with some files replaced (text) or removed
    (None); the large files are links."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name in replace:
            continue
        if f.suffix == ".safetensors" or f.name == "tokenizer.json":
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    for name, text in replace.items():
        if text is not None:
            (dst / name).write_text(text, encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> Path:
    return tiny_model_dir[0]


@pytest.fixture(scope="module")
def loaded(model):
    return load_model(model, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def thinking_model(model, tmp_path_factory) -> Path:
    """Like Qwen3-*-Thinking-2507: the generation prompt already opens <think>."""
    config = json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8"))
    opening = "{{- '<|im_start|>assistant\\n' }}"
    assert opening in config["chat_template"]
    config["chat_template"] = config["chat_template"].replace(
        opening, "{{- '<|im_start|>assistant\\n<think>\\n' }}"
    )
    replaced = {"tokenizer_config.json": json.dumps(config)}
    return model_copy(model, tmp_path_factory.mktemp("thinking") / "m", replaced)


# --- One-shot and pipes --------------------------------------------------------------------


def test_prompt_prints_only_the_answer_on_stdout(model, loaded):
    result = chat(model, "-p", "hello", "-n", 12, *EXACT)
    assert result.exit_code == 0, result.output
    expected, _ = reply(loaded, "hello", 12)
    assert result.stdout == expected.text + "\n"
    assert result.stderr == ""  # no spinner, no thinking, no colour when not a terminal


def test_piped_stdin_is_the_prompt(model, loaded):
    result = chat(model, "-n", 12, *EXACT, input="hello")
    assert result.exit_code == 0, result.output
    assert result.stdout == reply(loaded, "hello", 12)[0].text + "\n"


def test_piped_stdin_follows_the_prompt_after_a_blank_line(model, loaded):
    result = chat(model, "-p", "Summarize:", "-n", 8, "--json", *EXACT, input="the body")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    expected, prompt = reply(loaded, "Summarize:\n\nthe body", 8)
    assert out["usage"]["prompt_tokens"] == len(prompt)
    assert out["token_ids"] == expected.token_ids


def test_json_is_one_object_with_every_field(model, loaded):
    result = chat(model, "-p", "hello", "-n", 7, "--json", *EXACT)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # exactly one JSON document, nothing else on stdout
    expected, prompt = reply(loaded, "hello", 7)
    assert set(out) == {"text", "thinking", "token_ids", "finish_reason", "usage", "timings"}
    assert out["text"] == expected.text
    assert out["thinking"] == ""
    assert out["token_ids"] == expected.token_ids
    assert out["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 7}
    assert set(out["timings"]) == {"load_s", "ttft_s", "prefill_tok_s", "decode_tok_s"}
    assert all(isinstance(v, float) and v > 0 for v in out["timings"].values())


def test_generation_config_replaces_the_defaults_unless_a_flag_is_given(model, loaded, tmp_path):
    hot = {"temperature": 5.0, "top_p": 1.0, "top_k": 0}
    path = model_copy(model, tmp_path / "m", {"generation_config.json": json.dumps(hot)})
    from_file = reply(loaded, "hello", 10, SamplingSettings(**hot, seed=42))[0].token_ids
    greedy = reply(loaded, "hello", 10)[0].token_ids
    assert from_file != greedy  # otherwise this test could not tell them apart

    result = chat(path, "-p", "hello", "-n", 10, "--json", "--dtype", "float32")
    assert json.loads(result.stdout)["token_ids"] == from_file
    result = chat(path, "-p", "hello", "-n", 10, "--json", *EXACT)
    assert json.loads(result.stdout)["token_ids"] == greedy


def test_a_prompt_ending_inside_think_streams_as_thinking(thinking_model):
    result = chat(thinking_model, "-p", "hello", "-n", 20, "--json", *EXACT)
    out = json.loads(result.stdout)
    assert out["thinking"] != "" and out["text"] == ""  # never closed within 20 tokens


def test_think_budget_closes_the_thinking_and_the_answer_follows(thinking_model, loaded):
    result = chat(thinking_model, "-p", "hello", "-n", 40, "--think-budget", 5, "--json", *EXACT)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    closing = loaded.tokenizer.encode(EARLY_STOP_THINKING)
    assert out["token_ids"][5 : 5 + len(closing)] == closing
    assert out["thinking"].endswith(EARLY_STOP_THINKING.split("</think>")[0].strip())
    assert out["text"] != ""
    assert len(out["token_ids"]) == 40


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stderr_is_terminal", [True, False])
def test_thinking_goes_to_stderr_only_when_it_is_a_terminal(thinking_model, stderr_is_terminal):
    loaded = load_model(thinking_model, device="cpu", dtype="float32")
    engine = Engine(loaded.model, loaded.tokenizer, 256)
    stdout, stderr = io.StringIO(), Terminal() if stderr_is_terminal else io.StringIO()
    finish = run_oneshot(
        engine, "hello", None, GREEDY, 30, True, False, 0.0, 5, stdout=stdout, stderr=stderr
    )
    assert stdout.getvalue() == finish.text + "\n"
    if stderr_is_terminal:
        assert finish.thinking in stderr.getvalue()
        assert "[thinking cut at 5 tokens]" in stderr.getvalue()
    else:
        assert stderr.getvalue() == ""


def test_a_pipeline_closed_early_by_head_ends_quietly(model):
    command = (
        f"echo hello | {sys.executable} -m qwen3chat chat -m {model} -n 400 --temperature 0"
        " | head -c 20; echo status=${PIPESTATUS[1]} >&2"
    )
    done = subprocess.run(["bash", "-c", command], capture_output=True, timeout=120)
    assert len(done.stdout) == 20
    assert done.stderr.decode().strip() == "status=0"  # no traceback, no "Exception ignored"


# --- Errors ---------------------------------------------------------------------------------


def assert_one_line_error(result, code: int, fragment: str) -> None:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert fragment in result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "stdin", "code", "fragment"),
    [
        (["-p", ""], None, 2, "the prompt is empty"),
        ([], " \n", 2, "the prompt is empty"),
        (["-p", "hi", "--top-p", "0"], None, 2, "--top-p: 0.0 is out of range"),
        (["-p", "hi", "--temperature", "-1"], None, 2, "--temperature"),
        ([], b"\xff\xfe not text", 1, "stdin: not UTF-8 text"),
        (["-p", "hi", "--format", "gguf"], None, 1, "--format gguf"),
        (["-p", "hello " * 20, "--max-seq-len", "16"], None, 1, "--max-seq-len is 16"),
    ],
)
def test_errors_are_one_line(model, args, stdin, code, fragment):
    assert_one_line_error(chat(model, *args, input=stdin), code, fragment)


def test_json_needs_a_one_shot_prompt(model):
    # stdin is a terminal and there is no -p: that is the interactive mode.
    child = pexpect.spawn(
        sys.executable, ["-m", "qwen3chat", "chat", "-m", str(model), "--json"], timeout=30
    )
    output = child.read().decode()
    child.close()
    assert child.exitstatus == 2
    assert output == "error: --json needs a one-shot prompt: pass -p TEXT or pipe stdin\r\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_is_one_line(model):
    assert_one_line_error(chat(model, "-p", "hi", "--device", "cuda"), 1, "--device cuda")


def test_a_missing_model_is_one_line(tmp_path):
    result = chat(tmp_path / "nowhere", "-p", "hi")
    assert_one_line_error(result, 1, "no such file or directory (--model-path)")


@pytest.mark.parametrize(
    ("replace", "fragment"),
    [
        ({"config.json": None}, "config.json"),
        ({"tokenizer.json": None}, "tokenizer.json: not found"),
        ({"generation_config.json": "{oops"}, "generation_config.json: not valid JSON"),
    ],
)
def test_a_broken_model_directory_names_the_file(model, tmp_path, replace, fragment):
    broken = model_copy(model, tmp_path / "m", replace)
    assert_one_line_error(chat(broken, "-p", "hi"), 1, fragment)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["-n", "0"], "--max-tokens"),
        (["--think-budget", "0"], "--think-budget"),
        (["--temperature", "warm"], "--temperature"),
        (["--quantize", "int3"], "--quantize"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_flags_are_usage_errors(model, args, flag):
    result = chat(model, "-p", "hi", *args)
    assert result.exit_code == 2
    assert flag in result.stderr
    assert "Traceback" not in result.output


# --- --preset: random weights, no download ------------------------------------------------

NOISE = "--preset tiny has random weights, so the words are noise"


def test_a_preset_chats_with_no_download_and_says_the_words_are_noise():
    args = ["chat", "--preset", "tiny", "-p", "Hi", "--json", "--temperature", "0", "-n", "8"]
    runs = [CliRunner().invoke(app, args) for _ in range(2)]
    for result in runs:
        assert result.exit_code == 0, result.output
        assert result.stderr == f"note: {NOISE}; -m MODEL chats for real\n"
    first, second = (json.loads(result.stdout) for result in runs)
    assert len(first["token_ids"]) == 8 or first["finish_reason"] == "stop"
    assert first["token_ids"] == second["token_ids"]  # the random weights are seeded


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--preset", "huge"], "--preset: unknown preset 'huge'; choose from qwen3-0.6b,"),
        (["--preset", "tiny", "-m", "M"], "--preset and -m exclude each other; give one"),
    ],
)
def test_preset_usage_errors(args, fragment):
    assert_one_line_error(CliRunner().invoke(app, ["chat", *args, "-p", "hi"]), 2, fragment)


def test_the_repl_banner_names_the_preset_and_its_random_weights(tmp_path):
    env = {
        # The pty's size, not a COLUMNS inherited (pytest-xdist's workers set 80), whose
        # width would wrap the stats line matched.
        **{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "PROMPT_TOOLKIT_NO_CPR": "1",  # pexpect does not answer cursor-position queries
        "TERM": "xterm-256color",
    }
    child = pexpect.spawn(
        sys.executable,
        ["-m", "qwen3chat", "chat", "--preset", "tiny", "-n", "4"],
        env=env,
        encoding="utf-8",
        dimensions=(40, 160),
        timeout=60,
    )
    child.expect(NOISE)
    child.expect("preset tiny, random weights · context 2048")
    child.expect(">>>")  # the prompt (its space comes after a style reset)
    child.send("Hello!\r")
    child.expect(r"context \d+/2048")  # the stats line: a reply came
    child.expect(">>>")
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# ---------------------------------------------------------------------------- vision-chat


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory, tokenizer_dir):
    from test_vl_parity import build_vl_reference, picture, save_vl_dir

    path = save_vl_dir(build_vl_reference(), tmp_path_factory.mktemp("vl"), tokenizer_dir)
    return path, picture(path.parent / "photo.png", 96, 64, 1)


def vision_chat(model, *args, input=None):
    return CliRunner().invoke(app, ["vision-chat", "-m", str(model), *map(str, args)], input=input)


def test_vision_chat_one_shot_json(vl_model):
    from qwen3chat.vision.preprocess import VisionPreprocessing
    from qwen3chat.vision.prompt import VisionChat, user_message

    path, photo = vl_model
    result = vision_chat(path, "--image", photo, "-p", "What is it?", "-n", 5, "--json", *EXACT)
    assert result.exit_code == 0, result.output
    assert result.stderr == "6 visual tokens\n"
    out = json.loads(result.stdout)
    assert out["timings"]["vision_s"] > 0
    # The same answer as the engine computes in-process.
    loaded = load_model(path, device="cpu", dtype="float32")
    chat = VisionChat(VisionPreprocessing.from_model_dir(path))
    ids, visuals = chat.encode_chat(
        loaded.tokenizer, [user_message("What is it?", [chat.image(photo)])]
    )
    engine = Engine(loaded.model, loaded.tokenizer, 4096)
    finish = list(engine.generate(ids, 5, GREEDY, visuals=visuals))[-1]
    assert out["token_ids"] == finish.token_ids
    assert out["usage"]["prompt_tokens"] == len(ids)


def test_vision_chat_video_frames_take_several_paths(vl_model):
    path, photo = vl_model
    frames = [photo, photo, photo]
    result = vision_chat(path, "-p", "Go", "-n", 2, *EXACT, "--video-frames", *frames)
    assert result.exit_code == 0, result.output
    # 3 frames: padded to 2 temporal groups, each upscaled to the video's minimum size.
    assert result.stderr == "96 visual tokens\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "missing.png"], "missing.png: no such file"),
        (["--image", __file__], "not an image"),
        (["--image", "PHOTO", "--max-seq-len", 6], "need 6 tokens but --max-seq-len is 6"),
    ],
)
def test_vision_chat_bad_inputs_are_one_line(vl_model, args, message):
    path, photo = vl_model
    args = [photo if a == "PHOTO" else a for a in args]
    result = vision_chat(path, *args, "-p", "hi")
    assert result.exit_code == 1
    assert message in result.stderr
    assert result.stderr.count("\n") == 1


def test_vision_chat_on_a_text_only_model(model):
    result = vision_chat(model, "-p", "hi")
    assert result.exit_code == 1
    assert "is a text-only model; use qwen3chat chat" in result.stderr


def test_vision_chat_takes_preset_too():
    result = CliRunner().invoke(app, ["vision-chat", "--preset", "tiny", "-p", "hi"])
    assert result.exit_code == 1  # tiny is loaded, then refused as text-only
    assert "is a text-only model; use qwen3chat chat" in result.stderr


def test_chat_on_a_vl_model_is_text_chat(vl_model):
    result = chat(vl_model[0], "-p", "hi", "-n", 3, *EXACT)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["chat", "vision-chat", "serve", "download", "list", "bench"])
def test_help_paragraphs_wrap_to_a_narrow_terminal(command):
    """The docstrings' later paragraphs are rewrapped to the terminal, not broken where the
    source's lines end (which, on 80 columns, left a word or two alone on a line)."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    prose = result.stdout.split("╭")[0].splitlines()
    paragraphs = "\n".join(line.strip() for line in prose).strip().split("\n\n")[1:]
    assert paragraphs, result.stdout
    for paragraph in paragraphs:
        lines = paragraph.splitlines()
        assert all(len(line) > 60 for line in lines[:-1]), paragraph
