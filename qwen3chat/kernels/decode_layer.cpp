// One decode step of a whole decoder layer; bindings.cpp runs every layer's in one call
// from Python.
//
// A layer's decode step is about a dozen operations (two norms, four or five products,
// rotary embedding and the cache write, attention, SwiGLU, two residual adds), each
// already one native call. Driven from Python they still cost ~15 interpreter round trips
// and tensor wrappers per layer, 5-9 ms per token at Qwen3-0.6B's 28 layers, a fifth of
// an int4 decode step. Here the same functions run in the same order from C++, so the
// result is bit for bit the per-operation path's. The layer reaches its rows of the KV
// cache by address and adds the residuals in one loop: the view and add operations
// that did it cost ~20 us a layer (3% of a 0.6B int4 step).
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

// SwiGLU feed-forward of one row.
at::Tensor feed_forward(const at::Tensor& h, const Matrix& gate_up, const Matrix& down) {
  return matmul(silu_mul(matmul(h, gate_up)), down);
}

// Mixture of experts for one token, as model/moe.py computes it: softmax over the
// router's logits in float32, the top k (renormalised if asked), each chosen expert's
// output scaled by its weight in the activations' dtype and summed in ascending expert
// order, which is the order the grouped path adds them in.
at::Tensor experts_step(const at::Tensor& h, const DecoderLayerWeights& w) {
  RECORD_FUNCTION("qwen3chat::experts_step", std::vector<c10::IValue>());
  TORCH_CHECK(h.size(0) == 1, "decode_layer: a mixture-of-experts step takes one sequence");
  const auto probs = at::softmax(matmul(h, w.router).view({-1}), -1, at::kFloat);
  auto [weights, chosen] = probs.topk(w.top_k);
  if (w.norm_topk_prob) weights = weights / weights.sum();
  weights = weights.to(h.scalar_type());
  const auto* ids = chosen.data_ptr<int64_t>();
  std::vector<int64_t> order(w.top_k);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  auto out = at::zeros_like(h);
  for (const int64_t i : order) {
    const int64_t e = ids[i];
    out.add_(feed_forward(h, w.expert_gate_up[e], w.expert_down[e]).mul(weights[i]));
  }
  return out;
}

}  // namespace

at::Tensor decode_layer(const at::Tensor& x, const DecoderLayerWeights& w, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        int64_t start) {
  RECORD_FUNCTION("qwen3chat::decode_layer", std::vector<c10::IValue>());
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "decode_layer: expected x [B, 1, hidden]");
  const auto q = qk_norm_rope_into(matmul(rms_norm(x, w.input_norm, w.eps), w.qkv), w.q_norm,
                                   w.k_norm, cos, sin, w.eps, w.num_heads, w.num_kv_heads,
                                   cache_rows(k_cache, v_cache, w.layer, start, 1));
  const auto context = attend(q, cache_rows(k_cache, v_cache, w.layer, 0, start + 1));
  const auto h = add_residual(x, matmul(context, w.o_proj));
  const auto normed = rms_norm(h, w.post_norm, w.eps);
  const bool moe = !w.expert_down.empty();
  return add_residual(h, moe ? experts_step(normed, w) : feed_forward(normed, w.gate_up, w.down));
}
