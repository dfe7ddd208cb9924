"""`qwen3chat serve`: the real server, started on loopback on a tiny model, talked to with
the official `openai` client and with raw HTTP (SSE framing, errors)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from qwen3chat.batch.engine import BLOCK_SIZE
from qwen3chat.engine import Engine
from qwen3chat.loading import load_model
from qwen3chat.sampling import SamplingSettings

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
START_TIMEOUT_S = 120


class Server:
    def __init__(self, model_dir, *flags: str, env: dict | None = None):
        command = [sys.executable, "-m", "qwen3chat", "serve", "-m", str(model_dir), "--port"]
        command += ["0", "--dtype", "float32", "--served-model-name", "m", *flags]
        self.process = subprocess.Popen(
            command,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        self.lines = []
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("listening on "):
                self.url = line.split()[-1]
                return
        self.stop()
        raise AssertionError(f"the server did not start: {''.join(self.lines)}")

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.process.stderr.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    running = Server(tiny_model_dir[0])
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    loaded = load_model(tiny_model_dir[0], device="cpu", dtype="float32")
    return Engine(loaded.model, loaded.tokenizer, max_seq_len=4096)


def greedy_text(engine, messages, max_tokens):
    ids = engine.tokenizer.encode_chat(messages)
    events = list(engine.generate(ids, max_tokens, SamplingSettings(temperature=0.0)))
    return events[-1]


def test_greedy_reply_is_the_engine_s_and_transformers(server, engine, tiny_model_dir):
    reply = server.client().chat.completions.create(
        model="m", messages=MESSAGES, temperature=0, max_tokens=12
    )
    expected = greedy_text(engine, MESSAGES, 12)
    prompt = engine.tokenizer.encode_chat(MESSAGES)
    with torch.no_grad():
        reference = (
            tiny_model_dir[1]
            .generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None
            )[0, len(prompt) :]
            .tolist()
        )
    assert reference[: len(expected.token_ids)] == expected.token_ids
    assert reply.choices[0].message.content == (expected.text.strip() or None)
    assert reply.choices[0].finish_reason == expected.reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.model == "m"


def test_a_stream_joins_to_the_whole_reply(server):
    client = server.client()
    whole = client.chat.completions.create(
        messages=MESSAGES, model="m", temperature=0, max_tokens=12
    )
    stream = client.chat.completions.create(
        messages=MESSAGES,
        model="m",
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (whole.choices[0].message.content or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_sse_framing(server):
    body = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event.removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_a_shared_prefix_is_reported_as_cached(server, engine):
    client = server.client()
    follow = [
        *MESSAGES,
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "More"},
    ]
    client.chat.completions.create(messages=MESSAGES, model="m", max_tokens=2)
    second = client.chat.completions.create(messages=follow, model="m", max_tokens=2)
    # The whole blocks of the system turn and the first question come from the cache.
    first_ids, follow_ids = (engine.tokenizer.encode_chat(m) for m in (MESSAGES, follow))
    shared = 0
    while first_ids[shared : shared + 1] == follow_ids[shared : shared + 1] != []:
        shared += 1
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert shared // BLOCK_SIZE * BLOCK_SIZE == cached > 0


def test_a_stop_string_ends_the_reply(server, engine):
    expected = greedy_text(engine, MESSAGES, 16).text.strip()
    stop = expected[len(expected) // 2 :][:3]
    assert stop, expected
    reply = server.client().chat.completions.create(
        messages=MESSAGES, model="m", temperature=0, max_tokens=16, stop=[stop]
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == expected[: expected.index(stop)].strip() or None


def test_raw_completion(server, engine):
    reply = server.client().completions.create(
        model="m", prompt="The capital of France is", max_tokens=5, temperature=0
    )
    ids = engine.tokenizer.encode("The capital of France is")
    finish = list(engine.generate(ids, 5, SamplingSettings(temperature=0.0)))[-1]
    assert reply.choices[0].text == finish.thinking + finish.text
    assert reply.usage.completion_tokens == len(finish.token_ids)


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client().models.list().data] == ["m"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(server.url + "/metrics").text
    names = ("requests_running", "requests_waiting", "generation_tokens_total")
    names += ("kv_cache_blocks_in_use", "kv_cache_blocks", "generation_tokens_per_second")
    for name in names:
        assert f"qwen3chat_{name} " in metrics
    assert "qwen3chat_time_to_first_token_seconds_count " in metrics


def post(server, body, headers=None, raw: bytes | None = None):
    url = server.url + "/v1/chat/completions"
    if raw is not None:
        return httpx.post(url, content=raw, headers={"content-type": "application/json"})
    return httpx.post(url, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(
    ("body", "status", "fragment", "code"),
    [
        (None, 400, "not valid JSON", None),
        ({"messages": MESSAGES, "temperature": "hot"}, 400, "temperature", None),
        ({"messages": []}, 400, "messages", None),
        ({"messages": MESSAGES, "n": 2}, 400, "n", None),
        ({"messages": MESSAGES, "model": "gpt-4"}, 404, "does not exist", "model_not_found"),
        (
            {"messages": MESSAGES, "max_tokens": 5000},
            400,
            "--max-seq-len",
            "context_length_exceeded",
        ),
        ({"messages": MESSAGES, "top_logprobs": 3}, 400, "needs logprobs", None),
        ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None),
        ({"messages": MESSAGES, "stop": ["x"] * 40}, 400, "stop", None),
    ],
)
def test_errors_are_openai_error_objects(server, body, status, fragment, code):
    response = post(server, body, raw=b"{bad" if body is None else None)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}


def test_a_long_prompt_is_context_length_exceeded(server):
    long = [{"role": "user", "content": "word " * 5000}]
    response = post(server, {"messages": long})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_a_huge_body_is_refused(server):
    response = post(server, None, raw=b"{" + b" " * (9 * 2**20) + b"}")
    assert response.status_code == 413


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    [value] = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(value)


def test_a_disconnected_stream_is_cancelled_and_frees_its_blocks(server):
    body = {"messages": MESSAGES, "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)
        for _ in range(4):
            assert next(lines).startswith("data: ")
        assert metric(server, "qwen3chat_kv_cache_blocks_in_use") > 0
    # Closed mid-stream: the server stops generating and frees the request's blocks.
    deadline = time.monotonic() + 30
    while metric(server, "qwen3chat_kv_cache_blocks_in_use") > 0:
        assert time.monotonic() < deadline, "the blocks were not freed"
        time.sleep(0.05)
    assert metric(server, "qwen3chat_requests_running") == 0
    reply = server.client().chat.completions.create(messages=MESSAGES, model="m", max_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_the_api_key_is_required_and_checked(tiny_model_dir):
    keyed = Server(tiny_model_dir[0], env={"QWEN3CHAT_API_KEY": "s3cret"})
    try:
        for key in ("wrong", "none"):
            with pytest.raises(openai.AuthenticationError):
                keyed.client(key).models.list()
        assert httpx.get(keyed.url + "/health").status_code == 200
        reply = keyed.client("s3cret").chat.completions.create(
            messages=MESSAGES, model="m", max_tokens=1
        )
        assert reply.usage.completion_tokens == 1
    finally:
        assert keyed.stop() == 0


def test_sigterm_ends_a_running_stream_and_exits_0(tiny_model_dir):
    running = Server(tiny_model_dir[0])
    body = {"messages": MESSAGES, "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", running.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        running.process.send_signal(signal.SIGTERM)
        rest = list(lines)
    assert "data: [DONE]" in rest
    assert running.stop() == 0


def test_an_idle_server_exits_on_a_sigterm_another_thread_receives(tiny_model_dir):
    """The kernel hands a process's signal to any of its threads: one that lands on the
    HTTP server's thread while the engine's loop waits for work still stops the server."""
    import ctypes

    running = Server(tiny_model_dir[0])
    pid = running.process.pid
    others = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "tgkill"):
        running.stop()
        pytest.skip("this C library has no tgkill (glibc 2.30 or later has)")
    try:
        assert libc.tgkill(pid, others[0], signal.SIGTERM) == 0
        assert running.process.wait(timeout=30) == 0
    finally:
        running.process.kill()
        running.stop()


def test_json_schema_output_parses_and_validates(server):
    from test_grammar import SCHEMA, follows_schema

    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    for seed in (0, 1):
        reply = server.client().chat.completions.create(
            messages=MESSAGES,
            model="m",
            temperature=1.0,
            seed=seed,
            max_tokens=64,
            response_format=response_format,
        )
        assert reply.choices[0].finish_reason == "stop"
        assert follows_schema(json.loads(reply.choices[0].message.content))
        assert getattr(reply.choices[0].message, "reasoning_content", None) is None


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}},
    ],
)
def test_a_bad_response_format_is_a_400(server, response_format):
    response = post(server, {"messages": MESSAGES, "response_format": response_format})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format"


def test_concurrent_greedy_requests_each_get_their_own_reply(server, engine):
    """16 clients at once, each with its own prompt: every reply is that prompt's greedy
    reply alone, however the server interleaves them."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(16)]

    def ask(messages):
        reply = server.client().chat.completions.create(
            messages=messages, model="m", temperature=0, max_tokens=6
        )
        return reply.choices[0].message.content, reply.usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, prompts))
    for messages, (content, tokens) in zip(prompts, replies, strict=True):
        expected = greedy_text(engine, messages, 6)
        assert content == (expected.text or None)
        assert tokens == len(expected.token_ids)


