"""GGUF files (llama.cpp's format) through gguf-py's memory-mapped reader."""

from __future__ import annotations

import mmap
import struct
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

from ..config import ModelConfig
from ..distributed.split import Part
from ..errors import QwenChatError
from ..quant import QuantizedMatrix
from . import gguf_quants
from .gguf_split import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS, shard_paths, shard_pattern
from .names import KeyHeadPart, canonical_from_gguf, key_head_parts

# GGUF architecture -> ours (config.json's name).
SUPPORTED_ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "qwen35": "Qwen3_5ForCausalLM",
    "qwen35moe": "Qwen3_5MoeForCausalLM",
    "qwen3next": "Qwen3NextForCausalLM",
}
_MOE_ARCHITECTURES = ("qwen3moe", "qwen35moe", "qwen3next")
# llama.cpp's converter reorders qwen35 files' value heads to follow the key heads tiled.
_TILED_VALUE_HEADS = ("qwen35", "qwen35moe")
# The hybrid generation's Gated DeltaNet shape: our field -> the key after "<arch>.".
_SSM_KEYS = {
    "linear_conv_kernel_dim": "ssm.conv_kernel",
    "linear_key_head_dim": "ssm.state_size",
    "linear_num_key_heads": "ssm.group_count",
    "linear_num_value_heads": "ssm.time_step_rank",
}
# No real GGUF holds arrays or counts near these; a header that claims more is corrupt,
# and is refused before the reader walks (and allocates for) it.
_MAX_ARRAY_ITEMS = 1 << 24
_MAX_COUNT = 1 << 20
# Our config field -> the GGUF metadata key (after "<arch>.") that holds it.
_SHAPE_KEYS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
}
_MOE_KEYS = {
    "num_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length",
}


_U64 = struct.Struct("<Q")


class _StringArrayParts(Sequence):
    """A string array field's parts as gguf-py lists them (the leading parts, then each
    string's length and bytes), each numpy view made when it is read: making 600k views
    up front took half a second of opening a Qwen3 GGUF. ``starts`` holds each string's
    offset in ``data``, and the offset past the last."""

    def __init__(self, head: list, data: np.ndarray, starts: array):
        self._head, self._data, self._starts = head, data, starts

    def after(self, head: list) -> _StringArrayParts:
        return _StringArrayParts(head + self._head, self._data, self._starts)

    def strings(self) -> list[str]:
        """The array's strings, what ``contents()`` gives, decoded straight from the
        file's bytes."""
        view, starts = memoryview(self._data), self._starts
        return [str(view[starts[i] + 8 : starts[i + 1]], "utf-8") for i in range(len(starts) - 1)]

    def __len__(self) -> int:
        return len(self._head) + 2 * (len(self._starts) - 1)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index < len(self._head):
            return self._head[index]
        item, is_text = divmod(index - len(self._head), 2)
        start = self._starts[item]
        if is_text:
            return self._data[start + 8 : self._starts[item + 1]]
        return self._data[start : start + 8].view(np.uint64)


