"""The interactive chat: Markdown streaming, the reply view, turns through the real engine
(KV reuse, context overflow, Ctrl-C), and the real REPL driven in a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
import threading
import time

import pexpect
import pytest
import torch
from rich.console import Console
from rich.text import Text

from qwen3chat.chat.render import ReplyView, _BottomLines, finished_length, stats_line
from qwen3chat.chat.repl import Repl
from qwen3chat.chat.session import ChatOptions, Conversation
from qwen3chat.engine import Engine
from qwen3chat.errors import QwenChatError
from qwen3chat.generation import FinishEvent, TextEvent, ThinkingEnd, Timings
from qwen3chat.loading import load_model, load_preset
from qwen3chat.sampling import SamplingSettings

GREEDY = SamplingSettings(temperature=0.0)

# --- Markdown blocks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "finished"),
    [
        ("para one\n\npara two", "para one\n\n"),
        ("para one\n\n", ""),  # the next block has not begun: more list items may follow
        ("- item\n\n  continued", ""),  # indented: still the list item above
        ("- a\n- b\n\n- c", "- a\n- b\n\n"),
        ("intro\n```py\nx = 1\n\ny = 2\n", "intro\n"),  # blank lines inside code do not count
        ("```py\nx = 1\n\ny = 2\n```\nafter", "```py\nx = 1\n\ny = 2\n```\n"),
        ("```py\nx = 1\n```", ""),  # the closing fence line is not complete yet
        ("~~~\n```\n~~~\nafter", "~~~\n```\n~~~\n"),  # ``` does not close a ~~~ fence
        ("no blank line\nyet", ""),
    ],
)
def test_finished_length_splits_on_block_boundaries(text, finished):
    assert text[: finished_length(text)] == finished


def test_a_block_taller_than_the_screen_shows_its_last_lines():
    console = Console(file=io.StringIO(), width=40)
    console.print(_BottomLines(Text("\n".join(f"line {i}" for i in range(50))), 3))
    assert console.file.getvalue().split() == ["line", "47", "line", "48", "line", "49"]


# --- The reply view ------------------------------------------------------------------------


def finish_event(reason="stop", thinking_tokens=0) -> FinishEvent:
    timings = Timings(prefill_s=0.1, ttft_s=0.1, decode_s=1.0, prefill_tokens=6, decode_tokens=3)
    return FinishEvent(reason, [1, 2, 3, 4], 10, 4, "answer", "", thinking_tokens, timings)


def plain_console() -> Console:
    # Not a terminal: the live region draws nothing, so the output is exactly what stays
    # in the scrollback.
    return Console(file=io.StringIO(), width=100, force_terminal=False)


ANSWER = ["# Title\n\nFirst para", "graph.\n\n```python\nx = 1\n", "```\n\nDone."]


def test_thinking_is_shown_apart_with_its_size_and_the_cut():
    console = plain_console()
    with ReplyView(console, show_thinking=True, show_stats=True, max_seq_len=2048) as view:
        view.show(TextEvent("Let me think", True))
        view.show(TextEvent(" about it.", True))
        view.show(ThinkingEnd(64, cut=True))
        for piece in ANSWER:
            view.show(TextEvent(piece, False))
        view.show(finish_event())
    out = console.file.getvalue()
    assert "Thinking…\nLet me think about it.\nthought for" in out
    assert "64 tokens · cut by the think budget" in out
    assert out.index("cut by") < out.index("Title") < out.index("First paragraph.")
    assert out.index("x = 1") < out.index("Done.")
    for text in ("Title", "First paragraph.", "x = 1", "Done."):
        assert out.count(text) == 1
    assert out.rstrip().endswith(
        "4 tokens · 3.0 tok/s · first token 0.10 s · prompt 10 (4 cached) · context 14/2048 · stop"
    )


def test_finished_blocks_are_printed_while_the_reply_is_still_streaming():
    console = plain_console()
    with ReplyView(console, show_thinking=True, show_stats=False, max_seq_len=2048) as view:
        view.show(TextEvent(ANSWER[0], False))
        view.show(TextEvent(ANSWER[1], False))
        midway = console.file.getvalue()
        view.show(TextEvent(ANSWER[2], False))
        view.show(finish_event())
    assert "Title" in midway and "First paragraph." in midway
    assert "x = 1" not in midway  # the code block is still open
    assert "Done." in console.file.getvalue()


def test_collapsed_thinking_leaves_only_its_summary():
    console = plain_console()
    with ReplyView(console, show_thinking=False, show_stats=False, max_seq_len=2048) as view:
        view.show(TextEvent("secret reasoning", True))
        view.show(ThinkingEnd(12, cut=False))
        view.show(TextEvent("Hi!", False))
        view.show(finish_event())
    out = console.file.getvalue()
    assert "secret reasoning" not in out
    assert "12 tokens" in out and "Hi!" in out
    assert "cut" not in out


def test_an_empty_thinking_block_shows_nothing():
    console = plain_console()
    with ReplyView(console, show_thinking=True, show_stats=False, max_seq_len=2048) as view:
        view.show(ThinkingEnd(2, cut=False))  # <think>\n\n</think> in non-thinking mode
        view.show(TextEvent("Hi!", False))
        view.show(finish_event())
    assert console.file.getvalue().strip() == "Hi!"


def test_a_reply_that_ends_while_thinking_says_so():
    console = plain_console()
    with ReplyView(console, show_thinking=True, show_stats=False, max_seq_len=2048) as view:
        view.show(TextEvent("hmm", True))
        view.show(finish_event("length", thinking_tokens=5))
    out = console.file.getvalue()
    assert "5 tokens · unfinished (length)" in out
    assert out.rstrip().endswith("(length)")


# --- Turns through the real engine ---------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir[0], device="cpu", dtype="float32")


def make_repl(
    loaded, max_seq_len=2048, system=None, vision=None, kv_dtype=None, draft_max=0, **options
) -> Repl:
    engine = Engine(
        loaded.model, loaded.tokenizer, max_seq_len, kv_dtype=kv_dtype, draft_max=draft_max
    )
    return Repl(
        engine,
        loaded,
        GREEDY,
        ChatOptions(**options),
        Conversation(system),
        console=Console(file=io.StringIO(), width=200),
        vision=vision,
    )


def record_replies(engine: Engine) -> list[tuple[list[int], FinishEvent]]:
    """(prompt ids, finish event) of every reply the engine generates from now on."""
    replies = []
    generate = engine.generate

    def recording(prompt_ids, *args, **kwargs):
        for event in generate(prompt_ids, *args, **kwargs):
            if isinstance(event, FinishEvent):
                replies.append((list(prompt_ids), event))
            yield event

    engine.generate = recording
    return replies


def count_forwarded_tokens(engine: Engine, monkeypatch) -> list[int]:
    """A one-element list holding how many tokens the model has run so far."""
    count = [0]
    forward = engine.model.forward

    def counting(tokens, *args, **kwargs):
        count[0] += tokens.shape[1]
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", counting)
    return count


def test_each_turn_prefills_only_what_follows_the_cached_prefix(loaded, monkeypatch):
    repl = make_repl(loaded, system="You are a helpful assistant.", max_tokens=8)
    replies = record_replies(repl.engine)
    forwarded = count_forwarded_tokens(repl.engine, monkeypatch)
    previous_prompt: list[int] = []
    for i in range(10):
        before = forwarded[0]
        assert repl.reply(f"Question {i}: what else can you tell me about that?") is not None
        prompt, finish = replies[-1]
        # The model ran exactly the prompt tokens the engine reports, plus the decode steps.
        assert forwarded[0] - before == finish.timings.prefill_tokens + finish.timings.decode_tokens
        assert finish.timings.prefill_tokens == finish.prompt_tokens - finish.cached_tokens
        # The whole previous prompt came from the cache: only the previous answer (its
        # thinking-free form) and the new message were run.
        assert prompt[: len(previous_prompt)] == previous_prompt
        assert finish.cached_tokens >= len(previous_prompt)
        previous_prompt = prompt
    first, last = replies[0][1], replies[-1][1]
    assert last.prompt_tokens > 8 * first.timings.prefill_tokens // 2
    assert last.timings.prefill_tokens < last.prompt_tokens // 5
    assert len(repl.conversation.turns) == 10


def test_a_full_context_drops_the_oldest_turns_and_goes_on(loaded):
    repl = make_repl(loaded, max_seq_len=200, system="You are terse.", max_tokens=8)
    replies = record_replies(repl.engine)
    for i in range(14):
        assert repl.reply(f"message {i}: please answer this briefly") is not None
    out = repl.console.file.getvalue()
    assert (
        "context full (--max-seq-len 200): dropped the 5 oldest turns, "
        "'message 0: please answer this…' to 'message 4: please answer this…'"
    ) in out
    users = [turn.user for turn in repl.conversation.turns]
    assert users[-1] == "message 13: please answer this briefly"
    assert "message 0: please answer this briefly" not in users
    assert repl.conversation.system == "You are terse."
    system_ids = loaded.tokenizer.encode("<|im_start|>system\nYou are terse.<|im_end|>")
    for prompt, finish in replies:
        assert prompt[: len(system_ids)] == system_ids
        assert finish.prompt_tokens + 8 <= 200  # room was left for the whole reply


def test_a_message_longer_than_the_context_is_refused_and_given_back(loaded):
    repl = make_repl(loaded, max_seq_len=64)
    message = "word " * 100
    with pytest.raises(QwenChatError, match="--max-seq-len is 64"):
        repl.handle(message)
    assert repl.next_input == message
    assert repl.conversation.turns == []


def test_ctrl_c_while_streaming_keeps_the_partial_answer(loaded, monkeypatch):
    repl = make_repl(loaded, max_tokens=200)
    replies = record_replies(repl.engine)
    decode_step = repl.engine.decode_step
    steps = [0]

    def decode_then_interrupt(*args):
        steps[0] += 1
        if steps[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        return decode_step(*args)

    monkeypatch.setattr(repl.engine, "decode_step", decode_then_interrupt)
    handler = signal.getsignal(signal.SIGINT)
    turn = repl.reply("hello")
    finish = replies[-1][1]
    assert finish.reason == "cancelled"
    assert len(finish.token_ids) == 6  # stopped at the next token, not at -n 200
    assert turn is not None and turn.assistant == finish.text != ""
    assert repl.conversation.turns == [turn]
    assert "cancelled" in repl.console.file.getvalue()
    assert signal.getsignal(signal.SIGINT) is handler  # put back after the reply


def test_ctrl_c_during_a_long_prefill_stops_at_once_and_the_next_reply_is_exact(
    loaded, monkeypatch
):
    repl = make_repl(loaded, max_tokens=6)
    assert repl.reply("first message") is not None
    cached = list(repl.engine.cache.tokens)
    forward = loaded.model.forward

    def slow_prefill(tokens, *args, **kwargs):
        if tokens.shape[1] > 1:  # a prompt, not a decode step: take "forever"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                time.sleep(0.005)
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", slow_prefill)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.monotonic()
    assert repl.reply("second message") is None
    assert time.monotonic() - start < 3
    assert [t.user for t in repl.conversation.turns] == ["first message"]
    # The abandoned pass left nothing behind: the cache is a prefix of what it held.
    assert repl.engine.cache.tokens == cached[: len(repl.engine.cache.tokens)]

    monkeypatch.setattr(loaded.model, "forward", forward)
    prompt = loaded.tokenizer.encode_chat(repl.conversation.messages("second message"))
    fresh = Engine(loaded.model, loaded.tokenizer, 2048)
    expected = list(fresh.generate(prompt, 6, GREEDY))[-1].text
    turn = repl.reply("second message")
    assert turn is not None and turn.assistant == expected


def test_regen_replaces_the_last_answer(loaded):
    repl = make_repl(loaded, max_tokens=6)
    repl.sampling = SamplingSettings(temperature=1.0, top_p=1.0)
    repl.reply("tell me a story")
    first = repl.conversation.turns[-1].assistant
    repl.handle("/regen")
    assert len(repl.conversation.turns) == 1
    assert repl.conversation.turns[-1].user == "tell me a story"
    assert repl.conversation.turns[-1].assistant != first  # a new seed per reply


def test_set_changes_settings_and_rejects_bad_values(loaded):
    repl = make_repl(loaded)
    for line in ("/set top_k 20", "/set think_budget 32", "/set show_thinking off"):
        repl.handle(line)
    assert repl.sampling.top_k == 20
    assert repl.options.think_budget == 32
    assert repl.options.show_thinking is False
    for line in ("/set top_p 2", "/set max_tokens 0", "/set top_k many", "/set stats maybe"):
        repl.handle(line)
    assert repl.sampling.top_p == GREEDY.top_p
    assert repl.options.max_tokens == 256 and repl.options.stats is True
    out = repl.console.file.getvalue()
    assert "/set: top_p 2 is out of range" in out
    assert "/set: max_tokens takes a number of tokens, at least 1" in out
    assert "/set: top_k takes an integer" in out
    assert "/set: stats takes on or off" in out
    repl.handle("/set think_budget off")
    assert repl.options.think_budget is None


@pytest.mark.parametrize("kv_dtype", [None, torch.int8])
def test_show_describes_a_hybrid_model_s_cache(kv_dtype):
    """/show on the hybrid generation, whose cache keeps recurrent states beside the
    attention layers' keys and values."""
    hybrid = load_preset("tiny-hybrid", "cpu", "float32")
    repl = make_repl(hybrid, 256, kv_dtype=kv_dtype, draft_max=7)
    repl.show("")
    shown = repl.console.file.getvalue()
    kind = "int8 (32-value blocks)" if kv_dtype else "compute dtype"
    assert re.search(rf"kv cache\s+{re.escape(kind)}, \d+ MiB for 256 tokens", shown)
    assert re.search(r"drafts\s+none", shown)  # its recurrent states cannot step back


