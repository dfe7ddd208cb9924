"""The chat template renders exactly what transformers' apply_chat_template renders."""

from __future__ import annotations

import pytest

from qwen3chat.chat_template import builtin_template, render_chat
from qwen3chat.errors import QwenChatError

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi"}],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
    ],
    "multi_turn_with_think_history": [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\nSix.\n</think>\n\n6"},
        {"role": "user", "content": "Thanks! 你好 👋"},
    ],
    "multi_turn_plain_history": [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?"},
    ],
}


@pytest.fixture(scope="module")
def reference(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [True, False])
def test_matches_transformers(tokenizer, reference, name, thinking):
    messages = CONVERSATIONS[name]
    expected = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    assert tokenizer.render(messages, enable_thinking=thinking) == expected
    assert (
        tokenizer.encode_chat(messages, thinking)
        == reference.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, enable_thinking=thinking
        )["input_ids"]
    )


def test_history_think_content_not_fed_back(tokenizer):
    text = tokenizer.render(CONVERSATIONS["multi_turn_with_think_history"])
    assert "Add them." not in text and "Six." not in text
    assert text.endswith("<|im_start|>assistant\n")


def test_no_thinking_adds_empty_block(tokenizer):
    text = tokenizer.render(CONVERSATIONS["single"], enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_builtin_template_is_qwen3s(tokenizer):
    assert builtin_template("qwen3") == tokenizer.chat_template


def test_template_is_sandboxed():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(QwenChatError, match="chat template"):
        render_chat(evil, [{"role": "user", "content": "x"}])


def test_template_errors_are_clean():
    with pytest.raises(QwenChatError, match="syntax error"):
        render_chat("{% if %}", [])
    with pytest.raises(QwenChatError, match="no system"):
        render_chat("{{ raise_exception('no system') }}", [])
