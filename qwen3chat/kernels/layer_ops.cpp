// The small operations of a decoder layer, each done in one call and one pass.
//
// A decode step of Qwen3-0.6B runs about a hundred small torch operations per layer
// (norms, rotary embedding, cache writes, attention, SwiGLU), and on this class of CPU
// their dispatch costs as much time as the matrix products. Each function here does the
// work of several of them, and rounds where the torch code rounds (to the activations'
// dtype after each operation), so results match it to float32 rounding.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "kernels.h"

using qk::hsum;
using qk::load8;

namespace {

// Calls f with a value of the C++ type of a float32, bfloat16 or half tensor.
template <typename F>
void with_dtype(at::ScalarType dtype, const char* name, F f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, name, ": activations must be float32, bfloat16 or float16");
  }
}

// exp of eight floats (Cephes' polynomial, within 2 ulp): softmax and SiLU need
// millions of them per token, and the scalar libm call is several times slower.
inline __m256 exp8(__m256 x) {
  // Below -87 the result would be a denormal; softmax and SiLU only need it to be ~0.
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i exponent =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

// RMSNorm of one row as the torch code computes it: normalise in float32, round to the
// activations' dtype, then scale by the weight in that dtype.
template <typename T>
void rms_norm_row(const T* x, const T* weight, T* out, int64_t dim, float eps) {
  float squares = 0.0f;
  for (int64_t i = 0; i < dim; ++i) squares += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(dim) + eps);
  for (int64_t i = 0; i < dim; ++i) {
    const T normed = static_cast<T>(static_cast<float>(x[i]) * inverse);
    out[i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(normed));
  }
}

// RMSNorm of one head, then its rotation: x * cos + rotate_half(x) * sin, each product
// and the sum rounded to T as three torch operations would.
template <typename T>
void norm_rope_head(const T* x, const T* weight, const T* cos, const T* sin, T* out,
                    int64_t dim, float eps) {
  T normed[512];
  rms_norm_row(x, weight, normed, dim, eps);
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < dim; ++i) {
    const float rotated = i < half ? -static_cast<float>(normed[i + half])
                                   : static_cast<float>(normed[i - half]);
    const T a = static_cast<T>(static_cast<float>(normed[i]) * static_cast<float>(cos[i]));
    const T b = static_cast<T>(rotated * static_cast<float>(sin[i]));
    out[i] = static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
  }
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  const auto x = x_in.contiguous();
  const auto weight = weight_in.to(x.scalar_type()).contiguous();
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  TORCH_CHECK(weight.numel() == dim, "rms_norm: weight does not match the last dimension");
  auto out = at::empty_like(x);
  with_dtype(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        rms_norm_row(xp + r * dim, wp, op + r * dim, dim, static_cast<float>(eps));
    });
  });
  return out;
}

// qkv [B, T, (H + 2 KVH) * D] -> q [B, H, T, D] normed and rotated, returned; k (normed,
// rotated) and v written to k_out/v_out [B, KVH, T, D] (views into the KV cache).
at::Tensor qk_norm_rope(const at::Tensor& qkv_in, const at::Tensor& q_weight_in,
                        const at::Tensor& k_weight_in, const at::Tensor& cos_in,
                        const at::Tensor& sin_in, double eps, int64_t num_heads,
                        int64_t num_kv_heads, const at::Tensor& k_out, const at::Tensor& v_out) {
  const auto qkv = qkv_in.contiguous();
  const auto dtype = qkv.scalar_type();
  const auto q_weight = q_weight_in.to(dtype).contiguous();
  const auto k_weight = k_weight_in.to(dtype).contiguous();
  const auto cos = cos_in.to(dtype).contiguous();
  const auto sin = sin_in.to(dtype).contiguous();
  const int64_t B = qkv.size(0), T = qkv.size(1), D = q_weight.numel();
  const int64_t width = qkv.size(2), q_size = num_heads * D, kv_size = num_kv_heads * D;
  TORCH_CHECK(width == q_size + 2 * kv_size && D <= 512 && D % 2 == 0 &&
                  cos.size(0) == T && cos.size(1) == D && k_out.sizes() == v_out.sizes() &&
                  k_out.size(0) == B && k_out.size(1) == num_kv_heads && k_out.size(2) == T &&
                  k_out.size(3) == D && k_out.stride(3) == 1 && v_out.stride(3) == 1 &&
                  k_out.scalar_type() == dtype && v_out.scalar_type() == dtype,
              "qk_norm_rope: shapes do not match");
  auto q = at::empty({B, num_heads, T, D}, qkv.options());
  with_dtype(dtype, "qk_norm_rope", [&](auto tag) {
    using S = decltype(tag);
    const S* src = qkv.data_ptr<S>();
    const S* qw = q_weight.data_ptr<S>();
    const S* kw = k_weight.data_ptr<S>();
    const S* cp = cos.data_ptr<S>();
    const S* sp = sin.data_ptr<S>();
    S* qp = q.data_ptr<S>();
    S* kp = k_out.data_ptr<S>();
    S* vp = v_out.data_ptr<S>();
    const auto ks = k_out.strides();
    const auto vs = v_out.strides();
    const int64_t heads = num_heads + num_kv_heads;
    // One task per (batch, token, head): q heads first, then k heads (which copy v too).
    at::parallel_for(0, B * T * heads, 8, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (T * heads), t = i / heads % T, h = i % heads;
        const S* row = src + (b * T + t) * width;
        const S* c = cp + t * D;
        const S* s = sp + t * D;
        if (h < num_heads) {
          norm_rope_head(row + h * D, qw, c, s, qp + ((b * num_heads + h) * T + t) * D, D,
                         static_cast<float>(eps));
        } else {
          const int64_t kh = h - num_heads;
          norm_rope_head(row + q_size + kh * D, kw, c, s,
                         kp + b * ks[0] + kh * ks[1] + t * ks[2], D, static_cast<float>(eps));
          const S* v = row + q_size + kv_size + kh * D;
          std::copy(v, v + D, vp + b * vs[0] + kh * vs[1] + t * vs[2]);
        }
      }
    });
  });
  return q;
}

