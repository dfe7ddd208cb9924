"""Models from the Hugging Face Hub: download, repo id -> local path, and the cache listing.

Everything goes through huggingface_hub and its shared cache (``HF_HOME``), so models
fetched by other tools are reused and the other way round; it also honours
``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE``. A file only appears under its name
once it is complete: huggingface_hub writes to a temporary file and renames it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import CacheNotFound, HfApi, constants, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from .errors import QwenChatError
from .weights.gguf_split import shard_paths

# What inference reads: weights, configs, tokenizer and chat template. Only files at the
# repo root, because subfolders hold other formats (original/, onnx/, ...); *.bin, *.pth
# and *.pt are other formats too.
DEFAULT_INCLUDE = ("*.safetensors", "*.json", "*.jinja", "*.txt")
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
TOKEN_HELP = "https://huggingface.co/settings/tokens"

# The quant type in a GGUF file name: Qwen3-8B-Q4_K_M.gguf, ...-UD-IQ2_XXS-00001-of-00003.gguf
_GGUF_QUANT = re.compile(r"(?:^|[-_.])(I?Q\d+(?:_[A-Z0-9]{1,3})*|BF16|F16|F32)(?=[-.])", re.I)
_SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


def is_repo_id(text: str) -> bool:
    """``owner/name`` as the Hub spells it; ``dir/model.gguf`` is taken for a mistyped file."""
    if text.count("/") != 1 or text.endswith(".gguf"):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_model_path(path: str | Path) -> Path:
    """The local model ``-m`` names: an existing path as it is, a repo id as its folder (or
    single .gguf file) in the cache, downloaded first if it is not there yet."""
    local = Path(path).expanduser()
    if local.exists() or not is_repo_id(str(path)):
        return local
    repo_id = str(path)
    snapshot = cached_snapshot(repo_id)
    model = model_in(snapshot) if snapshot else None
    if model:
        return model
    if constants.is_offline_mode():
        raise QwenChatError(
            f"{repo_id} is not (fully) downloaded and HF_HUB_OFFLINE=1 forbids fetching it; "
            f"run: qwen3chat download {repo_id}"
        )
    folder = download_model(repo_id)
    # A folder with files still missing is loaded anyway: loading names what is missing.
    return model_in(folder) or folder


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of the repo's main branch, read from the cache without a request."""
    ref = cache_folder(repo_id) / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = cache_folder(repo_id) / "snapshots" / ref.read_text().strip()
    return snapshot if snapshot.is_dir() else None


def cache_folder(repo_id: str) -> Path:
    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def model_in(folder: Path) -> Path | None:
    """What ``-m`` loads from a downloaded folder: the folder for SafeTensors, the file for
    GGUF; None while files are missing (an interrupted download)."""
    if any(folder.glob("*.safetensors")):
        return folder if _safetensors_complete(folder) else None
    # A model split into several files counts once, as its first file (llama.cpp's -m).
    firsts = sorted({shard_paths(g)[0] for g in folder.rglob("*.gguf")})
    if len(firsts) > 1:
        names = ", ".join(str(g.relative_to(folder)) for g in firsts)
        raise QwenChatError(f"{folder} holds several GGUF models ({names}); pass one with -m PATH")
    if not firsts:
        return None
    return firsts[0] if all(p.is_file() for p in shard_paths(firsts[0])) else None


def _safetensors_complete(folder: Path) -> bool:
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        # Numbered shards come with their index; without it the set may be partial.
        return not any(_SHARD_NAME.search(p.name) for p in folder.glob("*.safetensors"))
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True  # loading reports the broken index with its own clear message
    return all((folder / shard).is_file() for shard in shards)


