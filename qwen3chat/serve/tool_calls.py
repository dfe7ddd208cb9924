"""Tool calls in a Qwen answer, taken out of its text as OpenAI ``tool_calls``.

Qwen models write a call as a ``<tool_call>…</tool_call>`` block in the answer, in one of
two forms:

* Hermes JSON, which the Qwen3 chat template asks for::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

  ``arguments`` is usually an object, sometimes an object serialised as a JSON string.

* XML, written by Qwen3-Coder and Qwen3.5/3.6::

      <tool_call>
      <function=get_weather>
      <parameter=city>
      Paris
      </parameter>
      </function>
      </tool_call>

  Values are text (one newline on each side is layout, not value). A value that reads as
  JSON other than a string (number, bool, null, object, array) is taken as that, unless
  the tool's schema says the parameter is a string: zip code ``02139`` stays ``"02139"``.

Several blocks may follow each other; the text before, between and after them is the
message content. A block that does not parse (bad JSON, no name, an unknown form) or is
never closed is not a call: it stays in the content as written, as llama.cpp and vLLM do,
so that no text the model wrote is ever lost and the client sees what went wrong.

Where a block starts and ends is decided on the text alone, without regard for Markdown:
a ``<tool_call>`` tag mentioned in prose or a code span is text (its block never closes
or does not parse), but a whole well-formed block is a call wherever it stands. When a
closed block holds several ``<tool_call>`` tags, the first from which the rest parses
opens the call: an argument may mention the tag, and a tag mentioned in prose before a
real call does not swallow it.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

OPEN = "<tool_call>"
CLOSE = "</tool_call>"

_FUNCTION = re.compile(r"\s*<function=([^>\n]*)>(.*)</function>\s*", re.DOTALL)
# Non-greedy: a value ends at the first </parameter> (the closing tag is required, as the
# templates always write it; guessing where an unclosed value ends could eat later text).
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]*)>(.*?)</parameter>", re.DOTALL)


def _new_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, serialised with json.dumps(..., ensure_ascii=False)
    id: str = field(default_factory=_new_id)


def _reject_constant(name: str):
    # NaN and Infinity are accepted by json.loads but are not JSON: json.dumps would write
    # arguments no client can read.
    raise ValueError(name)


def _loads(text: str):
    return json.loads(text, parse_constant=_reject_constant)


def _string_parameters(tools: list[dict] | None) -> dict[str, set[str]]:
    """Per function name, the parameters whose schema type is (or admits) "string"."""
    found: dict[str, set[str]] = {}
    for tool in tools or []:
        if not isinstance(tool, dict):
            continue
        function = tool.get("function", tool)  # OpenAI {"type", "function"} or bare
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        names = set()
        for key, schema in (properties or {}).items():
            kind = schema.get("type") if isinstance(schema, dict) else None
            if kind == "string" or (isinstance(kind, list) and "string" in kind):
                names.add(key)
        found[function["name"]] = names
    return found


def _parse_json_block(body: str) -> tuple[str, dict] | None:
    try:
        call = _loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(call, dict):
        return None
    name = call.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    arguments = call.get("arguments", call.get("parameters"))
    if arguments is None:
        arguments = {}  # a call of a function without parameters
    elif isinstance(arguments, str):
        try:
            arguments = _loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return name.strip(), arguments


def _xml_value(text: str, is_string: bool):
    # One newline on each side is how the templates lay a value out, not part of it.
    text = text.removeprefix("\n").removesuffix("\n")
    if is_string:
        return text
    try:
        value = _loads(text)
    except (ValueError, RecursionError):
        return text
    # A JSON string literal stays as written: values are raw text, quotes included.
    return text if isinstance(value, str) else value


def _parse_xml_block(body: str, strings: dict[str, set[str]]) -> tuple[str, dict] | None:
    function = _FUNCTION.fullmatch(body)
    if function is None:
        return None
    name = function.group(1).strip()
    if not name:
        return None
    inner, pos = function.group(2), 0
    string_names = strings.get(name, set())
    arguments = {}
    while (parameter := _PARAMETER.match(inner, pos)) is not None:
        key = parameter.group(1).strip()
        if not key:
            return None
        arguments[key] = _xml_value(parameter.group(2), key in string_names)
        pos = parameter.end()
    if inner[pos:].strip():
        return None  # anything but parameters inside the function: not this form
    return name, arguments


def _parse_block(body: str, strings: dict[str, set[str]]) -> ToolCall | None:
    """The call written between <tool_call> and </tool_call>, or None if it is not one."""
    stripped = body.lstrip()
    if stripped.startswith("{"):
        parsed = _parse_json_block(body)
    elif stripped.startswith("<function="):
        parsed = _parse_xml_block(body, strings)
    else:
        parsed = None
    if parsed is None:
        return None
    name, arguments = parsed
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _held_prefix(text: str) -> int:
    """Length of the tail of ``text`` that may be the start of a <tool_call> tag."""
    # The tag holds one "<", at its start, so only a tail from the last "<" can begin it.
    start = text.rfind("<")
    return len(text) - start if start >= 0 and OPEN.startswith(text[start:]) else 0


class ToolCallStream:
    """The same, incrementally, for streaming: push() each piece of answer text as it comes;
    it returns what can be sent now, holding back text that may be the start of a
    '<tool_call>' tag or is inside a block not yet closed.

    Content comes out stripped like the whole answer's: leading whitespace is dropped and
    trailing whitespace is held until more content follows, so the newline a model writes
    before a final tool call is never sent. The content deltas joined are exactly the
    content parse_tool_calls gives the whole text, however it was cut into pieces.
    """

    def __init__(self, tools: list[dict] | None = None):
        self._strings = _string_parameters(tools)
        self._pending = ""  # undecided text: a possible tag start, or an open block
        self._inside = False  # _pending starts with <tool_call> and is not yet closed
        self._searched = 0  # where in _pending the search for </tool_call> resumes
        self._started = False  # some content has been sent
        self._space = ""  # whitespace held back after the content sent
        self._calls: list[ToolCall] = []

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._calls)

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content delta, calls completed by this piece)."""
        buffer, self._pending = self._pending + text, ""
        content: list[str] = []
        calls: list[ToolCall] = []
        while buffer:
            if not self._inside:
                start = buffer.find(OPEN)
                if start < 0:
                    keep = _held_prefix(buffer)
                    content.append(self._content(buffer[: len(buffer) - keep]))
                    self._pending = buffer[len(buffer) - keep :]
                    break
                content.append(self._content(buffer[:start]))
                buffer, self._inside, self._searched = buffer[start:], True, len(OPEN)
                continue
            end = buffer.find(CLOSE, self._searched)
            if end < 0:
                # Resume later where a </tool_call> split across pieces could start, so a
                # long block streamed token by token is not searched again from its start.
                self._searched = max(len(OPEN), len(buffer) - len(CLOSE) + 1)
                self._pending = buffer
                break
            text_before, call = self._close(buffer[:end])
            content.append(self._content(text_before))
            if call is not None:
                calls.append(call)
            buffer, self._inside = buffer[end + len(CLOSE) :], False
        self._calls += calls
        return "".join(content), calls

    def flush(self) -> tuple[str, list[ToolCall]]:
        """At the end: whatever is held back (an unclosed block goes out as content)."""
        content = self._content(self._pending)
        self._pending, self._inside, self._space = "", False, ""
        return content, []

    def _close(self, block: str) -> tuple[str, ToolCall | None]:
        """(content, call) of ``block``: text from <tool_call> up to its </tool_call>."""
        start = 0
        while start >= 0:
            call = _parse_block(block[start + len(OPEN) :], self._strings)
            if call is not None:
                return block[:start], call
            start = block.find(OPEN, start + 1)
        return block + CLOSE, None  # not a call: it stays content as written

    def _content(self, text: str) -> str:
        """What of ``text`` can be sent now, keeping the content stripped."""
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        body = text.rstrip()
        if not body:
            self._space += text
            return ""
        out = self._space + body
        self._space = text[len(body) :]
        return out


def parse_tool_calls(
    text: str, tools: list[dict] | None = None
) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole answer."""
    # One piece through the stream: the whole and the streamed replies cannot disagree.
    stream = ToolCallStream(tools)
    content, calls = stream.push(text)
    tail, more = stream.flush()
    return (content + tail) or None, calls + more
