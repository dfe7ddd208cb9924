"""The server's parsing of Qwen3 output (thinking, answer, tool calls, stop strings), end to
end: real HTTP, the official `openai` client, the real engine, tokenizer and chat template.

Only the model is replaced: a *scripted model* whose greedy output is a chosen text. The
script is encoded with the real tokenizer, so the server sees the very ids Qwen3 writes
(``<think>``, ``</think>`` and ``<tool_call>`` are single tokens); it is played one token
per position after the prompt, then ``<|im_end|>`` ends the reply. A random tiny model (as
tests/test_serve.py uses) can never write a thinking block or a tool call, and these are
where OpenAI-compatible servers for Qwen3 have most of their reported bugs.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
import uvicorn

from qwen3chat.batch.engine import BatchEngine
from qwen3chat.kv_cache import PagedKVCache
from qwen3chat.model.qwen3 import TextLayout
from qwen3chat.presets import preset_config
from qwen3chat.serve.app import ServerSettings, create_app
from qwen3chat.serve.runner import Runner

openai = pytest.importorskip("openai")

MAX_SEQ_LEN = 512
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

THINK_THEN_ANSWER = "<think>\nLet me see.\n</think>\n\nParis."
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
XML_CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]


class ScriptedModel(torch.nn.Module):
    """Stands in for Qwen3Model in the batched engine: its greedy reply to any prompt is
    ``script``.

    The engine announces each request's prompt through ``prompt_layout`` (recorded in
    ``prompts``); a row at the prompt's i-th generated position says ``script[i]``, with all
    other logits far below, and ``<|im_end|>`` after it.
    """

    def __init__(self, tokenizer):
        super().__init__()
        self.config = preset_config("tiny")
        assert self.config.vocab_size >= tokenizer.vocab_size
        self.device = torch.device("cpu")
        self.end_id = tokenizer.token_id("<|im_end|>")
        self.script: list[int] = []
        self.prompts: list[list[int]] = []

    def kv_bytes_per_token(self, kv_dtype=None) -> int:
        return 8

    def new_paged_cache(self, num_blocks, block_size, max_seq_len, kv_dtype=None, state_slots=0):
        # Real block bookkeeping (prefix caching, freeing), one-number keys and values.
        return PagedKVCache(1, 1, 1, num_blocks, block_size, torch.float32)

    def prompt_layout(self, ids: list[int], visuals=()) -> TextLayout:
        self.prompts.append(list(ids))
        return TextLayout(ids)

    def forward_batch(self, tokens, batch):
        logits = torch.zeros(len(batch.logit_rows), self.config.vocab_size)
        for i, row in enumerate(batch.logit_rows.tolist()):
            generated = int(batch.positions[row]) + 1 - len(self.prompts[-1])
            assert generated >= 0, "a forward ended inside the prompt"
            token = self.script[generated] if generated < len(self.script) else self.end_id
            logits[i, token] = 100.0
        return logits


@pytest.fixture(scope="module")
def model(tokenizer):
    return ScriptedModel(tokenizer)


@pytest.fixture(scope="module")
def base_url(model, tokenizer):
    """One in-process server for the module (tests run one at a time; each sets the
    script it needs), on a free loopback port."""
    runner = Runner(BatchEngine(model, tokenizer, max_seq_len=MAX_SEQ_LEN))
    runner.start()
    app = create_app(runner, tokenizer, ServerSettings("scripted", MAX_SEQ_LEN))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    yield f"http://{host}:{port}"
    server.should_exit = True
    thread.join(timeout=30)
    runner.close()
    assert not thread.is_alive()


@pytest.fixture
def serve(model, tokenizer, base_url):
    """serve(script text) -> an OpenAI client of a server whose model replies the script."""

    def scripted(text: str) -> openai.OpenAI:
        model.script = tokenizer.encode(text)
        return openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)

    return scripted


def ask(client, **request):
    """The whole reply's choice."""
    request = {"model": "scripted", "messages": QUESTION, "temperature": 0, **request}
    return client.chat.completions.create(**request).choices[0]


def ask_streaming(client, **request) -> list:
    """The choices of every streamed chunk."""
    request = {"model": "scripted", "messages": QUESTION, "temperature": 0, **request}
    chunks = client.chat.completions.create(stream=True, **request)
    return [chunk.choices[0] for chunk in chunks if chunk.choices]


def joined(choices, field: str) -> str:
    return "".join(getattr(c.delta, field, None) or "" for c in choices)


def arguments(call) -> dict:
    return json.loads(call.function.arguments)


def test_thinking_goes_to_reasoning_content(serve):
    client = serve(THINK_THEN_ANSWER)
    choice = ask(client)
    assert choice.message.reasoning_content == "Let me see."
    assert choice.message.content == "Paris."
    assert choice.finish_reason == "stop"

    choices = ask_streaming(client)
    assert joined(choices, "reasoning_content") == "Let me see."
    assert joined(choices, "content") == "Paris."
    thinking = [i for i, c in enumerate(choices) if getattr(c.delta, "reasoning_content", None)]
    answer = [i for i, c in enumerate(choices) if c.delta.content]
    assert max(thinking) < min(answer)
    assert choices[-1].finish_reason == "stop"


