"""The GGUF header reader on corrupt input: clean errors only, fast, no large allocation."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3chat.errors import QwenChatError
from qwen3chat.weights.gguf import metadata, open_gguf


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "small.gguf"
    writer = gguf.GGUFWriter(path, "qwen3")
    writer.add_block_count(1)
    writer.add_token_list(["a", "b", "c"])
    writer.add_token_types([1, 1, 3])
    writer.add_rope_freq_base(1e6)
    writer.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    writer.add_tensor(
        "blk.0.ffn_down.weight",
        gguf.quants.quantize(np.ones((2, 32), np.float32), gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0,
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_fields_match_gguf_py(tmp_path):
    """Our reader lists the same fields as gguf-py's, part for part (string arrays make
    their parts when read), and gives the same contents."""
    path = tmp_path / "fields.gguf"
    writer = gguf.GGUFWriter(path, "qwen3")
    writer.add_token_list(["a", "", "ĠĠ", "日本", "<|im_end|>"])
    writer.add_token_merges(["Ġ Ġ", "a b"])
    writer.add_token_types([1, 1, 3, 1, 3])
    writer.add_string("general.name", "tiny")
    writer.add_rope_freq_base(1e6)
    writer.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = open_gguf(path)
    ours, theirs = reader.fields, gguf.GGUFReader(path).fields
    assert list(ours) == list(theirs)
    for name, field in theirs.items():
        mine = ours[name]
        assert (mine.offset, mine.data, mine.types) == (field.offset, field.data, field.types)
        assert len(mine.parts) == len(field.parts)
        for index in range(-len(field.parts), len(field.parts)):
            assert mine.parts[index].tobytes() == field.parts[index].tobytes()
            assert mine.parts[index].dtype == field.parts[index].dtype
        assert mine.contents() == field.contents() == metadata(reader, name)
    assert ours["tokenizer.ggml.tokens"].contents(3) == "日本"


def try_open(tmp_path, data: bytes) -> None:
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(data)
    try:
        reader = open_gguf(path)
    except QwenChatError as e:
        assert str(e).startswith(str(path))
        return
    for tensor in reader.tensors:  # a header that parses must describe in-file tensors
        assert tensor.data.nbytes <= len(data)


FUZZ = settings(
    max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(data=st.data())
def test_random_byte_corruption(tmp_path, small_gguf, data):
    corrupted = bytearray(small_gguf)
    for _ in range(data.draw(st.integers(1, 8))):
        corrupted[data.draw(st.integers(0, len(corrupted) - 1))] = data.draw(st.integers(0, 255))
    try_open(tmp_path, bytes(corrupted))


@FUZZ
@given(cut=st.integers(0, 4096))
def test_truncation(tmp_path, small_gguf, cut):
    try_open(tmp_path, small_gguf[: min(cut, len(small_gguf))])


@FUZZ
@given(offset=st.integers(8, 400), value=st.sampled_from([2**32 - 1, 2**40, 2**62, 2**64 - 1]))
def test_absurd_counts_and_lengths(tmp_path, small_gguf, offset, value):
    """Huge 64-bit counts or lengths anywhere in the header: refused, not allocated."""
    corrupted = bytearray(small_gguf)
    corrupted[offset : offset + 8] = struct.pack("<Q", value)
    try_open(tmp_path, bytes(corrupted[: len(small_gguf)]))
