"""Writing GGUF files from transformers models the way llama.cpp's convert_hf_to_gguf.py
does for Qwen3 (metadata keys, vocabulary and token types, tensor names), with gguf-py's
writer and quantizer. K-quant blocks, which gguf-py cannot quantize, are built by hand."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
}
# transformers holds each MoE layer's experts as two stacks; llama.cpp stores three.
EXPERT_STACKS = {
    "mlp.experts.gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"),
    "mlp.experts.down_proj": ("ffn_down_exps",),
}


def gguf_name(hf_name: str) -> str:
    name = hf_name.removeprefix("model.")
    if name.startswith("layers."):
        _, layer, rest = name.split(".", 2)
        module, _, kind = rest.rpartition(".")
        return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"
    return {
        "embed_tokens.weight": "token_embd.weight",
        "norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[name]


def hand_built_blocks(rows: int, cols: int, qtype: T, rng: np.random.Generator) -> np.ndarray:
    """Random but valid K-quant blocks: random codes and sub-scales, with super-block
    scales chosen so the weights come out with a spread like INIT_STD's."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    if qtype == T.Q4_K:  # f16 d, f16 dmin first
        raw[..., 0:2] = np.full((rows, cols // block, 1), 0.004, np.float16).view(np.uint8)
        raw[..., 2:4] = np.full((rows, cols // block, 1), 0.01, np.float16).view(np.uint8)
    elif qtype == T.Q6_K:  # int8 scales at 192..207, f16 d last
        raw[..., 208:210] = np.full((rows, cols // block, 1), 0.0015, np.float16).view(np.uint8)
    else:
        raise ValueError(qtype)
    return raw.reshape(rows, -1)


def vocab_metadata(tokenizer_dir: Path, vocab_size: int):
    """Tokens, token types and merges as the converter's _set_vocab_gpt2 writes them."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    reverse = {i: t for t, i in data["model"]["vocab"].items()}
    added = {t["id"]: t for t in data["added_tokens"]}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            content = added[i]["content"]
            looks_special = content.startswith("<|") and content.endswith("|>")
            special = added[i]["special"] or looks_special
            tokens.append(content)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    return tokens, types, merges


def write_gguf(
    model,
    tokenizer_dir: Path,
    path: Path,
    qtype: T,
    seed: int = 0,
    chat_template: str | None = None,
    expert_weights_norm: bool | None = None,
    table_qtype: T | None = None,
) -> dict[str, torch.Tensor]:
    """Write ``model`` as a GGUF file with 2-D weights (and 3-D expert stacks) in
    ``qtype``, the embedding table and output in ``table_qtype`` when given (as
    llama-quantize's --token-embedding-type and --output-tensor-type do); return the
    weights as the file holds them, dequantized (load them into the reference model to
    compare). The MoE router stays F32, as llama.cpp keeps it."""
    config = model.config
    moe = config.model_type == "qwen3_moe"
    writer = gguf.GGUFWriter(path, "qwen3moe" if moe else "qwen3")
    if moe:  # as convert_hf_to_gguf's Qwen2MoeModel writes them
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        if expert_weights_norm is not None:
            writer.add_expert_weights_norm(expert_weights_norm)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    tokens, types, merges = vocab_metadata(tokenizer_dir, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(151645)
    writer.add_pad_token_id(151643)
    writer.add_bos_token_id(151643)
    writer.add_add_bos_token(False)
    if chat_template is None:
        tokenizer_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
        chat_template = tokenizer_config["chat_template"]
    writer.add_chat_template(chat_template)

    rng = np.random.default_rng(seed)
    stored = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        stack = next((s for s in EXPERT_STACKS if name.endswith(s)), None)
        if stack is None:
            full_precision = array.ndim == 1 or name.endswith("mlp.gate.weight")
            table = name in ("model.embed_tokens.weight", "lm_head.weight")
            kind = T.F32 if full_precision else (table and table_qtype) or qtype
            stored[name] = add_tensor(writer, gguf_name(name), array, kind, rng)
            continue
        layer = name.split(".")[2]
        parts = np.split(array, len(EXPERT_STACKS[stack]), axis=1)
        stored[name] = torch.cat(
            [
                add_tensor(writer, f"blk.{layer}.{part_name}.weight", part, qtype, rng)
                for part_name, part in zip(EXPERT_STACKS[stack], parts, strict=True)
            ],
            dim=1,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def add_tensor(writer, name: str, array: np.ndarray, qtype: T, rng) -> torch.Tensor:
    """Add ``array`` in ``qtype``; return what the file holds, dequantized."""
    if qtype == T.F32:
        raw = array
    elif qtype in (T.Q4_K, T.Q6_K):
        rows = int(np.prod(array.shape[:-1]))
        raw = hand_built_blocks(rows, array.shape[-1], qtype, rng)
        raw = raw.reshape(*array.shape[:-1], -1)
    elif qtype == T.F16:
        raw = array.astype(np.float16)
    else:
        raw = gguf.quants.quantize(array, qtype)
    writer.add_tensor(name, raw, raw_dtype=qtype)
    if qtype in (T.F32, T.F16):
        return torch.from_numpy(raw.astype(np.float32))
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype)).reshape(array.shape)
