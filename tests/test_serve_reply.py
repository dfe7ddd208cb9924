"""A request's reply from the engine's events: reasoning apart from content, tool calls out
of the answer (never out of the thinking), stop strings, and the streamed deltas joining to
the whole reply however the text is cut."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from qwen3chat.generation import FinishEvent, TextEvent
from qwen3chat.serve.reply import Reply, StopStrings

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def finish(reason="stop"):
    return FinishEvent(reason, [1, 2], 5, 0, "", "", 0)


def run(reply: Reply, events: list[TextEvent], reason="stop"):
    deltas = [d for e in events for d in reply.push(e)]
    last, why = reply.finish(finish(reason))
    return deltas + last, why


def test_thinking_goes_to_reasoning_content_and_the_answer_to_content():
    reply = Reply([], TOOLS)
    deltas, why = run(reply, [TextEvent("Let me think.", True), TextEvent("Hello!", False)])
    assert deltas == [{"reasoning_content": "Let me think."}, {"content": "Hello!"}]
    assert reply.message() == {
        "role": "assistant",
        "content": "Hello!",
        "reasoning_content": "Let me think.",
    }
    assert why == "stop"


def test_no_thinking_means_no_reasoning_content():
    reply = Reply([])
    run(reply, [TextEvent("Just the answer.", False)])
    assert reply.message() == {"role": "assistant", "content": "Just the answer."}


def test_a_tool_call_in_the_answer_is_a_call_and_finishes_with_tool_calls():
    reply = Reply([], TOOLS)
    deltas, why = run(reply, [TextEvent("Checking.\n\n" + CALL, False)])
    assert why == "tool_calls"
    message = reply.message()
    assert message["content"] == "Checking."
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    streamed = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert streamed == [{"index": 0, **call}]


def test_a_tool_call_written_while_thinking_is_not_a_call():
    reply = Reply([], TOOLS)
    _, why = run(reply, [TextEvent("maybe " + CALL, True), TextEvent("No call needed.", False)])
    assert why == "stop"
    assert "tool_calls" not in reply.message()
    assert CALL in reply.message()["reasoning_content"]


def test_without_tools_a_tool_call_stays_text():
    reply = Reply([])
    run(reply, [TextEvent(CALL, False)])
    assert reply.message()["content"] == CALL


def test_a_stop_string_cuts_the_answer_and_asks_to_stop():
    reply = Reply(["END"])
    deltas = reply.push(TextEvent("one two E", False))
    assert not reply.stopped
    deltas += reply.push(TextEvent("ND three", False))
    assert reply.stopped
    last, why = reply.finish(finish("cancelled"))
    assert "".join(d.get("content", "") for d in deltas + last) == "one two "
    assert why == "stop"


def test_a_raw_completion_keeps_everything_as_text():
    reply = Reply([], raw=True)
    deltas, _ = run(reply, [TextEvent(" thought", True), TextEvent(" and text", False)])
    assert "".join(d["content"] for d in deltas) == " thought and text"


@given(
    st.lists(st.sampled_from(["Hi ", "the ", "<", "tool", CALL, "\n", "ST", "OP", " end"])),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1),
)
def test_streamed_deltas_join_to_the_whole_reply(pieces, cuts):
    text = "".join(pieces)
    chunks, i = [], 0
    while i < len(text):
        size = cuts[len(chunks) % len(cuts)]
        chunks.append(text[i : i + size])
        i += size
    whole = Reply(["STOP"], TOOLS)
    run(whole, [TextEvent(text, False)])
    streamed = Reply(["STOP"], TOOLS)
    deltas, _ = run(streamed, [TextEvent(c, False) for c in chunks])
    content = "".join(d.get("content", "") for d in deltas)
    assert content == (whole.message()["content"] or "")
    names = [d["tool_calls"][0]["function"]["name"] for d in deltas if "tool_calls" in d]
    assert names == [c["function"]["name"] for c in whole.message().get("tool_calls", [])]


def test_stop_strings_hold_back_only_what_may_begin_one():
    stops = StopStrings(["<|end|>"])
    assert stops.push("abc") == ""  # could still be followed by a stop string's start
    assert stops.push("defghij") == "abcd"
    assert stops.flush() == "efghij"
