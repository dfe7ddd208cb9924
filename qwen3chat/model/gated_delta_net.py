"""Gated DeltaNet, the linear-attention layer of the hybrid generation (Qwen3-Next,
Qwen3.5/3.6), with the checkpoint's names.

Per token: one fused projection gives q, k, v (through a short causal depthwise conv and
SiLU), the output gate z, and per value head the write strength beta = sigmoid(b) and
the decay g = A * softplus(a + dt_bias) (A < 0: a decay in log space). Each value head
keeps a state S [dk, dv]; a token decays it by exp(g), writes beta * (v - S^T k) along k
(the delta rule: only what S does not already predict), and reads q from it. The output
is RMS-normed per head, multiplied by silu(z), and projected back.

In torch a prompt runs the chunked form of the rule (matmuls within chunks of CHUNK
tokens, a scan over chunks), a decode step the recurrent form; both are vectorized over
heads and use float32 state, as the reference does. The native kernel
(kernels/delta_net.cpp) runs the recurrent form for both, wherever a cache holds the
states. The conv and delta states live in the cache (hybrid_cache.py), which hands each
layer its own.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.split import Part
from . import native
from .layers import Linear, shard_weight

CHUNK = 64  # tokens per chunk of the chunked delta rule (the reference's)


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, then times silu(gate), in float32 as the reference."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(x.dtype)
        return (h * F.silu(gate.float())).to(x.dtype)


class CausalConv(nn.Module):
    """Depthwise causal conv1d over time, ``weight [channels, kernel]``, no bias."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, kernel), requires_grad=False)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """``x [B, T, C]`` after the ``kernel - 1`` inputs in ``state [B, C, kernel - 1]``
        (zeros when None); the state is moved on in place. SiLU applied."""
        history = self.weight.shape[1] - 1
        x = x.transpose(1, 2)
        if state is None:
            padded = F.pad(x, (history, 0))
        else:
            padded = torch.cat((state.to(x.dtype), x), dim=-1)
            state.copy_(padded[..., -history:])
        # A multiply-add per tap of the kernel in float32, in the decode kernel's order,
        # rounded to x's dtype as a conv in it rounds: torch's depthwise conv1d in
        # bfloat16 runs a convolution per channel (thousands of calls a layer).
        padded, weight, length = padded.float(), self.weight.float(), x.shape[-1]
        out = padded[..., :length] * weight[:, :1]
        for tap in range(1, history + 1):
            out.addcmul_(padded[..., tap : tap + length], weight[:, tap : tap + 1])
        return F.silu(out.to(x.dtype)).transpose(1, 2)


class GatedDeltaNet(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.slot = config.layer_slot(layer_idx)  # its place in the cache's state stacks
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.tiled = config.linear_value_heads_tiled
        # q, k, v (conv input), z, b, a in one matmul (weights/names.py's FUSED).
        self.in_proj = Linear(
            config.hidden_size,
            self.conv_dim + self.value_dim + 2 * self.num_v_heads,
            split=(self.conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads),
        )
        self.conv1d = CausalConv(self.conv_dim, config.linear_conv_kernel_dim)
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads), requires_grad=False)
        # -exp(A_log) of the checkpoint, as llama.cpp stores it (ssm_a).
        self.A = nn.Parameter(torch.empty(self.num_v_heads), requires_grad=False)
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, config.hidden_size)

    def shard(self, world) -> None:
        """Keep this process's share of the key heads and the value heads that read them
        (tensor split): their rows of q, k, v (in_proj and the conv), z, b and a, their A
        and dt_bias, their columns of out_proj, whose output is summed over processes."""
        part = functools.partial(Part, -2, world.rank, world.size)
        values, heads = self._by_value_head(self.head_v_dim), self._by_value_head(1)
        qkv = part((self.key_dim,) * 2 + values)
        shard_weight(self.in_proj, (qkv, part(values), part(heads), part(heads)))
        shard_weight(self.conv1d, (qkv,))
        shard_weight(self.out_proj, (Part(-1, world.rank, world.size, values),))
        self.out_proj.reduce = world
        self.parts = (Part(-1, world.rank, world.size, heads),)  # A's and dt_bias's
        self.num_k_heads //= world.size
        self.num_v_heads //= world.size
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.A, self.dt_bias = (
            nn.Parameter(torch.empty(self.num_v_heads, device="meta"), requires_grad=False)
            for _ in range(2)
        )

    def _by_value_head(self, width: int) -> tuple[int, ...]:
        """Sections of something ``width`` wide per value head, each of which a Part cuts
        by key heads: one, or (tiled: value head j reads key head j % key heads) a section
        per round of the key heads."""
        rounds = self.num_v_heads // self.num_k_heads if self.tiled else 1
        return (self.num_v_heads // rounds * width,) * rounds

    def forward(self, x: torch.Tensor, cache, start: int) -> torch.Tensor:
        """``x [B, T, hidden]`` following the ``start`` tokens whose conv and delta states
        ``cache`` holds (None: from nothing, states discarded)."""
        conv_state, state = (
            (None, None) if cache is None else cache.linear_state(self.layer_idx, start, x.shape[1])
        )
        return self.out_proj(self.mix(self.in_proj(x), conv_state, state))

    def forward_batch(self, x: torch.Tensor, batch) -> torch.Tensor:
        """The rows ``x [N, hidden]`` of a PagedBatch, each sequence's run of rows on its
        state slot: a step of one row each in one native call, else a sequence at a time
        (a prompt's chunk through the chunked rule)."""
        proj = self.in_proj(x)
        conv, delta = batch.cache.conv[self.slot], batch.cache.delta[self.slot]
        out = None
        if batch.decode_only:
            out = native.gated_delta_step(proj[:, None], self, conv, delta, batch.row_states())
        if out is None:
            parts, first = [], 0
            for count, s in zip(batch.counts, batch.states, strict=True):
                rows = proj[None, first : first + count]
                parts.append(self.mix(rows, conv[s : s + 1], delta[s : s + 1])[0])
                first += count
            out = torch.cat(parts)
        return self.out_proj(out.reshape(len(x), -1))

    def mix(self, proj: torch.Tensor, conv_state, state) -> torch.Tensor:
        """From the input projection ``proj [B, T, width]`` to what out_proj multiplies
        ``[B, T, value_dim]``, the states (None: none kept) moved on in place."""
        batch, seq, _ = proj.shape
        if state is not None:  # the native kernel's recurrent rule, for a prompt too
            out = native.gated_delta_step(proj, self, conv_state, state)
            if out is not None:
                return out
        mixed, z, b, a = proj.split(self.in_proj.split, dim=-1)
        mixed = self.conv1d(mixed, conv_state)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.unflatten(-1, (self.num_k_heads, self.head_k_dim))
        k = k.unflatten(-1, (self.num_k_heads, self.head_k_dim))
        v = v.unflatten(-1, (self.num_v_heads, self.head_v_dim))
        beta = torch.sigmoid(b.float())
        g = self.A.float() * F.softplus(a.float() + self.dt_bias.float())
        if state is None:
            state = proj.new_zeros(
                batch, self.num_v_heads, self.head_k_dim, self.head_v_dim, dtype=torch.float32
            )
        rule = recurrent_delta_rule if seq == 1 else chunked_delta_rule
        out = rule(*self._heads(q, k, v, beta, g), state)  # [B, Hv, T, dv]
        out = self.norm(out.transpose(1, 2).to(proj.dtype), z.unflatten(-1, (self.num_v_heads, -1)))
        return out.flatten(-2)

    def _heads(self, q, k, v, beta, g):
        """Float32 ``[B, Hv, T, .]`` inputs of the rule: q and k L2-normed (q also scaled
        by dk^-0.5) and repeated for the value heads they serve."""
        repeat = self.num_v_heads // self.num_k_heads
        q, k = (l2_normalize(t.float()) for t in (q, k))
        if self.tiled:
            q, k = (t.repeat(1, 1, repeat, 1) for t in (q, k))
        else:
            q, k = (t.repeat_interleave(repeat, dim=2) for t in (q, k))
        q = q * self.head_k_dim**-0.5
        heads = (t.transpose(1, 2) for t in (q, k, v.float(), beta, g))
        return tuple(heads)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / |x|`` along the last dim, with the reference's epsilon inside the root."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def recurrent_delta_rule(q, k, v, beta, g, state: torch.Tensor) -> torch.Tensor:
    """One token per sequence: ``q, k [B, H, 1, dk]``, ``v [B, H, 1, dv]``, ``beta, g
    [B, H, 1]``; ``state [B, H, dk, dv]`` moved on in place. Output ``[B, H, 1, dv]``."""
    state.mul_(g.exp()[..., None])
    predicted = k @ state  # [B, H, 1, dv]
    delta = (v - predicted) * beta[..., None]
    state.add_(k.transpose(-1, -2) @ delta)
    return q @ state


def chunked_delta_rule(q, k, v, beta, g, state: torch.Tensor) -> torch.Tensor:
    """Several tokens per sequence (shapes as ``recurrent_delta_rule``'s with T tokens):
    within each chunk the T sequential updates become one triangular solve (the WY form
    of the delta rule), and the chunks are scanned in order; ``state`` moved on in place."""
    seq = q.shape[2]
    pad = -seq % CHUNK
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    beta, g = (F.pad(t, (0, pad)) for t in (beta, g))
    q, k, v = (t.unflatten(2, (-1, CHUNK)) for t in (q, k, v))  # [B, H, N, C, d]
    beta, g = (t.unflatten(2, (-1, CHUNK)) for t in (beta, g))  # [B, H, N, C]
    decay = g.cumsum(-1)  # log of the decay from the chunk's start to each token
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    # pairwise[i, j]: decay from token j to token i (i >= j), else 0.
    pairwise = (decay[..., :, None] - decay[..., None, :]).masked_fill(~causal, float("-inf"))
    pairwise = pairwise.exp()
    k_beta = k * beta[..., None]
    # (I + strictly lower part of A) solves the chunk's updates at once (unit diagonal).
    system = (k_beta @ k.transpose(-1, -2)) * pairwise
    new_values = torch.linalg.solve_triangular(
        system, v * beta[..., None], upper=False, unitriangular=True
    )
    state_keys = torch.linalg.solve_triangular(
        system, k_beta * decay.exp()[..., None], upper=False, unitriangular=True
    )
    within = (q @ k.transpose(-1, -2)) * pairwise
    q = q * decay.exp()[..., None]
    last = decay[..., -1:]
    k = k * (last - decay).exp()[..., None]
    chunk_decay = last.exp()[..., None]  # [B, H, N, 1, 1]
    out = torch.empty_like(new_values)
    for i in range(q.shape[2]):
        fresh = new_values[:, :, i] - state_keys[:, :, i] @ state
        out[:, :, i] = q[:, :, i] @ state + within[:, :, i] @ fresh
        state.mul_(chunk_decay[:, :, i]).add_(k[:, :, i].transpose(-1, -2) @ fresh)
    return out.flatten(2, 3)[:, :, :seq]
