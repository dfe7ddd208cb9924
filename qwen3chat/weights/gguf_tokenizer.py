"""A `tokenizers` tokenizer rebuilt from GGUF metadata (``tokenizer.ggml.*``).

llama.cpp's converter stores the BPE vocabulary, merges and token types of the model's
tokenizer.json plus the name of its pre-tokenizer; putting those back into the same
`tokenizers` pipeline gives a tokenizer that encodes exactly as tokenizer.json does.
"""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader, TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ..errors import QwenChatError
from ..tokenizer import Tokenizer, digest, shared_backend
from .gguf import metadata

# The split regex of each supported `tokenizer.ggml.pre` (llama.cpp's names).
PRE_TOKENIZER_REGEX = {
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}


def tokenizer_from_gguf(reader: GGUFReader, path: Path) -> Tokenizer:
    model = metadata(reader, "tokenizer.ggml.model")
    pre = metadata(reader, "tokenizer.ggml.pre", "qwen2")
    if model != "gpt2" or pre not in PRE_TOKENIZER_REGEX:
        raise QwenChatError(
            f"{path}: tokenizer {model!r} with pre-tokenizer {pre!r} is not supported; "
            "put the model's tokenizer.json beside the file"
        )
    tokens = metadata(reader, "tokenizer.ggml.tokens") or []
    types = metadata(reader, "tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    merges = metadata(reader, "tokenizer.ggml.merges") or []
    if not tokens or len(types) != len(tokens):
        raise QwenChatError(f"{path}: tokenizer metadata is incomplete")
    built_from = digest(
        f"{pre} {len(tokens)} {len(merges)}".encode(),
        "\0".join(tokens).encode(),
        bytes(int(kind) for kind in types),
        "\0".join(merges).encode(),
    )
    backend = shared_backend(built_from, lambda: _bpe(tokens, types, merges, pre, path))

    def token(key):
        index = metadata(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and index < len(tokens) else None

    special = {"bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding")}
    template = metadata(reader, "tokenizer.chat_template")
    eos = metadata(reader, "tokenizer.ggml.eos_token_id")
    eot = metadata(reader, "tokenizer.ggml.eot_token_id")
    return Tokenizer(backend, template, special, [i for i in (eos, eot) if i is not None])


def _bpe(tokens: list[str], types: list, merges: list[str], pre: str, path: Path) -> HFTokenizer:
    """tokenizer.json's pipeline over the file's vocabulary, merges and added tokens."""
    vocab, added = {}, []
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == TokenType.UNUSED:  # the converter's [PAD] rows up to the embedding size
            continue
        if kind in (TokenType.CONTROL, TokenType.USER_DEFINED):
            added.append((i, token, kind == TokenType.CONTROL))
        else:
            vocab[token] = i
    backend = HFTokenizer(
        models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    for i, token, special in sorted(added):
        if backend.get_vocab_size(with_added_tokens=True) != i:
            raise QwenChatError(f"{path}: added token {token!r} is out of order")
        backend.add_tokens([AddedToken(token, special=special, normalized=False)])
    return backend
