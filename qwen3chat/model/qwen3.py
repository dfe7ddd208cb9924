"""The Qwen3 decoder (dense and MoE): embedding, N pre-norm blocks, final norm, LM head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..config import ModelConfig
from ..kv_cache import KVCache
from .layers import (
    MLP,
    Attention,
    Embedding,
    Linear,
    RMSNorm,
    linear,
    mrope_axes,
    mrope_rows,
    native_matrix,
    rope_tables,
)
from .moe import SparseMoE


@dataclass
class VisualTokens:
    """The image and video tokens of one forward pass (Qwen3-VL).

    ``mask [T]`` marks them among the pass's tokens; their input embeddings are replaced
    by ``embeds [n, hidden]`` (the vision tower's merged tokens, in order), and after
    decoder layer ``i`` their hidden states get ``deepstack[i] [n, hidden]`` added.
    """

    mask: torch.Tensor
    embeds: torch.Tensor
    deepstack: list[torch.Tensor]


_UNBUILT = object()


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = SparseMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self._native_weights = _UNBUILT

    def forward(self, x, cos, sin, mask, cache, start):
        if x.shape[1] == 1 and cache is not None:
            # Qwen3Model runs all its layers' decode steps in one native call; a layer
            # called on its own (bench --ops, a model with a layer the kernels do not
            # cover) runs its own the same way.
            native = kernels.native(x)
            weights = self.native_weights(native) if native is not None else None
            if weights is not None:
                return native.decode_layers(x, [weights], cos, sin, cache.k, cache.v, start)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))

    def native_weights(self, native):
        """This layer's weights for the native decode step (kernels/decode_layer.cpp),
        built on first use; None where the kernels do not cover one of its matrices."""
        if self._native_weights is _UNBUILT:
            self._native_weights = self._build_native_weights(native)
        return self._native_weights

    def _build_native_weights(self, native):
        attn, mlp = self.self_attn, self.mlp
        if attn.head_dim % 16 or attn.head_dim > 512:
            return None
        w = native.DecoderLayerWeights()
        w.layer, w.eps = attn.layer_idx, self.input_layernorm.eps
        w.num_heads, w.num_kv_heads = attn.num_heads, attn.num_kv_heads
        w.input_norm, w.post_norm = (
            self.input_layernorm.weight,
            self.post_attention_layernorm.weight,
        )
        w.q_norm, w.k_norm = attn.q_norm.weight, attn.k_norm.weight
        matrices = {"qkv": attn.qkv_proj.weight, "o_proj": attn.o_proj.weight}
        if isinstance(mlp, SparseMoE):
            matrices["router"] = mlp.gate.weight
            w.top_k, w.norm_topk_prob = mlp.top_k, mlp.norm_topk_prob
            experts = {
                "expert_gate_up": mlp.experts.gate_up_proj.weight,
                "expert_down": mlp.experts.down_proj.weight,
            }
            for name, stack in experts.items():
                per_expert = [native_matrix(native, stack[e]) for e in range(stack.shape[0])]
                if None in per_expert:
                    return None
                setattr(w, name, per_expert)
        else:
            matrices.update(gate_up=mlp.gate_up_proj.weight, down=mlp.down_proj.weight)
        for name, weight in matrices.items():
            matrix = native_matrix(native, weight)
            if matrix is None:
                return None
            setattr(w, name, matrix)
        return w

    def _apply(self, fn, recurse=True):
        # Moving or converting the weights makes new tensors: build the native view anew.
        self._native_weights = _UNBUILT
        return super()._apply(fn, recurse)


class Qwen3Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        )
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        self.mrope_axes: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def setup_rope(self, max_seq_len: int) -> None:
        """Build the cos/sin tables for positions < max_seq_len on the weights' device."""
        inv_freq, scale = self.config.rope_inv_freq_and_scale()
        self.rope_cos, self.rope_sin = rope_tables(
            inv_freq, scale, max_seq_len, self.dtype, self.device
        )
        if self.config.mrope_section:
            self.mrope_axes = mrope_axes(
                self.config.mrope_section, self.config.head_dim, self.device
            )

    def new_cache(self, max_seq_len: int) -> KVCache:
        if self.rope_cos is None or self.rope_cos.shape[0] < max_seq_len:
            self.setup_rope(max_seq_len)
        c = self.config
        return KVCache(
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            max_seq_len,
            self.dtype,
            self.device,
        )

    def native_layers(self, x, cache, visual) -> list | None:
        """For a decode step on the CPU kernels, every layer's weights for one native call
        running them all (kernels/decode_layer.cpp); None where that does not apply or a
        layer's weights are not covered (the layers then run one by one). Layer by layer
        from Python the same step costs ~0.5 ms a token more at Qwen3-0.6B (2-3% of an
        int4 step)."""
        native = kernels.native(x)
        if native is None or x.shape[1] != 1 or cache is None or visual is not None:
            return None
        layers = [layer.native_weights(native) for layer in self.layers]
        return None if None in layers else layers

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        all_logits: bool = False,
        positions: torch.Tensor | None = None,
        visual: VisualTokens | None = None,
    ) -> torch.Tensor:
        """Logits for ``tokens [1, T]`` placed at positions ``start..start+T-1``.

        With a cache, keys/values land in it and attention sees everything before
        ``start`` too; without one (the uncached reference mode) ``start`` must be 0.
        ``positions [3, T]`` gives M-RoPE (time, height, width) positions instead of the
        cache indices, and ``visual`` the image/video tokens among ``tokens`` (Qwen3-VL).
        Returns ``[1, vocab]`` for the last position, or ``[1, T, vocab]``.
        """
        seq = tokens.shape[1]
        end = start + seq
        if self.rope_cos is None or self.rope_cos.shape[0] < end:
            self.setup_rope(max(end, cache.max_seq_len if cache else 0))
        if positions is None:
            cos = self.rope_cos[start:end]
            sin = self.rope_sin[start:end]
        else:
            # An M-RoPE position never exceeds its token's index (a picture of h x w
            # tokens moves the position on by max(h, w)), so the tables cover it.
            cos = mrope_rows(self.rope_cos, positions, self.mrope_axes)
            sin = mrope_rows(self.rope_sin, positions, self.mrope_axes)
        mask = None
        if seq > 1 and start > 0:
            indices = torch.arange(end, device=tokens.device)
            mask = indices[None, :] <= indices[start:, None]
        x = self.embed_tokens(tokens)
        if visual is not None:
            x[0, visual.mask] = visual.embeds.to(x.dtype)
        layers = self.native_layers(x, cache, visual)
        if layers is not None:
            x = kernels.native(x).decode_layers(x, layers, cos, sin, cache.k, cache.v, start)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, mask, cache, start)
                if visual is not None and i < len(visual.deepstack):
                    x[0, visual.mask] += visual.deepstack[i].to(x.dtype)
        x = x if all_logits else x[:, -1]
        x = self.norm(x)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(x, head).float()