class _BoundedReader(GGUFReader):
    """gguf-py's reader, refusing every read past the end of the file and absurd counts,
    so that a truncated or corrupt header fails at once instead of hanging or exhausting
    memory; and reading through a plain ndarray view of the memory map, since slicing
    np.memmap itself costs microseconds per call and a Qwen3 header (150k vocabulary
    strings) needs close to a million of them."""

    def _get(self, offset, dtype, count=1, override_order=None):
        data = self.__dict__.get("_plain")
        if data is None:
            data = self._plain = self.data.view(np.ndarray)
        count = int(count)
        end = int(offset) + np.dtype(dtype).itemsize * count
        if count < 0 or end > len(data):
            raise ValueError(f"header runs past the end of the file (at byte {offset})")
        array = data[offset:end].view(dtype=dtype)
        order = self.byte_order if override_order is None else override_order
        return array.view(array.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs, raw_type):
        if GGUFValueType(raw_type) == GGUFValueType.ARRAY:
            item_type = int(self._get(orig_offs, np.uint32)[0])
            length = int(self._get(orig_offs + 4, np.uint64)[0])
            if length > min(_MAX_ARRAY_ITEMS, len(self.data) - orig_offs):
                raise ValueError(f"an array claims {length} items")
            if item_type == GGUFValueType.STRING and self.byte_order == "I":
                return self._string_array_parts(orig_offs, length)
            scalar = self.gguf_scalar_to_np.get(GGUFValueType(item_type))
            if scalar is not None:
                return self._scalar_array_parts(orig_offs, length, item_type, scalar)
        return super()._get_field_parts(orig_offs, raw_type)

    def _scalar_array_parts(self, orig_offs, length, item_type, scalar):
        """Like gguf-py's parts for a numeric array (one part per item), without its
        per-item recursion (the vocabulary's token types are 150k of them)."""
        values = self._get(orig_offs + 12, scalar, length)
        parts = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
        parts += [values[i : i + 1] for i in range(length)]
        types = [GGUFValueType.ARRAY, GGUFValueType(item_type)]
        return 12 + values.nbytes, parts, list(range(2, length + 2)), types

    def _string_array_parts(self, orig_offs, length):
        """The parts gguf-py lists for an array of strings, without its per-item
        recursion and without a view per part until one is read (_StringArrayParts):
        the vocabulary and merges are 300k strings, and only a GGUF without a
        tokenizer.json beside it reads them."""
        data = self._plain
        head = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
        starts = array("q")
        offs, size, length_at, append = orig_offs + 12, len(data), _U64.unpack_from, starts.append
        try:
            for _ in range(length):
                append(offs)
                offs += 8 + length_at(data, offs)[0]
        except struct.error:  # a length read past the end
            offs = size + 1
        if offs > size:  # checked once: a string past the end leaves offs past it
            raise ValueError(f"a string runs past the end of the file (at byte {starts[-1]})")
        append(offs)
        types = [GGUFValueType.ARRAY, GGUFValueType.STRING]
        parts = _StringArrayParts(head, data, starts)
        return offs - orig_offs, parts, list(range(3, 2 * length + 2, 2)), types

    def _build_fields(self, offs, count):
        """gguf-py's loop over the metadata, keeping a string array's parts lazy."""
        if int(count) > _MAX_COUNT:
            raise ValueError(f"the header claims {int(count)} metadata entries")
        for _ in range(count):
            orig_offs = offs
            key_length, key = self._get_str(offs)
            offs += int(key_length.nbytes + key.nbytes)
            raw_type = self._get(offs, np.uint32)
            offs += int(raw_type.nbytes)
            head = [key_length, key, raw_type]
            size, parts, indices, types = self._get_field_parts(offs, raw_type[0])
            parts = parts.after(head) if isinstance(parts, _StringArrayParts) else head + parts
            name = str(bytes(key), encoding="utf-8")
            indices = [i + len(head) for i in indices]
            self._push_field(ReaderField(orig_offs, name, parts, indices, types), skip_sum=True)
            offs += size
        return offs

    def _build_tensor_info(self, offs, count):
        if int(count) > _MAX_COUNT:
            raise ValueError(f"the header claims {int(count)} tensors")
        return super()._build_tensor_info(offs, count)


def open_gguf(path: Path) -> GGUFReader:
    try:
        return _BoundedReader(path)
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as e:
        raise QwenChatError(f"{path}: not a valid GGUF file ({e})") from None
    except OSError as e:
        raise QwenChatError(f"{path}: cannot read ({e.strerror or e})") from None


