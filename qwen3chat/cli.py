"""The command line: one thin function per subcommand, flags -> settings -> engine."""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import sys
import traceback
import typing
from collections.abc import Iterator
from enum import Enum
from typing import NoReturn

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from .errors import QwenChatError
from .presets import PRESETS, preset_config


class _OneLineErrors(TyperGroup):
    """Usage errors (unknown flag, bad value) as one line like every other error, with
    click's exit code 2, instead of click's multi-line box."""

    def main(self, args=None, prog_name=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except TyperException as e:
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            ctx = getattr(e, "ctx", None)
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            typer.echo(f"error: {message}{hint}", err=True)
            code = getattr(e, "exit_code", 2)
        except typer.Abort:
            code = 130
        sys.exit(code or 0)


app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


@app.callback(invoke_without_command=True)
def root(ctx: typer.Context) -> None:
    """Chat with Qwen3 models from the terminal."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


DEFAULT_MODEL = "Qwen/Qwen3-0.6B"


class Quantize(str, Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"


class KvCache(str, Enum):
    auto = "auto"
    int8 = "int8"

    @property
    def dtype(self):
        from .kv_cache import kv_dtype

        return kv_dtype(self.value)


class Draft(str, Enum):
    none = "none"
    ngram = "ngram"


DRAFT_HELP = (
    "Speculative decoding: ngram guesses the next tokens from what followed the last few "
    "tokens where they occurred before in the conversation (prompt lookup) and checks the "
    "guesses in one forward pass. The reply is unchanged; it comes faster where it repeats "
    "earlier text (code edits, quotes, lists)."
)
DRAFT_MAX_HELP = (
    "Most tokens guessed per step with --draft ngram; no more than keep the reply exact "
    "(the CPU kernels add a pass of up to 7 rows of float weights as single steps: 6 "
    "guesses; of int8/int4 weights in groups of 32 on x86, any number)."
)


class Split(str, Enum):
    auto = "auto"
    tensor = "tensor"
    expert = "expert"
    pipeline = "pipeline"


SPLIT_HELP = (
    "Under torchrun, how the model divides among the processes: auto takes experts for "
    "mixture-of-experts layers and tensor for the rest."
)


KV_CACHE_HELP = (
    "KV cache storage: auto keeps the compute dtype; int8 stores keys and values as int8 "
    "per block of 32 with a scale (llama.cpp's -ctk/-ctv q8_0)."
)


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
    model_path: str | None = typer.Option(
        None,  # None rather than DEFAULT_MODEL, so that -m given with --preset is seen
        "-m",
        "--model-path",
        help=f"Model directory, .gguf file or repo id. \\[default: {DEFAULT_MODEL}]",
    ),
    preset: str | None = typer.Option(
        None,
        "--preset",
        help="Instead of -m: a named shape with random weights (as bench), to try the "
        f"interface without a download; the words are noise: {', '.join(PRESETS)}.",
    ),
    prompt: str | None = typer.Option(
        None, "-p", "--prompt", help="One-shot: answer this and exit."
    ),
    system: str | None = typer.Option(None, "-s", "--system", help="System prompt."),
    temperature: float | None = typer.Option(
        None, help="Sampling temperature; 0 is greedy. \\[default: 0.6]"
    ),
    top_p: float | None = typer.Option(None, help="Nucleus sampling. \\[default: 0.9]"),
    top_k: int | None = typer.Option(None, help="Top-k sampling, 0 is off. \\[default: 0]"),
    min_p: float | None = typer.Option(None, help="Min-p sampling, 0 is off. \\[default: 0.0]"),
    repetition_penalty: float | None = typer.Option(None, help="1.0 is off. \\[default: 1.0]"),
    presence_penalty: float | None = typer.Option(None, help="OpenAI-style. \\[default: 0.0]"),
    frequency_penalty: float | None = typer.Option(None, help="OpenAI-style. \\[default: 0.0]"),
    max_tokens: int = typer.Option(256, "-n", "--max-tokens", min=1, help="New tokens per reply."),
    max_seq_len: int = typer.Option(2048, min=2, help="Context window (KV cache size)."),
    chunk_size: int | None = typer.Option(None, min=1, help="Prefill chunk size in tokens."),
    quantize: Quantize = typer.Option(Quantize.none, help="Weight quantization at load."),
    group_size: int = typer.Option(32, min=8, help="Inputs per int4 scale (--quantize int4)."),
    kv_cache: KvCache = typer.Option(KvCache.auto, help=KV_CACHE_HELP),
    draft: Draft = typer.Option(Draft.none, help=DRAFT_HELP),
    draft_max: int = typer.Option(7, min=1, help=DRAFT_MAX_HELP),
    format: Format = typer.Option(Format.auto, "--format", help="Model format."),
    seed: int = typer.Option(42, help="Sampling RNG seed."),
    think: bool = typer.Option(True, "--think/--no-think", help="Qwen3 thinking mode."),
    think_budget: int | None = typer.Option(
        None, min=1, help="End thinking after this many tokens."
    ),
    device: Device = typer.Option(Device.auto, help="Compute device."),
    dtype: Dtype = typer.Option(Dtype.auto, help="Compute dtype."),
    split: Split = typer.Option(Split.auto, help=SPLIT_HELP),
    json_output: bool = typer.Option(False, "--json", help="One-shot: print one JSON object."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Chat with a model: interactive in a terminal, one-shot with -p or piped stdin.

    Sampling values in the model's generation_config.json (or a GGUF file's
    general.sampling.* metadata) replace the defaults shown here; a flag given on the
    command line always wins.
    """
    _run_chat(locals())


def _run_chat(flags: dict, vision_flags: dict | None = None) -> None:
    """`chat` and `vision-chat`: ``flags`` are chat's, ``vision_flags`` vision-chat's own."""
    f = flags
    with reported_errors(f["debug"]):
        interactive = f["prompt"] is None and sys.stdin.isatty()
        # Flag checks first: a usage error should not wait for torch and the model to load.
        if f["json_output"] and interactive:
            _usage_error("--json needs a one-shot prompt: pass -p TEXT or pipe stdin")
        from .sampling import SamplingSettings

        names = SamplingSettings.distribution_names()
        given = {name: f[name] for name in names if f[name] is not None}
        _check_model_flags(f)
        try:
            SamplingSettings(**given).validate()
        except QwenChatError as e:
            _usage_error(str(e))
        world = _join(f)
        try:
            if world is not None and not world.driver:
                _follow(f, world)
                return
            text = None if interactive else _read_prompt(f["prompt"])
            loaded = _load(f, spinner=interactive, world=world)
            from .distributed.driver import driving

            with driving(loaded.model, world):
                _chat(f, vision_flags, loaded, given, interactive, text)
        finally:
            _leave(world)


def _chat(f: dict, vision_flags: dict | None, loaded, given: dict, interactive: bool, text):
    """`chat` once its model is loaded: the REPL, or the one-shot answer to ``text``."""
    from .engine import Engine
    from .sampling import SamplingSettings

    vision, pictures = None, []
    if vision_flags is not None:
        vision, pictures = _open_pictures(loaded, vision_flags, f["max_seq_len"])
    # generation_config.json replaces our defaults; a flag given replaces both.
    sampling = SamplingSettings(**{**loaded.generation_defaults, **given, "seed": f["seed"]})
    sampling.validate()
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        f["max_seq_len"],
        f["chunk_size"],
        f["kv_cache"].dtype,
        0 if f["draft"] is Draft.none else f["draft_max"],
    )
    _say_if_not_drafting(f, engine)
    if interactive:
        from .chat.repl import Repl
        from .chat.session import ChatOptions, Conversation

        options = ChatOptions(f["max_tokens"], f["think"], f["think_budget"])
        repl = Repl(engine, loaded, sampling, options, Conversation(f["system"]), vision=vision)
        repl.pending.extend(pictures)
        repl.run()
        return
    from .chat.oneshot import run_oneshot

    run_oneshot(
        engine,
        text,
        f["system"],
        sampling,
        f["max_tokens"],
        f["think"],
        f["json_output"],
        loaded.load_s,
        think_budget=f["think_budget"],
        prompts=vision,
        pictures=pictures,
    )