def test_without_thinking_the_answer_is_content(serve, model, tokenizer):
    client = serve("Paris.")
    choice = ask(client, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert getattr(choice.message, "reasoning_content", None) is None
    assert choice.message.content == "Paris."
    # The kwarg reached the template: the prompt closed an empty thinking block.
    assert tokenizer.decode(model.prompts[-1]).endswith("<think>\n\n</think>\n\n")


def test_a_tool_call_after_thinking(serve):
    client = serve(f"<think>\nI need the weather.\n</think>\n\n{CALL}")
    choice = ask(client, tools=TOOLS)
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.reasoning_content == "I need the weather."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city": "Paris"}'

    choices = ask_streaming(client, tools=TOOLS)
    [delta] = [c.delta.tool_calls for c in choices if c.delta.tool_calls]
    [call] = delta
    assert call.index == 0 and call.id and call.type == "function"
    assert call.function.name == "get_weather"
    assert arguments(call) == {"city": "Paris"}
    assert joined(choices, "content") == ""
    assert choices[-1].finish_reason == "tool_calls"


def test_two_parallel_calls_and_the_text_before_them(serve):
    client = serve(f"Checking both.\n{CALL}\n{CALL.replace('Paris', 'Rome')}")
    choice = ask(client, tools=TOOLS)
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking both."
    calls = choice.message.tool_calls
    assert [arguments(c) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert len({c.id for c in calls}) == 2

    choices = ask_streaming(client, tools=TOOLS)
    streamed = [call for c in choices for call in c.delta.tool_calls or []]
    assert [c.index for c in streamed] == [0, 1]
    assert [arguments(c) for c in streamed] == [{"city": "Paris"}, {"city": "Rome"}]
    assert joined(choices, "content") == "Checking both."


def test_an_xml_tool_call(serve):
    choice = ask(serve(XML_CALL), tools=TOOLS)
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    # The schema types the values: city stays text, days becomes a number.
    assert arguments(call) == {"city": "Paris", "days": 3}


def test_a_tool_call_written_while_thinking_is_not_a_call(serve):
    client = serve(f"<think>\nMaybe {CALL}? No.\n</think>\n\nParis.")
    choice = ask(client, tools=TOOLS)
    assert choice.finish_reason == "stop"
    assert not choice.message.tool_calls
    assert choice.message.reasoning_content == f"Maybe {CALL}? No."
    assert choice.message.content == "Paris."

    choices = ask_streaming(client, tools=TOOLS)
    assert not any(c.delta.tool_calls for c in choices)
    assert joined(choices, "reasoning_content") == f"Maybe {CALL}? No."


def test_without_tools_a_tool_call_block_is_content(serve):
    choice = ask(serve(CALL))
    assert choice.finish_reason == "stop"
    assert not choice.message.tool_calls
    assert choice.message.content == CALL


WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def tool_round_trip(assistant: dict) -> list[dict]:
    """A question, the assistant's call (``assistant`` adds to it), and the tool's result."""
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL], **assistant},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
    ]


def test_a_tool_result_goes_back_through_the_chat_template(serve, model, tokenizer):
    client = serve("It is sunny in Paris.")
    choice = ask(client, messages=tool_round_trip({}), tools=TOOLS)
    assert choice.message.content == "It is sunny in Paris."
    prompt = tokenizer.decode(model.prompts[-1])
    assert f"<|im_start|>assistant\n{CALL}<|im_end|>" in prompt  # the call, as the model wrote it
    assert "<tool_response>\n22 C, sunny\n</tool_response>" in prompt


def test_the_reasoning_before_a_tool_call_goes_back_too(serve, model, tokenizer):
    # Mid tool loop, Qwen3's template shows the model its own thinking (as vLLM and
    # llama.cpp pass it); without it the prompt is not what the model wrote, and the
    # KV cache's prefix stops at that assistant turn.
    assistant = {"reasoning_content": "I need the weather."}
    ask(serve("It is sunny in Paris."), messages=tool_round_trip(assistant), tools=TOOLS)
    prompt = tokenizer.decode(model.prompts[-1])
    assert f"<think>\nI need the weather.\n</think>\n\n{CALL}" in prompt


@pytest.mark.parametrize(("stop", "content"), [("Par", None), ("is.", "Par")])
def test_a_stop_string_cuts_the_answer(serve, stop, content):
    client = serve(THINK_THEN_ANSWER)
    choice = ask(client, stop=[stop])
    assert choice.finish_reason == "stop"
    assert choice.message.content == content
    assert choice.message.reasoning_content == "Let me see."

    choices = ask_streaming(client, stop=[stop])
    assert joined(choices, "content") == (content or "")
    assert choices[-1].finish_reason == "stop"