namespace {

// out[d] += sum over l of p[l] * values[l][d] for a block of 8 * V columns, kept in
// registers across the whole sweep over the cache.
template <int V, typename S>
void weighted_sum(const float* p, const S* values, int64_t stride, int64_t L, float* out) {
  __m256 acc[V];
  for (int j = 0; j < V; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t l = 0; l < L; ++l) {
    const __m256 weight = _mm256_set1_ps(p[l]);
    const S* value = values + l * stride;
    for (int j = 0; j < V; ++j) acc[j] = _mm256_fmadd_ps(weight, load8(value + 8 * j), acc[j]);
  }
  for (int j = 0; j < V; ++j) _mm256_storeu_ps(out + 8 * j, acc[j]);
}

}  // namespace

// One query token: q [B, H, 1, D], k and v [B, KVH, L, D] (cache views) -> [B, 1, H * D].
// Scores, softmax and the weighted sum in float32, the result rounded once, as SDPA does.
// One task per KV head: each cached key is widened once for all the query heads that
// share it.
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v) {
  const auto q = q_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  const int64_t KVH = k.size(1), L = k.size(2);
  TORCH_CHECK(q.size(2) == 1 && H % KVH == 0 && D % 8 == 0 && k.sizes() == v.sizes() &&
                  k.size(3) == D && k.stride(3) == 1 && v.stride(3) == 1 &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "decode_attention: shapes do not match");
  auto out = at::empty({B, 1, H * D}, q.options());
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t groups = H / KVH, padded = (L + 7) / 8 * 8;
  with_dtype(q.scalar_type(), "decode_attention", [&](auto tag) {
    using S = decltype(tag);
    const S* qp = q.data_ptr<S>();
    const S* kp = k.data_ptr<S>();
    const S* vp = v.data_ptr<S>();
    S* op = out.data_ptr<S>();
    const auto ks = k.strides();
    const auto vs = v.strides();
    at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(groups * padded), query(groups * D), key(D), acc(D);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / KVH, kh = i % KVH, first = b * H + kh * groups;
        const S* keys = kp + b * ks[0] + kh * ks[1];
        const S* values = vp + b * vs[0] + kh * vs[1];
        for (int64_t d = 0; d < groups * D; ++d)
          query[d] = static_cast<float>(qp[first * D + d]) * scale;
        for (int64_t l = 0; l < L; ++l) {
          for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(key.data() + d, load8(keys + l * ks[2] + d));
          for (int64_t g = 0; g < groups; ++g) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            for (int64_t d = 0; d < D; d += 16) {
              a0 = _mm256_fmadd_ps(_mm256_loadu_ps(key.data() + d), _mm256_loadu_ps(query.data() + g * D + d), a0);
              if (d + 8 < D)
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(key.data() + d + 8),
                                     _mm256_loadu_ps(query.data() + g * D + d + 8), a1);
            }
            scores[g * padded + l] = hsum(_mm256_add_ps(a0, a1));
          }
        }
        for (int64_t g = 0; g < groups; ++g) {
          float* p = scores.data() + g * padded;
          float top = -INFINITY;
          for (int64_t l = 0; l < L; ++l) top = std::max(top, p[l]);
          for (int64_t l = 0; l < padded; l += 8)
            _mm256_storeu_ps(p + l, exp8(_mm256_sub_ps(_mm256_loadu_ps(p + l), _mm256_set1_ps(top))));
          float sum = 0.0f;
          for (int64_t l = 0; l < L; ++l) sum += p[l];
          for (int64_t d = 0; d < D; d += 64) {
            if (D - d >= 64) {
              weighted_sum<8>(p, values + d, vs[2], L, acc.data() + d);
            } else {
              for (int64_t e = d; e < D; e += 8) weighted_sum<1>(p, values + e, vs[2], L, acc.data() + e);
            }
          }
          S* o = op + (first + g) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<S>(acc[d] / sum);
        }
      }
    });
  });
  return out;
}

// gate_up [..., 2I] -> silu(gate) * up [..., I], each rounded as two torch operations.
at::Tensor silu_mul(const at::Tensor& gate_up_in) {
  const auto gate_up = gate_up_in.contiguous();
  const int64_t width = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * width);
  TORCH_CHECK(width % 8 == 0, "silu_mul: the width must be a multiple of 8");
  auto sizes = gate_up.sizes().vec();
  sizes.back() = width;
  auto out = at::empty(sizes, gate_up.options());
  with_dtype(gate_up.scalar_type(), "silu_mul", [&](auto tag) {
    using S = decltype(tag);
    const S* gp = gate_up.data_ptr<S>();
    S* op = out.data_ptr<S>();
    at::parallel_for(0, rows * width / 8, 64, [&](int64_t begin, int64_t end) {
      float silu[8];
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i * 8 / width, c = i * 8 % width;
        const S* gate = gp + r * 2 * width + c;
        const __m256 g = load8(gate);
        const __m256 one = _mm256_set1_ps(1.0f);
        _mm256_storeu_ps(silu, _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)))));
        for (int j = 0; j < 8; ++j) {
          const S rounded = static_cast<S>(silu[j]);
          op[r * width + c + j] = static_cast<S>(static_cast<float>(rounded) * static_cast<float>(gate[width + j]));
        }
      }
    });
  });
  return out;
}
