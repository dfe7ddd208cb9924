"""Tool calls taken out of a Qwen answer: both forms, what stays content, and streaming that
agrees with the whole text however it is cut."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3chat.serve.tool_calls import ToolCall, ToolCallStream, parse_tool_calls


def hermes(name: str, arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def xml(name: str, **parameters: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in parameters.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def pairs(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {
                    "zip": {"type": "string"},
                    "count": {"type": "integer"},
                    "note": {"type": ["string", "null"]},
                },
            },
        },
    }
]


# --- the whole text ---------------------------------------------------------------------


def test_plain_text_is_content():
    assert parse_tool_calls("  Hello, world.\n") == ("Hello, world.", [])
    assert parse_tool_calls("") == (None, [])
    assert parse_tool_calls(" \n ") == (None, [])


def test_hermes_call():
    content, calls = parse_tool_calls(hermes("get_weather", {"city": "Paris"}))
    assert content is None
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert calls[0].arguments == '{"city": "Paris"}'


def test_hermes_arguments_as_json_string():
    text = '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content is None
    assert pairs(calls) == [("f", {"a": [1, 2]})]


def test_hermes_without_arguments_and_non_ascii():
    text = (
        '<tool_call>{"name": "now"}</tool_call>'
        '<tool_call>{"name": "say", "arguments": {"t": "café ☃"}}</tool_call>'
    )
    content, calls = parse_tool_calls(text)
    assert content is None
    assert pairs(calls) == [("now", {}), ("say", {"t": "café ☃"})]
    assert calls[1].arguments == '{"t": "café ☃"}'  # ensure_ascii=False


def test_several_calls_with_text_around():
    text = (
        "Let me check both.\n\n"
        + hermes("get_weather", {"city": "Paris"})
        + "\n"
        + hermes("get_weather", {"city": "Oslo"})
        + "\nDone."
    )
    content, calls = parse_tool_calls(text)
    assert content == "Let me check both.\n\n\n\nDone."
    assert pairs(calls) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]


def test_xml_call_values_converted_from_json():
    text = xml(
        "f",
        city="Paris",
        days="3",
        ratio="0.5",
        flag="true",
        nothing="null",
        obj='{"a": 1}',
        arr="[1, 2]",
        quoted='"hi"',
        nan="NaN",
    )
    content, calls = parse_tool_calls(text)
    assert content is None
    assert pairs(calls) == [
        (
            "f",
            {
                "city": "Paris",
                "days": 3,
                "ratio": 0.5,
                "flag": True,
                "nothing": None,
                "obj": {"a": 1},
                "arr": [1, 2],
                "quoted": '"hi"',  # values are raw text: a JSON string literal stays as written
                "nan": "NaN",  # not JSON: json.dumps would write an unreadable NaN
            },
        )
    ]


def test_xml_only_one_newline_each_side_is_layout():
    text = xml("write", code="\n  x = 1\n")
    _, calls = parse_tool_calls(text)
    assert pairs(calls) == [("write", {"code": "\n  x = 1\n"})]
    # Values on the tag's line, with no newlines at all, are read as well.
    _, calls = parse_tool_calls(
        "<tool_call><function=f><parameter=a>7</parameter></function></tool_call>"
    )
    assert pairs(calls) == [("f", {"a": 7})]


def test_xml_function_without_parameters():
    _, calls = parse_tool_calls("<tool_call>\n<function=now>\n</function>\n</tool_call>")
    assert pairs(calls) == [("now", {})]


def test_xml_schema_string_stays_string():
    text = xml("lookup", zip="02139", count="5", note="null")
    _, calls = parse_tool_calls(text, WEATHER_TOOLS)
    assert pairs(calls) == [("lookup", {"zip": "02139", "count": 5, "note": "null"})]
    # Without the schema the same text reads as JSON where it can (02139 cannot: leading 0).
    _, calls = parse_tool_calls(xml("lookup", zip="12345", note="null"))
    assert pairs(calls) == [("lookup", {"zip": 12345, "note": None})]
    # The schema of another function does not apply.
    _, calls = parse_tool_calls(xml("other", zip="12345"), WEATHER_TOOLS)
    assert pairs(calls) == [("other", {"zip": 12345})]


def test_bare_function_schema_is_read_too():
    tools = [{"name": "lookup", "parameters": {"properties": {"zip": {"type": "string"}}}}]
    _, calls = parse_tool_calls(xml("lookup", zip="12345"), tools)
    assert pairs(calls) == [("lookup", {"zip": "12345"})]


def test_both_forms_in_one_answer():
    text = hermes("a", {"x": 1}) + "\n" + xml("b", y="2")
    content, calls = parse_tool_calls(text)
    assert content is None
    assert pairs(calls) == [("a", {"x": 1}), ("b", {"y": 2})]


MALFORMED = [
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',  # bad JSON
    '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',  # empty name
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',  # arguments not an object
    '<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>',  # string, not JSON
    '<tool_call>\n["f", {}]\n</tool_call>',  # unknown form
    "<tool_call>\nget_weather(city='Paris')\n</tool_call>",  # unknown form
    "<tool_call></tool_call>",  # empty
    "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</tool_call>",  # no </function>
    "<tool_call>\n<function=f>\n<parameter=a>\n1\n</function>\n</tool_call>",  # no </parameter>
    "<tool_call>\n<function=>\n</function>\n</tool_call>",  # no name
    "<tool_call>\n<function=f>\nhello\n</function>\n</tool_call>",  # text among parameters
]


def test_malformed_blocks_stay_content():
    for block in MALFORMED:
        text = "Before.\n" + block + "\nAfter."
        assert parse_tool_calls(text) == (text, []), block
        # A malformed block does not hide a good one after it.
        content, calls = parse_tool_calls(block + hermes("g", {}))
        assert content == block
        assert pairs(calls) == [("g", {})]


def test_unclosed_block_stays_content():
    text = 'Calling.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n'
    assert parse_tool_calls(text) == (text.strip(), [])
    text = "A partial tag at the end: <tool_ca"
    assert parse_tool_calls(text) == (text, [])


def test_stray_closing_tag_is_content():
    text = "x </tool_call> y"
    assert parse_tool_calls(text) == (text, [])


def test_tag_inside_a_block_argument():
    # The first <tool_call> from which the block parses opens the call: an argument may
    # mention the tag.
    text = hermes("explain", {"text": "write <tool_call> then JSON"})
    content, calls = parse_tool_calls(text)
    assert content is None
    assert pairs(calls) == [("explain", {"text": "write <tool_call> then JSON"})]


def test_tag_in_a_code_span():
    # Markdown is not tracked. A tag only mentioned in prose or a code span never makes a
    # call: its block is not closed, or what it encloses does not parse.
    for text in [
        "Models write `<tool_call>` before each call.",
        "Wrap it in `<tool_call>` and `</tool_call>` tags.",
    ]:
        assert parse_tool_calls(text) == (text, [])
    # ... nor does it swallow a real call that follows it.
    mention = "Models write `<tool_call>` before each call. Here is mine:"
    content, calls = parse_tool_calls(mention + "\n" + hermes("f", {"a": 1}))
    assert content == mention
    assert pairs(calls) == [("f", {"a": 1})]
    # A whole well-formed block is a call wherever it stands, in a code span or fence too
    # (as vLLM and llama.cpp read it): the fence stays content around it.
    content, calls = parse_tool_calls("```\n" + hermes("f", {"a": 1}) + "\n```")
    assert content == "```\n\n```"
    assert pairs(calls) == [("f", {"a": 1})]


def test_ids_unique_and_prefixed():
    text = "".join(hermes("f", {"i": i}) for i in range(50))
    _, calls = parse_tool_calls(text)
    assert len(calls) == 50
    assert len({c.id for c in calls}) == 50
    for call in calls:
        assert call.id.startswith("call_")
        assert len(call.id) == len("call_") + 24
        assert call.id[5:].isalnum()
    assert ToolCall("f", "{}").id != ToolCall("f", "{}").id


# --- streaming --------------------------------------------------------------------------


def run_stream(pieces: list[str], tools: list[dict] | None = None):
    stream = ToolCallStream(tools)
    deltas, calls = [], []
    for piece in pieces:
        delta, new = stream.push(piece)
        deltas.append(delta)
        calls += new
    delta, new = stream.flush()
    deltas.append(delta)
    calls += new
    assert pairs(stream.calls) == pairs(calls)
    return deltas, calls


def test_stream_sends_plain_text_at_once():
    stream = ToolCallStream()
    assert stream.push("Hello") == ("Hello", [])
    assert stream.push(" world") == (" world", [])
    # Only a tail that may begin <tool_call> is held, and only while it may.
    assert stream.push(", a<") == (", a", [])
    assert stream.push("b and <tool") == ("<b and", [])  # the space before a tag is held too
    assert stream.push("box>") == (" <toolbox>", [])
    assert stream.flush() == ("", [])


def test_stream_holds_an_open_block_and_the_space_before_it():
    stream = ToolCallStream()
    assert stream.push("Checking.\n\n<tool_call>\n") == ("Checking.", [])
    assert stream.push('{"name": "f", "arguments": {}}\n</tool') == ("", [])
    delta, calls = stream.push("_call>")
    assert delta == ""  # the newlines before a final call are never sent
    assert pairs(calls) == [("f", {})]
    assert stream.push("\n") == ("", [])
    assert stream.flush() == ("", [])
    assert pairs(stream.calls) == [("f", {})]


def test_stream_unclosed_block_goes_out_at_flush():
    stream = ToolCallStream()
    assert stream.push("Hi <tool_call>\n{") == ("Hi", [])
    assert stream.flush() == (" <tool_call>\n{", [])


def test_stream_character_by_character():
    text = "Sure.\n" + xml("lookup", zip="02139") + "\nand " + MALFORMED[0] + " end"
    deltas, calls = run_stream(list(text), WEATHER_TOOLS)
    content, whole = parse_tool_calls(text, WEATHER_TOOLS)
    assert "".join(deltas) == content
    assert pairs(calls) == pairs(whole) == [("lookup", {"zip": "02139"})]


# Fragments whose contributions to the answer are known, and which make no tag when put
# next to each other (there is no ">" or "tool_call>" fragment to complete a "<tool_call").
PLAIN = [
    "Hello",
    " world",
    "x < y",
    "a<b",
    "é ☃",
    " ",
    "\n",
    "\n\n",
    "<",
    "<tool",
    "<tool_c",
    "<tool_call",
    "</tool_call>",
    "`",
    "{",
]
GOOD = [
    (hermes("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Paris"})),
    (
        hermes("f", {"s": "<tool_call> é", "n": [1, {"b": None}]}),
        ("f", {"s": "<tool_call> é", "n": [1, {"b": None}]}),
    ),
    ('<tool_call>{"name": "g", "arguments": "{\\"k\\": 2}"}</tool_call>', ("g", {"k": 2})),
    (xml("lookup", zip="02139", count="4"), ("lookup", {"zip": "02139", "count": 4})),
    (xml("h", text="two\nlines", flag="false"), ("h", {"text": "two\nlines", "flag": False})),
]
UNCLOSED = [
    '<tool_call>\n{"name": "f", "arguments": {}}\n',
    "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n",
    "<tool_call>",
    "<tool_call>\n{",
]

# Tags that open a block which can never parse, whatever follows: they may stand anywhere,
# and must not swallow a call after them.
OPENED = ["<tool_call>\n{", "<tool_call> Hello"]

fragment = st.one_of(
    st.sampled_from(PLAIN + OPENED).map(lambda t: (t, None)),
    st.sampled_from(GOOD),
    st.sampled_from(MALFORMED).map(lambda t: (t, None)),
)


@st.composite
def answers(draw):
    """(text, expected content, expected calls, pieces the text is cut into)."""
    parts = draw(st.lists(fragment, max_size=12))
    # An unclosed block that may parse can only end the answer: a later </tool_call> would
    # close it.
    if draw(st.booleans()):
        parts.append((draw(st.sampled_from(UNCLOSED)), None))
    text = "".join(t for t, _ in parts)
    content = "".join(t for t, call in parts if call is None).strip() or None
    calls = [call for _, call in parts if call is not None]
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=20)))
    return text, content, calls, cut(text, cuts)


def cut(text: str, cuts: list[int]) -> list[str]:
    """``text`` in pieces at the sorted positions ``cuts`` (empty pieces included)."""
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


STREAMING = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@STREAMING
@given(answers())
def test_stream_agrees_with_whole_text_however_cut(answer):
    text, content, calls, pieces = answer
    whole_content, whole_calls = parse_tool_calls(text, WEATHER_TOOLS)
    assert whole_content == content
    assert pairs(whole_calls) == calls
    deltas, streamed = run_stream(pieces, WEATHER_TOOLS)
    assert "".join(deltas).strip() == (content or "")
    assert "".join(deltas) == (content or "")  # stronger: already stripped, nothing to strip
    assert pairs(streamed) == calls
    # Content is sent as early as it is known, and never taken back.
    sent, seen = "", ""
    stream = ToolCallStream(WEATHER_TOOLS)
    for piece in pieces:
        sent += stream.push(piece)[0]
        seen += piece
        assert (content or "").startswith(sent)
        if "<" not in seen:
            assert sent == seen.strip()


# Pieces of tags and bodies thrown together at random: whatever the text, cutting it into
# pieces changes nothing.
SOUP = [
    "<",
    ">",
    "/",
    "tool_call>",
    "<tool_call>",
    "</tool_call>",
    "</tool_",
    "call>",
    "<function=f>",
    "</function>",
    "<parameter=zip>",
    "</parameter>",
    '{"name": "f", "arguments": {}}',
    '{"name": "lookup"',
    hermes("f", {"a": 1}),
    xml("lookup", zip="02139"),
    "}",
    "02139",
    "x",
    " ",
    "\n",
]


@STREAMING
@given(st.data())
def test_stream_cut_anywhere_in_tag_soup(data):
    text = "".join(data.draw(st.lists(st.sampled_from(SOUP), max_size=30)))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=20)))
    pieces = cut(text, cuts)
    content, calls = parse_tool_calls(text, WEATHER_TOOLS)
    deltas, streamed = run_stream(pieces, WEATHER_TOOLS)
    assert "".join(deltas) == (content or "")
    assert pairs(streamed) == pairs(calls)
    # No text is lost: every character is in the content or inside a call's block.
    if not calls:
        assert content == (text.strip() or None)