def test_drafting_server_replies_as_the_engine_does(tiny_model_dir, engine):
    """--draft ngram: greedy replies to prompts that repeat themselves (so that guesses are
    made) are still the engine's, streamed or not."""
    running = Server(tiny_model_dir[0], "--draft", "ngram", "--draft-max", "4")
    try:
        client = running.client()
        for i in range(3):
            messages = [{"role": "user", "content": f"say {i} one two three one two three one"}]
            expected = greedy_text(engine, messages, 10)
            reply = client.chat.completions.create(
                model="m", messages=messages, temperature=0, max_tokens=10
            )
            assert reply.choices[0].message.content == (expected.text.strip() or None)
            assert reply.usage.completion_tokens == len(expected.token_ids)
            stream = client.chat.completions.create(
                model="m", messages=messages, temperature=0, max_tokens=10, stream=True
            )
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
            assert text.strip() == expected.text.strip()
    finally:
        assert running.stop() == 0


def test_load_of_64_streaming_clients(server):
    """64 streaming clients with random lengths, for a bounded time: every request ends with
    [DONE], once, with its own id in every chunk and the token count it asked for."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(0)
    lengths = [rng.randint(1, 12) for _ in range(64)]
    deadline = time.monotonic() + 240

    def stream(index):
        body = {
            "messages": [{"role": "user", "content": f"Client {index} says hi"}],
            "max_tokens": lengths[index],
            "temperature": 0.7,
            "seed": index,
            "stream": True,
            "stream_options": {"include_usage": True},
            "stop": [],
        }
        url = server.url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=240) as r:
            events = [line for line in r.iter_lines() if line]
        assert time.monotonic() < deadline
        return events

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(stream, range(64)))
    seen_ids = set()
    for index, events in enumerate(results):
        assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        ids = {c["id"] for c in chunks}
        assert len(ids) == 1 and not ids & seen_ids  # its own id, never another's
        seen_ids |= ids
        usage = chunks[-1]["usage"]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
        assert usage["completion_tokens"] == lengths[index] or finish == "stop", index
    assert "qwen3chat_requests_running 0\n" in httpx.get(server.url + "/metrics").text


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize(
    ("tool_choice", "names"),
    [
        ("required", {"get_weather", "get_time"}),
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ],
)
def test_tool_choice_required_or_named_forces_calls(server, tool_choice, names):
    """The random model would never write a call: held to the calls' grammar it must, with
    arguments that follow the function's schema."""
    for seed in (0, 1):
        reply = server.client().chat.completions.create(
            messages=MESSAGES,
            model="m",
            tools=[WEATHER, TIME],
            tool_choice=tool_choice,
            temperature=1.0,
            seed=seed,
            max_tokens=120,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        for call in choice.message.tool_calls:
            assert call.function.name in names
            arguments = json.loads(call.function.arguments)
            key, allowed = ("city", {"Paris", "Rome"})
            if call.function.name == "get_time":
                key, allowed = ("zone", {"UTC", "CET"})
            assert set(arguments) == {key} and arguments[key] in allowed


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"tool_choice": "required"}, "no tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "not among",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "exclude",
        ),
    ],
)
def test_bad_tool_choices_are_400s(server, extra, fragment):
    response = post(server, {"messages": MESSAGES, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"] == "tool_choice"


def test_a_huge_chunked_body_is_refused_too(server):
    # No Content-Length: the limit holds on what arrives.
    def body():
        yield b'{"messages": ['
        for _ in range(10):
            yield b" " * 2**20

    response = httpx.post(server.url + "/v1/chat/completions", content=body(), timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["message"].startswith("the request body is over")


def test_logprobs_are_the_model_s(server, engine):
    """Greedy with logprobs: each token's is the model's log-softmax at its position (the
    top alternative, since greedy picks it); a stream carries the same entries."""
    body = {"messages": MESSAGES, "model": "m", "temperature": 0, "max_tokens": 5}
    reply = server.client().chat.completions.create(**body, logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 5
    prompt = engine.tokenizer.encode_chat(MESSAGES)
    generated = [engine.tokenizer.encode(e.token) for e in entries]
    assert all(len(ids) == 1 for ids in generated)
    ids = prompt + [i for [i] in generated]
    expected = torch.log_softmax(engine.score(ids)[len(prompt) - 1 : -1], dim=-1)
    for position, entry in enumerate(entries):
        assert entry.top_logprobs[0].token == entry.token
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        top = expected[position].topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            top.values.tolist(), abs=1e-4
        )
    chunks = server.client().chat.completions.create(
        **body, logprobs=True, top_logprobs=3, stream=True
    )
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-4)
    raw = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": "Hello", "max_tokens": 3, "temperature": 0, "logprobs": 2},
        timeout=60,
    ).json()
    logprobs = raw["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 3
    assert "".join(logprobs["tokens"]) == raw["choices"][0]["text"]
    assert logprobs["text_offset"] == [
        0,
        *itertools.accumulate(len(t) for t in logprobs["tokens"][:-1]),
    ]
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])


