"""The Qwen3 decoder (dense and MoE): embedding, N pre-norm blocks, final norm, LM head."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..kv_cache import KVCache
from .layers import MLP, Attention, Embedding, Linear, RMSNorm, linear, rope_tables
from .moe import SparseMoE


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

    def forward(self, x, cos, sin, mask, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


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

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Logits for ``tokens [1, T]`` placed at positions ``start..start+T-1``.

        With a cache, keys/values land in it and attention sees everything before
        ``start`` too; without one (the uncached reference mode) ``start`` must be 0.
        Returns ``[1, vocab]`` for the last position, or ``[1, T, vocab]``.
        """
        seq = tokens.shape[1]
        end = start + seq
        if self.rope_cos is None or self.rope_cos.shape[0] < end:
            self.setup_rope(max(end, cache.max_seq_len if cache else 0))
        cos = self.rope_cos[start:end]
        sin = self.rope_sin[start:end]
        mask = None
        if seq > 1 and start > 0:
            positions = torch.arange(end, device=tokens.device)
            mask = positions[None, :] <= positions[start:, None]
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, start)
        x = x if all_logits else x[:, -1]
        x = self.norm(x)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(x, head).float()
