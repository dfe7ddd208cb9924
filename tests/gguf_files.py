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


def add_vocabulary(writer, tokenizer_dir: Path, vocab_size: int) -> None:
    """The tokenizer's metadata as the converter writes Qwen's (gpt2 model, qwen2
    pre-tokenizer, <|im_end|> as the end of text)."""
    tokens, types, merges = vocab_metadata(tokenizer_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(151645)


def write_gguf(
    model,
    tokenizer_dir: Path,
    path: Path,
    qtype: T,
    seed: int = 0,
    chat_template: str | None = None,
    expert_weights_norm: bool | None = None,
    table_qtype: T | None = None,
    sampling: dict | None = None,
    split_max_tensors: int = 0,
    small_first_shard: bool = False,
) -> dict[str, torch.Tensor]:
    """Write ``model`` as a GGUF file with 2-D weights (and 3-D expert stacks) in
    ``qtype``, the embedding table and output in ``table_qtype`` when given (as
    llama-quantize's --token-embedding-type and --output-tensor-type do), and
    ``sampling`` values ({"temp": 0.6, ...}) as the converter copies them from
    generation_config.json into general.sampling.* keys; return the
    weights as the file holds them, dequantized (load them into the reference model to
    compare). The MoE router stays F32, as llama.cpp keeps it. ``split_max_tensors``:
    a model split into files of at most that many tensors, PATH-00001-of-0000N.gguf on,
    as the converter's --split-max-tensors and gguf-split write them (``small_first_shard``:
    the metadata alone in the first, gguf-split's --no-tensor-first-split)."""
    config = model.config
    moe = config.model_type == "qwen3_moe"
    writer = gguf.GGUFWriter(
        path,
        "qwen3moe" if moe else "qwen3",
        split_max_tensors=split_max_tensors,
        small_first_shard=small_first_shard,
    )
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
    add_vocabulary(writer, tokenizer_dir, config.vocab_size)
    writer.add_pad_token_id(151643)
    writer.add_bos_token_id(151643)
    writer.add_add_bos_token(False)
    if chat_template is None:
        tokenizer_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
        chat_template = tokenizer_config["chat_template"]
    writer.add_chat_template(chat_template)
    for name, value in (sampling or {}).items():
        getattr(writer, f"add_sampling_{name}")(value)

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


# The hybrid generation (llama.cpp's Qwen3NextModel and its Qwen3.5 subclasses in
# convert_hf_to_gguf.py): more names, and tensors stored converted.
HYBRID_ARCHS = {
    "qwen3_5_text": "qwen35",
    "qwen3_5_moe_text": "qwen35moe",
    "qwen3_next": "qwen3next",
}
HYBRID_LAYER_NAMES = {
    **LAYER_NAMES,
    "post_attention_layernorm": "post_attention_norm",
    "linear_attn.in_proj_qkv": "attn_qkv",
    "linear_attn.in_proj_z": "attn_gate",
    "linear_attn.in_proj_b": "ssm_beta",
    "linear_attn.in_proj_a": "ssm_alpha",
    "linear_attn.in_proj_ba": "ssm_ba",
    "linear_attn.conv1d": "ssm_conv1d",
    "linear_attn.norm": "ssm_norm",
    "linear_attn.out_proj": "ssm_out",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
}


def _v_heads(tensor: torch.Tensor, dim: int, k_heads: int, per_k: int, width: int, tiled: bool):
    """Value heads along ``dim`` from Hugging Face's order (grouped by key head) to the
    tiled one qwen35 files hold, or back (``tiled`` False)."""
    shape = list(tensor.shape)
    dim %= len(shape)
    split = (k_heads, per_k) if tiled else (per_k, k_heads)
    tensor = tensor.reshape(*shape[:dim], *split, width, *shape[dim + 1 :])
    return tensor.transpose(dim, dim + 1).reshape(shape)


def write_hybrid_gguf(
    model, tokenizer_dir: Path, path: Path, qtype: T, seed: int = 0, random_weights=False
):
    """``model`` (Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM or Qwen3NextForCausalLM) as
    llama.cpp's converter writes it: zero-centred norms plus one, A_log as -exp(A_log)
    (``ssm_a``), dt_bias as ``ssm_dt.bias``, the conv squeezed and F32; for qwen35 the value
    heads reordered to follow the key heads tiled; for qwen3next in_proj_qkvz regrouped
    into attn_qkv and attn_gate, in_proj_ba kept as it is (ssm_ba). Returns the weights as
    the file holds them, dequantized, in the model's own names and layout.

    ``random_weights``: ``model`` may be on the meta device (a shape too large to hold):
    each tensor is written as random values or blocks of its type, one at a time, and
    nothing is returned (benchmarks' files)."""
    config = model.config
    arch = HYBRID_ARCHS[config.model_type]
    moe = arch != "qwen35"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    if getattr(config, "intermediate_size", None) and not moe:
        writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    if moe:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    nk, nv = config.linear_num_key_heads, config.linear_num_value_heads
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    writer.add_ssm_conv_kernel(config.linear_conv_kernel_dim)
    writer.add_ssm_state_size(dk)
    writer.add_ssm_group_count(nk)
    writer.add_ssm_time_step_rank(nv)
    writer.add_ssm_inner_size(dv * nv)
    interval = config.layer_types.index("full_attention") + 1
    writer.add_full_attention_interval(interval)
    writer.add_rope_dimension_count(int(config.head_dim * rope["partial_rotary_factor"]))
    if arch != "qwen3next":
        writer.add_rope_dimension_sections([11, 11, 10, 0])
    add_vocabulary(writer, tokenizer_dir, config.vocab_size)
    writer.add_chat_template(
        json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"]
    )

    tiled = arch != "qwen3next" and nk != nv
    per_k = nv // nk
    rng = np.random.default_rng(seed)
    stored = {}
    planned: list[tuple[str, tuple[int, ...], T]] = []

    def put(gguf_name: str, array: torch.Tensor, f32: bool = False) -> torch.Tensor:
        kind = T.F32 if f32 or array.dim() == 1 else qtype
        if random_weights:
            planned.append((gguf_name, tuple(array.shape), kind))
            writer.add_tensor_info(
                gguf_name, array.shape, np.float32, _nbytes(array.shape, kind), raw_dtype=kind
            )
            return torch.empty(array.shape, device="meta")
        return add_tensor(writer, gguf_name, array.float().contiguous().numpy(), kind, rng)

    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        short = name.removeprefix("model.")
        if not short.startswith("layers."):
            held = tensor + 1 if short == "norm.weight" else tensor
            out = put(gguf_name(name), held, f32=short == "norm.weight")
            stored[name] = out - 1 if short == "norm.weight" else out
            continue
        _, layer, rest = short.split(".", 2)
        module, _, kind = rest.rpartition(".")
        blk = f"blk.{layer}"
        stack = next((s for s in EXPERT_STACKS if rest == s), None)
        if stack is not None:
            parts = tensor.chunk(len(EXPERT_STACKS[stack]), dim=1)
            stored[name] = torch.cat(
                [
                    put(f"{blk}.{n}.weight", p)
                    for n, p in zip(EXPERT_STACKS[stack], parts, strict=True)
                ],
                dim=1,
            )
            continue
        if tiled and rest.startswith("linear_attn."):
            v = lambda t, dim, width, back=False: _v_heads(t, dim, nk, per_k, width, not back)  # noqa: E731
        else:
            v = None
        if rest == "linear_attn.A_log":
            held = -tensor.float().exp()
            held = v(held[:, None], 0, 1)[:, 0] if v else held
            out = put(f"{blk}.ssm_a", held)
            out = v(out[:, None], 0, 1, back=True)[:, 0] if v else out
            stored[name] = (-out).log()
        elif rest == "linear_attn.dt_bias":
            held = v(tensor[:, None], 0, 1)[:, 0] if v else tensor
            out = put(f"{blk}.ssm_dt.bias", held)
            stored[name] = v(out[:, None], 0, 1, back=True)[:, 0] if v else out
        elif rest == "linear_attn.conv1d.weight":
            held = tensor.squeeze(1)
            qk = 2 * nk * dk
            if v:
                held = torch.cat((held[:qk], v(held[qk:], 0, dv)))
            out = put(f"{blk}.ssm_conv1d.weight", held, f32=True)
            if v:
                out = torch.cat((out[:qk], v(out[qk:], 0, dv, back=True)))
            stored[name] = out[:, None]
        elif rest == "linear_attn.in_proj_qkvz.weight":  # qwen3next: regrouped
            widths = [dk, dk, per_k * dv, per_k * dv]
            q, k, vv, z = tensor.unflatten(0, (nk, -1)).split(widths, dim=1)
            qkv = torch.cat([t.flatten(0, 1) for t in (q, k, vv)])
            out_qkv = put(f"{blk}.attn_qkv.weight", qkv)
            out_z = put(f"{blk}.attn_gate.weight", z.flatten(0, 1))
            q, k, vv = out_qkv.split([nk * dk, nk * dk, nv * dv])
            groups = [t.unflatten(0, (nk, -1)) for t in (q, k, vv, out_z)]
            stored[name] = torch.cat(groups, dim=1).flatten(0, 1)
        elif rest == "linear_attn.in_proj_qkv.weight" and v:
            qk = 2 * nk * dk
            out = put(f"{blk}.attn_qkv.weight", torch.cat((tensor[:qk], v(tensor[qk:], 0, dv))))
            stored[name] = torch.cat((out[:qk], v(out[qk:], 0, dv, back=True)))
        elif (
            rest
            in (
                "linear_attn.in_proj_z.weight",
                "linear_attn.in_proj_b.weight",
                "linear_attn.in_proj_a.weight",
            )
            and v
        ):
            width = dv if rest.endswith("z.weight") else 1
            out = put(f"{blk}.{HYBRID_LAYER_NAMES[module]}.weight", v(tensor, 0, width))
            stored[name] = v(out, 0, width, back=True)
        elif rest == "linear_attn.out_proj.weight" and v:
            out = put(f"{blk}.ssm_out.weight", v(tensor, 1, dv))
            stored[name] = v(out, 1, dv, back=True)
        else:
            zero_centred = float(
                kind == "weight" and module.endswith("norm") and module != "linear_attn.norm"
            )
            f32 = module.endswith(("norm", "mlp.gate", "shared_expert_gate"))
            out = put(f"{blk}.{HYBRID_LAYER_NAMES[module]}.{kind}", tensor + zero_centred, f32=f32)
            stored[name] = out - zero_centred
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    if not random_weights:
        writer.write_tensors_to_file()
        writer.close()
        return stored
    writer.write_ti_data_to_file()
    for tensor_name, shape, kind in planned:
        writer.write_tensor_data(_random_data(tensor_name, shape, kind, rng))
    writer.close()
    return None


def _nbytes(shape, kind: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return int(np.prod(shape)) // block * size


def _random_data(tensor_name: str, shape, kind: T, rng) -> np.ndarray:
    """Random values of a tensor of a benchmark's file: norms one, Gated DeltaNet's decay
    rate negative and its time-step bias one, matrices with a spread like a trained
    model's (quantized blocks built directly: random codes, fixed scales)."""
    if kind == T.F32:
        if "norm" in tensor_name or tensor_name.endswith("ssm_dt.bias"):
            return np.ones(shape, np.float32)
        if tensor_name.endswith("ssm_a"):
            return -rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0, 0.02, shape).astype(np.float32)
    if kind == T.F16:
        return rng.normal(0, 0.02, shape).astype(np.float16)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rows = int(np.prod(shape[:-1]))
    raw = rng.integers(0, 256, (rows, shape[-1] // block, size), dtype=np.uint8)
    scale = {T.Q8_0: 3e-4, T.Q4_0: 5e-3}[kind]
    raw[..., 0:2] = np.full((rows, shape[-1] // block, 1), scale, np.float16).view(np.uint8)
    return raw.reshape(*shape[:-1], -1)
