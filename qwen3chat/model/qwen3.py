"""The Qwen3 decoder (dense and MoE): embedding, N pre-norm blocks, final norm, LM head."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..distributed.pipeline import Stage
from ..distributed.vocab import VocabSplit
from ..hybrid_cache import HybridCache, PagedHybridCache
from ..kv_cache import Cache, KVCache, PagedBatch, PagedKVCache
from . import native
from .gated_delta_net import GatedDeltaNet
from .layers import (
    MLP,
    Attention,
    Embedding,
    Linear,
    RMSNorm,
    linear,
    mrope_axes,
    mrope_rows,
    rope_tables,
    shard_weight,
)
from .moe import ExpertLinear, SparseMoE


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


class TextLayout:
    """How a text prompt lies in the cache and the forward passes (the engine's seam for
    what a family adds to ids: Qwen3-VL's pictures, see qwen3_vl.VisionPrompt): cached
    under its ids, and its forward passes need nothing beyond ids and start."""

    def __init__(self, ids: list[int]):
        self.keys = list(ids)

    def prepare(self, model: nn.Module, start: int) -> float:
        """Run what the prompt's tokens from ``start`` on need before the decoder (nothing
        for text); the seconds it took."""
        return 0.0

    def rows(self, start: int, end: int, device) -> dict:
        """The forward's keyword arguments for positions ``start..end-1``: the prompt's
        tokens, then generated ones."""
        return {}


class DecoderLayer(nn.Module):
    """Pre-norm block: a token mixer (attention, or in the hybrid generation's linear
    layers Gated DeltaNet) and a feed-forward (MLP or experts), each added back."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_linear_layer(layer_idx):
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = SparseMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.world = None  # run across processes: the World that sums its blocks' outputs

    def shard(self, world, split: str) -> None:
        """Keep this process's share (distributed/split.py): heads and MLP widths unless
        ``split`` is expert; the experts held, or a share of each."""
        tensor = split != "expert"
        if tensor:
            (self.linear_attn if hasattr(self, "linear_attn") else self.self_attn).shard(world)
        if isinstance(self.mlp, SparseMoE):
            self.mlp.shard(world, experts=split != "tensor")
        elif tensor:
            self.mlp.shard(world)
        self.world = world

    def forward(self, x, cos, sin, mask, cache, start):
        if x.shape[1] == 1 and isinstance(cache, KVCache):
            # A layer called on its own (bench --ops, a model with a layer the kernels do
            # not cover) runs its decode step natively too (a hybrid cache's states move
            # for all layers at once: not one by one).
            out = native.decode_layers(x, [self], cos, sin, cache, start)
            if out is not None:
                return out
        h = self.input_layernorm(x)
        if hasattr(self, "linear_attn"):
            x = x + self.linear_attn(h, cache, start)
        else:
            x = x + self.self_attn(h, cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_batch(self, x, cos, sin, batch: PagedBatch):
        """The torch path of a PagedBatch's rows ``x [N, hidden]``."""
        h = self.input_layernorm(x)
        if hasattr(self, "linear_attn"):
            x = x + self.linear_attn.forward_batch(h, batch)
        else:
            x = x + self.self_attn.forward_batch(h, cos, sin, batch)
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
        self.held = config  # the heads this process's caches hold (a share: shard)
        self.stage: Stage | None = None  # the pipeline split's range of layers
        self.vocab: VocabSplit | None = None  # the other splits' share of the LM head
        self._head_rows = None  # a tied head's share (VocabSplit.rows), taken on first use
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        self.mrope_axes: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def shard(self, world, split: str) -> None:
        """Make this model (on the meta device, before loading) the share of process
        ``world.rank`` of ``world.size`` under ``split`` (distributed/split.py checked
        that it divides); its caches hold the heads it holds (``held``; config keeps the
        whole model's), and it computes the logits of its share of the vocabulary. Under the
        pipeline split it keeps its stage's layers, the others left as empty modules, so
        that names and cache layers stay the whole model's; a later stage holds no
        embedding or LM head either (its input comes from the stage before, and process
        0 takes the logits)."""
        if split == "pipeline":
            self.stage = Stage(world, len(self.layers))
            for i in range(len(self.layers)):
                if not self.stage.first <= i < self.stage.end:
                    self.layers[i] = nn.Module()
            if self.stage.first:
                self.embed_tokens = nn.Module()
                self.lm_head = None if self.lm_head is None else nn.Module()
            return
        for layer in self.layers:
            layer.shard(world, split)
        attention = next(layer.self_attn for layer in self.layers if hasattr(layer, "self_attn"))
        heads = {"num_key_value_heads": attention.num_kv_heads}
        linear = next(
            (layer.linear_attn for layer in self.layers if hasattr(layer, "linear_attn")), None
        )
        if linear is not None:
            heads.update(
                linear_num_key_heads=linear.num_k_heads, linear_num_value_heads=linear.num_v_heads
            )
        self.held = dataclasses.replace(self.config, **heads)
        self.vocab = VocabSplit(world, self.config.vocab_size)
        if self.lm_head is not None:  # a tied head's table stays whole for the lookup
            shard_weight(self.lm_head, (self.vocab.part,))

    @property
    def running(self) -> nn.ModuleList:
        """The layers this process runs: all, or its pipeline stage's."""
        return self.layers if self.stage is None else self.layers[self.stage.first : self.stage.end]

    @property
    def first_layer(self) -> int:
        """The index of the first layer this process runs."""
        return 0 if self.stage is None else self.stage.first

    def _apply(self, fn, recurse=True):
        # Moving or converting the weights makes new tensors: the native step's view of
        # them is built anew.
        native.forget(self)
        self._head_rows = None
        return super()._apply(fn, recurse)

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
                self.config.mrope_section, self.config.rotary_dim, self.device
            )

    def _rope_up_to(self, max_seq_len: int) -> None:
        if self.rope_cos is None or self.rope_cos.shape[0] < max_seq_len:
            self.setup_rope(max_seq_len)

    def step_order_rows(self) -> int:
        """The most rows of one sequence a forward pass runs giving each row, bit for bit,
        the logits of a one-row step (native.step_order_rows), over this process's layers
        and head: how many tokens a drafting pass may check at once."""
        modules = list(self.running.modules())
        weights = [m.weight for m in modules if isinstance(m, Linear)]
        weights += [m.weight[0] for m in modules if isinstance(m, ExpertLinear)]
        head = getattr(self.embed_tokens if self.lm_head is None else self.lm_head, "weight", None)
        weights += [] if head is None else [head]
        return native.step_order_rows(self.running, weights, self.device)

    def new_cache(
        self, max_seq_len: int, kv_dtype: torch.dtype | None = None
    ) -> KVCache | HybridCache:
        """A KVCache storing ``kv_dtype`` (torch.int8: quantized rows; default the
        weights' dtype); a hybrid model's HybridCache holds its linear layers' states too."""
        self._rope_up_to(max_seq_len)
        c = self.held
        if c.hybrid:
            return HybridCache(c, max_seq_len, self.dtype, kv_dtype, self.device)
        return KVCache(
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            max_seq_len,
            kv_dtype or self.dtype,
            self.device,
        )

    def new_paged_cache(
        self,
        num_blocks: int,
        block_size: int,
        max_seq_len: int,
        kv_dtype: torch.dtype | None = None,
        state_slots: int = 0,
    ) -> PagedKVCache:
        """A PagedKVCache for the batched engine; rotary tables up to ``max_seq_len``. A
        hybrid model's keeps ``state_slots`` slots of its linear layers' states too."""
        c = self.held
        self._rope_up_to(max_seq_len)
        if c.hybrid:
            return PagedHybridCache(
                c, num_blocks, block_size, state_slots, self.dtype, kv_dtype, self.device
            )
        return PagedKVCache(
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            num_blocks,
            block_size,
            kv_dtype or self.dtype,
            self.device,
        )

    def kv_bytes_per_token(self, kv_dtype: torch.dtype | None = None) -> int:
        c = self.held
        layers = sum(not c.is_linear_layer(i) for i in range(c.num_hidden_layers))
        return PagedKVCache.bytes_per_token(
            layers, c.num_key_value_heads, c.head_dim, kv_dtype or self.dtype
        )

    def prompt_layout(self, ids: list[int], visuals: Sequence = ()) -> TextLayout:
        if visuals:
            raise ValueError("a text model takes no pictures")
        return TextLayout(ids)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: Cache | None = None,
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
        x = self.embed(tokens)
        if visual is not None:
            x[0, visual.mask] = visual.embeds.to(x.dtype)
        if self.stage is None:
            x = self.run_layers(x, cos, sin, cache, start, visual)
        elif seq > 1 and cache is not None and visual is None:
            # A prompt through the pipeline: the stages work on pieces of it at once.
            def run(piece, first, end):
                return self.run_layers(piece, cos[first:end], sin[first:end], cache, start + first)

            x = self.stage.prompt(x, run)
        else:
            x = self.stage.receive(x)
            x = self.stage.pass_on(self.run_layers(x, cos, sin, cache, start, visual))
        if x is None:
            return None  # a later pipeline stage: process 0 takes the logits
        return self.logits(x if all_logits else x[:, -1])

    def run_layers(self, x, cos, sin, cache, start: int, visual: VisualTokens | None = None):
        """The layers this process runs over ``x [1, T, hidden]`` at ``start``: a decode
        step, or a few tokens (drafts, a short prompt), in one native call where the
        kernels cover it."""
        seq = x.shape[1]
        if cache is not None and visual is None:
            decoded = native.decode_layers(x, self.running, cos, sin, cache, start)
            if decoded is not None:
                return decoded
        mask = None
        if seq > 1 and start > 0:  # the new tokens see the cached ones and those before them
            indices = torch.arange(start + seq, device=x.device)
            mask = indices[None, :] <= indices[start:, None]
        for i, layer in enumerate(self.running, self.first_layer):
            x = layer(x, cos, sin, mask, cache, start)
            if visual is not None and i < len(visual.deepstack):
                x[0, visual.mask] += visual.deepstack[i].to(x.dtype)
        return x

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The ids' embeddings; on a later pipeline stage, which holds no table, a buffer
        that the stage before's hidden states are received into."""
        if self.stage is not None and self.stage.first:
            size = (*tokens.shape, self.config.hidden_size)
            return torch.empty(size, dtype=self.dtype, device=tokens.device)
        return self.embed_tokens(tokens)

    def logits(self, x: torch.Tensor, float32: bool = True) -> torch.Tensor | None:
        """Next-token logits of hidden states ``x [..., hidden]``: float32, or with
        ``float32=False`` in the head's dtype where one process holds the head (the same
        values; a batched step's sampling widens only what it reads, where a float32 copy
        of 16 rows of a 151k vocabulary took ~0.7 ms a step). Across processes (tensor and
        expert splits) each computes its share of the vocabulary and process 0 gets them
        all, as float32; the others get None."""
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.vocab is None:
            out = linear(self.norm(x), head)
            return out.float() if float32 else out
        if self.lm_head is None:
            if self._head_rows is None:
                self._head_rows = self.vocab.rows(head)
            head = self._head_rows
        return self.vocab.gather(linear(self.norm(x), head).float())

    def forward_batch(
        self,
        tokens: torch.Tensor,
        batch: PagedBatch,
        positions: torch.Tensor | None = None,
        visual: VisualTokens | None = None,
    ) -> torch.Tensor:
        """Logits ``[len(batch.logit_rows), vocab]`` of a PagedBatch's rows ``tokens [N]``,
        in the head's dtype (``logits``' float32=False).

        Each row's rotary position is its position, or its column of ``positions [3, N]``
        (M-RoPE); ``visual`` as ``forward`` takes it. The layers run in one native call
        where the kernels cover them (one per layer when DeepStack adds between them)."""
        if positions is None:
            cos, sin = self.rope_cos[batch.positions], self.rope_sin[batch.positions]
        else:
            cos = mrope_rows(self.rope_cos, positions, self.mrope_axes)
            sin = mrope_rows(self.rope_sin, positions, self.mrope_axes)
        x = self.embed(tokens)
        if visual is not None:
            x[visual.mask] = visual.embeds.to(x.dtype)
        cache = batch.cache
        states = None
        if cache.state_slots:
            # The decode form of the delta rule runs natively for a step of one row per
            # sequence; prompt chunks take the chunked form, a layer at a time.
            states = (cache.conv, cache.delta, batch.row_states()) if batch.decode_only else None
        whole = visual is None and (states is not None or not cache.state_slots)
        if self.stage is not None:
            x = self.stage.receive(x)
        groups = [self.running] if whole else [[layer] for layer in self.running]
        for i, group in enumerate(groups, self.first_layer):
            out = None
            if states is not None or not hasattr(group[0], "linear_attn"):
                out = native.paged_layers(
                    x,
                    group,
                    cos,
                    sin,
                    cache.k,
                    cache.v,
                    batch.positions,
                    batch.row_seq,
                    batch.block_tables,
                    cache.block_size,
                    states,
                )
            if out is None:
                for layer in group:
                    x = layer.forward_batch(x, cos, sin, batch)
            else:
                x = out
            if visual is not None and i < len(visual.deepstack):
                x[visual.mask] += visual.deepstack[i].to(x.dtype)
        if self.stage is not None and (x := self.stage.pass_on(x)) is None:
            return None
        return self.logits(x[batch.logit_rows], float32=False)
