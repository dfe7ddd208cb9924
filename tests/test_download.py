"""`download`, `list` and `-m REPO_ID` against a real HTTP server on 127.0.0.1 that speaks
the Hub endpoints huggingface_hub uses (model info, tree, resolve with HEAD and Range).

The CLI runs in subprocesses: huggingface_hub reads HF_HOME, HF_ENDPOINT and
HF_HUB_OFFLINE when it is imported, so each run needs its own environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from gguf import GGMLQuantizationType as T
from gguf_files import write_gguf
from typer.testing import CliRunner

from qwen3chat.cli import app
from qwen3chat.download import gguf_quant, is_repo_id, model_in, resolve_model_path
from qwen3chat.errors import QwenChatError
from qwen3chat.loading import model_path

TINY = "test/tiny"
# Repo files the default selection must skip: other formats and subfolders.
SKIPPED = {"pytorch_model.bin": b"pickle", "original/params.json": b"{}", "README.md": b"# tiny"}
CHAT = ["chat", "-p", "hi", "-n", "2", "--temperature", "0"]


@dataclass
class Repo:
    files: dict[str, bytes]
    token: str | None = None  # private: only this bearer token may read it
    gated: bool = False
    listed_sizes: dict[str, int] = field(default_factory=dict)  # sizes the listing claims

    def __post_init__(self):
        # Hashed once: the handler needs them on every request.
        self.sha256 = {name: hashlib.sha256(data).hexdigest() for name, data in self.files.items()}
        self.sha = hashlib.sha1(json.dumps(self.sha256, sort_keys=True).encode()).hexdigest()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".gguf", ".bin"))


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, str | None]] = []  # method, path, Range header
        self.cut_once: set[str] = set()  # send half the file, then drop the connection
        self.fail_once: set[str] = set()  # answer HTTP 500 once
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, filename: str) -> list[str | None]:
        """The Range headers of the GET requests for a file, in order."""
        file_url = re.compile(r"/[^/]+/[^/]+/resolve/[^/]+/" + re.escape(filename))
        return [
            range_header
            for method, path, range_header in self.log
            if method == "GET" and file_url.fullmatch(unquote(urlsplit(path).path))
        ]


class HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        self.route(send_body=True)

    def do_HEAD(self):
        self.route(send_body=False)

    def route(self, send_body: bool):
        hub = self.server
        hub.log.append((self.command, self.path, self.headers.get("Range")))
        path = unquote(urlsplit(self.path).path)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            self.with_repo(
                m[1], m[2] or "main", lambda repo: self.send_json(model_info(m[1], repo))
            )
        elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
            self.with_repo(m[1], m[2], lambda repo: self.send_json(tree(repo)))
        elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            self.with_repo(m[1], m[2], lambda repo: self.send_file(repo, m[3], send_body))
        else:
            self.send_error_code(404, "RepoNotFound")

    def with_repo(self, repo_id: str, revision: str, respond):
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self.send_error_code(404, "RepoNotFound")
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self.send_error_code(401, None)
        if repo.gated:
            return self.send_error_code(403, "GatedRepo")
        if revision not in ("main", repo.sha):
            return self.send_error_code(404, "RevisionNotFound")
        respond(repo)

    def send_error_code(self, status: int, code: str | None):
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_json(self, value):
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_file(self, repo: Repo, name: str, send_body: bool):
        hub = self.server
        if name not in repo.files:
            return self.send_error_code(404, "EntryNotFound")
        data = repo.files[name]
        if send_body and name in hub.fail_once:
            hub.fail_once.discard(name)
            return self.send_error_code(500, None)
        start = (
            int(m[1]) if (m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))) else 0
        )
        self.send_response(206 if start else 200)
        etag = repo.sha256[name] if is_lfs(name) else git_blob_id(data)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not send_body:
            return
        if name in hub.cut_once and not start:
            hub.cut_once.discard(name)
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True  # the client sees a body cut short
            return
        self.wfile.write(data[start:])


def model_info(repo_id: str, repo: Repo) -> dict:
    siblings = [
        {
            "rfilename": name,
            "size": repo.listed_sizes.get(name, len(data)),
            "blobId": git_blob_id(data),
        }
        for name, data in repo.files.items()
    ]
    return {"id": repo_id, "sha": repo.sha, "private": bool(repo.token), "siblings": siblings}


def tree(repo: Repo) -> list[dict]:
    entries = []
    for name, data in repo.files.items():
        entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
        if is_lfs(name):
            entry["lfs"] = {"oid": repo.sha256[name], "size": len(data), "pointerSize": 134}
        entries.append(entry)
    return entries


@pytest.fixture(scope="module")
def tiny_files(tiny_model_dir) -> dict[str, bytes]:
    directory = tiny_model_dir[0]
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.fixture
def hub(tiny_files):
    server = FakeHub()
    server.repos[TINY] = Repo({**tiny_files, **SKIPPED})
    server.repos["test/tiny-GGUF"] = Repo(
        {"tiny-Q4_K_M.gguf": b"GGUF" + b"4" * 300, "tiny-Q8_0.gguf": b"GGUF" + b"8" * 500}
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    # Bounded: the server stops itself even if a test hangs past this.
    watchdog = threading.Timer(120, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    yield server
    watchdog.cancel()
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def hf_home(tmp_path) -> Path:
    return tmp_path / "hf-home"


def hub_env(hub_url: str, hf_home: Path, **env: str) -> dict[str, str]:
    """This environment with the Hub at ``hub_url`` and the HF cache under ``hf_home``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    clean.pop("TRANSFORMERS_OFFLINE", None)
    return {**clean, "HF_HOME": str(hf_home), "HF_ENDPOINT": hub_url, **env}