def _say_if_not_drafting(f: dict, engine) -> None:
    """The note for --draft ngram on a model whose engine cannot draft."""
    if f["draft"] is Draft.none or engine.draft_max:
        return
    why = (
        "this device's products do not give a pass's rows the results of single steps"
        if engine.model.step_order_rows() < 2
        else "this model's recurrent layers cannot step back past a wrong guess"
    )
    typer.echo(f"note: --draft ngram: {why}; decoding without drafts", err=True)


def _check_model_flags(f: dict) -> None:
    """The checks of the flags that choose and load a model, before anything loads."""
    if f["preset"] is not None and f["model_path"] is not None:
        _usage_error("--preset and -m exclude each other; give one of them")
    from .quant import QuantSpec

    try:
        if f["preset"] is not None:
            preset_config(f["preset"])  # an unknown name lists the choices
        QuantSpec.parse(f["quantize"].value, f["group_size"])
    except QwenChatError as e:
        _usage_error(str(e))


def _join(f: dict):
    """The run's World when torchrun started this process among several, else None."""
    from .device import resolve_device
    from .distributed.world import join

    return join(resolve_device(f["device"].value))


def _leave(world) -> None:
    if world is not None:
        world.close()


def _follow(f: dict, world) -> None:
    """A process other than 0: load its share and run process 0's model calls until it
    stops. Ctrl-C ends it at once (torchrun stops the run; process 0 reports)."""
    import signal

    from .distributed.driver import follow

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    follow(_load(f, world=world, quiet=True).model, world)


