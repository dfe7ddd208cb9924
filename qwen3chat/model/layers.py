"""Building blocks: RMSNorm, rotary embeddings, linear layers, attention, SwiGLU MLP.

Each operation asks native.py first (the CPU kernels, where they cover it) and otherwise
runs the torch code here, the reference the kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..device import matmul_dtype
from ..distributed.split import Part, kv_part
from ..kv_cache import Cache, PagedBatch, readable
from ..quant import QuantizedWeight
from . import native


class Linear(nn.Module):
    """``y = x @ W.T`` (no bias: Qwen3 has none); the weight may be a QuantizedWeight.

    A projection fused from several of the checkpoint's (weights/names.py's FUSED) gives
    ``split``, the rows of each part in order.

    Run across processes (distributed/), ``parts`` are this process's shares of the
    checkpoint's tensors (shard_weight), and a ``reduce`` World makes the output the sum
    of every process's share: partial sums in float32, rounded once after the all-reduce."""

    def __init__(self, in_features: int, out_features: int, split: tuple[int, ...] = ()):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.split = split
        self.parts: tuple[Part, ...] | None = None
        self.reduce = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce is None:
            return linear(x, self.weight)
        return self.reduce.all_reduce(linear(x.float(), self.weight)).to(x.dtype)


def shard_weight(module: nn.Module, parts: tuple[Part, ...]) -> None:
    """Make the (meta) ``module.weight`` of a Linear, ExpertLinear or conv this process's share:
    ``parts`` gives one Part per checkpoint tensor fused into it (its ``split``), which
    the loader reads; rows shrink part by part, columns and experts all alike."""
    shape = list(module.weight.shape)
    fused = getattr(module, "split", ())
    split = fused or (shape[-2],)
    rows = [p.size(n) if p.dim == -2 else n for p, n in zip(parts, split, strict=True)]
    for dim in {p.dim for p in parts if p.dim != -2}:
        shape[dim] = parts[0].size(shape[dim])
    shape[-2] = sum(rows)
    module.split = tuple(rows) if fused else ()
    module.parts = parts
    module.weight = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)


class Embedding(nn.Module):
    """Token embedding whose table may be quantized (rows dequantized on lookup)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, QuantizedWeight):
            return self.weight.rows(ids)
        return F.embedding(ids, self.weight)


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    out = native.linear(x, weight)
    if out is not None:
        return out
    if isinstance(weight, QuantizedWeight):
        return weight.linear(x)
    compute = matmul_dtype(x.numel() // x.shape[-1], x.dtype, x.device)
    if compute != weight.dtype:
        return F.linear(x.to(compute), weight.to(compute)).to(x.dtype)
    return F.linear(x, weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = native.rms_norm(x, self.weight, self.eps)
        if out is not None:
            return out
        # Normalise in float32 and scale in the compute dtype, as the reference does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(
    inv_freq: torch.Tensor, scale: float, max_seq_len: int, dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every position, ``[max_seq_len, head_dim]`` (halves repeated)."""
    positions = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (
        (emb.cos() * scale).to(device=device, dtype=dtype),
        (emb.sin() * scale).to(device=device, dtype=dtype),
    )


