"""One request's reply as the engine's events arrive: the deltas a client is sent.

Thinking goes to ``reasoning_content`` (the engine splits it off on token ids, so a tool
call written while thinking is never a call); the answer is cut at the first stop string
(generation then ends) and its tool calls are taken out into ``tool_calls``. The streamed
and the whole replies are built by this one mechanism: a whole reply is its deltas joined.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..generation import FinishEvent, TextEvent
from .tool_calls import ToolCall, ToolCallStream


class StopStrings:
    """Cuts text at the first of ``stops``; holds back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.matched = False

    def push(self, text: str) -> str:
        if self.matched:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.matched = True
            out, self.pending = self.pending[: min(found)], ""
            return out
        cut = len(self.pending) - self.hold
        if cut <= 0:
            return ""
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return "" if self.matched else out


@dataclass
class Reply:
    stops: list[str]
    tools: list[dict] | None = None  # None: tool calls are not parsed (tool_choice none)
    raw: bool = False  # a raw completion: thinking is text like the rest
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def __post_init__(self):
        self._stop = StopStrings(self.stops)
        self._calls = ToolCallStream(self.tools) if self.tools is not None else None

    @property
    def stopped(self) -> bool:
        """A stop string matched: the engine should end this reply."""
        return self._stop.matched

    def push(self, event: TextEvent) -> list[dict]:
        """The chunk deltas of one engine text event."""
        if event.thinking and not self.raw:
            self.reasoning += event.text
            return [{"reasoning_content": event.text}]
        return self._answer(self._stop.push(event.text))

    def finish(self, finish: FinishEvent) -> tuple[list[dict], str]:
        """The last deltas and the finish reason."""
        deltas = self._answer(self._stop.flush(), last=True)
        if self.calls:
            reason = "tool_calls"
        elif self.stopped:
            reason = "stop"
        else:
            reason = finish.reason
        return deltas, reason

    def _answer(self, text: str, last: bool = False) -> list[dict]:
        if self._calls is None:
            content, calls = text, []
        else:
            content, calls = self._calls.push(text)
            if last:
                tail, more = self._calls.flush()
                content, calls = content + tail, calls + more
        if not self.content and not self.raw:
            content = content.lstrip()  # a reply starts at its first word
        deltas = [{"content": content}] if content else []
        self.content += content
        for call in calls:
            index = len(self.calls)
            self.calls.append(call)
            deltas.append({"tool_calls": [tool_call_json(call, index)]})
        return deltas

    def message(self) -> dict:
        """The whole reply as a chat.completion message."""
        message: dict = {"role": "assistant", "content": self.content or None}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.calls:
            message["tool_calls"] = [tool_call_json(c) for c in self.calls]
        return message


def tool_call_json(call: ToolCall, index: int | None = None) -> dict:
    out = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    return out if index is None else {"index": index, **out}