def download_model(
    repo_id: str,
    include: Sequence[str] = (),
    revision: str | None = None,
    local_dir: str | Path | None = None,
) -> Path:
    """Fetch the files inference needs (or those matching ``include``) and return the folder.

    Reports the size on stderr first and refuses when the disk lacks room. Files already
    there are skipped, so running it again after an interruption fetches only the rest.
    """
    local_dir = Path(local_dir).expanduser() if local_dir else None
    with hub_errors(repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        files = select_files(repo_id, sizes, include)
        target = local_dir or cache_folder(repo_id) / "snapshots" / str(info.sha)
        total = sum(sizes[f] for f in files)
        missing = sum(sizes[f] for f in files if not (target / f).is_file())
        todo = f", {format_size(missing)} to fetch" if missing != total else ""
        print(
            f"{repo_id} @ {str(info.sha)[:7]}: {len(files)} files, {format_size(total)}{todo}",
            file=sys.stderr,
        )
        check_disk_space(missing, target)
        folder = snapshot_download(
            repo_id,
            revision=revision,
            local_dir=local_dir,
            # The exact files chosen above, so the download matches the size just reported.
            allow_patterns=[glob.escape(f) for f in files],
        )
    return Path(folder)


def select_files(repo_id: str, sizes: dict[str, int], include: Sequence[str]) -> list[str]:
    """The repo files to download: those matching ``include``, else the inference set."""
    if include:
        chosen = list(filter_repo_objects(sizes, allow_patterns=list(include)))
    else:
        root_files = [f for f in sizes if "/" not in f]
        chosen = list(filter_repo_objects(root_files, allow_patterns=list(DEFAULT_INCLUDE)))
    if any(f.endswith(WEIGHT_SUFFIXES) for f in chosen):
        return chosen
    ggufs = {f: size for f, size in sizes.items() if f.endswith(".gguf")}
    if ggufs:
        raise QwenChatError(gguf_choice_message(repo_id, ggufs))
    if not include:
        raise QwenChatError(f"{repo_id} has no *.safetensors or *.gguf weights to load")
    if not chosen:
        patterns = " ".join(f"--include {p!r}" for p in include)
        raise QwenChatError(f"no file of {repo_id} matches {patterns}")
    return chosen


def gguf_choice_message(repo_id: str, ggufs: dict[str, int]) -> str:
    """The GGUF files by quant type (split files summed) and how to pick one."""
    by_quant: dict[str, int] = {}
    for name, size in sorted(ggufs.items()):
        label = gguf_quant(name) or name
        by_quant[label] = by_quant.get(label, 0) + size
    listing = ", ".join(f"{label} ({format_size(size)})" for label, size in by_quant.items())
    first = min(ggufs)
    example = f"*{quant}*.gguf" if (quant := gguf_quant(first)) else first
    return (
        f"{repo_id} is a GGUF repo: choose a quant with --include, "
        f'e.g. --include "{example}"; available: {listing}'
    )


def gguf_quant(filename: str) -> str | None:
    match = _GGUF_QUANT.search(Path(filename).name)
    return match.group(1).upper() if match else None


def check_disk_space(needed: int, target: Path) -> None:
    existing = next(p for p in (target, *target.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise QwenChatError(
            f"not enough disk space: the download needs {format_size(needed)} but {existing} "
            f"has {format_size(free)} free; free some space or use --local-dir on another disk"
        )


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub and network errors -> one line saying what failed and what to do."""
    endpoint = constants.ENDPOINT
    try:
        yield
    except OfflineModeIsEnabled:
        raise QwenChatError(
            f"cannot download {repo_id}: HF_HUB_OFFLINE=1 is set; unset it to download"
        ) from None
    except GatedRepoError:
        raise QwenChatError(
            f"{repo_id} is gated: accept its conditions at {endpoint}/{repo_id}, then set "
            f"HF_TOKEN to an access token of that account ({TOKEN_HELP})"
        ) from None
    except RepositoryNotFoundError as e:
        if e.response.status_code == 401:
            # The Hub answers 401, not 404, for private and missing repos alike.
            raise _token_error(repo_id, 401) from None
        raise QwenChatError(f"{repo_id}: no such model on {endpoint}; check the repo id") from None
    except RevisionNotFoundError:
        raise QwenChatError(f"{repo_id} has no revision {revision!r} (--revision)") from None
    except HfHubHTTPError as e:
        status = e.response.status_code
        if status in (401, 403):
            raise _token_error(repo_id, status) from None
        raise QwenChatError(
            f"{endpoint} answered HTTP {status} for {repo_id}; try again later"
        ) from None
    except (httpx2.ConnectError, httpx2.UnsupportedProtocol) as e:
        raise QwenChatError(
            f"cannot reach {endpoint} to download {repo_id} ({e}); check the network "
            "connection (and HF_ENDPOINT), or pass a local model path"
        ) from None
    except (httpx2.TransportError, LocalEntryNotFoundError) as e:
        # huggingface_hub already resumed a few times with Range requests before this.
        raise QwenChatError(
            f"the download of {repo_id} was interrupted ({type(e).__name__}); run the same "
            "command again to fetch the rest"
        ) from None
    except HFValidationError:
        raise QwenChatError(f"{repo_id!r} is not a valid repo id; use owner/name") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise QwenChatError(
                f"the disk filled up while downloading {repo_id}; free some space and "
                "run the same command again"
            ) from None
        raise QwenChatError(f"the download of {repo_id} failed: {e}") from None


def _token_error(repo_id: str, status: int) -> QwenChatError:
    return QwenChatError(
        f"access to {repo_id} denied (HTTP {status}): the repo is private, gated or missing; "
        f"check the repo id, or set HF_TOKEN to an access token that can read it ({TOKEN_HELP})"
    )


@dataclass
class CachedModel:
    repo_id: str
    format: str
    quant: str  # GGUF quant types, or the SafeTensors dtype or quantization method
    size: int


def cached_models() -> list[CachedModel]:
    """The models in the Hugging Face cache that hold SafeTensors or GGUF weights."""
    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    models = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        names = {f.file_name for rev in repo.revisions for f in rev.files}
        ggufs = [n for n in names if n.endswith(".gguf")]
        if any(n.endswith(".safetensors") for n in names):
            newest = max(repo.revisions, key=lambda rev: rev.last_modified)
            quant = safetensors_dtype(newest.snapshot_path / "config.json")
            models.append(CachedModel(repo.repo_id, "safetensors", quant, repo.size_on_disk))
        elif ggufs:
            quants = ",".join(sorted({gguf_quant(n) or "?" for n in ggufs}))
            models.append(CachedModel(repo.repo_id, "gguf", quants, repo.size_on_disk))
    return models


def safetensors_dtype(config_path: Path) -> str:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "?"
    quantization = config.get("quantization_config") or {}
    return (
        quantization.get("quant_method") or config.get("torch_dtype") or config.get("dtype") or "?"
    )


def format_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