def mrope_axes(section: list[int], head_dim: int, device) -> torch.Tensor:
    """For each of the ``head_dim`` columns, the position axis that rotates it in Qwen3-VL's
    interleaved M-RoPE (0 time, 1 height, 2 width): frequency ``j`` follows height when
    ``j % 3 == 1 and j < 3 * section[1]``, width when ``j % 3 == 2 and j < 3 * section[2]``,
    time otherwise; the second half of the head repeats the first."""
    j = torch.arange(head_dim // 2)
    axes = torch.zeros_like(j)
    axes[(j % 3 == 1) & (j < 3 * section[1])] = 1
    axes[(j % 3 == 2) & (j < 3 * section[2])] = 2
    return torch.cat((axes, axes)).to(device)


def mrope_rows(table: torch.Tensor, positions: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """cos (or sin) rows ``[T, head_dim]`` for tokens at ``positions [3, T]`` (time, height,
    width): each column is read from the plain table's row of its axis' position, which
    gives exactly the values of computing the angles per axis."""
    rows = table[positions]  # [3, T, head_dim]
    index = axes.view(1, 1, -1).expand(1, positions.shape[1], -1)
    return rows.gather(0, index)[0]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, T, head_dim]`` by the tables' rows for its positions. Tables
    narrower than the head (partial rotary) rotate its first columns; the rest pass."""
    width = cos.shape[-1]
    if width < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :width], cos, sin), x[..., width:]), dim=-1)
    half = width // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _readable(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A cache's keys or values as SDPA reads them (kv_cache.readable), natively where the
    kernels run."""
    out = native.dequantize_kv(rows, dtype)
    return readable(rows, dtype) if out is None else out


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on q and k before RoPE (Qwen3).

    The hybrid generation's is gated: q_proj gives each head its query and then as many
    gate columns, and the output is multiplied by sigmoid(gate) before o_proj; its RoPE
    rotates only part of each head (the tables say how much)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.slot = config.layer_slot(layer_idx)  # its place in a hybrid cache's KV stack
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.gated = config.hybrid
        q_width = 2 * self.q_size if self.gated else self.q_size
        self.qkv_proj = Linear(
            config.hidden_size,
            q_width + 2 * self.kv_size,
            split=(q_width, self.kv_size, self.kv_size),
        )
        self.o_proj = Linear(self.q_size, config.hidden_size)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def shard(self, world) -> None:
        """Keep this process's share of the heads (tensor split): its query heads and the
        KV heads they read; o_proj's output is summed over processes."""
        q, kv = Part(-2, world.rank, world.size), kv_part(world.rank, world.size, self.num_kv_heads)
        self.num_heads //= world.size
        self.num_kv_heads = kv.size(self.num_kv_heads)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        shard_weight(self.qkv_proj, (q, kv, kv))
        shard_weight(self.o_proj, (Part(-1, world.rank, world.size),))
        self.o_proj.reduce = world

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
        start: int,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        qkv, gate = self.split_gate(self.qkv_proj(x))
        q, k, v = self.project_qkv(qkv, cos, sin, cache, start)
        out = native.cached_attention(q, k, v)
        if out is None:
            out = self.attend(q, k, v, mask).transpose(1, 2).reshape(batch, seq, self.q_size)
        return self.o_proj(self.gated_output(out.to(x.dtype), gate))

    def split_gate(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A gated layer's projection ``[..., 2 * q_size + 2 * kv_size]`` (each head's query
        columns, then its gate's) as the plain q, k, v projection and the gate
        ``[..., q_size]``; (qkv, None) for an ungated layer."""
        if not self.gated:
            return qkv, None
        q_gate, kv = qkv.split([2 * self.q_size, 2 * self.kv_size], dim=-1)
        q, gate = q_gate.unflatten(-1, (self.num_heads, 2, self.head_dim)).unbind(-2)
        return torch.cat((q.flatten(-2), kv), dim=-1), gate.flatten(-2)

    @staticmethod
    def gated_output(out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        return out if gate is None else out * torch.sigmoid(gate)

    def attend(self, q, k, v, mask) -> torch.Tensor:
        """SDPA of ``q [B, heads, T, head_dim]`` over the keys and values a cache stores."""
        batch, _, seq, _ = q.shape
        k, v = _readable(k, q.dtype), _readable(v, q.dtype)
        q = q.to(k.dtype)
        if seq == 1:
            # One query row sees every cached key, so no mask; and the query heads that
            # share a KV head go in as rows of one group (5x faster than enable_gqa on
            # CPU in bf16, where SDPA's GQA path runs per head).
            groups = self.num_heads // self.num_kv_heads
            grouped = q.reshape(batch, self.num_kv_heads, groups, self.head_dim)
            out = F.scaled_dot_product_attention(grouped, k, v).view(q.shape)
        else:
            # A chunk starting at 0 is plain causal; a later chunk gets the explicit mask
            # built once per forward.
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
        return out

    def project(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Cache | None,
        start: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, heads, T, head_dim]`` normed and rotated, and all the keys and values
        attention sees ``[B, kv_heads, start + T, head_dim]`` as the cache stores them,
        the new ones stored (an ungated layer's)."""
        return self.project_qkv(self.qkv_proj(x), cos, sin, cache, start)

    def project_qkv(self, qkv, cos, sin, cache: Cache | None, start: int):
        """``project`` from the q, k, v projection ``qkv [B, T, width]``."""
        batch, seq, _ = qkv.shape
        end = start + seq
        # The native call splits, norms and rotates, and writes k and v into the cache.
        if cache is not None:
            k_slots, v_slots = cache.window(self.layer_idx, start, end)
        else:
            k_slots = qkv.new_empty(batch, self.num_kv_heads, seq, self.head_dim)
            v_slots = torch.empty_like(k_slots)
        q = native.qk_norm_rope(qkv, self, cos, sin, k_slots, v_slots)
        if q is not None:
            if cache is None:
                return q, k_slots, v_slots
            return (q, *cache.window(self.layer_idx, 0, end))
        q, k, v = self.heads(qkv, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, start, k, v)
        return q, k, v

    def heads(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``qkv [B, T, width]`` split into q, k, v ``[B, heads, T, head_dim]``, q and k normed
        and rotated (the torch path)."""
        batch, seq, _ = qkv.shape
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(batch, seq, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(batch, seq, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward_batch(self, x: torch.Tensor, cos, sin, batch: PagedBatch) -> torch.Tensor:
        """The rows ``x [N, hidden]`` of a PagedBatch (torch path): keys and values stored,
        each row attending to its own sequence."""
        qkv, gate = self.split_gate(self.qkv_proj(x[None]))
        q, k, v = (t[0].transpose(0, 1) for t in self.heads(qkv, cos, sin))
        batch.store(self.slot, k, v)
        out = batch.attend(self.slot, q)
        return self.o_proj(self.gated_output(out, None if gate is None else gate[0]))


class MLP(nn.Module):
    """SwiGLU feed-forward with gate and up fused into one projection."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = Linear(
            hidden_size, 2 * intermediate_size, split=(intermediate_size, intermediate_size)
        )
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))

    def shard(self, world, summed: bool = True) -> None:
        """Keep this process's share of the inner width (tensor split); the output is
        summed over processes here, or (not ``summed``) left a share for the caller's sum."""
        inner = Part(-2, world.rank, world.size)
        shard_weight(self.gate_up_proj, (inner, inner))
        shard_weight(self.down_proj, (Part(-1, world.rank, world.size),))
        if summed:
            self.down_proj.reduce = world


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` from a fused ``[..., 2 * width]`` projection."""
    out = native.silu_mul(gate_up)
    if out is not None:
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
