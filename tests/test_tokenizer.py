"""The real Qwen3 tokenizer through `tokenizers`, and the streaming detokenizer."""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
import unicodedata

import pytest
from conftest import SHARED_TOKENIZER, TOKENIZER_JSON_XZ

from qwen3chat.presets import PRESETS
from qwen3chat.thinking import ThinkSplitter
from qwen3chat.tokenizer import StreamDecoder, Tokenizer

SAMPLES = [
    "Hello, world!",
    "你好，世界！今天天气怎么样？",
    "日本語のテキストと한국어 텍스트",
    "Emoji: 👩‍👩‍👧‍👦 🇫🇷 🤖✨ and a family",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # code\r\n",
    "   leading and trailing spaces   \n\n\n\t\t",
    "Ünïcödé çømbíning: é (e + \u0301) and Ω",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2, π ≈ 3.14159",
    "Русский текст и العربية и हिन्दी",
]


def test_fixture_matches_shared_copy():
    """The compressed copy in the package is byte-identical to ../shared's tokenizer.json."""
    if not SHARED_TOKENIZER.is_dir():
        pytest.skip("../shared is not beside this checkout")
    ours = lzma.decompress(TOKENIZER_JSON_XZ.read_bytes())
    shared = (SHARED_TOKENIZER / "tokenizer.json").read_bytes()
    assert hashlib.sha256(ours).digest() == hashlib.sha256(shared).digest()


def test_the_packaged_tokenizer_encodes_chats_as_the_fixture_directory_does(tokenizer):
    builtin = Tokenizer.builtin_qwen3()
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": SAMPLES[1]},
        {"role": "assistant", "content": "<think>\nhm\n</think>\n\nFine."},
        {"role": "user", "content": SAMPLES[3]},
    ]
    for thinking in (True, False):
        expected = tokenizer.encode_chat(messages, thinking)
        assert builtin.encode_chat(messages, thinking) == expected
    assert builtin.stop_ids == tokenizer.stop_ids == [151643, 151645]
    assert builtin.vocab_size == tokenizer.vocab_size


def test_models_of_one_tokenizer_share_its_parse(tokenizer_dir, tmp_path):
    """Folders holding the same tokenizer.json bytes (a draft model beside its target) share
    one parsed tokenizer; a file that differs is parsed for itself."""
    copy, other = tmp_path / "copy", tmp_path / "other"
    copy.mkdir(), other.mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", copy / "tokenizer.json")
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    (think,) = [t for t in data["added_tokens"] if t["content"] == "<think>"]
    think["content"] = "<reason>"
    (other / "tokenizer.json").write_text(json.dumps(data))
    first, second, third = (Tokenizer.from_dir(d) for d in (tokenizer_dir, copy, other))
    assert second.backend is first.backend
    assert third.backend is not first.backend
    assert (first.token_id("<reason>"), third.token_id("<reason>")) == (None, 151667)
    assert Tokenizer.builtin_qwen3().backend is Tokenizer.builtin_qwen3().backend


def test_text_presets_fit_the_packaged_tokenizer():
    """chat --preset pairs every text preset with the packaged tokenizer: its (padded)
    vocabulary must hold every id the tokenizer has."""
    size = Tokenizer.builtin_qwen3().vocab_size
    for name, config in PRESETS.items():
        if config.vision is None:
            assert config.vocab_size >= size, name


def test_known_ids(tokenizer):
    assert tokenizer.encode("Hello") == [9707]
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tokenizer.stop_ids == [151643, 151645]
    assert (tokenizer.think_start_id, tokenizer.think_end_id) == (151667, 151668)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == unicodedata.normalize("NFC", text)


def test_same_ids_as_transformers(tokenizer, tokenizer_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in SAMPLES:
        assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False)


def stream(tokenizer, ids):
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_never_splits_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces = stream(tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_multibyte_character_spanning_tokens_waits(tokenizer):
    # Byte-level BPE splits rare characters into byte tokens: the first must yield nothing.
    ids = tokenizer.encode("𝔘")
    assert len(ids) > 1
    pieces = stream(tokenizer, ids)
    assert pieces[0] == ""
    assert "".join(pieces) == "𝔘"


def test_stream_decodes_a_short_window_only(tokenizer):
    """Decoding cost per token must not grow with the reply: the window stays small."""
    ids = tokenizer.encode(" ".join(SAMPLES) * 20)
    lengths = []
    original = tokenizer.decode

    def counting_decode(window, skip_special=False):
        lengths.append(len(window))
        return original(window, skip_special)

    tokenizer.decode = counting_decode
    try:
        text = "".join(stream(tokenizer, ids))
    finally:
        del tokenizer.decode
    assert text == original(ids)
    assert len(ids) > 1000
    assert max(lengths) <= 8


def test_special_tokens_are_not_shown(tokenizer):
    im_start = tokenizer.token_id("<|im_start|>")
    assert "".join(stream(tokenizer, [im_start, *tokenizer.encode("hi")])) == "hi"


def test_think_splitter_separates_and_trims(tokenizer):
    ids = tokenizer.encode("<think>\nLet me think.\n</think>\n\nThe answer is 4.")
    assert ids[0] == tokenizer.think_start_id
    splitter = ThinkSplitter(tokenizer)
    events = [splitter.push(i) for i in ids] + [splitter.flush()]
    thinking = "".join(t for t, is_thinking in events if is_thinking)
    answer = "".join(t for t, is_thinking in events if not is_thinking)
    assert thinking == "Let me think."
    assert answer == "The answer is 4."
    assert (splitter.thinking_text, splitter.answer_text) == (thinking, answer)


def test_empty_think_block_shows_nothing(tokenizer):
    ids = tokenizer.encode("<think>\n\n</think>\n\nHi there")
    splitter = ThinkSplitter(tokenizer)
    events = [splitter.push(i) for i in ids] + [splitter.flush()]
    assert [t for t, thinking in events if thinking and t] == []
    assert splitter.answer_text == "Hi there"


def test_prompt_ending_inside_think_starts_in_thinking(tokenizer):
    splitter = ThinkSplitter(tokenizer, in_thinking=True)
    ids = tokenizer.encode("pondering</think>\n\nDone")
    events = [splitter.push(i) for i in ids] + [splitter.flush()]
    assert splitter.thinking_text == "pondering"
    assert splitter.answer_text == "Done"
    assert events[0][1] is True