def run(args: list[str], hub_url: str, hf_home: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen3chat", *args],
        env=hub_env(hub_url, hf_home, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def snapshot_of(hf_home: Path, repo_id: str, repo: Repo) -> Path:
    return hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / repo.sha


def default_files(tiny_files: dict[str, bytes]) -> set[str]:
    return {name for name in tiny_files if name.endswith((".json", ".safetensors"))}


# Resolve a repo id the way `-m` does, in a process with its own HF environment.
RESOLVE = """
import sys
from qwen3chat.errors import QwenChatError
from qwen3chat.loading import model_path
try:
    print(model_path(sys.argv[1]))
except QwenChatError as e:
    sys.exit(f"error: {e}")
"""


def resolve(repo_id: str, hub_url: str, hf_home: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", RESOLVE, repo_id],
        env=hub_env(hub_url, hf_home, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def reference_answer(tiny_model_dir) -> str:
    """The answer of the tiny model loaded from its own folder."""
    result = CliRunner().invoke(app, [*CHAT, "-m", str(tiny_model_dir[0])])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_download_list_then_chat_offline_by_repo_id(hub, hf_home, tiny_files, reference_answer):
    result = run(["download", TINY], hub.url, hf_home)
    assert result.returncode == 0, result.stderr
    snapshot = snapshot_of(hf_home, TINY, hub.repos[TINY])
    assert result.stdout.strip() == str(snapshot)
    # The size is reported before the transfer.
    wanted = default_files(tiny_files)
    size_mb = sum(len(tiny_files[f]) for f in wanted) / 1e6
    assert f"{len(wanted)} files, {size_mb:.1f} MB" in result.stderr
    # Only what inference needs: no .bin, no subfolder, no README.
    assert {p.name for p in snapshot.iterdir()} == wanted
    assert all((snapshot / f).read_bytes() == tiny_files[f] for f in wanted)
    assert not any(hub.gets(f) for f in SKIPPED)

    listing = run(["list"], hub.url, hf_home)
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()
    assert header.split() == ["MODEL", "FORMAT", "QUANT", "SIZE"]
    assert row.split() == [TINY, "safetensors", "float32", f"{size_mb:.1f}", "MB"]

    requests_before = len(hub.log)
    chat = run([*CHAT, "-m", TINY], hub.url, hf_home, HF_HUB_OFFLINE="1")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == reference_answer
    assert len(hub.log) == requests_before


def test_chat_downloads_on_first_use(hub, hf_home, reference_answer):
    chat = run([*CHAT, "-m", TINY], hub.url, hf_home)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == reference_answer  # progress and sizes go to stderr only
    assert hub.gets("model.safetensors") == [None]

    # Once cached, a repo id resolves without any request, even with the network allowed.
    requests_before = len(hub.log)
    resolved = resolve(TINY, hub.url, hf_home)
    assert resolved.stdout.strip() == str(snapshot_of(hf_home, TINY, hub.repos[TINY]))
    assert len(hub.log) == requests_before


def test_not_downloaded_offline_gives_the_hint(hub, hf_home):
    error = one_line_error(run([*CHAT, "-m", TINY], hub.url, hf_home, HF_HUB_OFFLINE="1"))
    assert "HF_HUB_OFFLINE=1" in error
    assert error.endswith(f"run: qwen3chat download {TINY}")
    assert hub.log == []


def test_gguf_repo_lists_quants_and_include_picks_one(hub, hf_home):
    error = one_line_error(run(["download", "test/tiny-GGUF"], hub.url, hf_home))
    assert "--include" in error and "Q4_K_M (304 B)" in error and "Q8_0 (504 B)" in error

    result = run(["download", "test/tiny-GGUF", "--include", "*Q8_0.gguf"], hub.url, hf_home)
    assert result.returncode == 0, result.stderr
    snapshot = Path(result.stdout.strip())
    assert [p.name for p in snapshot.iterdir()] == ["tiny-Q8_0.gguf"]
    assert not hub.gets("tiny-Q4_K_M.gguf")

    listing = run(["list"], hub.url, hf_home)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split("\n")[1].split() == ["test/tiny-GGUF", "gguf", "Q8_0", "504", "B"]


@pytest.fixture(scope="module")
def split_gguf(tmp_path_factory, tiny_model_dir, tokenizer_dir) -> dict[str, bytes]:
    """The tiny model as a float32 GGUF split into files of 8 tensors."""
    folder = tmp_path_factory.mktemp("split-gguf")
    write_gguf(
        tiny_model_dir[1], tokenizer_dir, folder / "tiny-F32.gguf", T.F32, split_max_tensors=8
    )
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_split_gguf_downloads_and_loads_by_repo_id(hub, hf_home, split_gguf, reference_answer):
    """The Hub's large quants come split (NAME-00001-of-00003.gguf, ...): the choice lists
    their summed size, --include fetches them all, and -m REPO_ID loads them as one model
    once every file is there."""
    repo = "test/split-GGUF"
    hub.repos[repo] = Repo({**split_gguf, "tiny-Q8_0.gguf": b"GGUF" + b"8" * 500})
    error = one_line_error(run(["download", repo], hub.url, hf_home))
    assert f"F32 ({sum(len(b) / 1e6 for b in split_gguf.values()):.1f} MB)" in error
    result = run(["download", repo, "--include", "*F32*"], hub.url, hf_home)
    assert result.returncode == 0, result.stderr
    snapshot = Path(result.stdout.strip())
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(split_gguf) and len(split_gguf) > 2
    chat = run([*CHAT, "-m", repo], hub.url, hf_home, HF_HUB_OFFLINE="1")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == reference_answer

    (snapshot / sorted(split_gguf)[-1]).unlink()  # an interrupted download
    error = one_line_error(run([*CHAT, "-m", repo], hub.url, hf_home, HF_HUB_OFFLINE="1"))
    assert f"{repo} is not (fully) downloaded" in error


def test_a_split_model_is_one_model_of_a_folder(tmp_path):
    first = tmp_path / "m-Q8_0-00001-of-00002.gguf"
    first.touch()
    assert model_in(tmp_path) is None  # its second file still missing
    (tmp_path / "m-Q8_0-00002-of-00002.gguf").touch()
    assert model_in(tmp_path) == first
    (tmp_path / "m-Q4_0.gguf").touch()
    with pytest.raises(QwenChatError, match=r"several GGUF models \(m-Q4_0.gguf, m-Q8_0-00001"):
        model_in(tmp_path)


def test_include_is_repeatable(hub, hf_home):
    args = ["download", TINY, "--include", "config.json", "--include", "*.md"]
    result = run(args, hub.url, hf_home)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in Path(result.stdout.strip()).iterdir()} == {"config.json", "README.md"}

    error = one_line_error(run(["download", TINY, "--include", "*.onnx"], hub.url, hf_home))
    assert error == f"error: no file of {TINY} matches --include '*.onnx'"


def test_list_with_an_empty_cache(hub, hf_home):
    listing = run(["list"], hub.url, hf_home)
    assert listing.returncode == 0 and listing.stdout == ""
    assert "qwen3chat download" in listing.stderr


def test_local_dir(hub, hf_home, tmp_path, tiny_files):
    target = tmp_path / "models" / "tiny"
    result = run(["download", TINY, "--local-dir", str(target)], hub.url, hf_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(target)
    wanted = default_files(tiny_files)
    assert {p.name for p in target.iterdir() if p.is_file()} == wanted
    assert all((target / f).read_bytes() == tiny_files[f] for f in wanted)
    assert not (hf_home / "hub" / "models--test--tiny" / "snapshots").exists()


def test_interrupted_transfer_resumes(hub, hf_home, tiny_files):
    hub.cut_once.add("model.safetensors")
    result = run(["download", TINY], hub.url, hf_home)
    assert result.returncode == 0, result.stderr
    first, resumed = hub.gets("model.safetensors")
    # Resumed from what had arrived (whole chunks of it), not from the start.
    start = int(re.fullmatch(r"bytes=(\d+)-", resumed)[1])
    assert first is None and 0 < start <= len(tiny_files["model.safetensors"]) // 2
    snapshot = snapshot_of(hf_home, TINY, hub.repos[TINY])
    assert (snapshot / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]


def test_failed_file_is_never_left_looking_complete(hub, hf_home, tiny_files):
    hub.fail_once.add("model.safetensors")
    error = one_line_error(run(["download", TINY], hub.url, hf_home))
    assert "HTTP 500" in error
    repo_dir = hf_home / "hub" / "models--test--tiny"
    snapshot = snapshot_of(hf_home, TINY, hub.repos[TINY])
    assert not (snapshot / "model.safetensors").exists()
    assert not list(repo_dir.rglob("*.incomplete"))

    # Offline, the partial snapshot is not taken for the model.
    error = one_line_error(resolve(TINY, hub.url, hf_home, HF_HUB_OFFLINE="1"))
    assert error.endswith(f"run: qwen3chat download {TINY}")

    # Running again fetches only what is missing.
    gets_before = {f: len(hub.gets(f)) for f in tiny_files}
    result = run(["download", TINY], hub.url, hf_home)
    assert result.returncode == 0, result.stderr
    size_mb = len(tiny_files["model.safetensors"]) / 1e6
    assert f"{size_mb:.1f} MB to fetch" in result.stderr
    fetched = {f for f in tiny_files if len(hub.gets(f)) > gets_before[f]}
    assert fetched == {"model.safetensors"}
    assert (snapshot / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]


def test_server_gone_is_a_clean_error(hub, hf_home):
    url = hub.url
    hub.shutdown()
    hub.server_close()
    error = one_line_error(run(["download", TINY], url, hf_home))
    assert error.startswith(f"error: cannot reach {url} to download {TINY}")


def test_private_repo_needs_hf_token(hub, hf_home, tiny_files):
    hub.repos["test/private"] = Repo(
        {"config.json": b"{}", "model.safetensors": b"x"}, token="hf_ok"
    )
    error = one_line_error(run(["download", "test/private"], hub.url, hf_home))
    assert "HTTP 401" in error and "HF_TOKEN" in error

    result = run(["download", "test/private"], hub.url, hf_home, HF_TOKEN="hf_ok")
    assert result.returncode == 0, result.stderr
    assert (Path(result.stdout.strip()) / "model.safetensors").read_bytes() == b"x"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["test/gated"], "test/gated is gated: accept its conditions at {url}/test/gated"),
        (["test/missing"], "test/missing: no such model on {url}; check the repo id"),
        ([TINY, "--revision", "v9"], "test/tiny has no revision 'v9' (--revision)"),
    ],
)
def test_hub_refusals(hub, hf_home, args, expected):
    hub.repos["test/gated"] = Repo({"model.safetensors": b"x"}, gated=True)
    error = one_line_error(run(["download", *args], hub.url, hf_home))
    assert error.startswith("error: " + expected.format(url=hub.url))


def test_refuses_when_the_disk_lacks_room(hub, hf_home):
    huge = Repo({"config.json": b"{}", "model.safetensors": b"x"})
    huge.listed_sizes["model.safetensors"] = 10**18  # 1 EB: more than any test disk
    hub.repos["test/huge"] = huge
    result = run(["download", "test/huge"], hub.url, hf_home)
    error = one_line_error(result)
    assert "2 files, 1000000.0 TB" in result.stderr
    assert error.startswith("error: not enough disk space: the download needs 1000000.0 TB")
    assert not hub.gets("model.safetensors")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Qwen/Qwen3-0.6B", True),
        ("unsloth/Qwen3-8B-GGUF", True),
        ("gpt2", False),  # a bare name is taken for a path
        ("models/qwen.gguf", False),
        ("./Qwen3-0.6B", False),
        ("a/b/c", False),
        ("~/models", False),
    ],
)
def test_is_repo_id(text, expected):
    assert is_repo_id(text) is expected