def test_pictures_on_a_vision_model(tmp_path, tokenizer_dir):
    """A Qwen3-VL model's server reads data-URL images: the greedy reply is the engine's
    for the same picture; remote URLs, broken data and pictures sent to a text model are
    400s naming the field."""
    import base64

    from test_vl_parity import build_vl_reference, picture, save_vl_dir

    from qwen3chat.vision.preprocess import VisionPreprocessing
    from qwen3chat.vision.prompt import VisionChat, user_message

    model_dir = save_vl_dir(build_vl_reference(), tmp_path / "vl", tokenizer_dir)
    image = picture(tmp_path / "a.png", 96, 64, 1)
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "Describe."},
    ]
    loaded = load_model(model_dir, device="cpu", dtype="float32")
    chat = VisionChat(VisionPreprocessing.from_model_dir(model_dir))
    ids, visuals = chat.encode_chat(
        loaded.tokenizer, [user_message("Describe.", [chat.image(image)])]
    )
    engine = Engine(loaded.model, loaded.tokenizer, 4096)
    expected = list(engine.generate(ids, 8, SamplingSettings(temperature=0.0), visuals=visuals))[-1]
    server = Server(model_dir)
    try:
        reply = server.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=8
        )
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.choices[0].message.content == (expected.text.strip() or None)
        assert reply.usage.completion_tokens == len(expected.token_ids)
        for bad, fragment in [
            ("https://example.com/a.png", "data: URLs"),
            ("data:image/png;base64,%%%", "not a base64 data URL"),
            ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not an image"),
        ]:
            body = {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": bad}}]}
                ]
            }
            response = post(server, body)
            assert response.status_code == 400
            error = response.json()["error"]
            assert fragment in error["message"] and "messages[0].content[0]" in error["message"]
    finally:
        assert server.stop() == 0
