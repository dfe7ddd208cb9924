// The k largest logits of each row, for top-k sampling.
//
// torch.topk over a 151,936-id vocabulary took 3.4 ms for 16 rows (2 threads, Intel Xeon):
// 5% of a 16-sequence int4 decode step. One sweep keeps the k largest values seen so far,
// sorted; a value must beat the k-th of them to enter, and past the first few thousand
// ids almost none does, so the sweep is one compare per eight values.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <limits>

#include "kernels.h"

namespace {

// Row [V]'s k largest values, largest first, into values/ids; equal values in id order
// (an equal value found later does not beat a kept one). NaN never enters; a row with
// fewer than k other values is padded with -inf at id 0, which sampling never draws.
template <typename T>
void row_top_k(const T* row, int64_t V, int64_t k, float* values, int64_t* ids) {
  int64_t kept = 0;
  float least = -std::numeric_limits<float>::infinity();  // to beat once k are kept
  auto offer = [&](float v, int64_t id) {
    if (!(v > least) && !(kept < k && v == v)) return;
    int64_t at = std::min(kept, k - 1);
    for (; at > 0 && values[at - 1] < v; --at) {
      values[at] = values[at - 1];
      ids[at] = ids[at - 1];
    }
    values[at] = v;
    ids[at] = id;
    kept = std::min(kept + 1, k);
    if (kept == k) least = values[k - 1];
  };
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 v = qk::load8(row + i);
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(least), _CMP_GT_OQ));
    if (kept < k) mask = 0xFF;  // -inf itself, and equal values, still enter
    while (mask) {
      const int lane = __builtin_ctz(mask);
      mask &= mask - 1;
      offer(static_cast<float>(row[i + lane]), i + lane);
    }
  }
  for (; i < V; ++i) offer(static_cast<float>(row[i]), i);
  for (; kept < k; ++kept) {
    values[kept] = -std::numeric_limits<float>::infinity();
    ids[kept] = 0;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> top_k(const at::Tensor& logits_in, int64_t k) {
  RECORD_FUNCTION("qwen3chat::top_k", std::vector<c10::IValue>());
  const auto logits = logits_in.contiguous();
  TORCH_CHECK(logits.dim() == 2 && k > 0 && k <= logits.size(1),
              "top_k: expected logits [rows, vocab] and 0 < k <= vocab");
  const int64_t M = logits.size(0), V = logits.size(1);
  auto values = at::empty({M, k}, logits.options().dtype(at::kFloat));
  auto ids = at::empty({M, k}, logits.options().dtype(at::kLong));
  qk::with_dtype(logits.scalar_type(), "top_k", [&](auto tag) {
    using T = decltype(tag);
    const T* lp = logits.data_ptr<T>();
    float* vp = values.data_ptr<float>();
    int64_t* ip = ids.data_ptr<int64_t>();
    qk::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) row_top_k(lp + m * V, V, k, vp + m * k, ip + m * k);
    });
  });
  return {values, ids};
}
