"""The command line: one thin function per subcommand, flags -> settings -> engine."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from enum import Enum

import typer

from .errors import QwenChatError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Chat with Qwen3 models from the terminal.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"


class Quantize(str, Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"


class Format(str, Enum):
    auto = "auto"
    safetensors = "safetensors"
    gguf = "gguf"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@contextlib.contextmanager
def reported_errors(debug: bool) -> Iterator[None]:
    """User errors become one line on stderr and exit 1; tracebacks only with --debug."""
    try:
        yield
    except QwenChatError as e:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except BrokenPipeError:
        # `qwen3chat chat ... | head` closed the pipe: stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as e:
        if debug:
            raise
        typer.echo(
            f"error: internal error: {type(e).__name__}: {e} (run with --debug for details)",
            err=True,
        )
        raise typer.Exit(1) from None


@app.command()
def chat(
    model_path: str = typer.Option(
        DEFAULT_MODEL, "-m", "--model-path", help="Model directory, .gguf file or repo id."
    ),
    prompt: str | None = typer.Option(
        None, "-p", "--prompt", help="One-shot: answer this and exit."
    ),
    system: str | None = typer.Option(None, "-s", "--system", help="System prompt."),
    temperature: float | None = typer.Option(
        None, help="Sampling temperature; 0 is greedy. [default: 0.6]"
    ),
    top_p: float | None = typer.Option(None, help="Nucleus sampling. [default: 0.9]"),
    top_k: int | None = typer.Option(None, help="Top-k sampling, 0 is off. [default: 0]"),
    min_p: float | None = typer.Option(None, help="Min-p sampling, 0 is off. [default: 0.0]"),
    repetition_penalty: float | None = typer.Option(None, help="1.0 is off. [default: 1.0]"),
    presence_penalty: float | None = typer.Option(None, help="OpenAI-style. [default: 0.0]"),
    frequency_penalty: float | None = typer.Option(None, help="OpenAI-style. [default: 0.0]"),
    max_tokens: int = typer.Option(256, "-n", "--max-tokens", min=1, help="New tokens per reply."),
    max_seq_len: int = typer.Option(2048, min=2, help="Context window (KV cache size)."),
    chunk_size: int | None = typer.Option(None, min=1, help="Prefill chunk size in tokens."),
    quantize: Quantize = typer.Option(Quantize.none, help="Weight quantization at load."),
    format: Format = typer.Option(Format.auto, "--format", help="Model format."),
    seed: int = typer.Option(42, help="Sampling RNG seed."),
    think: bool = typer.Option(True, "--think/--no-think", help="Qwen3 thinking mode."),
    think_budget: int | None = typer.Option(
        None, min=1, help="End thinking after this many tokens."
    ),
    device: Device = typer.Option(Device.auto, help="Compute device."),
    dtype: Dtype = typer.Option(Dtype.auto, help="Compute dtype."),
    json_output: bool = typer.Option(False, "--json", help="One-shot: print one JSON object."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Chat with a model: interactive in a terminal, one-shot with -p or piped stdin."""
    with reported_errors(debug):
        from .chat.oneshot import run_oneshot
        from .engine import Engine
        from .loading import load_model
        from .sampling import SamplingSettings

        flags = {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "repetition_penalty": repetition_penalty,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
        }
        interactive = prompt is None and sys.stdin.isatty()
        if json_output and interactive:
            raise QwenChatError("--json needs a one-shot prompt: pass -p TEXT or pipe stdin")
        if quantize != Quantize.none:
            raise QwenChatError("--quantize: weight quantization is not built yet; use none")
        if think_budget is not None:
            raise QwenChatError("--think-budget is not built yet")
        if interactive:
            raise QwenChatError(
                "the interactive chat is not built yet; pass -p TEXT or pipe a prompt on stdin"
            )
        text = prompt or ""
        if not sys.stdin.isatty():
            piped = sys.stdin.read()
            text = f"{text}\n\n{piped}" if text and piped else (text or piped)
        if not text.strip():
            raise QwenChatError("the prompt is empty: pass -p TEXT or pipe text on stdin")

        loaded = load_model(model_path, format.value, device.value, dtype.value)
        given = {k: v for k, v in flags.items() if v is not None}
        sampling = SamplingSettings(**{**loaded.generation_defaults, **given, "seed": seed})
        sampling.validate()
        engine = Engine(loaded.model, loaded.tokenizer, max_seq_len, chunk_size)
        run_oneshot(engine, text, system, sampling, max_tokens, think, json_output, loaded.load_s)


def _not_built(name: str, issue: str) -> None:
    typer.echo(f"error: `qwen3chat {name}` is not built yet ({issue})", err=True)
    raise typer.Exit(1)


@app.command(
    "vision-chat",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def vision_chat() -> None:
    """Chat about images and video frames with a Qwen3-VL model (not built yet)."""
    _not_built("vision-chat", "Qwen3-VL support is planned")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def download() -> None:
    """Fetch a model from the Hugging Face Hub (not built yet)."""
    _not_built("download", "use a local model directory for now")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench() -> None:
    """Measure load, prefill, decode and memory (not built yet)."""
    _not_built("bench", "benchmarks/compare.py measures decode for now")


def main() -> None:
    app()