def _load(f: dict, spinner: bool = False, world=None, quiet: bool = False):
    """The model the flags name (-m or --preset), its notices said on stderr (not
    ``quiet``); with a ``world``, this process's share of it (--split)."""
    from .distributed.split import Sharding
    from .loading import load_model, load_preset, model_path

    preset, named = f["preset"], f["model_path"] or DEFAULT_MODEL
    sharding = None if world is None else Sharding(world, f["split"].value)
    # A first-use download shows its own progress; a preset needs none.
    path = None if preset else model_path(named)
    with _loading_spinner(preset or named) if spinner else contextlib.nullcontext():
        if preset:
            loaded = load_preset(
                preset,
                f["device"].value,
                f["dtype"].value,
                f["quantize"].value,
                f["group_size"],
                sharding,
            )
        else:
            loaded = load_model(
                path,
                f["format"].value,
                f["device"].value,
                f["dtype"].value,
                f["quantize"].value,
                f["group_size"],
                sharding,
            )
    for notice in [] if quiet else loaded.notices:
        typer.echo(f"note: {notice}", err=True)
    return loaded


def _open_pictures(loaded, vision_flags: dict, max_seq_len: int):
    """The VisionChat for a Qwen3-VL model and the pictures given on the command line."""
    from .vision.preprocess import VisionPreprocessing
    from .vision.prompt import VisionChat, require_vision_model

    require_vision_model(loaded.config, loaded.path)
    settings = VisionPreprocessing.from_model_dir(
        loaded.path,
        min_pixels=vision_flags["min_pixels"],
        max_pixels=vision_flags["max_pixels"],
        fps=vision_flags["video_fps"],
        max_frames=vision_flags["max_frames"],
    )
    vision = VisionChat(settings)
    pictures = [vision.image(path) for path in vision_flags["image"] or []]
    if vision_flags["video_frames"]:
        pictures.append(vision.video(vision_flags["video_frames"]))
    vision.check_fits(pictures, max_seq_len)
    return vision, pictures