def open_gguf_files(path: Path) -> dict[Path, GGUFReader]:
    """The reader of ``path``, or of every file of the split model it is one of
    (gguf_split.py), the first, which holds the metadata, first."""
    reader = open_gguf(path)
    count = metadata(reader, SPLIT_COUNT, 0)
    if not isinstance(count, int) or count <= 1:
        return {path: reader}
    paths = shard_paths(path)
    if len(paths) != count:
        raise QwenChatError(
            f"{path}: one of the {count} files of a split model, but not named "
            f"NAME-0000i-of-{count:05d}.gguf as gguf-split names them; give the files "
            "their original names"
        )
    files = {}
    for number, shard in enumerate(paths):
        if not shard.is_file():
            raise QwenChatError(
                f"{shard}: missing; {path.name} is one of the {count} files of a split "
                f"model: put them all in one folder (download: --include "
                f"'{shard_pattern(path)}')"
            )
        files[shard] = reader if shard == path else open_gguf(shard)
        found = (metadata(files[shard], SPLIT_NO), metadata(files[shard], SPLIT_COUNT))
        if found != (number, count):
            raise QwenChatError(
                f"{shard}: its metadata says file {_ordinal(found[0])} of {found[1]}, "
                f"not {number + 1} of {count}: not a file of {path.name}'s split model"
            )
    tensors = metadata(next(iter(files.values())), SPLIT_TENSORS)
    held = sum(len(r.tensors) for r in files.values())
    if tensors is not None and held != tensors:
        raise QwenChatError(
            f"{paths[0]}: the split model's {count} files hold {held} tensors, "
            f"not the {tensors} its metadata (split.tensors.count) says"
        )
    return files


def _ordinal(split_no) -> str:
    return "?" if split_no is None else str(int(split_no) + 1)


def release_vocabulary(reader: GGUFReader) -> None:
    """Drop the vocabulary's fields once the tokenizer is built (or read from a
    tokenizer.json instead): the reader keeps two array views per string, ~90 MiB for
    Qwen3's 151k tokens and 151k merges, which nothing reads again."""
    for key in ("tokens", "token_type", "merges", "scores"):
        reader.fields.pop(f"tokenizer.ggml.{key}", None)


