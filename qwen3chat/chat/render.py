"""Drawing a reply in the terminal with Rich while it is being generated.

The thinking is shown apart from the answer, dimmed, with its length and time; the answer
is Markdown. Markdown cannot be printed token by token (a code fence changes everything
after it), and redrawing the whole answer in one Live region flickers and, once taller
than the screen, freezes at its first screenful. So the answer is cut into blocks: each
finished block is printed once into the scrollback and only the block in progress is
redrawn, showing its last lines.
"""

from __future__ import annotations

import re
import time

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.text import Text

from ..generation import Event, FinishEvent, TextEvent, ThinkingEnd

_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_REDRAW_EVERY_S = 0.05  # the live region is redrawn at most 20 times a second


def _fence_marker(line: str) -> str:
    match = _FENCE.match(line)
    return match.group(1) if match else ""


def finished_length(text: str) -> int:
    """Length of the start of ``text`` made of finished Markdown blocks.

    A block ends at a blank line outside a code fence, once the next block has begun at
    the left margin (an indented line may still belong to the list item above), and a
    code block ends with its closing fence line. An opening fence also ends the
    paragraph before it, as in CommonMark.
    """
    end = pos = 0
    fence = ""  # the opening fence while inside a fenced code block
    after_blank = False
    for line in text.splitlines(keepends=True):
        start, pos = pos, pos + len(line)
        complete = line.endswith("\n")
        marker = _fence_marker(line)
        if fence:
            closes = marker[:1] == fence[:1] and len(marker) >= len(fence)
            if complete and closes and line.strip() == marker:
                fence, end = "", pos
            continue
        if not line.strip():
            after_blank = after_blank or complete
            continue
        if after_blank and not line[0].isspace():
            end = start
        after_blank = False
        if marker and complete:
            fence, end = marker, start
    return end


class _BottomLines:
    """The last ``height`` lines of a renderable: a block in progress taller than the
    screen shows where the text is being written, not its top."""

    def __init__(self, renderable: RenderableType, height: int):
        self.renderable = renderable
        self.height = height

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.renderable, options, pad=False)
        for line in lines[-self.height :]:
            yield from line
            yield Segment.line()


class _LiveRegion:
    """A transient area under the scrollback, redrawn at a bounded rate."""

    def __init__(self, console: Console):
        self.console = console
        self.live: Live | None = None
        self.drawn_at = 0.0

    def show(self, renderable: RenderableType) -> None:
        now = time.monotonic()
        if self.live is None:
            self.live = Live(
                renderable,
                console=self.console,
                auto_refresh=False,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.live.start(refresh=True)
            self.drawn_at = now
            return
        redraw = now - self.drawn_at >= _REDRAW_EVERY_S
        self.live.update(renderable, refresh=redraw)
        if redraw:
            self.drawn_at = now

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


class _MarkdownStream:
    def __init__(self, console: Console, live: _LiveRegion):
        self.console = console
        self.live = live
        self.text = ""
        self.printed = 0  # characters of ``text`` already printed as finished blocks

    def feed(self, piece: str) -> None:
        self.text += piece
        pending = self.text[self.printed :]
        done = finished_length(pending)
        if done:
            self._print(pending[:done])
            self.printed += done
            pending = pending[done:]
        if pending.strip():
            height = max(self.console.height - 2, 3)
            self.live.show(_BottomLines(Markdown(pending), height))

    def close(self) -> None:
        self.live.close()
        self._print(self.text[self.printed :])
        self.printed = len(self.text)

    def _print(self, block: str) -> None:
        if block.strip():
            self.console.print(Markdown(block))


class ReplyView:
    """One reply on screen as its events arrive; a context manager so that the live
    region is always closed, even when the reply is interrupted."""

    def __init__(self, console: Console, show_thinking: bool, show_stats: bool, max_seq_len: int):
        self.console = console
        self.show_thinking = show_thinking
        self.show_stats = show_stats
        self.max_seq_len = max_seq_len
        self.live = _LiveRegion(console)
        self.answer = _MarkdownStream(console, self.live)
        self.thinking_since: float | None = None  # set while a thinking block is on screen
        self.thinking_tail = ""

    def __enter__(self) -> ReplyView:
        self.live.show(Text("…", style="dim"))  # until the first token: the prompt is read
        return self

    def __exit__(self, *exc) -> None:
        self.live.close()

    def show(self, event: Event) -> None:
        if isinstance(event, TextEvent) and event.thinking:
            self._thinking_text(event.text)
        elif isinstance(event, TextEvent):
            self.answer.feed(event.text)
        elif isinstance(event, ThinkingEnd):
            self._end_thinking(event.tokens, "cut by the think budget" if event.cut else "")
        elif isinstance(event, FinishEvent):
            self._finish(event)

    def _thinking_text(self, text: str) -> None:
        if self.thinking_since is None:
            self.thinking_since = time.monotonic()
            if self.show_thinking:
                self.live.close()
                self.console.print(Text("Thinking…", style="dim bold"))
        if self.show_thinking:
            self.console.print(Text(text, style="dim italic"), end="", soft_wrap=True)
            return
        # Collapsed: only a one-line glimpse of the latest thought while it lasts.
        self.thinking_tail = (self.thinking_tail + text).rsplit("\n", 1)[-1][-200:]
        elapsed = time.monotonic() - self.thinking_since
        glimpse = Text(f"Thinking… {elapsed:.0f} s  ", style="dim bold")
        glimpse.append(self.thinking_tail, style="dim italic")
        glimpse.no_wrap, glimpse.overflow = True, "ellipsis"
        self.live.show(glimpse)

    def _end_thinking(self, tokens: int, note: str) -> None:
        """Close a thinking block that was shown (an empty one never is)."""
        if self.thinking_since is None:
            return
        elapsed = time.monotonic() - self.thinking_since
        self.thinking_since = None
        if self.show_thinking:
            self.console.print()
        else:
            self.live.close()
        summary = f"thought for {elapsed:.1f} s · {tokens} tokens"
        self.console.print(Text(summary + (f" · {note}" if note else ""), style="dim"))

    def _finish(self, finish: FinishEvent) -> None:
        self._end_thinking(finish.thinking_tokens, f"unfinished ({finish.reason})")
        self.answer.close()
        if self.show_stats:
            self.console.print(Text(stats_line(finish, self.max_seq_len), style="dim"))
        elif finish.reason != "stop":
            self.console.print(Text(f"({finish.reason})", style="dim"))


def stats_line(finish: FinishEvent, max_seq_len: int) -> str:
    t = finish.timings
    used = finish.prompt_tokens + len(finish.token_ids)
    return " · ".join(
        [
            f"{len(finish.token_ids)} tokens",
            f"{t.decode_tok_s:.1f} tok/s",
            f"first token {t.ttft_s:.2f} s",
            *([f"vision {t.vision_s:.2f} s"] if t.vision_s else []),
            *([f"drafts {t.accepted_tokens}/{t.drafted_tokens} kept"] if t.drafted_tokens else []),
            f"prompt {finish.prompt_tokens} ({finish.cached_tokens} cached)",
            f"context {used}/{max_seq_len}",
            finish.reason,
        ]
    )