def _usage_error(message: str) -> NoReturn:
    """A wrong flag or input: one line, and exit 2 like the usage errors click reports."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _loading_spinner(model_path: str) -> contextlib.AbstractContextManager:
    from rich.console import Console

    return Console(stderr=True).status(f"loading {model_path}")


def _read_prompt(prompt: str | None) -> str:
    """The one-shot prompt: -p TEXT, piped stdin, or -p TEXT then stdin after a blank line."""
    text = prompt or ""
    if not sys.stdin.isatty():
        try:
            piped = sys.stdin.read()
        except UnicodeDecodeError:
            raise QwenChatError("stdin: not UTF-8 text; pipe a text prompt") from None
        text = f"{text}\n\n{piped}" if text and piped else (text or piped)
    if not text.strip():
        _usage_error("the prompt is empty: pass -p TEXT or pipe text on stdin")
    return text


def vision_chat(
    ctx: typer.Context,
    image: list[str] | None = typer.Option(
        None, "--image", metavar="PATH", help="An image (PNG/JPEG) to ask about; repeatable."
    ),
    video_frames: list[str] | None = typer.Option(
        None,
        "--video-frames",
        metavar="PATH...",
        help="Image files taken as one video's frames, in order.",
    ),
    min_pixels: int | None = typer.Option(
        None, min=1, help="Smallest image area in pixels. \\[default: the model's]"
    ),
    max_pixels: int | None = typer.Option(
        None, min=1, help="Largest image area in pixels. \\[default: the model's]"
    ),
    video_fps: float | None = typer.Option(
        None, help="Frames per second the --video-frames were taken at. \\[default: 2]"
    ),
    max_frames: int | None = typer.Option(
        None, min=2, help="Most video frames kept (evenly spaced). \\[default: the model's]"
    ),
    **chat_flags,
) -> None:
    """Chat about images and video frames with a Qwen3-VL model: interactive in a
    terminal (/image PATH attaches an image to the next message), one-shot with -p or
    piped stdin. The pictures come before the text in the message.
    """
    frames = [*(video_frames or []), *ctx.args] if video_frames else []
    if ctx.args and not video_frames:
        _usage_error(f"unexpected argument {ctx.args[0]!r} (see: qwen3chat vision-chat --help)")
    vision_flags = {
        "image": image,
        "video_frames": frames,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "video_fps": video_fps,
        "max_frames": max_frames,
    }
    _run_chat(chat_flags, vision_flags)


def _with_chat_options(command, **defaults):
    """``command``'s signature with every `chat` option added (``defaults`` replacing some
    of their defaults): one definition of the flags both commands take."""
    own = inspect.signature(command)
    hints = typing.get_type_hints(command)
    params = [
        p.replace(annotation=hints[p.name])
        for p in own.parameters.values()
        if p.kind is not p.VAR_KEYWORD
    ]
    chat_hints = typing.get_type_hints(chat)
    for p in inspect.signature(chat).parameters.values():
        option = p.default
        if p.name in defaults:
            option = copy.copy(option)
            option.default = defaults[p.name]
        params.append(p.replace(annotation=chat_hints[p.name], default=option))
    command.__signature__ = own.replace(parameters=params)
    return command


app.command("vision-chat", context_settings={"allow_extra_args": True})(
    _with_chat_options(vision_chat, max_seq_len=4096)
)


@app.command()
def serve(
    model_path: str | None = typer.Option(
        None,
        "-m",
        "--model-path",
        help=f"Model directory, .gguf file or repo id. \\[default: {DEFAULT_MODEL}]",
    ),
    preset: str | None = typer.Option(
        None, "--preset", help="Instead of -m: a named shape with random weights."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port (0: any free one)."),
    api_key: str | None = typer.Option(
        None,
        envvar="QWEN3CHAT_API_KEY",
        help="Require 'Authorization: Bearer KEY'. \\[default: $QWEN3CHAT_API_KEY]",
        show_default=False,
    ),
    served_model_name: str | None = typer.Option(
        None, help="The model's id in the API. \\[default: the repo id or the path's last part]"
    ),
    max_running: int = typer.Option(
        16, min=1, help="Sequences decoded together (continuous batching)."
    ),
    max_seq_len: int = typer.Option(4096, min=2, help="Longest context of one request."),
    think: bool = typer.Option(
        True, "--think/--no-think", help="enable_thinking when a request does not say."
    ),
    chunk_size: int | None = typer.Option(
        None,
        min=1,
        help="Rows a step runs at most (chunked prefill). \\[default: whole prompts]",
    ),
    quantize: Quantize = typer.Option(Quantize.none, help="Weight quantization at load."),
    group_size: int = typer.Option(32, min=8, help="Inputs per int4 scale (--quantize int4)."),
    kv_cache: KvCache = typer.Option(KvCache.auto, help=KV_CACHE_HELP),
    draft: Draft = typer.Option(Draft.none, help=DRAFT_HELP),
    draft_max: int = typer.Option(7, min=1, help=DRAFT_MAX_HELP),
    format: Format = typer.Option(Format.auto, "--format", help="Model format."),
    device: Device = typer.Option(Device.auto, help="Compute device."),
    dtype: Dtype = typer.Option(Dtype.auto, help="Compute dtype."),
    split: Split = typer.Option(Split.auto, help=SPLIT_HELP),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """An OpenAI-compatible HTTP server (chat and raw completions, streaming, models,
    health, metrics), on 127.0.0.1 unless --host says otherwise."""
    f = locals()
    with reported_errors(debug):
        _check_model_flags(f)
        world = _join(f)
        try:
            if world is not None and not world.driver:
                _follow(f, world)
                return
            loaded = _load(f, world=world)
            from .distributed.driver import driving

            with driving(loaded.model, world):
                _serve(f, loaded)
        finally:
            _leave(world)


def _serve(f: dict, loaded) -> None:
    """`serve` once its model is loaded: the engine, the app, the server until it stops."""
    from .batch.engine import BatchEngine
    from .serve.app import ServerSettings, create_app, run_server
    from .serve.runner import Runner

    name = f["served_model_name"] or f["preset"] or _served_name(f["model_path"] or DEFAULT_MODEL)
    engine = BatchEngine(
        loaded.model,
        loaded.tokenizer,
        f["max_seq_len"],
        f["max_running"],
        token_budget=f["chunk_size"],
        kv_dtype=f["kv_cache"].dtype,
        draft_max=0 if f["draft"] is Draft.none else f["draft_max"],
    )
    _say_if_not_drafting(f, engine)
    engine.warm_up()
    runner = Runner(engine)
    settings = ServerSettings(
        name, f["max_seq_len"], f["think"], f["api_key"] or None, loaded.generation_defaults
    )
    vision = None
    if loaded.config.vision is not None:
        from .vision.preprocess import VisionPreprocessing
        from .vision.prompt import VisionChat

        vision = VisionChat(VisionPreprocessing.from_model_dir(loaded.path))
    app = create_app(runner, loaded.tokenizer, settings, vision)
    run_server(app, runner, f["host"], f["port"])


def _served_name(model_path: str) -> str:
    """A repo id as given; a path's last part."""
    from pathlib import Path

    path = Path(model_path).expanduser()
    return path.name if path.exists() else model_path


