// Gated DeltaNet's steps (the hybrid generation's linear-attention layers), from the
// layer's input projection to what its output projection multiplies: the short causal
// conv and SiLU, q and k L2-normed, the gate and decay of each value head, the recurrent
// delta rule on the float32 state, and the gated RMSNorm. As model/gated_delta_net.py
// computes it (rounded to the activations' dtype where the torch code rounds), in one
// call where the torch code takes some thirty operations.
//
// A prompt's tokens take the recurrent rule too, a head's tokens in order on one thread,
// 32 columns of its state at a time in that core's L1 (row_ops.inc's delta_rule): 3 dk dv
// multiply-adds a token where the torch code's chunked form takes about three times as
// many in small matrix products and a scan (qwen3.5-0.8b's 128-token prompt, one layer,
// Intel Xeon, 2 threads: 8.9 ms in torch, 5.0 here; `bench` prefill Q8_0 287 -> 351
// tok/s, F16 346 -> 464, Q4_0 at 1024 tokens 308 -> 491; with the rule in L1 and
// AVX-512, 2026-12-05, model 207: 7.4 -> 3.6 ms).
//
// The rule reads each head's state [dk, dv] twice and writes it once. With decay d, key
// k, query q, value v and strength beta:
//   delta = (v - d S^T k) beta,   out = d S^T q + (k . q) delta,   S <- d S + k delta^T,
// the same values as decaying S, reading it with k, writing the delta and reading it with
// q, in one pass over S for the two reads and the write.
#include <ATen/Parallel.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>

#include <cmath>

#include "kernels.h"
#include "row_ops.h"

using qk::with_dtype;

namespace {

// a . b over n floats (a multiple of 8).
float dot(const float* a, const float* b, int64_t n) {
  __m256 sum = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8)
    sum = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), sum);
  return qk::hsum(sum);
}

// torch's softplus (threshold 20: above it, x itself).
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

// The conv of channels [c, c + 8) over their history and n inputs (rows t at rows + t *
// width), each sum rounded to T, into mixed (row t at mixed + t * ld); the history moves on
// by n. Eight channels a vector: a token's inputs lie side by side in the projection. Each
// sum reads its K inputs where they lie, with no window carried from token to token.
template <typename T>
void conv_channels(const T* rows, int64_t width, T* history, const T* w, int64_t K, int64_t c,
                   int64_t n, float* mixed, int64_t ld) {
  const int64_t past = K - 1;
  __m256 taps[kMaxConvKernel], earlier[kMaxConvKernel];
  alignas(32) float lanes[8];
  for (int64_t j = 0; j < K; ++j) {
    for (int i = 0; i < 8; ++i) lanes[i] = static_cast<float>(w[(c + i) * K + j]);
    taps[j] = _mm256_load_ps(lanes);
  }
  for (int64_t j = 0; j < past; ++j) {
    for (int i = 0; i < 8; ++i) lanes[i] = static_cast<float>(history[(c + i) * past + j]);
    earlier[j] = _mm256_load_ps(lanes);
  }
  // Input s: the history's last ones for s < 0.
  const auto input = [&](int64_t s) {
    return s < 0 ? earlier[past + s] : qk::load8(rows + s * width + c);
  };
  for (int64_t t = 0; t < n; ++t) {
    __m256 acc = _mm256_mul_ps(input(t - past), taps[0]);
    for (int64_t j = 1; j < K; ++j) acc = _mm256_fmadd_ps(input(t - past + j), taps[j], acc);
    _mm256_storeu_ps(mixed + t * ld + c, qk::Lanes8::round(T{}, acc));
  }
  for (int64_t j = 0; j < past; ++j) {
    _mm256_store_ps(lanes, input(n - past + j));
    for (int i = 0; i < 8; ++i) history[(c + i) * past + j] = static_cast<T>(lanes[i]);
  }
}

}  // namespace

