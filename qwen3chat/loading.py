"""From a path on disk (or a preset) to a ready model, tokenizer and generation defaults."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig, read_config_json
from .device import resolve_device, resolve_dtype
from .distributed.split import Sharding, take_fused
from .errors import QwenChatError
from .jsonfiles import read_json
from .memory import HeapTrimmer, gather, return_freed_memory
from .model import build_on_meta
from .model.qwen3 import Qwen3Model
from .presets import preset_config
from .quant import QuantSpec, random_quantized
from .sampling import SamplingSettings
from .tokenizer import Tokenizer
from .vision.preprocess import IMAGE_PAD
from .weights.gguf import (
    GGUFSource,
    config_from_gguf,
    open_gguf_files,
    release_vocabulary,
    sampling_defaults_from_gguf,
)
from .weights.gguf_tokenizer import tokenizer_from_gguf
from .weights.loader import (
    check_tensors,
    load_weights,
    place,
    quant_layout,
)
from .weights.names import FLOAT32
from .weights.safetensors import SafeTensorsSource


@dataclass
class LoadedModel:
    model: Qwen3Model
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    format: str
    generation_defaults: dict = field(default_factory=dict)
    load_s: float = 0.0
    quantization: str = "none"  # what the weights are held as, for /show and bench
    notices: list[str] = field(default_factory=list)  # one-line notes for the user


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt not in ("auto", "safetensors", "gguf"):
        raise QwenChatError(f"--format: unknown format {fmt!r}; use auto, safetensors or gguf")
    if not path.exists():
        raise QwenChatError(f"{path}: no such file or directory (--model-path)")
    if fmt != "auto":
        return fmt
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    if path.is_dir():
        return "safetensors"
    raise QwenChatError(
        f"{path}: not a model directory or .gguf file (--model-path); "
        "give a directory with config.json and *.safetensors"
    )


def read_generation_defaults(directory: Path) -> tuple[dict, list[int]]:
    """The sampling values of the folder's generation_config.json that replace our
    defaults, and its stop ids."""
    raw = read_json(directory / "generation_config.json")
    names = SamplingSettings.distribution_names()
    defaults = {k: raw[k] for k in names if raw.get(k) is not None}
    if raw.get("do_sample") is False:
        defaults["temperature"] = 0.0
    eos = raw.get("eos_token_id")
    return defaults, [eos] if isinstance(eos, int) else list(eos or [])


# The packaged template a family falls back on when its files bring none (Qwen3's
# otherwise; Qwen3-Next uses Qwen3's).
_BUILTIN_TEMPLATES = {
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
    "Qwen3VLMoeForConditionalGeneration": "qwen3_vl",
    **dict.fromkeys(
        (
            "Qwen3_5ForCausalLM",
            "Qwen3_5MoeForCausalLM",
            "Qwen3_5ForConditionalGeneration",
            "Qwen3_5MoeForConditionalGeneration",
        ),
        "qwen3_5",
    ),
}


def builtin_template_of(config: ModelConfig) -> str:
    return _BUILTIN_TEMPLATES.get(config.architecture, "qwen3")


def _tokenizer_from_dir(directory: Path, config: ModelConfig, stop_ids: list[int]) -> Tokenizer:
    """The folder's tokenizer.json with a template for the model (one that places the
    pictures for a vision model) and its stop ids (else config.json's)."""
    vision = config.vision is not None
    return Tokenizer.from_dir(
        directory,
        stop_ids or config.eos_token_ids,
        builtin=builtin_template_of(config),
        requires=IMAGE_PAD if vision else None,
    )


def _open_safetensors(path: Path):
    if not path.is_dir():
        raise QwenChatError(f"{path}: --format safetensors needs a model directory")
    config, config_json = read_config_json(path / "config.json")
    source = SafeTensorsSource(path, config_json, config)
    config.complete_from_shapes(source.shapes())
    generation, stop_ids = read_generation_defaults(path)
    return config, source, _tokenizer_from_dir(path, config, stop_ids), generation


def _open_gguf(path: Path):
    if not path.is_file():
        raise QwenChatError(f"{path}: --format gguf needs a .gguf file")
    files = open_gguf_files(path)  # one, or each of a split model's
    head, reader = next(iter(files.items()))  # the one with the metadata
    config = config_from_gguf(files)
    # A tokenizer.json (and generation_config.json) beside the file win over the metadata.
    beside = path.parent
    generation, stop_ids = read_generation_defaults(beside)
    if not (beside / "generation_config.json").is_file():
        generation = sampling_defaults_from_gguf(reader)
    if (beside / "tokenizer.json").is_file():
        tokenizer = _tokenizer_from_dir(beside, config, stop_ids)
    else:
        tokenizer = tokenizer_from_gguf(reader, head)
    release_vocabulary(reader)
    return config, GGUFSource(files, config), tokenizer, generation


def model_path(path: str | Path) -> Path:
    """The local model ``-m`` names: an existing path as it is, anything else what
    download.py makes of it (a repo id's cached or just fetched folder), whose Hub
    libraries take ~0.3 s to import and so are imported only then."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    from .download import resolve_model_path

    return resolve_model_path(path)


def load_model(
    path: str | Path,
    fmt: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "none",
    group_size: int = 32,
    sharding: Sharding | None = None,
) -> LoadedModel:
    """``sharding``: load this process's share of the model only (a run of several)."""
    path = model_path(path)  # a repo id becomes its cached (or just fetched) folder
    start = time.perf_counter()
    fmt = detect_format(path, fmt)
    quant = QuantSpec.parse(quantize, group_size)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    opener = _open_gguf if fmt == "gguf" else _open_safetensors
    config, source, tokenizer, generation = opener(path)
    model = build_on_meta(config)
    check_tensors(model, source, str(path))
    if sharding is not None:
        sharding.apply(model)
    notices = []
    stored = getattr(source, "quant_types", dict)()
    requantized = getattr(source, "requantized_types", dict)()
    kept = [t for t in sorted(stored) if t not in ("F32", "F16", "BF16", *requantized)]
    if quant and kept:
        notices.append(
            f"--quantize {quantize}: {path.name} is already quantized; keeping its "
            f"{', '.join(kept)} tensors as they are (float tensors in it are quantized as asked)"
        )
    if requantized:
        types = ", ".join(f"{t} ({n} tensors)" for t, n in sorted(requantized.items()))
        if quant is not None and quant.bits == 4:
            held = (
                f"requantized to int4 per {quant.group_size} as --quantize int4 asks "
                "(embedding tables and the LM head to int8 per 32)"
            )
        else:
            held = (
                "held as int8 per 32 (8.5 bits a weight), as there is no exact form of them "
                "here (--quantize int4: int4, 5 bits, less exact)"
            )
        notices.append(f"{path.name}: {types} {held}")
    if (quant or stored) and torch_device.type != "cpu":
        notices.append(
            f"quantized weights on {torch_device.type}: no fused kernel here yet, so each "
            "matmul dequantizes its weights first (correct, slower than on the CPU path)"
        )
    load_weights(model, source, torch_dtype, torch_device, quant)
    model.eval()
    described = ", ".join(f"{t} x{n}" for t, n in sorted(stored.items())) or "none"
    if quant:
        converted = ", ".join(["float", *sorted(requantized)] if quant.bits == 4 else ["float"])
        described = str(quant) if not stored else f"{described}; {converted} tensors {quant}"
    return LoadedModel(
        model,
        tokenizer,
        config,
        path,
        fmt,
        generation,
        time.perf_counter() - start,
        quantization=described,
        notices=notices,
    )


# Parameters a random model sets rather than draws: Gated DeltaNet's decay rate must be
# negative (a positive one grows the state without bound), its time-step bias as the
# reference initialises it.
_RANDOM_CONSTANTS = {"A": -1.0, "dt_bias": 1.0}


def random_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    std: float = 0.02,
    quant: QuantSpec | None = None,
    sharding: Sharding | None = None,
) -> Qwen3Model:
    """A model of ``config``'s shape with random weights, filled in place (fast). With
    ``quant`` each matrix is drawn directly as quantized codes, so a preset that only fits
    memory quantized (30B-A3B int4 in 24 GB) never exists in float. With ``sharding``
    each process draws every weight whole, as one process does, and keeps its share: the
    processes of a run hold one model."""
    generator = torch.Generator(device=device).manual_seed(seed)
    model = build_on_meta(config)
    whole = {name: tuple(p.shape) for name, p in model.named_parameters()}
    splits = sharding.apply(model) if sharding is not None else {}
    heap = HeapTrimmer()
    held = dict(model.named_parameters())
    for name, shape in whole.items():
        weight = _random_weight(name, shape, dtype, device, quant, std, generator)
        if name not in held:  # another pipeline stage's: drawn all the same, to stay in step
            continue
        parts = getattr(model.get_submodule(name.rpartition(".")[0]), "parts", None)
        if parts is not None:
            weight = take_fused(weight, splits[name], parts)
        place(model, name, weight, dtype, device)
        del weight
        heap.placed(held[name].numel())
    gather(model)
    return_freed_memory()
    return model.eval()