def metadata(reader: GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    if field is None:
        return default
    if isinstance(field.parts, _StringArrayParts):
        return field.parts.strings()
    return field.contents()


# llama.cpp's converter copies generation_config.json's sampling values into these keys,
# and llama.cpp takes them as its defaults; ours are SamplingSettings' names.
_SAMPLING_KEYS = {
    "temperature": "general.sampling.temp",
    "top_k": "general.sampling.top_k",
    "top_p": "general.sampling.top_p",
    "min_p": "general.sampling.min_p",
    "repetition_penalty": "general.sampling.penalty_repeat",
}


def sampling_defaults_from_gguf(reader: GGUFReader) -> dict:
    """The sampling values the file's metadata gives (as generation_config.json's);
    float32 values to six digits, as they were written (0.95, not 0.949999988)."""
    found = {name: metadata(reader, key) for name, key in _SAMPLING_KEYS.items()}
    return {
        name: float(f"{value:.6g}") if isinstance(value, float) else value
        for name, value in found.items()
        if value is not None
    }


def config_from_gguf(files: dict[Path, GGUFReader]) -> ModelConfig:
    """From the first file's metadata and every file's tensors (open_gguf_files)."""
    path, reader = next(iter(files.items()))
    tensors = [t for r in files.values() for t in r.tensors]
    arch = metadata(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise QwenChatError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"expected one of {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key, default=None):
        return metadata(reader, f"{arch}.{key}", default)

    rope_type = get("rope.scaling.type")
    rope_scaling = None
    if rope_type and rope_type != "none":
        rope_scaling = {
            "rope_type": rope_type,
            "factor": get("rope.scaling.factor", 1.0),
            "original_max_position_embeddings": get("rope.scaling.original_context_length"),
        }
    names = {t.name for t in tensors}
    embed = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise QwenChatError(f"{path}: tensor token_embd.weight is missing")
    shape = {attr: get(key) for attr, key in _SHAPE_KEYS.items()}
    moe = {}
    if arch in _MOE_ARCHITECTURES:
        moe = {attr: get(key) for attr, key in _MOE_KEYS.items()}
        # A layer without a router is a dense one; llama.cpp's converter writes none,
        # but a file may, and then its feed_forward_length is the dense width.
        moe["mlp_only_layers"] = [
            i
            for i in range(shape["num_hidden_layers"] or 0)
            if f"blk.{i}.ffn_gate_inp.weight" not in names
        ]
        # llama.cpp renormalises Qwen3-MoE's top-k weights unless the file says otherwise.
        moe["norm_topk_prob"] = bool(get("expert_weights_norm", True))
        if not moe["mlp_only_layers"] and shape["intermediate_size"] is None:
            shape["intermediate_size"] = 0
    hybrid = _hybrid_fields(get, arch, shape) if arch in HYBRID_GGUF else {}
    read = {**shape, **moe, **hybrid}
    keys = {**_SHAPE_KEYS, **_MOE_KEYS, **_SSM_KEYS, "linear_value_head_dim": "ssm.inner_size"}
    missing = [keys[attr] for attr in keys if attr in read and read[attr] is None]
    if missing:
        raise QwenChatError(f"{path}: metadata {arch}.{missing[0]} is missing")
    config = ModelConfig(
        vocab_size=int(embed.shape[1]),
        **shape,
        **moe,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=float(get("rope.freq_base", 1_000_000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=get("context_length", 40960),
        tie_word_embeddings="output.weight" not in names,
        architecture=SUPPORTED_ARCHITECTURES[arch],
        **hybrid,
    )
    config.validate()
    return config


HYBRID_GGUF = ("qwen35", "qwen35moe", "qwen3next")


def _hybrid_fields(get, arch: str, shape: dict) -> dict:
    """The hybrid generation's fields from a file's metadata, as llama.cpp reads them:
    the layer kinds from attention.recurrent_layers if written, else every
    full_attention_interval-th layer full attention; the rotated share of a head from
    rope.dimension_count; the shared expert's width."""
    fields = {attr: get(key) for attr, key in _SSM_KEYS.items()}
    layers = shape["num_hidden_layers"] or 0
    recurrent = get("attention.recurrent_layers")
    if recurrent is None:
        interval = get("full_attention_interval", 4)
        recurrent = [(i + 1) % interval != 0 for i in range(layers)]
    fields["layer_types"] = [
        "linear_attention" if r else "full_attention" for r in list(recurrent)[:layers]
    ]
    inner, heads = get("ssm.inner_size"), fields["linear_num_value_heads"]
    fields["linear_value_head_dim"] = inner // heads if inner and heads else None
    rotated, head_dim = get("rope.dimension_count"), shape["head_dim"]
    fields["partial_rotary_factor"] = rotated / head_dim if rotated and head_dim else 0.25
    fields["shared_expert_intermediate_size"] = get("expert_shared_feed_forward_length", 0)
    fields["linear_value_heads_tiled"] = arch in _TILED_VALUE_HEADS
    return fields


class GGUFSource:
    """Canonical tensor name -> float tensor, or QuantizedMatrix for quantized blocks."""

    def __init__(self, files: dict[Path, GGUFReader], config: ModelConfig | None = None):
        """``files``: open_gguf_files'. ``config``: the model's, where a qwen3next file's
        ssm_ba holds two of our tensors (names.key_head_parts)."""
        self.path, self.reader = next(iter(files.items()))  # the metadata's
        self._tensors = {}
        self._file: dict[str, tuple[Path, GGUFReader]] = {}  # each tensor's
        # Canonical part -> (the tensor holding it, how to take it).
        self._key_head_part: dict[str, tuple[str, KeyHeadPart]] = {}
        for path, reader in files.items():
            for tensor in reader.tensors:
                self._add(tensor, path, reader, config)

    def _add(self, tensor, path: Path, reader: GGUFReader, config: ModelConfig | None) -> None:
        name = canonical_from_gguf(tensor.name)
        if name is None:
            raise QwenChatError(f"{path}: unexpected tensor {tensor.name}")
        if name in self._tensors:
            raise QwenChatError(f"{path}: tensor {tensor.name} is also in {self.file_of(name)}")
        for part, take in (key_head_parts(name, config) if config else {}).items():
            self._key_head_part[part] = (name, take)
        if not gguf_quants.supported(tensor.tensor_type):
            raise QwenChatError(
                f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, "
                "which is not supported"
            )
        block = GGML_QUANT_SIZES[tensor.tensor_type][0]
        if int(tensor.shape[0]) % block:
            raise QwenChatError(
                f"{path}: tensor {tensor.name} has rows of {int(tensor.shape[0])} values, "
                f"not a multiple of the {tensor.tensor_type.name} block size {block}"
            )
        self._tensors[name] = tensor
        self._file[name] = (path, reader)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        # GGUF lists dimensions innermost first; torch order is the reverse.
        shapes = {n: tuple(int(d) for d in reversed(t.shape)) for n, t in self._tensors.items()}
        for part, (whole, take) in self._key_head_part.items():
            shapes[part] = (take.rows, int(self._tensors[whole].shape[0]))
        for whole, _ in self._key_head_part.values():
            shapes.pop(whole, None)
        return shapes

    def file_of(self, name: str) -> str:
        return self._file[name][0].name

    def quant_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self._tensors.values():
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    def requantized_types(self) -> dict[str, int]:
        """The file's block types with no exact form here (held as int8 per 32, or int4
        under --quantize int4), with their tensor counts."""
        counts = self.quant_types()
        return {t: n for t, n in counts.items() if gguf_quants.requantized(GGMLQuantizationType[t])}

    def read(
        self,
        name: str,
        dtype: torch.dtype,
        kept: bool = False,
        part: Part | None = None,
        layout: tuple[int, int] | None = None,
    ) -> torch.Tensor | QuantizedMatrix:
        """Always decoded into memory of its own (in 2 MiB pages where ``kept``, see
        gguf_quants.decode): the file's pages are released here.
        ``part``: that share, cut from the stored blocks before decoding (a range of the
        experts decodes only those), or once decoded where it would cut a block.
        ``layout``: for a block type with no exact form here (gguf_quants.requantized_layout)."""
        if part is not None and name in self._key_head_part:
            return part.take(self.read(name, dtype, layout=layout))
        if name in self._key_head_part:  # some rows of another tensor, as stored
            whole, take = self._key_head_part[name]
            held = self.read(whole, dtype, layout=layout)
            index = take.row_index()
            return held.take_rows(index) if isinstance(held, QuantizedMatrix) else held[index]
        tensor = self._tensors[name]
        shape = tuple(int(d) for d in reversed(tensor.shape))
        try:
            qtype = GGMLQuantizationType(tensor.tensor_type)
            raw = tensor.data
            cut = None if part is None else gguf_quants.share(raw, qtype, shape, part)
            if cut is not None:
                raw, shape = cut
            decoded = gguf_quants.decode(raw, qtype, shape, dtype, layout, kept)
            return decoded if part is None or cut is not None else part.take(decoded)
        except (ValueError, IndexError) as e:
            path = self._file[name][0]
            raise QwenChatError(f"{path}: cannot read tensor {tensor.name} ({e})") from None
        finally:
            self._release(tensor, self._file[name][1])

    @staticmethod
    def _release(tensor, reader: GGUFReader) -> None:
        """Drop the file pages of a tensor already copied out: without this the whole
        file stays resident beside the weights until loading ends (twice the memory)."""
        mapping = getattr(reader.data, "_mmap", None)
        if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = tensor.data_offset - tensor.data_offset % mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)
