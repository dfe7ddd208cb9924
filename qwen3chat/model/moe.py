"""Mixture-of-experts feed-forward (Qwen3-MoE): a router picks the top-k experts of each
token, and only those experts' weights are read.

Tokens are routed, then their (token, expert) pairs sorted by expert, so that each expert
multiplies all its rows at once: one grouped matmul over every expert where torch has one
for the weights' dtype, else one matmul per expert that received rows (never per expert
of the layer: a decode step touches num_experts_per_tok of them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..device import matmul_dtype
from ..distributed.split import Part
from ..quant import QuantizedExperts
from .layers import MLP, Linear, linear, shard_weight, silu_mul


class ExpertLinear(nn.Module):
    """One projection of every expert: ``weight [experts, out, in]``, float or quantized;
    ``split`` as Linear's, for a projection fused from several."""

    def __init__(
        self, num_experts: int, in_features: int, out_features: int, split: tuple[int, ...] = ()
    ):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_features, in_features), requires_grad=False
        )
        self.split = split
        self.parts: tuple[Part, ...] | None = None


class SparseMoE(nn.Module):
    """Softmax router over ``num_experts``, top-k (renormalised with ``norm_topk_prob``),
    and SwiGLU experts with gate and up fused, as Qwen3MoeSparseMoeBlock computes it.

    The hybrid generation adds a shared expert that every token runs through, its output
    weighted by sigmoid(shared_expert_gate(x)) (Qwen3NextSparseMoeBlock).

    Run across processes, a process holds the experts ``expert_range`` (expert split) or a
    share of every expert's inner width (tensor split), and a share of the shared expert's
    width, and ``reduce`` sums the outputs."""

    def __init__(self, config):
        super().__init__()
        d, width = config.hidden_size, config.moe_intermediate_size
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.width = width
        self.gate = Linear(d, config.num_experts)
        self.experts = nn.Module()
        self.experts.gate_up_proj = ExpertLinear(
            config.num_experts, d, 2 * width, split=(width, width)
        )
        self.experts.down_proj = ExpertLinear(config.num_experts, width, d)
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(d, config.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(d, 1)
        self.expert_range = (0, config.num_experts)
        self.reduce = None

    def shard(self, world, experts: bool) -> None:
        """Keep a range of the experts (``experts``) or a share of each one's inner width."""
        if experts:
            held = Part(0, world.rank, world.size)
            gate_up, down = (held, held), (held,)
            self.expert_range = held.bounds(self.num_experts)
        else:
            inner = Part(-2, world.rank, world.size)
            gate_up, down = (inner, inner), (Part(-1, world.rank, world.size),)
        shard_weight(self.experts.gate_up_proj, gate_up)
        shard_weight(self.experts.down_proj, down)
        if hasattr(self, "shared_expert"):  # every token's: a share of its width each
            self.shared_expert.shard(world, summed=False)
        self.reduce = world

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's top-k experts ``[rows, k]`` and their weights, in x's dtype."""
        probs = F.softmax(linear(x, self.gate.weight), dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.route(x)
        # (token, expert) pairs grouped by expert; rows[i] is the token of pair i.
        order = experts.flatten().argsort(stable=True)
        rows = order // self.top_k
        counts = torch.bincount(experts.flatten(), minlength=self.num_experts)
        low, high = self.expert_range
        if (low, high) != (0, self.num_experts):  # the pairs of the experts held here
            ends = counts.cumsum(0).tolist()
            first, last = ends[low - 1] if low else 0, ends[high - 1]
            order, rows, counts = order[first:last], rows[first:last], counts[low:high]
        # An expert multiplies at most as many rows as there are tokens.
        h = grouped_linear(x[rows], self.experts.gate_up_proj.weight, counts, x.shape[0])
        h = grouped_linear(silu_mul(h), self.experts.down_proj.weight, counts, x.shape[0])
        h = h * weights.flatten()[order, None]
        # A share of the sum over processes: kept in float32 until the all-reduce.
        out = torch.zeros_like(x, dtype=x.dtype if self.reduce is None else torch.float32)
        out.index_add_(0, rows, h.to(out.dtype))
        if hasattr(self, "shared_expert"):
            gate = torch.sigmoid(self.shared_expert_gate(x))
            out += gate * self.shared_expert(x)
        if self.reduce is not None:
            out = self.reduce.all_reduce(out).to(x.dtype)
        return out.view(shape)


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor | QuantizedExperts,
    counts: torch.Tensor,
    max_rows: int,
) -> torch.Tensor:
    """``x``'s rows sorted by expert, ``counts[e]`` of them for expert ``e``: each row
    times its expert's matrix ``weight[e]``, ``[rows, in] -> [rows, out]``."""
    if isinstance(weight, torch.Tensor) and x.device.type == "cpu":
        compute = matmul_dtype(max_rows, x.dtype, x.device)
        if compute == weight.dtype:
            # One call, no host sync; it reads only experts that have rows.
            offsets = counts.cumsum(0).to(torch.int32)
            return torch._grouped_mm(x.to(compute), weight.transpose(-2, -1), offs=offsets)
    # Quantized experts (or a float weight that needs another compute dtype): each
    # expert with rows runs the 2-D path, whose kernels and dtype policy it shares.
    out = x.new_empty(x.shape[0], weight.shape[-2])
    sizes, ends = counts.tolist(), counts.cumsum(0).tolist()
    for expert in counts.nonzero().flatten().tolist():
        start, end = ends[expert] - sizes[expert], ends[expert]
        out[start:end] = linear(x[start:end], weight[expert])
    return out