def _random_weight(name, shape, dtype, device, quant, std, generator):
    """Parameter ``name`` of ``shape``, drawn (quantized where ``quant`` says) or a constant."""
    constant = _RANDOM_CONSTANTS.get(name.rpartition(".")[2])
    if name.endswith("norm.weight") or constant is not None:
        held = torch.float32 if FLOAT32.search(name) else dtype
        return torch.full(shape, constant or 1.0, dtype=held, device=device)
    layout = quant_layout(name, shape, quant)
    if layout is not None:
        return random_quantized(shape, *layout, std, generator, device)
    weight = torch.empty(shape, dtype=dtype, device=device)
    return weight.normal_(0.0, std, generator=generator)


def load_preset(
    name: str,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "none",
    group_size: int = 32,
    sharding: Sharding | None = None,
) -> LoadedModel:
    """A preset's shape with seeded random weights and the packaged Qwen3 tokenizer: the
    whole chat interface with no download, though the words are noise."""
    start = time.perf_counter()
    name = name.lower()
    config = preset_config(name)
    tokenizer = Tokenizer.builtin_qwen3(builtin_template_of(config))
    if config.vocab_size < tokenizer.vocab_size:
        raise QwenChatError(
            f"--preset {name}: its {config.vocab_size}-id vocabulary is smaller than the "
            f"packaged Qwen3 tokenizer's ({tokenizer.vocab_size}); chat with another preset"
        )
    quant = QuantSpec.parse(quantize, group_size)
    torch_device = resolve_device(device)
    # As bench: a quantized preset is drawn directly quantized, never held in float.
    model = random_model(
        config, resolve_dtype(dtype, torch_device), torch_device, quant=quant, sharding=sharding
    )
    notice = f"--preset {name} has random weights, so the words are noise; -m MODEL chats for real"
    return LoadedModel(
        model,
        tokenizer,
        config,
        Path(name),
        "preset",
        load_s=time.perf_counter() - start,
        quantization=str(quant) if quant else "none",
        notices=[notice],
    )
