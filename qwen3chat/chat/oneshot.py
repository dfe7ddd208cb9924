"""One-shot mode: a prompt in, the answer on stdout (or one JSON object), then exit."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TextIO

from ..engine import Engine
from ..generation import FinishEvent, TextEvent, ThinkingEnd
from ..sampling import SamplingSettings
from .prompts import TextPrompts
from .session import user_turn_message


def build_messages(prompt: str, system: str | None, pictures: Sequence = ()) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, user_turn_message(prompt, list(pictures))]


def run_oneshot(
    engine: Engine,
    prompt: str,
    system: str | None,
    sampling: SamplingSettings,
    max_tokens: int,
    enable_thinking: bool,
    as_json: bool,
    load_s: float,
    think_budget: int | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    prompts: TextPrompts | None = None,
    pictures: Sequence = (),
) -> FinishEvent:
    """Answer ``prompt`` (about ``pictures``, with a Qwen3-VL model and its VisionChat as
    ``prompts``).
    Text mode streams the answer to stdout as it is generated and the thinking to stderr
    only when stderr is a terminal (a script reading stdout never sees it); JSON mode
    prints one object at the end."""
    # Looked up per call, not bound as defaults: tests and callers may swap the streams.
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    prompts = prompts or TextPrompts()
    ids, visuals = prompts.encode_chat(
        engine.tokenizer, build_messages(prompt, system, pictures), enable_thinking
    )
    if visuals:
        stderr.write(f"{prompts.count_tokens(visuals)} visual tokens\n")
        stderr.flush()
    show_thinking = not as_json and stderr.isatty()
    in_thinking_block = False
    finish = None
    events = engine.generate(ids, max_tokens, sampling, think_budget=think_budget, visuals=visuals)
    for event in events:
        if isinstance(event, ThinkingEnd):
            if event.cut and in_thinking_block:
                stderr.write(f" [thinking cut at {think_budget} tokens]")
        elif isinstance(event, TextEvent):
            if as_json:
                continue
            if event.thinking:
                if show_thinking:
                    stderr.write(("" if in_thinking_block else "\x1b[2m") + event.text)
                    stderr.flush()
                    in_thinking_block = True
                continue
            if in_thinking_block:
                stderr.write("\x1b[0m\n\n")
                stderr.flush()
                in_thinking_block = False
            stdout.write(event.text)
            stdout.flush()
        elif isinstance(event, FinishEvent):
            finish = event
    if in_thinking_block:
        stderr.write("\x1b[0m\n")
    if as_json:
        json.dump(finish_to_json(finish, load_s), stdout, ensure_ascii=False)
    stdout.write("\n")
    stdout.flush()
    return finish


def finish_to_json(finish: FinishEvent, load_s: float) -> dict:
    t = finish.timings
    return {
        "text": finish.text,
        "thinking": finish.thinking,
        "token_ids": finish.token_ids,
        "finish_reason": finish.reason,
        "usage": {
            "prompt_tokens": finish.prompt_tokens,
            "completion_tokens": len(finish.token_ids),
        },
        "timings": {
            "load_s": round(load_s, 4),
            "ttft_s": round(t.ttft_s, 4),
            "prefill_tok_s": round(t.prefill_tok_s, 2),
            "decode_tok_s": round(t.decode_tok_s, 2),
            # Only when the vision tower ran: text chat's object stays as it was.
            **({"vision_s": round(t.vision_s, 4)} if t.vision_s else {}),
        },
    }