at::Tensor gated_delta_step(const at::Tensor& proj_in, const at::Tensor& conv_weight_in,
                            const at::Tensor& conv_state, const at::Tensor& A_in,
                            const at::Tensor& dt_bias_in, const at::Tensor& norm_in,
                            const at::Tensor& state, int64_t num_k_heads, int64_t head_k_dim,
                            int64_t head_v_dim, bool tiled, double eps,
                            const c10::optional<at::Tensor>& slots_in) {
  RECORD_FUNCTION("qwen3chat::gated_delta_step", std::vector<c10::IValue>());
  const auto proj = proj_in.contiguous();
  const auto dtype = proj.scalar_type();
  const auto conv_weight = conv_weight_in.to(dtype).contiguous();
  const auto norm = norm_in.to(dtype).contiguous();
  const auto A = A_in.to(at::kFloat).contiguous();
  const auto dt_bias = dt_bias_in.to(at::kFloat).contiguous();
  const int64_t B = proj.size(0), Hv = A.numel(), Hk = num_k_heads, dk = head_k_dim,
                dv = head_v_dim;
  const int64_t key_dim = Hk * dk, value_dim = Hv * dv, C = 2 * key_dim + value_dim;
  const int64_t K = conv_weight.size(1), history = K - 1;
  // Row b's states: slot b, or slots[b] of the pools.
  const auto slots = slots_in.has_value() ? slots_in->contiguous() : at::arange(B, at::kLong);
  const int64_t P = conv_state.size(0);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == B &&
                  (slots_in.has_value() || P == B),
              "gated_delta_step: slots must be int64 [B] (or the states [B, ...])");
  const int64_t* slot = slots.data_ptr<int64_t>();
  std::vector<bool> taken(P);  // rows run in parallel: each on a slot of its own
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slot[b] >= 0 && slot[b] < P && !taken[slot[b]], "gated_delta_step: slot ",
                slot[b], " of ", P, " out of range or taken twice");
    taken[slot[b]] = true;
  }
  TORCH_CHECK(proj.dim() == 3 && proj.size(1) >= 1 && proj.size(2) == C + value_dim + 2 * Hv &&
                  conv_weight.dim() == 2 && conv_weight.size(0) == C && K >= 2 &&
                  conv_state.sizes() == at::IntArrayRef({P, C, history}) &&
                  conv_state.scalar_type() == dtype && conv_state.is_contiguous() &&
                  state.sizes() == at::IntArrayRef({P, Hv, dk, dv}) &&
                  state.scalar_type() == at::kFloat && state.is_contiguous() &&
                  norm.numel() == dv && dt_bias.numel() == Hv && Hv % Hk == 0 &&
                  dv % kDeltaDimBlock == 0 && dk % kDeltaDimBlock == 0 &&
                  K <= kMaxConvKernel && dv <= kMaxHeadDim && dk <= kMaxHeadDim,
              "gated_delta_step: shapes do not match");
  const int64_t steps = proj.size(1), width = proj.size(2);
  auto out = at::empty({B, steps, value_dim}, proj.options());
  const int64_t per_k = Hv / Hk;
  const float q_scale = 1.0f / std::sqrt(static_cast<float>(dk));
  with_dtype(dtype, "gated_delta_step", [&](auto tag) {
    using T = decltype(tag);
    const T* w = conv_weight.data_ptr<T>();
    const float* Ap = A.data_ptr<float>();
    const float* dt = dt_bias.data_ptr<float>();
    // The tokens a block of kStepBlock at a time, so that what is mixed stays small.
    const int64_t block = std::min<int64_t>(steps, kStepBlock);
    std::vector<float> mixed(B * block * C);
    std::vector<T> values(B * block * value_dim);
    for (int64_t t0 = 0; t0 < steps; t0 += block) {
      const int64_t n = std::min<int64_t>(block, steps - t0);
      // Per row, runs of 64 channels (so that a prompt's one row spreads over the threads
      // too): the conv over the history and the block's inputs, rounded (float32 copies of
      // the mixed q, k, v; the history moves on by n).
      const int64_t runs = (C + 63) / 64;
      qk::parallel_for(0, B * runs, 1, [&](int64_t first, int64_t last) {
        for (int64_t i = first; i < last; ++i) {
          const int64_t b = i / runs;
          const T* rows = proj.data_ptr<T>() + (b * steps + t0) * width;
          T* history_row = conv_state.data_ptr<T>() + slot[b] * C * history;
          for (int64_t c = i % runs * 64; c < std::min<int64_t>(C, (i % runs + 1) * 64); c += 8)
            conv_channels<T>(rows, width, history_row, w, K, c, n,
                             mixed.data() + b * block * C, C);
        }
      });
      // Per row and token: SiLU, rounded; q and k L2-normed per key head (q also by
      // dk^-0.5), v rounded back to T.
      qk::parallel_for(0, B * n, 1, [&](int64_t first, int64_t last) {
        for (int64_t i = first; i < last; ++i) {
          const int64_t b = i / n, t = i % n;
          float* m = mixed.data() + (b * block + t) * C;
          silu_rounded(m, C, dtype);
          for (int64_t part = 0; part < 2; ++part) {
            for (int64_t hk = 0; hk < Hk; ++hk) {
              float* x = m + part * key_dim + hk * dk;
              float squares = 0.0f;
              for (int64_t j = 0; j < dk; ++j) squares += x[j] * x[j];
              const float scale =
                  1.0f / std::sqrt(squares + 1e-6f) * (part == 0 ? q_scale : 1.0f);
              for (int64_t j = 0; j < dk; ++j) x[j] *= scale;
            }
          }
          for (int64_t j = 0; j < value_dim; ++j)
            values[(b * block + t) * value_dim + j] = static_cast<T>(m[2 * key_dim + j]);
        }
      });
      // Then every (row, value head) pair's rule over the block's tokens, spread over the
      // threads at once, and each token's gated norm.
      const bool wide = wide_rows(dv);
      const auto rule = wide ? rows16::delta_rule<T> : rows8::delta_rule<T>;
      const auto norm_out = wide ? rows16::gated_norm<T> : rows8::gated_norm<T>;
      qk::parallel_for(0, B * Hv, 1, [&](int64_t first, int64_t last) {
        std::vector<float> o(n * dv);
        float decay[kStepBlock], beta[kStepBlock], kq[kStepBlock];
        for (int64_t i = first; i < last; ++i) {
          const int64_t b = i / Hv, h = i % Hv;
          const int64_t hk = tiled ? h % Hk : h / per_k;
          const float* m = mixed.data() + b * block * C;
          const T* z = proj.data_ptr<T>() + (b * steps + t0) * width + C;
          for (int64_t t = 0; t < n; ++t) {
            const T* beta_in = z + t * width + value_dim;
            const T* a_in = beta_in + Hv;
            beta[t] = 1.0f / (1.0f + std::exp(-static_cast<float>(beta_in[h])));
            decay[t] = std::exp(Ap[h] * softplus(static_cast<float>(a_in[h]) + dt[h]));
            kq[t] = dot(m + t * C + key_dim + hk * dk, m + t * C + hk * dk, dk);
          }
          const DeltaTokens<T> tokens{m + key_dim + hk * dk,
                                      m + hk * dk,
                                      C,
                                      values.data() + b * block * value_dim + h * dv,
                                      value_dim,
                                      decay,
                                      beta,
                                      kq,
                                      n};
          rule(state.data_ptr<float>() + (slot[b] * Hv + h) * dk * dv, tokens, o.data(), dk, dv);
          T* head_out = out.data_ptr<T>() + (b * steps + t0) * value_dim + h * dv;
          for (int64_t t = 0; t < n; ++t)
            norm_out(o.data() + t * dv, z + t * width + h * dv, norm.data_ptr<T>(),
                     head_out + t * value_dim, dv, static_cast<float>(eps));
        }
      });
    }
  });
  return out;
}
