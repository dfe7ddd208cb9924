// One decode step of a whole decoder layer, or one step of a batch of sequences' rows
// over a paged KV cache (the server's); bindings.cpp runs every layer's in one call from
// Python. Both run one layer body and differ only in where attention finds its rows.
//
// A layer's decode step is about a dozen operations (two norms, four or five products,
// rotary embedding and the cache write, attention, SwiGLU, two residual adds), each
// already one native call. Driven from Python they still cost ~15 interpreter round trips
// and tensor wrappers per layer, 5-9 ms per token at Qwen3-0.6B's 28 layers, a fifth of
// an int4 decode step. Here the same functions run in the same order from C++, so the
// result is bit for bit the per-operation path's. The layer reaches its rows of the KV
// cache by address and adds the residuals in one loop: the view and add operations
// that did it cost ~20 us a layer (3% of a 0.6B int4 step).
//
// Run across processes (distributed/), a layer holds a share of its heads, widths or
// experts, and a block's output is the sum over processes of each one's part: the
// all-reduce runs here, between the blocks, through torch.distributed's functional
// collective (the dispatcher finds it by name; the process group by its name), so a
// sharded step is still one call: from Python, layer by layer, it cost ~2 ms a layer
// more on Qwen3-30B-A3B's MoE blocks.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <numeric>

#include "kernels.h"

at::Tensor matmul(const at::Tensor& x, const Matrix& w) {
  const auto rows = x.reshape({-1, x.size(-1)});
  at::Tensor out;
  switch (w.bits) {
    case 0:
      out = dense_linear(rows, w.weight);
      break;
    case 8:
      out = q8_linear(rows, w.weight, *w.scales);
      break;
    case 4:
      out = q4_linear(rows, w.weight, *w.scales, w.zeros);
      break;
    default:
      TORCH_CHECK(false, "matmul: bits must be 0 (float), 8 or 4");
  }
  auto sizes = x.sizes().vec();
  sizes.back() = out.size(1);
  return out.view(sizes);
}

namespace {

// The sum over the processes of ``group`` of their float32 ``x``, in place.
at::Tensor summed(at::Tensor x, const std::string& group) {
  RECORD_FUNCTION("qwen3chat::all_reduce", std::vector<c10::IValue>());
  static const auto all_reduce =
      c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::all_reduce_", "");
  static const auto wait =
      c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::wait_tensor", "");
  std::vector<c10::IValue> stack{x, std::string("sum"), group};
  all_reduce.callBoxed(&stack);
  stack = {x};
  wait.callBoxed(&stack);
  return x;
}

// x @ w.T; where ``group`` is set, the sum over its processes of each one's product with
// its columns of w: partial products in float32, rounded once after the sum, as
// model/layers.py's Linear with ``reduce`` computes it.
at::Tensor block_output(const at::Tensor& x, const Matrix& w, const std::string& group) {
  if (group.empty()) return matmul(x, w);
  return summed(matmul(x.to(at::kFloat), w), group).to(x.scalar_type());
}

// SwiGLU feed-forward of a block of rows (its output summed over ``group`` where set).
at::Tensor feed_forward(const at::Tensor& h, const Matrix& gate_up, const Matrix& down,
                        const std::string& group = {}) {
  return block_output(silu_mul(matmul(h, gate_up)), down, group);
}

// Mixture of experts for the rows of h, as model/moe.py computes it: softmax over the
// router's logits in float32, each row's top k (renormalised if asked), each expert's
// output scaled by its weight in the activations' dtype and summed in ascending expert
// order, which is the order the grouped path adds them in. Each expert that got rows runs
// once on all of them (its weights read once); the others are not touched. Across
// processes, a process runs the experts it holds (or its share of each one's width) and
// the float32 sum over processes is rounded once, as model/moe.py does.
at::Tensor experts_step(const at::Tensor& x, const DecoderLayerWeights& w) {
  RECORD_FUNCTION("qwen3chat::experts_step", std::vector<c10::IValue>());
  const auto h = x.reshape({-1, x.size(-1)});
  const int64_t rows = h.size(0), k = w.top_k;
  const auto probs = at::softmax(matmul(h, w.router), -1, at::kFloat);
  auto [weights, chosen] = probs.topk(k);
  if (w.norm_topk_prob) weights = weights.div(weights.sum(-1, true));
  weights = weights.to(h.scalar_type()).view({-1});
  // The (row, choice) pairs by expert, then row.
  const auto* ids = chosen.data_ptr<int64_t>();
  std::vector<int64_t> pairs(rows * k);
  std::iota(pairs.begin(), pairs.end(), 0);
  std::sort(pairs.begin(), pairs.end(), [&](int64_t a, int64_t b) {
    return ids[a] != ids[b] ? ids[a] < ids[b] : a < b;
  });
  std::vector<int64_t> pair_rows(pairs.size());
  for (size_t i = 0; i < pairs.size(); ++i) pair_rows[i] = pairs[i] / k;
  const bool split = !w.feed_forward_group.empty();
  auto out = at::zeros_like(h, split ? at::kFloat : h.scalar_type());
  const int64_t held = static_cast<int64_t>(w.expert_down.size());
  if (w.shared_down.weight.defined()) {  // the shared expert, weighted by its gate
    const auto gate = at::sigmoid(matmul(h, w.shared_gate));
    out.add_(feed_forward(h, w.shared_gate_up, w.shared_down).mul(gate));
  }
  for (int64_t first = 0, last; first < rows * k; first = last) {
    const int64_t e = ids[pairs[first]];
    for (last = first + 1; last < rows * k && ids[pairs[last]] == e; ++last) {
    }
    const int64_t count = last - first, local = e - w.expert_first;
    if (local < 0 || local >= held) continue;  // another process's expert
    const auto scale =
        weights.index_select(0, at::from_blob(pairs.data() + first, {count}, at::kLong))
            .unsqueeze(1);
    if (count == rows) {  // every row (a decode step's one): nothing to gather or scatter
      out.add_(feed_forward(h, w.expert_gate_up[local], w.expert_down[local]).mul(scale));
    } else {
      const auto index = at::from_blob(pair_rows.data() + first, {count}, at::kLong);
      const auto y =
          feed_forward(h.index_select(0, index), w.expert_gate_up[local], w.expert_down[local]);
      out.index_add_(0, index, y.mul(scale).to(out.scalar_type()));
    }
  }
  if (split) out = summed(out, w.feed_forward_group).to(h.scalar_type());
  return out.view(x.sizes());
}

// The token mixer of a layer's normed rows: attention (``attention`` turning qkv into its
// outputs, storing keys and values: the contiguous and the paged caches differ only
// there), gated where the layer is; or Gated DeltaNet on its states (a row a sequence:
// row i on slot ``row_states[i]`` of the pools where given).
template <typename Attention>
at::Tensor mixer(const at::Tensor& normed, const DecoderLayerWeights& w, Attention attention,
                 const at::Tensor& conv_cache, const at::Tensor& delta_cache,
                 const at::Tensor& row_states) {
  if (w.linear) {
    const auto proj = matmul(normed, w.in_proj);
    const auto out = gated_delta_step(
        proj.view({-1, 1, proj.size(-1)}), w.conv_weight, conv_cache[w.layer], w.A, w.dt_bias,
        w.linear_norm, delta_cache[w.layer], w.k_heads, w.k_dim, w.v_dim, w.tiled, w.eps,
        row_states.defined() ? c10::optional<at::Tensor>(row_states) : c10::nullopt);
    return block_output(out, w.out_proj, w.attention_group).view(normed.sizes());
  }
  auto qkv = matmul(normed, w.qkv);
  if (!w.gated) return block_output(attention(qkv), w.o_proj, w.attention_group);
  const int64_t q_size = w.num_heads * w.q_norm.numel();
  auto sizes = qkv.sizes().vec();
  const auto q_gate = qkv.narrow(-1, 0, 2 * q_size);
  sizes.back() = w.num_heads;
  sizes.push_back(2);
  sizes.push_back(w.q_norm.numel());
  const auto heads = q_gate.reshape(sizes);
  const auto q = heads.select(-2, 0).flatten(-2);
  const auto gate = heads.select(-2, 1).flatten(-2);
  const auto plain = at::cat({q, qkv.narrow(-1, 2 * q_size, qkv.size(-1) - 2 * q_size)}, -1);
  return block_output(attention(plain).mul(at::sigmoid(gate)), w.o_proj, w.attention_group);
}

// A decoder layer on the rows of x.
template <typename Attention>
at::Tensor layer_body(const at::Tensor& x, const DecoderLayerWeights& w, Attention attention,
                      const at::Tensor& conv_cache, const at::Tensor& delta_cache,
                      const at::Tensor& row_states = {}) {
  const auto normed_in = rms_norm(x, w.input_norm, w.eps);
  const auto h =
      add_residual(x, mixer(normed_in, w, attention, conv_cache, delta_cache, row_states));
  const auto normed = rms_norm(h, w.post_norm, w.eps);
  const bool moe = !w.expert_down.empty();
  return add_residual(h, moe ? experts_step(normed, w)
                             : feed_forward(normed, w.gate_up, w.down, w.feed_forward_group));
}

}  // namespace

