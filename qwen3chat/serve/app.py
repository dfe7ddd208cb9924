"""The ASGI app: OpenAI routes over the runner, API-key check, body limit, SSE, metrics."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import secrets
import signal
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import QwenChatError
from ..generation import FinishEvent, TextEvent, TokenLogprob
from ..grammar import GrammarConstraint, json_grammar, tool_call_grammar
from ..sampling import SamplingSettings
from ..tokenizer import Tokenizer
from ..vision.prompt import VisionChat
from .logprobs import LogprobsFormat
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    new_id,
    now,
    usage,
)
from .reply import Reply
from .runner import RATE_WINDOW_S, Job, Runner

# A request body larger than this is refused (413) before it is parsed.
MAX_BODY_BYTES = 8 * 2**20


@dataclass
class ServerSettings:
    model_name: str
    max_seq_len: int
    think: bool = True
    api_key: str | None = None
    # generation_config.json's sampling values: a request's own fields replace them.
    sampling_defaults: dict = field(default_factory=dict)
    max_body_bytes: int = MAX_BODY_BYTES


def create_app(
    runner: Runner, tokenizer: Tokenizer, settings: ServerSettings, vision: VisionChat | None = None
) -> FastAPI:
    """The app; ``vision`` (a vision model's picture handling) lets messages hold images."""
    app = FastAPI(title="qwen3chat", docs_url=None, redoc_url=None, openapi_url=None)
    created = now()

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON").response()
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg")
        return APIError(400, message or "invalid request", where or None).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        message = f"internal error: {type(e).__name__}: {e}"
        return APIError(500, message, kind="server_error").response()

    app.add_middleware(_KeyGuard, api_key=settings.api_key)
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        model = {"id": settings.model_name, "object": "model", "created": created}
        return {"object": "list", "data": [{**model, "owned_by": "qwen3chat"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(runner), media_type="text/plain; version=0.0.4")

    def _encode(body: ChatCompletionRequest, think: bool, tools) -> tuple[list[int], list]:
        """The prompt's ids and its pictures (with a vision model)."""
        messages = [
            m.for_template(None if vision is None else _pictures(vision, f"messages[{i}]"))
            for i, m in enumerate(body.messages)
        ]
        if vision is None:
            return tokenizer.encode_chat(messages, think, True, tools), []
        return vision.encode_chat(tokenizer, messages, think, True, tools)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(body.model, settings)
        kwargs = body.chat_template_kwargs or {}
        tools = body.tools if body.tools and body.tool_choice != "none" else None
        grammar = _grammar(body, tools)
        # A structured reply is the value (or the calls) alone: the grammar holds from the
        # first token, so the model answers without thinking first.
        think = grammar is None and bool(kwargs.get("enable_thinking", settings.think))
        if vision is None:
            ids, visuals = _encode(body, think, tools)
        else:  # decoding and resizing pictures is work the event loop must not wait on
            ids, visuals = await asyncio.to_thread(_encode, body, think, tools)
        reply = Reply(body.stop_strings(), tools)
        job = _job(ids, body, body.max_completion_tokens or body.max_tokens, settings)
        job.visuals = visuals
        if grammar is not None:
            try:
                job.constraint = GrammarConstraint(tokenizer, runner.engine.vocab_size, grammar)
            except QwenChatError as e:
                forced = body.tool_choice not in (None, "auto", "none")
                field = "tool_choice" if forced else "response_format"
                raise APIError(400, f"{field}: {e}", field) from None
        return await _respond(runner, job, reply, body, settings, "chat.completion", tokenizer)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, settings)
        if isinstance(body.prompt, str):
            ids = tokenizer.encode(body.prompt)
        else:
            ids = list(body.prompt)
            if not all(0 <= i < tokenizer.vocab_size for i in ids):
                raise APIError(400, "prompt: token ids outside the vocabulary", "prompt")
        reply = Reply(body.stop_strings(), raw=True)
        job = _job(ids, body, body.max_tokens, settings)
        return await _respond(runner, job, reply, body, settings, "text_completion", tokenizer)

    return app


class _KeyGuard:
    """A 401 for /v1/ and /metrics without the key. Plain ASGI: Starlette's
    BaseHTTPMiddleware passed every streamed chunk through a queue and another task, a
    third of the HTTP thread's time with 16 streams."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1/") or path == "/metrics"):
            try:
                _check_key(Request(scope), self.api_key)
            except APIError as e:
                return await e.response()(scope, receive, send)
        await self.app(scope, receive, send)


class _BodyLimit:
    """Refuses a body over ``limit`` bytes with a 413: at once when its Content-Length says
    so, else (a chunked upload) as soon as that much has arrived, so no request can make
    the server hold more. (The app reads whole bodies anyway, so reading it here first
    costs nothing.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is over {self.limit} bytes").response()
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await too_large(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            # The body as it came, then the live channel (a disconnect, for streams).
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    # Compared in constant time, so the time taken does not reveal how much matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
        raise APIError(
            401, "missing or wrong API key (Authorization: Bearer KEY)", None, "invalid_api_key"
        )


def _check_model(model: str | None, settings: ServerSettings) -> None:
    if model and model != settings.model_name:
        raise APIError(
            404,
            f"model {model!r} does not exist; this server serves {settings.model_name!r}",
            "model",
            "model_not_found",
        )


def _pictures(vision: VisionChat, where: str):
    """Reads a message's data-URL images as pictures; a bad one is a 400 naming it."""

    def picture(url: str, field: str):
        name = f"{where}.{field}"
        if not url.startswith("data:"):
            # Fetching a URL a request names would let any client make the server reach out.
            raise APIError(400, f"{name}: images must be data: URLs (base64)", "messages")
        header, _, data = url.partition(",")
        try:
            if not header.endswith(";base64"):
                raise ValueError
            raw = base64.b64decode(data, validate=True)
        except (ValueError, binascii.Error):
            raise APIError(400, f"{name}: not a base64 data URL", "messages") from None
        try:
            return vision.image(raw, name)
        except QwenChatError as e:
            raise APIError(400, str(e), "messages") from None

    return picture


def _grammar(body: ChatCompletionRequest, tools: list[dict] | None) -> str | None:
    """The grammar the request holds its reply to, if any: tool calls for tool_choice
    required or a named function, else what response_format asks for."""
    choice = body.tool_choice
    if choice in (None, "auto", "none"):
        return _response_grammar(body.response_format)
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if choice != "required" and not isinstance(named, str):
        raise APIError(
            400,
            'tool_choice: "auto", "none", "required" or {"type": "function", "function": '
            '{"name": ...}}',
            "tool_choice",
        )
    if not tools:
        raise APIError(400, "tool_choice: the request has no tools to call", "tool_choice")
    if (body.response_format or {}).get("type", "text") != "text":
        raise APIError(
            400, "tool_choice and a JSON response_format exclude each other", "tool_choice"
        )
    try:
        return tool_call_grammar(tools, named)
    except QwenChatError as e:
        raise APIError(400, f"tool_choice: {e}", "tool_choice") from None


def _response_grammar(response_format: dict | None) -> str | None:
    """The grammar ``response_format`` asks for: None for text, any JSON object for
    json_object, the schema's values for json_schema."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(None)
    spec = response_format.get("json_schema") if kind == "json_schema" else None
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise APIError(
            400,
            "response_format: type must be text, json_object or json_schema (with "
            "json_schema.schema an object)",
            "response_format",
        )
    try:
        return json_grammar(spec["schema"])
    except QwenChatError as e:
        raise APIError(400, f"response_format: {e}", "response_format") from None


def _job(ids: list[int], body, max_tokens: int | None, settings: ServerSettings) -> Job:
    room = settings.max_seq_len - len(ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = len(ids) + (max_tokens or 1)
        raise APIError(
            400,
            f"this request needs {asked} tokens of context ({len(ids)} in the prompt) but the "
            f"server's --max-seq-len is {settings.max_seq_len}",
            "messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            "context_length_exceeded",
        )
    seed = body.seed if body.seed is not None else secrets.randbits(31)
    given = {**settings.sampling_defaults, **body.sampling_fields(), "seed": seed}
    sampling = SamplingSettings(**given)
    loop = asyncio.get_running_loop()
    return Job(ids, max_tokens or room, sampling, loop, top_logprobs=body.alternatives())


async def _events(
    job: Job, reply: Reply
) -> AsyncIterator[tuple[list[dict], list[TokenLogprob], str | None, FinishEvent | None]]:
    """(deltas, the logprobs of the tokens they complete, finish reason, finish event) as
    the engine's events arrive."""
    unsent: list[TokenLogprob] = []  # tokens whose text is held back (stop strings)
    while True:
        event = await job.events.get()
        if isinstance(event, Exception):
            raise event
        if isinstance(event, TextEvent):
            unsent += event.logprobs
            deltas = reply.push(event)
            if reply.stopped:
                job.cancelled.set()
            if deltas:
                yield deltas, unsent, None, None
                unsent = []
        elif isinstance(event, FinishEvent):
            deltas, reason = reply.finish(event)
            yield deltas, unsent, reason, event
            return


async def _collect(job: Job, reply: Reply) -> tuple[str, FinishEvent]:
    """The finish reason and event of a reply taken whole (its deltas build ``reply``)."""
    async for _deltas, _logprobs, reason, finish in _events(job, reply):
        if finish is not None:
            return reason, finish
    raise RuntimeError("the engine ended a request without finishing it")


async def _respond(
    runner: Runner, job: Job, reply: Reply, body, settings, kind: str, tokenizer: Tokenizer
):
    runner.submit(job)
    logprobs = None
    if job.top_logprobs is not None:
        logprobs = LogprobsFormat(tokenizer, chat=kind == "chat.completion")
    rid = new_id("chatcmpl" if kind == "chat.completion" else "cmpl")
    created = now()
    base = {"id": rid, "created": created, "model": settings.model_name}
    if not body.stream:
        try:
            reason, finish = await _collect(job, reply)
        finally:
            job.cancelled.set()  # a client that went away stops its request
        use = usage(finish.prompt_tokens, len(finish.token_ids), finish.cached_tokens)
        if kind == "chat.completion":
            choice = {"index": 0, "message": reply.message(), "finish_reason": reason}
        else:
            choice = {"index": 0, "text": reply.content, "finish_reason": reason}
        if logprobs is not None:
            choice["logprobs"] = logprobs(finish.logprobs)
        return JSONResponse({**base, "object": kind, "choices": [choice], "usage": use})
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _sse(job, reply, base, kind, include_usage, logprobs),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _sse(
    job: Job,
    reply: Reply,
    base: dict,
    kind: str,
    include_usage: bool,
    logprobs: LogprobsFormat | None,
):
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**base, 'object': obj, 'choices': choices, **extra})}\n\n"

    def choice(delta: dict, reason: str | None = None, tokens=None) -> dict:
        if chat:
            out = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            out = {"index": 0, "text": delta.get("content", ""), "finish_reason": reason}
        if logprobs is not None and tokens is not None:
            out["logprobs"] = logprobs(tokens)
        return out

    try:
        if chat:
            yield chunk([choice({"role": "assistant", "content": ""})])
        async for deltas, tokens, reason, finish in _events(job, reply):
            # The tokens' logprobs go with the first chunk of the text they complete.
            for i, delta in enumerate(deltas):
                yield chunk([choice(delta, tokens=tokens if i == 0 else None)])
            if finish is not None:
                yield chunk([choice({}, reason, tokens=None if deltas else tokens)])
                if include_usage:
                    use = usage(finish.prompt_tokens, len(finish.token_ids), finish.cached_tokens)
                    yield chunk([], usage=use)
        yield "data: [DONE]\n\n"
    except Exception as e:  # the stream has begun: the error goes as an event
        error = {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error"}
        yield f"data: {json.dumps({'error': {**error, 'param': None, 'code': None}})}\n\n"
    finally:
        job.cancelled.set()  # also when the client went away mid-stream


def _prometheus(runner: Runner) -> str:
    s = runner.snapshot()
    blocks = runner.engine.blocks
    rows = [
        ("requests_running", "gauge", "requests being generated", s.running),
        ("requests_waiting", "gauge", "requests waiting for the engine", s.waiting),
        ("requests_total", "counter", "requests finished", s.requests),
        ("prompt_tokens_total", "counter", "prompt tokens", s.prompt_tokens),
        (
            "prompt_tokens_cached_total",
            "counter",
            "prompt tokens reused from the cache",
            s.cached_tokens,
        ),
        ("generation_tokens_total", "counter", "tokens generated", s.generated_tokens),
        ("kv_cache_blocks_in_use", "gauge", "KV cache blocks held by requests", s.blocks_in_use),
        ("kv_cache_blocks", "gauge", "KV cache blocks in all", blocks.num_blocks),
        ("kv_cache_block_size", "gauge", "tokens per KV cache block", blocks.block_size),
        (
            "generation_tokens_per_second",
            "gauge",
            f"tokens generated per second over the last {RATE_WINDOW_S:g} s",
            s.tokens_per_second,
        ),
    ]
    lines = []
    for name, kind, about, value in rows:
        lines += [
            f"# HELP qwen3chat_{name} {about}",
            f"# TYPE qwen3chat_{name} {kind}",
            f"qwen3chat_{name} {value}",
        ]
    lines += [
        "# HELP qwen3chat_time_to_first_token_seconds time to first token",
        "# TYPE qwen3chat_time_to_first_token_seconds summary",
        f"qwen3chat_time_to_first_token_seconds_sum {s.ttft_s_sum}",
        f"qwen3chat_time_to_first_token_seconds_count {s.ttft_count}",
    ]
    return "\n".join(lines) + "\n"


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once the socket is bound (the port may
    have been 0: any free one)."""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"listening on http://{host}:{port}", file=sys.stderr, flush=True)


def run_server(app: FastAPI, runner: Runner, host: str, port: int) -> None:
    """Serve until Ctrl-C or SIGTERM: then stop accepting, cancel what runs (each client
    gets its reply so far), and return (exit status 0). The engine's loop runs on this
    thread (see runner.py), the HTTP server on another."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10
    )
    server = _Server(config)

    def http() -> None:
        try:
            server.run()
        except SystemExit:  # uvicorn's way out when it cannot listen (it said why)
            pass
        finally:
            runner.close()  # the server has stopped: so does the engine's loop

    def on_signal(sig: int, frame) -> None:
        # Running replies are cancelled, so their streams end now, not after max_tokens;
        # a second Ctrl-C stops without waiting for them.
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True
        runner.cancel_all()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="qwen3chat-http", daemon=True)
    thread.start()
    try:
        runner.run()
    finally:
        server.should_exit = True
        thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise QwenChatError(f"--host {host} --port {port}: cannot listen there (see above)")