def test_show_and_the_stats_line_tell_of_drafts(loaded):
    repl = make_repl(loaded, draft_max=5)
    repl.show("")
    shown = repl.console.file.getvalue()
    assert re.search(r"drafts\s+ngram \(prompt lookup\), up to 5 tokens a step", shown)
    drafted = Timings(drafted_tokens=6, accepted_tokens=4)
    assert "drafts 4/6 kept" in stats_line(
        FinishEvent("stop", [1, 2], 9, 0, "", "", 0, drafted), 64
    )
    assert "drafts" not in stats_line(FinishEvent("stop", [1, 2], 9, 0, "", "", 0), 64)


def test_soft_switches_inside_a_message_are_sent_to_the_model(loaded):
    repl = make_repl(loaded, max_tokens=3)
    repl.handle("/no_think what is 2+2?")
    assert repl.conversation.turns[0].user == "/no_think what is 2+2?"
    assert repl.options.think is True  # only the bare command changes the mode
    repl.handle("/no_think")
    assert repl.options.think is False


# --- The real REPL in a pseudo-terminal ----------------------------------------------------

PROMPT = ">>>"


def first_word_of_reply(loaded, message: str) -> str:
    """A word from the start of the greedy reply, as the REPL will stream it."""
    engine = Engine(loaded.model, loaded.tokenizer, 2048)
    prompt = loaded.tokenizer.encode_chat([{"role": "user", "content": message}])
    text = list(engine.generate(prompt, 12, GREEDY))[-1].text
    return re.search(r"[A-Za-z]{4,}", text).group()