at::Tensor decode_layer(const at::Tensor& x, const DecoderLayerWeights& w, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        int64_t start, const at::Tensor& conv_cache, const at::Tensor& delta_cache) {
  RECORD_FUNCTION("qwen3chat::decode_layer", std::vector<c10::IValue>());
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "decode_layer: expected x [B, 1, hidden]");
  TORCH_CHECK(!w.linear || (conv_cache.defined() && delta_cache.defined()),
              "decode_layer: a linear layer needs its conv and delta states");
  return layer_body(
      x, w,
      [&](const at::Tensor& qkv) {
        const auto q =
            qk_norm_rope_into(qkv, w.q_norm, w.k_norm, cos, sin, w.eps, w.num_heads,
                              w.num_kv_heads, cache_rows(k_cache, v_cache, w.layer, start, 1));
        return attend(q, cache_rows(k_cache, v_cache, w.layer, 0, start + 1));
      },
      conv_cache, delta_cache);
}

at::Tensor paged_layer(const at::Tensor& x, const DecoderLayerWeights& w, const at::Tensor& cos,
                       const at::Tensor& sin, const PagedKV& cache, const at::Tensor& conv_cache,
                       const at::Tensor& delta_cache, const at::Tensor& row_states) {
  RECORD_FUNCTION("qwen3chat::paged_layer", std::vector<c10::IValue>());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == cache.rows,
              "paged_layer: expected x [N, hidden] for the N rows of positions");
  // The decode form of the rule moves a state on by one token: one row per sequence.
  TORCH_CHECK(!w.linear || (row_states.defined() && conv_cache.defined() &&
                            delta_cache.defined() && cache.rows == cache.block_tables_.size(0)),
              "paged_layer: a linear layer needs one row per sequence and its state slots");
  return layer_body(
      x, w,
      [&](const at::Tensor& qkv) {
        const auto q = qk_norm_rope_into(qkv, w.q_norm, w.k_norm, cos, sin, w.eps, w.num_heads,
                                         w.num_kv_heads, cache, w.layer);
        return attend(q, cache, w.layer);
      },
      conv_cache, delta_cache, row_states);
}
