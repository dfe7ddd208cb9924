"""The Qwen3-VL vision tower as plain nn.Modules: patches in, merged image tokens out.

It mirrors transformers' ``Qwen3VLVisionModel``: a 3-D patch embedding, learned position
embeddings resampled bilinearly to each image's grid, ViT blocks with 2-D rotary attention
that stays within one frame, a 2x2 patch merger to the text model's width, and the DeepStack
mergers whose outputs the text model adds to its first layers' hidden states.

Patches arrive as the image processor emits them: each row one ``C x T x P x P`` patch, the
rows of a frame in spatial-merge-block order (every ``m x m`` block of neighbouring patches
consecutive), the frames of a video one after another. Parameter names are the checkpoint's
with the ``model.visual.`` prefix stripped, so a state dict loads without renaming.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..device import matmul_dtype
from .layers import apply_rope

# config.VISION_ACTIVATIONS names the same ones, for the checks at load.
ACTIVATIONS = {
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}

# Qwen3-VL hard-codes the epsilon of every LayerNorm in the tower.
LAYER_NORM_EPS = 1e-6


def vision_tensor_shapes(config: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tower tensor's name (checkpoint name without ``model.visual.``) and shape, as
    the modules below define them."""
    with torch.device("meta"):
        tower = VisionTower(config)
    return {name: tuple(p.shape) for name, p in tower.named_parameters()}


def affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T + bias``, multiplied in the dtype ``matmul_dtype`` picks (float32 for
    many rows on CPU, where 16-bit GEMMs are slow) and returned in ``x``'s dtype."""
    compute = matmul_dtype(x.numel() // x.shape[-1], x.dtype, x.device)
    return F.linear(x.to(compute), weight.to(compute), bias.to(compute)).to(x.dtype)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class BiasLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = _param(out_features, in_features)
        self.bias = _param(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return affine(x, self.weight, self.bias)


class LayerNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, LAYER_NORM_EPS)


class PatchConv(nn.Module):
    """The checkpoint's Conv3d, whose stride equals its kernel: on patches already cut out
    and flattened it is one matrix product, far faster than Conv3d on CPU. The weight keeps
    the conv's ``[out, C, T, P, P]`` shape so the checkpoint loads as is."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config
        self.weight = _param(
            c.hidden_size, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size
        )
        self.bias = _param(c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return affine(x, self.weight.flatten(1), self.bias)


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_dim = config.patch_dim
        self.proj = PatchConv(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Round the pixels to the weights' dtype first, as the reference does.
        x = pixel_values.reshape(-1, self.patch_dim).to(self.proj.weight.dtype)
        return self.proj(x)


class PositionEmbedding(nn.Module):
    """A square grid of learned position embeddings, resampled to each image's grid."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.side = config.position_grid_side
        self.merge = config.spatial_merge_size
        self.weight = _param(config.num_position_embeddings, config.hidden_size)

    def forward(self, t: int, h: int, w: int) -> torch.Tensor:
        """``[t*h*w, hidden]`` for one image or video, rows in the patches' order.

        Bilinear with aligned corners (the grid's corners land on the table's corners),
        computed in float32 like transformers' ``get_vision_interpolation_indices_and_weights``.
        """
        table = self.weight.view(self.side, self.side, -1).float()
        grid = sum(
            (row_weight[:, None] * col_weight[None, :])[..., None] * table[row[:, None], col]
            for row, row_weight in self._taps(h)
            for col, col_weight in self._taps(w)
        )
        m = self.merge
        blocks = grid.view(h // m, m, w // m, m, -1).permute(0, 2, 1, 3, 4).reshape(h * w, -1)
        # Every frame of a video gets the same spatial embeddings.
        return blocks.repeat(t, 1).to(self.weight.dtype)

    def _taps(self, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For ``size`` positions along an axis: the lower and upper table index each
        reads, each with its weight."""
        device = self.weight.device
        src = torch.arange(size, dtype=torch.float32, device=device) * (self.side - 1)
        src = src / max(size - 1, 1)
        floor = src.floor()
        frac = src - floor
        lower = floor.long()
        # At the last position frac is 0, so clamping the upper tap changes nothing.
        upper = (lower + 1).clamp(max=self.side - 1)
        return [(lower, 1 - frac), (upper, frac)]


def rotary_angles(config: VisionConfig, h: int, w: int, device) -> torch.Tensor:
    """``[h*w, head_dim]`` rotation angles of one frame's patches, in the patches' order.

    Axial 2-D RoPE: the first quarter of the frequencies rotate by the patch's row, the
    second quarter by its column, and the second half of the head repeats the first.
    """
    quarter = config.head_dim // 2
    inv_freq = 1.0 / (
        config.rope_theta
        ** (torch.arange(0, quarter, 2, dtype=torch.float32, device=device) / quarter)
    )
    m = config.spatial_merge_size
    rows = torch.arange(h, device=device)[:, None].expand(h, w)
    cols = torch.arange(w, device=device)[None, :].expand(h, w)

    def block_order(pos: torch.Tensor) -> torch.Tensor:
        return pos.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()

    row_freqs = block_order(rows)[:, None].float() * inv_freq
    col_freqs = block_order(cols)[:, None].float() * inv_freq
    return torch.cat((row_freqs, col_freqs, row_freqs, col_freqs), dim=-1)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with 2-D RoPE, each frame attending only to itself."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = BiasLinear(config.hidden_size, 3 * config.hidden_size)
        self.proj = BiasLinear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segments: list[tuple[int, int]],
    ) -> torch.Tensor:
        """``segments`` lists (frames, patches per frame) for each image or video in order."""
        seq = x.shape[0]
        q, k, v = self.qkv(x).view(seq, 3, self.num_heads, self.head_dim).unbind(1)
        # The reference rotates in float32 whatever the weights' dtype.
        q = apply_rope(q.float(), cos, sin).to(x.dtype)
        k = apply_rope(k.float(), cos, sin).to(x.dtype)
        # Thousands of patches attend to each other: on CPU that runs in float32, where
        # 16-bit SDPA is twice as slow (no native bf16 matmul), as linear() does.
        compute = matmul_dtype(seq, x.dtype, x.device)
        outputs = []
        start = 0
        for frames, length in segments:
            end = start + frames * length
            # The frames of one entry have equal lengths: one batched SDPA call per entry.
            q_s, k_s, v_s = (self._frames(t[start:end], frames).to(compute) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q_s, k_s, v_s)
            outputs.append(out.transpose(1, 2).reshape(frames * length, -1).to(x.dtype))
            start = end
        return self.proj(torch.cat(outputs))

    def _frames(self, t: torch.Tensor, frames: int) -> torch.Tensor:
        """``[frames * length, heads, head_dim]`` -> ``[frames, heads, length, head_dim]``."""
        return t.view(frames, -1, self.num_heads, self.head_dim).transpose(1, 2)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.linear_fc1 = BiasLinear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = BiasLinear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(config.hidden_size)
        self.attn = VisionAttention(config)
        self.norm2 = LayerNorm(config.hidden_size)
        self.mlp = VisionMLP(config)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenates each ``m x m`` block of patches into one token and projects it to the
    text model's width. The final merger normalises patches before concatenating; the
    DeepStack mergers (``postshuffle_norm``) normalise the concatenation."""

    def __init__(self, config: VisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.merged = config.merged_hidden_size
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(self.merged if postshuffle_norm else config.hidden_size)
        self.linear_fc1 = BiasLinear(self.merged, self.merged)
        self.linear_fc2 = BiasLinear(self.merged, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.norm(x.view(-1, self.merged))
        else:
            x = self.norm(x).view(-1, self.merged)
        # Exact GELU here whatever the blocks use, as in the reference.
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    """Qwen3-VL's vision encoder (``model.visual`` in the checkpoint)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = PositionEmbedding(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(config, postshuffle_norm=True) for _ in config.deepstack_visual_indexes
        )
        # Block index -> its DeepStack merger.
        self.deepstack_after = {b: i for i, b in enumerate(config.deepstack_visual_indexes)}

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.pos_embed.weight.device

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode ``pixel_values [num_patches, C*T*P*P]`` of the images/videos in ``grid_thw``.

        ``grid_thw [n, 3]`` gives each entry's (frames, patch rows, patch columns), frames
        counted after temporal patching. Returns the merged tokens
        ``[num_patches / m^2, out_hidden_size]`` (the text model's image/video token
        embeddings, entries in order) and one tensor of that shape per DeepStack layer.
        """
        grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        m = self.config.spatial_merge_size
        if any(h % m or w % m for _, h, w in grids):
            raise ValueError(f"grid_thw {grids}: heights and widths must be multiples of {m}")
        if pixel_values.shape[0] != sum(t * h * w for t, h, w in grids):
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but grid_thw {grids} "
                f"needs {sum(t * h * w for t, h, w in grids)}"
            )
        x = self.patch_embed(pixel_values)
        x = x + torch.cat([self.pos_embed(t, h, w) for t, h, w in grids])
        angles = torch.cat(
            [rotary_angles(self.config, h, w, x.device).repeat(t, 1) for t, h, w in grids]
        )
        # One row per patch, broadcast over the heads.
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        segments = [(t, h * w) for t, h, w in grids]
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, segments)
            if i in self.deepstack_after:
                deepstack.append(self.deepstack_merger_list[self.deepstack_after[i]](x))
        return self.merger(x), deepstack