@app.command()
def download(
    repo_id: str = typer.Argument(
        ..., metavar="REPO_ID", help="Hugging Face repo id, e.g. Qwen/Qwen3-0.6B."
    ),
    include: list[str] | None = typer.Option(
        None,
        "--include",
        metavar="PATTERN",
        help="Only files matching this glob (repeatable), e.g. '*Q8_0.gguf'. "
        "Default: the SafeTensors weights, configs and tokenizer files.",
    ),
    local_dir: str | None = typer.Option(
        None,
        "--local-dir",
        metavar="DIR",
        help="Write a plain folder here instead of the shared HF cache.",
    ),
    revision: str | None = typer.Option(
        None, metavar="REV", help="Branch, tag or commit. Default: main."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Fetch a model from the Hugging Face Hub (resumable) and print its local path."""
    with reported_errors(debug):
        from .download import download_model

        typer.echo(download_model(repo_id, include or (), revision, local_dir))


@app.command("list")
def list_models(debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """Show the models in the Hugging Face cache: repo id, format, quant types, size."""
    with reported_errors(debug):
        from .download import cached_models, format_size

        rows = [(m.repo_id, m.format, m.quant, format_size(m.size)) for m in cached_models()]
        if not rows:
            typer.echo(
                "no models downloaded yet; get one with: qwen3chat download REPO_ID", err=True
            )
            return
        rows.insert(0, ("MODEL", "FORMAT", "QUANT", "SIZE"))
        widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
        for row in rows:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@app.command()
def bench(
    model_path: str | None = typer.Option(
        None, "-m", "--model-path", help="Model directory, .gguf file or repo id."
    ),
    preset: str | None = typer.Option(
        None,
        "--preset",
        help=f"Bench a named shape with random weights, no download: {', '.join(PRESETS)}.",
    ),
    prompt_tokens: str = typer.Option(
        "128", "-p", "--prompt-tokens", help="Prompt lengths, a comma list such as 128,512."
    ),
    gen_tokens: str = typer.Option(
        "64", "-n", "--gen-tokens", help="New tokens per run (at least 2), a comma list."
    ),
    depth: str | None = typer.Option(
        None,
        "-d",
        "--depth",
        help="Tokens of context before the prompt, a comma list (as llama-bench -d). "
        "\\[default: 0; with --plot 0,256,512,1024,2048]",
    ),
    repeat: int = typer.Option(
        3, "-r", "--repeat", min=1, help="Timed runs per combination, after one warm-up."
    ),
    quantize: Quantize = typer.Option(Quantize.none, help="Weight quantization at load."),
    kv_cache: KvCache = typer.Option(KvCache.auto, help=KV_CACHE_HELP),
    draft: Draft = typer.Option(Draft.none, help=DRAFT_HELP),
    draft_max: int = typer.Option(7, min=1, help=DRAFT_MAX_HELP),
    format: Format = typer.Option(Format.auto, "--format", help="Model format (with -m)."),
    device: Device = typer.Option(Device.auto, help="Compute device."),
    dtype: Dtype = typer.Option(Dtype.auto, help="Compute dtype."),
    chunk_size: int | None = typer.Option(None, min=1, help="Prefill chunk size in tokens."),
    threads: int | None = typer.Option(
        None, "-t", "--threads", min=1, help="CPU threads. \\[default: torch's choice]"
    ),
    ops: bool = typer.Option(
        False, "--ops", help="Time each operation alone at the model's dimensions."
    ),
    profile: bool = typer.Option(
        False, "--profile", help="Per-op time table of one prefill and one decode step."
    ),
    split: Split = typer.Option(Split.auto, help=SPLIT_HELP),
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON object on stdout instead of tables."
    ),
    plot: str | None = typer.Option(
        None, "--plot", metavar="FILE.png", help="Draw decode tokens/s against context depth."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Measure load time, prefill and decode speed, time to first token, memory, and the
    share of the memory-bandwidth roofline decode reaches.

    Every combination of --prompt-tokens, --gen-tokens and --depth runs once to warm up,
    then --repeat times; figures are medians (min-max beside them). With --json the
    top-level figures are the first combination's; "results" holds them all.
    """
    with reported_errors(debug):
        import json
        from pathlib import Path

        from .bench.report import print_report, report_json
        from .bench.run import BenchSettings, parse_counts, parse_depths, run_bench

        try:
            settings = BenchSettings(
                model_path=model_path,
                preset=preset,
                prompt_tokens=parse_counts(prompt_tokens, "--prompt-tokens", minimum=1),
                gen_tokens=parse_counts(gen_tokens, "--gen-tokens", minimum=2),
                depths=parse_depths(depth, plotting=plot is not None),
                repeat=repeat,
                fmt=format.value,
                quantize=quantize.value,
                kv_cache=kv_cache.value,
                draft_max=0 if draft is Draft.none else draft_max,
                device=device.value,
                dtype=dtype.value,
                chunk_size=chunk_size,
                threads=threads,
                ops=ops,
                profile=profile,
                plot=None if plot is None else Path(plot),
                split=split.value,
            )
        except QwenChatError as e:
            _usage_error(str(e))
        from .device import resolve_device
        from .distributed.world import join

        world = join(resolve_device(device.value))
        try:
            report = run_bench(settings, world)
        finally:
            _leave(world)
        if report is None:  # a process other than 0: it followed
            return
        if json_output:
            typer.echo(json.dumps(report_json(report)))
        else:
            print_report(report)


# typer's rich help keeps the line breaks of a docstring's paragraphs after the first, which
# then wrap raggedly on a terminal narrower than the source: each paragraph as one line,
# which rich wraps to the terminal.
for _command in app.registered_commands:
    _command.help = "\n\n".join(
        " ".join(part.split()) for part in inspect.cleandoc(_command.callback.__doc__).split("\n\n")
    )


def main() -> None:
    app()