def test_an_existing_path_wins_over_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen" / "Qwen3-0.6B").mkdir(parents=True)
    assert resolve_model_path("Qwen/Qwen3-0.6B") == Path("Qwen/Qwen3-0.6B")
    assert model_path("Qwen/Qwen3-0.6B") == Path("Qwen/Qwen3-0.6B")


def test_a_local_model_loads_without_the_hubs_libraries(tiny_model_dir):
    """-m with a path never imports huggingface_hub or its HTTP client (~0.3 s of every
    start); a repo id does (the tests above)."""
    code = (
        "import sys; from qwen3chat.loading import load_model; "
        f"load_model({str(tiny_model_dir[0])!r}, device='cpu', dtype='float32'); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'huggingface_hub', 'httpx2'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("Qwen3-0.6B-Q8_0.gguf", "Q8_0"),
        ("Qwen3-8B-Q4_K_M.gguf", "Q4_K_M"),
        ("Qwen3-30B-A3B-UD-Q4_K_XL-00001-of-00002.gguf", "Q4_K_XL"),
        ("qwen3-8b-iq4_xs.gguf", "IQ4_XS"),
        ("Qwen3-8B-BF16.gguf", "BF16"),
        ("model.gguf", None),
    ],
)
def test_gguf_quant(name, quant):
    assert gguf_quant(name) == quant