def spawn_chat(model_dir, tmp_path, *flags) -> pexpect.spawn:
    env = {
        # The terminal's size is the pty's: a COLUMNS inherited (pytest-xdist's workers set
        # 80) would wrap the lines matched.
        **{k: v for k, v in os.environ.items() if k not in ("VISUAL", "COLUMNS", "LINES")},
        "EDITOR": "sed -i s/draft/edited/",  # an "editor" that rewrites the message
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "PROMPT_TOOLKIT_NO_CPR": "1",  # pexpect does not answer cursor-position queries
        "TERM": "xterm-256color",
    }
    args = ["-m", "qwen3chat", "chat", "-m", str(model_dir), "--temperature", "0"]
    child = pexpect.spawn(
        sys.executable,
        [*args, "--dtype", "float32", *flags],
        env=env,
        encoding="utf-8",
        dimensions=(40, 160),
        timeout=30,
    )
    child.expect(PROMPT)
    return child


def ask(child: pexpect.spawn, line: str, *answers: str) -> None:
    """Type a line, wait for each expected pattern in turn, then for the next prompt."""
    child.send(line + "\r")
    for answer in answers:
        child.expect(answer)
    child.expect(PROMPT)


def finish_session(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_repl_streams_ctrl_c_stops_the_reply_and_enter_can_be_typed_ahead(
    tiny_model_dir, loaded, tmp_path
):
    word = first_word_of_reply(loaded, "hello")
    saved = tmp_path / "chat.json"
    child = spawn_chat(tiny_model_dir[0], tmp_path, "-n", "300")
    child.send("hello\r")
    child.expect(word)  # streamed while the reply is still being generated
    child.sendintr()
    stopped = time.monotonic()
    child.expect("cancelled")
    assert time.monotonic() - stopped < 2
    assert "^C" not in child.before  # not echoed into the lines Rich redraws
    child.expect(PROMPT)
    child.send("and now?\r")
    child.expect("…")  # the reply has begun: what is typed now waits for the next prompt
    child.send("/show\r")
    child.expect(r"300 tokens .* length")
    child.expect(r"turns\s+2")  # the Enter typed ahead sent /show
    child.expect(PROMPT)
    ask(child, f"/save {saved}", "saved 2 turn")
    child.send("a draft")
    child.sendintr()  # clears the line, does not quit
    ask(child, "/show", r"turns\s+2")
    child.sendintr()  # on an empty line: quit
    assert finish_session(child) == 0
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert [m["content"] for m in messages[::2]] == ["hello", "and now?"]
    assert word in messages[1]["content"]  # the partial answer was kept


def test_repl_commands(tiny_model_dir, tmp_path):
    saved = tmp_path / "chat.json"
    child = spawn_chat(tiny_model_dir[0], tmp_path, "-n", "8", "-s", "You are terse.")
    child.send("/he")
    child.expect("/help")  # the completion menu
    ask(child, "\t", "/regen", "Alt-Enter")  # Tab completes /help
    ask(child, "/set temperature 0.5", "temperature = 0.5")
    ask(child, "/set top_p 2", "out of range")
    ask(child, "/set nope 1", "unknown setting nope")
    ask(child, "/sav x", r"unknown command /sav; did you mean /save\?")
    ask(child, "hello", r"8 tokens .* length")
    ask(child, f"/save {saved}", "saved 1 turn")
    ask(child, "/clear", "conversation cleared")
    ask(
        child,
        "/show",
        r"kernels\s+(one-row float|native kernels)",
        r"kv cache\s+compute dtype, \d+ MiB for 2048 tokens",
        r"turns\s+0",
    )
    ask(child, f"/load {saved}", "loaded 1 turn")
    ask(child, "/show", r"context\s+\d+ of 2048 tokens used", r"turns\s+1")
    ask(child, "/regen", r"8 tokens .* length")
    ask(child, "/system", "You are terse.")
    child.send("/exit\r")
    assert finish_session(child) == 0
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "You are terse."


def test_repl_multiline_input_editor_history_and_ctrl_d(tiny_model_dir, tmp_path):
    saved = tmp_path / "chat.json"
    child = spawn_chat(tiny_model_dir[0], tmp_path, "-n", "3")
    child.send("\x1b[200~line one\nline two\x1b[201~")  # a bracketed paste of two lines
    ask(child, "", r"3 tokens")
    ask(child, "first\x1b\rsecond\\\rthird", r"3 tokens")  # Alt-Enter, \ Enter: new lines
    child.send("my draft")
    child.sendcontrol("g")  # opens $EDITOR on the message
    child.expect("edited")
    ask(child, "", r"3 tokens")
    ask(child, f"/save {saved}", "saved 3 turn")
    child.sendcontrol("d")
    assert finish_session(child) == 0
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    users = [m["content"] for m in messages[::2]]
    assert users == ["line one\nline two", "first\nsecond\nthird", "my edited"]
    history = (tmp_path / "state" / "qwen3chat" / "history").read_text(encoding="utf-8")
    assert "+line one\n+line two" in history
