"""Where the model meets the native CPU kernels (kernels/): the only Python that knows their
structs (Matrix, DecoderLayerWeights) and what they cover (the LIMITS that kernels.h
defines and checks). Each function returns None where the kernels do not run (not on the
CPU, a dtype or shape they do not cover, no build here); the caller then runs the torch
code, which is correct everywhere and is what the kernels are tested against.

A decode step of the decoder layers is one native call for all of them (``decode_layers``):
from Python, layer by layer, the same step costs ~0.5 ms a token more at Qwen3-0.6B (2-3%
of an int4 step). A layer reaches it through the names every Qwen3-style block has
(``input_layernorm``, ``self_attn.qkv_proj``, ``mlp.gate_up_proj`` or the experts, ...), so
another family whose blocks carry those names reuses it as it is. A step of a batch of
sequences over a paged KV cache (the server's) is one call too (``paged_layers``).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .. import kernels
from ..distributed.world import collective_errors
from ..hybrid_cache import HybridCache
from ..kv_cache import Cache, KVCache
from ..quant import QuantizedWeight


def _covers(native, limit: str, size: int) -> bool:
    return size % native.LIMITS[limit] == 0


def _matrix(native, weight: torch.Tensor | QuantizedWeight):
    """``weight`` as the kernels take it (kernels.h's Matrix), or None where they do not
    cover it: inputs, or quantization groups, not in whole column blocks."""
    if not _covers(native, "matrix_column_block", weight.shape[-1]):
        return None
    if not isinstance(weight, QuantizedWeight):
        return native.Matrix(weight)
    if not _covers(native, "matrix_column_block", weight.group_size):
        return None
    return native.Matrix(weight.codes, weight.scales, weight.zeros, weight.bits)


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor | None:
    native = kernels.native(x)
    matrix = _matrix(native, weight) if native is not None else None
    return None if matrix is None else native.matmul(x, matrix)


def step_order_rows(layers: list[nn.Module], weights: list, device: torch.device) -> int:
    """The most rows of one sequence a pass through ``layers`` (in one native call) and
    products over ``weights`` runs giving each row, bit for bit, a one-row step's results:
    the fewest any of the products takes adding a row's outputs as a one-row product does
    (the kernels' step_order_rows), and no more than a pass the native layers take in one
    call (LIMITS' prompt_kernel_rows). 1 where the kernels do not run here or do not cover
    a layer or weight: torch's products keep no such order."""
    native = kernels.native(torch.empty(0, device=device))
    if native is None or any(layer_weights(native, layer) is None for layer in layers):
        return 1
    rows = native.LIMITS["prompt_kernel_rows"]
    for weight in weights:
        matrix = _matrix(native, weight)
        if matrix is None:
            return 1
        rows = min(rows, native.step_order_rows(matrix))
    return rows


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    native = kernels.native(x)
    if native is None or not _covers(native, "norm_block", x.shape[-1]):
        return None
    return native.rms_norm(x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    native = kernels.native(gate_up)
    if native is None or not _covers(native, "swiglu_block", gate_up.shape[-1] // 2):
        return None
    return native.silu_mul(gate_up)


def _covers_head_dim(native, head_dim: int) -> bool:
    return _covers(native, "head_dim_block", head_dim) and head_dim <= native.LIMITS["max_head_dim"]


def _covers_delta_net(native, layer) -> bool:
    return (
        _covers(native, "delta_dim_block", layer.head_k_dim)
        and _covers(native, "delta_dim_block", layer.head_v_dim)
        and max(layer.head_k_dim, layer.head_v_dim) <= native.LIMITS["max_head_dim"]
        and layer.conv1d.weight.shape[1] <= native.LIMITS["max_conv_kernel"]
    )


def qk_norm_rope(qkv, attn, cos, sin, k_out, v_out) -> torch.Tensor | None:
    """Split ``qkv`` into the heads of ``attn`` (an Attention), RMSNorm q and k, rotate
    them, write k and v into ``k_out``/``v_out``; q ``[B, heads, T, head_dim]``."""
    native = kernels.native(qkv)
    if native is None or not _covers_head_dim(native, attn.head_dim):
        return None
    if not _covers(native, "head_dim_block", cos.shape[-1]):  # the rotated share of a head
        return None
    return native.qk_norm_rope(
        qkv,
        attn.q_norm.weight,
        attn.k_norm.weight,
        cos,
        sin,
        attn.q_norm.eps,
        attn.num_heads,
        attn.num_kv_heads,
        k_out,
        v_out,
    )


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """The attention of the queries of the last T positions ``q [B, heads, T, dim]`` over the
    keys and values, causal, ``[B, T, heads * dim]``: a decode step's token, or over an int8
    cache a prompt of up to LIMITS' prompt_kernel_rows tokens, row by row (each reads the
    cached rows again, from cache after the first). Longer prompts go to SDPA over the cache
    dequantized (dequantize_kv), which costs about that first read; a layer of the 0.6B
    shape over 4104-4224 cached rows (Intel Xeon, 2 threads): 8 rows 3.3 ms in the kernel
    against 7.9, 32 rows 11.8 against 10.6, 128 rows 47 against 26. Over a float cache SDPA
    takes any prompt as fast or faster."""
    native = kernels.native(q)
    if native is None or not _covers(native, "attention_head_dim_block", q.shape[-1]):
        return None
    rows = q.shape[2]
    if rows > 1 and (k.dtype != torch.int8 or rows > native.LIMITS["prompt_kernel_rows"]):
        return None
    return native.decode_attention(q, k, v)


def dequantize_kv(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """An int8 cache's rows as ``dtype`` values (kv_cache.readable's)."""
    native = kernels.native(torch.empty(0, dtype=dtype, device=rows.device))
    if native is None or rows.dtype != torch.int8 or rows.stride(-1) != 1:
        return None
    return native.dequantize_kv(rows, dtype)


def gated_delta_step(proj, layer, conv_state, state, slots=None) -> torch.Tensor | None:
    """A Gated DeltaNet layer's (model/gated_delta_net.py) steps from its input projection
    ``proj [B, T, width]`` (T tokens each, a decode step's one or a prompt's) to what
    out_proj multiplies, the states moved on (row b's at ``slots[b]`` of the pools
    ``conv_state``/``state`` where given)."""
    native = kernels.native(proj)
    if native is None or not _covers_delta_net(native, layer):
        return None
    return native.gated_delta_step(
        proj,
        layer.conv1d.weight,
        conv_state,
        layer.A,
        layer.dt_bias,
        layer.norm.weight,
        state,
        layer.num_k_heads,
        layer.head_k_dim,
        layer.head_v_dim,
        layer.tiled,
        layer.norm.eps,
        slots,
    )


def decode_layers(
    x: torch.Tensor,
    layers: list[nn.Module],
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: Cache,
    start: int,
) -> torch.Tensor | None:
    """One decode step (``x [B, 1, hidden]`` at ``start``) through every layer in one native
    call (kernels/decode_layer.cpp), keys and values written into ``cache``; or a few tokens
    of one sequence (``x [1, T, hidden]``, T up to LIMITS' prompt_kernel_rows: the pending
    token and its drafts, a short prompt) in one call of ``paged_layers`` over a KVCache
    taken as a single block (from Python, layer by layer, a pass of 2 tokens of the 0.6B
    shape cost 1.65x a decode step, of 8 tokens 3x; in one call 1.05-1.3x and 1.8-2.2x).
    None where that does not apply or the kernels do not cover one of the layers' weights."""
    native = kernels.native(x)
    if native is None or not isinstance(cache, KVCache | HybridCache):
        return None
    rows = x.shape[1]
    if rows > 1:
        if not isinstance(cache, KVCache) or rows > native.LIMITS["prompt_kernel_rows"]:
            return None
        return _one_block(native, x, layers, cos, sin, cache, start)
    weights = [layer_weights(native, layer) for layer in layers]
    if None in weights:
        return None
    with collective_errors(layers[0].world):
        if isinstance(cache, KVCache):
            return native.decode_layers(x, weights, cos, sin, cache.k, cache.v, start)
        conv, delta = cache.moving(start, 1)
        kv = cache.kv
        return native.decode_layers(x, weights, cos, sin, kv.k, kv.v, start, conv, delta)


def _one_block(native, x, layers, cos, sin, cache: KVCache, start: int) -> torch.Tensor | None:
    """``x [1, T, hidden]`` at ``start`` through ``paged_layers``, the cache's storage (whole
    blocks of paged_block_align positions) as one block of one sequence."""
    rows, slots = x.shape[1], cache.k.shape[3]
    if not _covers(native, "paged_block_align", slots):
        return None
    positions = torch.arange(start, start + rows, device=x.device)
    zeros = torch.zeros(rows, dtype=torch.long, device=x.device)
    table = torch.zeros((1, 1), dtype=torch.int32, device=x.device)
    k, v = cache.k.squeeze(1), cache.v.squeeze(1)
    out = paged_layers(x[0], layers, cos, sin, k, v, positions, zeros, table, slots)
    return None if out is None else out[None]


def paged_layers(
    x: torch.Tensor,
    layers: list[nn.Module],
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    row_seq: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    states: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Every layer over ``x [N, hidden]``, the token rows of several sequences, in one
    native call with a paged KV cache (kernels.h's PagedKV): ``k_cache``/``v_cache``
    ``[layers, kv_heads, num_blocks * block_size, head_dim]``; row i is at
    ``positions[i]`` of sequence ``row_seq[i]``, whose position p lies in slot
    ``block_tables[row_seq[i], p // block_size] * block_size + p % block_size``; ``cos``/
    ``sin`` ``[N, head_dim]`` are each row's. Each row's key and value are stored first,
    then it attends to its sequence's positions up to its own. A hybrid model's linear
    layers take ``states``: its state pools (hybrid_cache.py's PagedHybridCache) and each
    row's slot, in a step of one row per sequence. None where the kernels do not run or
    do not cover the block size or one of the layers' weights."""
    native = kernels.native(x)
    if native is None or not _covers(native, "paged_block_align", block_size):
        return None
    weights = [layer_weights(native, layer) for layer in layers]
    if None in weights:
        return None
    with collective_errors(layers[0].world):
        return native.paged_layers(
            x,
            weights,
            cos,
            sin,
            k_cache,
            v_cache,
            positions,
            row_seq,
            block_tables,
            block_size,
            *(states or ()),
        )


# Each layer's DecoderLayerWeights (or None), built on first use; a model whose tensors
# are moved or converted forgets its layers' (``forget``).
_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forget(model: nn.Module) -> None:
    """Drop what was built from ``model``'s tensors (they are about to be replaced)."""
    for module in model.modules():
        _built.pop(module, None)


def layer_weights(native, layer: nn.Module):
    """``layer``'s DecoderLayerWeights for the kernel module ``native``, or None where the
    kernels do not cover one of its weights."""
    # Looked up on every decode step, so no more than a dictionary lookup (a stamp read
    # through the layer's modules would cost ~35 us a token at 28 layers).
    if layer not in _built:
        _built[layer] = _build_layer_weights(native, layer)
    return _built[layer]


def _group(world) -> str:
    """The name of the process group that sums a block's outputs ('': held whole)."""
    return "" if world is None else world.steps.group_name


def _build_layer_weights(native, layer: nn.Module):
    attn, linear, mlp = (
        getattr(layer, "self_attn", None),
        getattr(layer, "linear_attn", None),
        layer.mlp,
    )
    w = native.DecoderLayerWeights()
    w.eps = layer.input_layernorm.eps
    w.input_norm, w.post_norm = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
    if linear is not None:  # Gated DeltaNet (the hybrid generation)
        if not _covers_delta_net(native, linear):
            return None
        w.linear, w.tiled, w.layer = True, linear.tiled, linear.slot
        w.conv_weight, w.A, w.dt_bias = linear.conv1d.weight, linear.A, linear.dt_bias
        w.linear_norm = linear.norm.weight
        w.k_heads, w.k_dim, w.v_dim = linear.num_k_heads, linear.head_k_dim, linear.head_v_dim
        w.attention_group = _group(linear.out_proj.reduce)
        matrices = {"in_proj": linear.in_proj.weight, "out_proj": linear.out_proj.weight}
    else:
        if not _covers_head_dim(native, attn.head_dim):
            return None
        w.layer, w.gated = attn.slot, attn.gated
        w.num_heads, w.num_kv_heads = attn.num_heads, attn.num_kv_heads
        w.q_norm, w.k_norm = attn.q_norm.weight, attn.k_norm.weight
        w.attention_group = _group(attn.o_proj.reduce)
        matrices = {"qkv": attn.qkv_proj.weight, "o_proj": attn.o_proj.weight}
    if hasattr(mlp, "shared_expert"):
        matrices.update(
            shared_gate_up=mlp.shared_expert.gate_up_proj.weight,
            shared_down=mlp.shared_expert.down_proj.weight,
            shared_gate=mlp.shared_expert_gate.weight,
        )
    if hasattr(mlp, "experts"):
        matrices["router"] = mlp.gate.weight
        w.top_k, w.norm_topk_prob = mlp.top_k, mlp.norm_topk_prob
        w.feed_forward_group, w.expert_first = _group(mlp.reduce), mlp.expert_range[0]
        experts = {
            "expert_gate_up": mlp.experts.gate_up_proj.weight,
            "expert_down": mlp.experts.down_proj.weight,
        }
        for name, stack in experts.items():
            per_expert = [_matrix(native, stack[e]) for e in range(stack.shape[0])]
            if None in per_expert:
                return None
            setattr(w, name, per_expert)
    else:
        w.feed_forward_group = _group(mlp.down_proj.reduce)
        matrices.update(gate_up=mlp.gate_up_proj.weight, down=mlp.down_proj.weight)
    for name, weight in matrices.items():
        matrix = _matrix(native, weight)
        if matrix is None:
            return None
        setattr(w, name, matrix)
    return w
