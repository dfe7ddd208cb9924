"""The conversation state of the interactive chat: messages, overflow trimming, files."""

from __future__ import annotations

import json
import os

import pytest

from qwen3chat.chat.session import (
    ChatOptions,
    Conversation,
    Turn,
    change_setting,
    describe_settings,
    write_atomically,
)
from qwen3chat.errors import QwenChatError
from qwen3chat.sampling import SamplingSettings


def make(n: int, system: str | None = "Be brief.") -> Conversation:
    return Conversation(system, [Turn(f"question {i}", f"answer {i}") for i in range(n)])


def test_messages_put_the_system_prompt_first_and_the_new_message_last():
    messages = make(2).messages("next")
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert messages[0]["content"] == "Be brief."
    assert messages[2]["content"] == "answer 0"
    assert messages[-1]["content"] == "next"
    assert [m["role"] for m in Conversation().messages()] == []


def test_dropping_removes_whole_turns_oldest_first_and_keeps_the_system_prompt():
    conversation = make(5)
    dropped = conversation.drop_oldest_until(lambda messages: len(messages) <= 6, "next")
    assert [t.user for t in dropped] == ["question 0", "question 1", "question 2"]
    assert [t.user for t in conversation.turns] == ["question 3", "question 4"]
    messages = conversation.messages("next")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert len(messages) == 6


def test_dropping_stops_when_no_turn_is_left():
    conversation = make(2)
    dropped = conversation.drop_oldest_until(lambda messages: False, "next")
    assert len(dropped) == 2
    assert conversation.turns == []
    assert conversation.messages("next")[0]["role"] == "system"


def test_save_then_load_gives_the_same_conversation(tmp_path):
    conversation = make(3)
    conversation.turns.append(Turn("multi\nline ünïcode 你好", "ok"))
    path = tmp_path / "chat.json"
    conversation.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "qwen3chat-conversation"
    assert data["messages"] == conversation.messages()
    loaded = Conversation.load(path)
    assert loaded.system == conversation.system
    assert loaded.turns == conversation.turns
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]  # no temporary file left


def test_load_accepts_a_plain_list_of_messages(tmp_path):
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(make(1, system=None).messages()), encoding="utf-8")
    loaded = Conversation.load(path)
    assert loaded.system is None
    assert loaded.turns == [Turn("question 0", "answer 0")]


def test_a_failed_save_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "chat.json"
    make(1).save(path)
    before = path.read_bytes()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(QwenChatError, match=r"chat\.json: cannot write"):
        make(4).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]


def test_saving_into_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(QwenChatError, match="cannot write"):
        write_atomically(tmp_path / "no" / "such" / "dir.json", "{}")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"messages": {"role": "user"}}', "expected a list of messages"),
        ('[{"role": "user", "content": 3}]', "message 0 has no text content"),
        ('[{"role": "user", "content": "unanswered"}]', "must alternate"),
        (
            '[{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]',
            "must alternate",
        ),
    ],
)
def test_loading_a_bad_file_names_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(QwenChatError, match=message) as error:
        Conversation.load(path)
    assert str(path) in str(error.value)


def test_loading_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(QwenChatError, match=r"missing\.json: cannot read"):
        Conversation.load(tmp_path / "missing.json")


def test_change_setting_returns_new_settings_with_one_changed():
    options, sampling = ChatOptions(), SamplingSettings()
    new_options, new_sampling = change_setting(options, sampling, "temperature", "0.3")
    assert new_sampling.temperature == 0.3 and new_options == options
    assert sampling.temperature == 0.6  # the old settings are left alone
    new_options, _ = change_setting(options, sampling, "think_budget", "128")
    assert new_options.think_budget == 128
    new_options, _ = change_setting(new_options, sampling, "think_budget", "off")
    assert new_options.think_budget is None
    new_options, _ = change_setting(options, sampling, "show_thinking", "off")
    assert "show_thinking off" in describe_settings(new_options, sampling)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("temprature", "1", "unknown setting temprature; did you mean temperature?"),
        ("top_k", "1.5", "top_k takes an integer"),
        ("min_p", "2", "min_p 2 is out of range"),
        ("max_tokens", "-3", "max_tokens takes a number of tokens, at least 1"),
        ("think", "yes please", "think takes on or off"),
    ],
)
def test_change_setting_explains_a_bad_value(name, value, message):
    with pytest.raises(ValueError) as error:
        change_setting(ChatOptions(), SamplingSettings(), name, value)
    assert str(error.value) == message
