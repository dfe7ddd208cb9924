"""Constrained decoding: a reply held to a JSON schema parses and follows it, whatever the
(random) model would have written, greedy or sampled."""

from __future__ import annotations

import json

import pytest

from qwen3chat.engine import Engine
from qwen3chat.errors import QwenChatError
from qwen3chat.grammar import GrammarConstraint, json_grammar
from qwen3chat.loading import load_model
from qwen3chat.sampling import SamplingSettings

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
        "sure": {"type": "boolean"},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["answer", "sure", "score"],
    "additionalProperties": False,
}


def follows_schema(value) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"answer", "sure", "score"}
        and value["answer"] in ("yes", "no", "maybe")
        and isinstance(value["sure"], bool)
        and isinstance(value["score"], int)
        and 0 <= value["score"] <= 9
    )


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    loaded = load_model(tiny_model_dir[0], device="cpu", dtype="float32")
    return Engine(loaded.model, loaded.tokenizer, max_seq_len=256)


def reply(engine, grammar, sampling, max_tokens=64):
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": "Is it?"}], False)
    constraint = (
        None if grammar is None else GrammarConstraint(engine.tokenizer, engine.vocab_size, grammar)
    )
    finish = list(engine.generate(ids, max_tokens, sampling, constraint=constraint))[-1]
    return finish


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_schema_s_reply_parses_and_follows_it(engine, seed):
    sampling = SamplingSettings(temperature=1.0, top_p=1.0, seed=seed)
    finish = reply(engine, json_grammar(SCHEMA), sampling)
    assert finish.reason == "stop"  # the grammar ended it, with the end-of-turn token
    assert follows_schema(json.loads(finish.text)), finish.text


def test_greedy_json_object(engine):
    finish = reply(engine, json_grammar(None), SamplingSettings(temperature=0), max_tokens=200)
    if finish.reason == "stop":
        assert isinstance(json.loads(finish.text), dict)
    else:  # a greedy object may go on past the budget; what there is is an object's start
        assert finish.text.startswith("{")


def test_without_the_grammar_the_random_model_writes_no_such_json(engine):
    text = reply(engine, None, SamplingSettings(temperature=1.0, top_p=1.0, seed=0)).text
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    assert not follows_schema(value)


def test_a_schema_that_cannot_be_used_is_one_line(engine):
    bad = json_grammar({"type": "object", "properties": {"x": {"type": "nonsense"}}})
    with pytest.raises(QwenChatError, match="schema"):
        GrammarConstraint(engine.tokenizer, engine.vocab_size, bad)
