// The small operations of a decoder layer, each done in one call and one pass.
//
// A decode step of Qwen3-0.6B runs about a hundred small torch operations per layer
// (norms, rotary embedding, cache writes, attention, SwiGLU), and on this class of CPU
// their dispatch costs as much time as the matrix products. Each function here does the
// work of several of them, and rounds where the torch code rounds (to the activations'
// dtype after each operation), so results match it to float32 rounding.
#include <ATen/Parallel.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/tensor.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "row_ops.h"

using qk::hsum;
using qk::load8;
using qk::round_to;
using qk::store8;
using qk::with_dtype;

namespace {

// The row operations' AVX-512 build runs (set_avx512_rows) for rows of a multiple of 16
// values: a 16-sequence Q4_0 decode step's q/k norms and rotary embedding took 2.1 ms with
// AVX2 on an Intel Xeon (two threads), SwiGLU 1.1, RMSNorm 0.7.
std::atomic<bool> avx512_rows{false};

}  // namespace

bool wide_rows(int64_t width) { return avx512_rows && width % 16 == 0; }

namespace {

// x [D] as an int8 cache's row, as kv_cache.py's quantize_rows does it: per block of 32,
// scale = max |x| / 127 and codes x * (1 / scale) rounded to nearest even (the MXCSR
// default, torch.round's rule); then the scales as float16.
template <typename T>
void quantize_kv_row(const T* x, int8_t* out, int64_t D) {
  auto* scales = reinterpret_cast<c10::Half*>(out + D);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t b = 0; b < D; b += kKvBlock) {
    __m256 v[4], top = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = load8(x + b + 8 * i);
      top = _mm256_max_ps(top, _mm256_and_ps(v[i], magnitude));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    const float scale = _mm_cvtss_f32(m) / 127.0f;
    const __m256 inverse = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
    __m256i codes[4];
    for (int i = 0; i < 4; ++i) codes[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));
    // packs interleave the 128-bit lanes; the permutation puts the 32 codes back in order.
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(codes[0], codes[1]),
                                             _mm256_packs_epi32(codes[2], codes[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + b),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    scales[b / kKvBlock] = c10::Half(scale);
  }
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  RECORD_FUNCTION("qwen3chat::rms_norm", std::vector<c10::IValue>());
  const auto x = x_in.contiguous();
  const auto weight = weight_in.to(x.scalar_type()).contiguous();
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  TORCH_CHECK(weight.numel() == dim && dim % kNormBlock == 0,
              "rms_norm: the weight must match the last dimension, a multiple of 8");
  auto out = at::empty_like(x);
  with_dtype(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const auto norm_row = wide_rows(dim) ? rows16::rms_norm_row<T> : rows8::rms_norm_row<T>;
    qk::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        norm_row(xp + r * dim, wp, op + r * dim, dim, static_cast<float>(eps));
    });
  });
  return out;
}

int64_t kv_head_dim(int64_t width, at::ScalarType dtype) {
  if (dtype != at::kChar) return width;
  TORCH_CHECK(width % (kKvBlock + 2) == 0, "an int8 KV cache's rows are ", kKvBlock + 2,
              " bytes a block of ", kKvBlock, " values, not ", width);
  return width / (kKvBlock + 2) * kKvBlock;
}

KVRows kv_rows(const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.stride(3) == 1 && v.stride(3) == 1 &&
                  k.scalar_type() == v.scalar_type(),
              "kv_rows: keys and values must be [B, KVH, L, D] with D contiguous");
  return {k.data_ptr(), v.data_ptr(), {k.stride(0), k.stride(1), k.stride(2)},
          {v.stride(0), v.stride(1), v.stride(2)}, k.size(0), k.size(1), k.size(2),
          kv_head_dim(k.size(3), k.scalar_type()), k.scalar_type()};
}

KVRows cache_rows(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t layer,
                  int64_t first, int64_t count) {
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.stride(4) == 1 && v_cache.stride(4) == 1 &&
                  k_cache.scalar_type() == v_cache.scalar_type() && layer >= 0 &&
                  layer < k_cache.size(0) && first >= 0 && first + count <= k_cache.size(3),
              "cache_rows: no such layer or rows in the KV cache");
  const int64_t size = k_cache.element_size();
  auto at_row = [&](const at::Tensor& c) {
    return static_cast<char*>(c.data_ptr()) + (layer * c.stride(0) + first * c.stride(3)) * size;
  };
  return {at_row(k_cache), at_row(v_cache),
          {k_cache.stride(1), k_cache.stride(2), k_cache.stride(3)},
          {v_cache.stride(1), v_cache.stride(2), v_cache.stride(3)}, k_cache.size(1),
          k_cache.size(2), count, kv_head_dim(k_cache.size(4), k_cache.scalar_type()),
          k_cache.scalar_type()};
}

PagedKV paged_kv(const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& positions_in, const at::Tensor& row_seq_in,
                 const at::Tensor& block_tables_in, int64_t block_size) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_kv: the caches must be contiguous [layers, kv_heads, slots, head_dim] "
              "of one shape and dtype");
  TORCH_CHECK(block_size > 0 && block_size % kPagedBlockAlign == 0 &&
                  k_cache.size(2) % block_size == 0,
              "paged_kv: block_size must be a multiple of ", kPagedBlockAlign,
              " dividing the slots, got ", block_size, " for ", k_cache.size(2), " slots");
  TORCH_CHECK(positions_in.scalar_type() == at::kLong && row_seq_in.scalar_type() == at::kLong &&
                  positions_in.dim() == 1 && row_seq_in.sizes() == positions_in.sizes(),
              "paged_kv: positions and row_seq must be int64 [N]");
  TORCH_CHECK(block_tables_in.scalar_type() == at::kInt && block_tables_in.dim() == 2,
              "paged_kv: block_tables must be int32 [sequences, max_blocks]");
  PagedKV kv;
  kv.k_cache = k_cache;
  kv.v_cache = v_cache;
  kv.positions_ = positions_in.contiguous();
  kv.row_seq_ = row_seq_in.contiguous();
  kv.block_tables_ = block_tables_in.contiguous();
  kv.positions = kv.positions_.data_ptr<int64_t>();
  kv.row_seq = kv.row_seq_.data_ptr<int64_t>();
  kv.block_tables = kv.block_tables_.data_ptr<int32_t>();
  kv.rows = kv.positions_.size(0);
  kv.layers = k_cache.size(0);
  kv.heads = k_cache.size(1);
  kv.slots = k_cache.size(2);
  kv.dim = kv_head_dim(k_cache.size(3), k_cache.scalar_type());
  kv.block_size = block_size;
  kv.max_blocks = kv.block_tables_.size(1);
  kv.dtype = k_cache.scalar_type();
  // Every block a row reads or writes, checked here so that the kernels index freely.
  const int64_t sequences = kv.block_tables_.size(0), blocks = kv.slots / block_size;
  for (int64_t i = 0; i < kv.rows; ++i) {
    const int64_t seq = kv.row_seq[i], position = kv.positions[i];
    TORCH_CHECK(seq >= 0 && seq < sequences, "paged_kv: row ", i, " names sequence ", seq,
                " of ", sequences);
    TORCH_CHECK(position >= 0 && position / block_size < kv.max_blocks, "paged_kv: row ", i,
                "'s position ", position, " is past its block table (", kv.max_blocks,
                " blocks)");
    const int32_t* table = kv.table(i);
    for (int64_t j = 0; j <= position / block_size; ++j)
      TORCH_CHECK(table[j] >= 0 && table[j] < blocks, "paged_kv: sequence ", seq, "'s block ", j,
                  " is ", table[j], ", not one of the cache's ", blocks);
  }
  return kv;
}

at::Tensor qk_norm_rope(const at::Tensor& qkv, const at::Tensor& q_weight,
                        const at::Tensor& k_weight, const at::Tensor& cos, const at::Tensor& sin,
                        double eps, int64_t num_heads, int64_t num_kv_heads,
                        const at::Tensor& k_out, const at::Tensor& v_out) {
  return qk_norm_rope_into(qkv, q_weight, k_weight, cos, sin, eps, num_heads, num_kv_heads,
                           kv_rows(k_out, v_out));
}

at::Tensor paged_qk_norm_rope(const at::Tensor& qkv, const at::Tensor& q_weight,
                              const at::Tensor& k_weight, const at::Tensor& cos,
                              const at::Tensor& sin, double eps, int64_t num_heads,
                              int64_t num_kv_heads, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, int64_t layer,
                              const at::Tensor& positions, const at::Tensor& row_seq,
                              const at::Tensor& block_tables, int64_t block_size) {
  return qk_norm_rope_into(qkv, q_weight, k_weight, cos, sin, eps, num_heads, num_kv_heads,
                           paged_kv(k_cache, v_cache, positions, row_seq, block_tables, block_size),
                           layer);
}

namespace {

// Where one row of qkv goes: the row of cos/sin that rotates it, and the offsets (in
// elements) of its key and value rows from the cache's pointers, for KV head 0.
struct RowPlace {
  int64_t rope, k, v;
};

// qkv's B * T rows [(H + 2 KVH) * D] -> q [B, H, T, D] normed and rotated, returned; each
// row's k (normed, rotated) and v written at place(b, t), KV head h at h * k_head
// (v_head) elements further. The contiguous and the paged caches differ only in place.
template <typename Place>
at::Tensor norm_rope_rows(const at::Tensor& qkv_in, const at::Tensor& q_weight_in,
                          const at::Tensor& k_weight_in, const at::Tensor& cos_in,
                          const at::Tensor& sin_in, double eps, int64_t num_heads,
                          int64_t num_kv_heads, int64_t B, int64_t T, at::IntArrayRef q_sizes,
                          void* k_out, void* v_out, int64_t k_head, int64_t v_head,
                          at::ScalarType out_dtype, Place place) {
  const auto qkv = qkv_in.contiguous();
  const auto dtype = qkv.scalar_type();
  const auto q_weight = q_weight_in.to(dtype).contiguous();
  const auto k_weight = k_weight_in.to(dtype).contiguous();
  const auto cos = cos_in.to(dtype).contiguous();
  const auto sin = sin_in.to(dtype).contiguous();
  const int64_t D = q_weight.numel(), rot = cos.size(-1);
  const int64_t width = qkv.size(-1), q_size = num_heads * D, kv_size = num_kv_heads * D;
  TORCH_CHECK(width == q_size + 2 * kv_size && qkv.numel() == B * T * width &&
                  D <= kMaxHeadDim && D % kHeadDimBlock == 0 && cos.dim() == 2 &&
                  rot <= D && rot % kHeadDimBlock == 0 && sin.sizes() == cos.sizes() &&
                  (out_dtype == dtype || (out_dtype == at::kChar && D % kKvBlock == 0)),
              "qk_norm_rope: shapes do not match");
  const bool quantized = out_dtype == at::kChar;
  auto q = at::empty(q_sizes, qkv.options());
  with_dtype(dtype, "qk_norm_rope", [&](auto tag) {
    using S = decltype(tag);
    const S* src = qkv.data_ptr<S>();
    const S* qw = q_weight.data_ptr<S>();
    const S* kw = k_weight.data_ptr<S>();
    const S* cp = cos.data_ptr<S>();
    const S* sp = sin.data_ptr<S>();
    S* qp = q.data_ptr<S>();
    // Into an int8 cache by the row's quantized form (k via a row in S, as stored in S).
    auto store = [&](const S* x, void* base, int64_t offset) {
      if (quantized)
        quantize_kv_row(x, static_cast<int8_t*>(base) + offset, D);
      else
        std::copy(x, x + D, static_cast<S*>(base) + offset);
    };
    const auto norm_rope_head =
        wide_rows(D) && rot % 32 == 0 ? rows16::norm_rope_head<S> : rows8::norm_rope_head<S>;
    const int64_t heads = num_heads + num_kv_heads;
    // One task per (batch, token, head): q heads first, then k heads (which copy v too).
    qk::parallel_for(0, B * T * heads, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (T * heads), t = i / heads % T, h = i % heads;
        const S* row = src + (b * T + t) * width;
        const RowPlace at = place(b, t);
        const S* c = cp + at.rope * rot;
        const S* s = sp + at.rope * rot;
        if (h < num_heads) {
          norm_rope_head(row + h * D, qw, c, s, qp + ((b * num_heads + h) * T + t) * D, D, rot,
                         static_cast<float>(eps));
        } else {
          const int64_t kh = h - num_heads;
          alignas(64) S k[kMaxHeadDim];
          norm_rope_head(row + q_size + kh * D, kw, c, s, k, D, rot, static_cast<float>(eps));
          store(k, k_out, at.k + kh * k_head);
          store(row + q_size + kv_size + kh * D, v_out, at.v + kh * v_head);
        }
      }
    });
  });
  return q;
}

}  // namespace

// qkv [B, T, (H + 2 KVH) * D] -> q [B, H, T, D]; k and v written to out's rows [B, KVH, T, D].
at::Tensor qk_norm_rope_into(const at::Tensor& qkv, const at::Tensor& q_weight,
                             const at::Tensor& k_weight, const at::Tensor& cos,
                             const at::Tensor& sin, double eps, int64_t num_heads,
                             int64_t num_kv_heads, const KVRows& out) {
  RECORD_FUNCTION("qwen3chat::qk_norm_rope", std::vector<c10::IValue>());
  TORCH_CHECK(qkv.dim() == 3, "qk_norm_rope: expected qkv [B, T, (H + 2 KVH) * D]");
  const int64_t B = qkv.size(0), T = qkv.size(1), D = q_weight.numel();
  TORCH_CHECK(cos.size(0) == T && out.batch == B && out.heads == num_kv_heads && out.rows == T &&
                  out.dim == D,
              "qk_norm_rope: shapes do not match");
  const int64_t* ks = out.k_strides;
  const int64_t* vs = out.v_strides;
  return norm_rope_rows(qkv, q_weight, k_weight, cos, sin, eps, num_heads, num_kv_heads, B, T,
                        {B, num_heads, T, D}, out.k, out.v, ks[1], vs[1], out.dtype,
                        [&](int64_t b, int64_t t) {
                          return RowPlace{t, b * ks[0] + t * ks[2], b * vs[0] + t * vs[2]};
                        });
}

// qkv [N, (H + 2 KVH) * D] -> q [N, H, D]; row i's k and v written to its slot.
at::Tensor qk_norm_rope_into(const at::Tensor& qkv, const at::Tensor& q_weight,
                             const at::Tensor& k_weight, const at::Tensor& cos,
                             const at::Tensor& sin, double eps, int64_t num_heads,
                             int64_t num_kv_heads, const PagedKV& cache, int64_t layer) {
  RECORD_FUNCTION("qwen3chat::paged_qk_norm_rope", std::vector<c10::IValue>());
  const int64_t N = cache.rows, D = q_weight.numel();
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == N && cos.size(0) == N &&
                  cache.heads == num_kv_heads && cache.dim == D && layer >= 0 &&
                  layer < cache.layers,
              "paged_qk_norm_rope: expected qkv [N, (H + 2 KVH) * D] and cos [N, D] for the N "
              "rows of positions, and a cache layer of KVH heads of D");
  const int64_t width = kv_row_width(D, cache.dtype);
  const int64_t head = cache.slots * width, first = layer * cache.heads * head;
  return norm_rope_rows(qkv, q_weight, k_weight, cos, sin, eps, num_heads, num_kv_heads, N, 1,
                        {N, num_heads, D}, cache.k_cache.data_ptr(), cache.v_cache.data_ptr(),
                        head, head, cache.dtype, [&](int64_t i, int64_t) {
                          const int64_t at = first + cache.slot(i) * width;
                          return RowPlace{i, at, at};
                        });
}

namespace {

// Four floats: the horizontal sums of a, b, c and d.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// Eight values of a cache row from column d as floats: an int8 row's codes.
template <typename K>
inline __m256 value8(const K* row, int64_t d) {
  return load8(row + d);
}
inline __m256 value8(const int8_t* row, int64_t d) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d))));
}

// A key row (of D) as scores read it, from column d: eight values as floats, of an int8
// row its codes times their block's scale (the product kv_cache.py's dequantize_rows
// computes). The scale, block_scale of the row's block of kRowBlock columns, is taken once
// per block: converted for every eight values it took a fifth of the time of attention
// over an int8 cache on AVX2 (Zen 3, 2 threads, 4096 tokens of the 0.6B shape: 28.4
// against about 23 ms a step for the 28 layers).
template <typename K>
constexpr int64_t kRowBlock = std::is_same_v<K, int8_t> ? kKvBlock : 8;

inline float kv_scale(const int8_t* row, int64_t d, int64_t D) {
  return qk::to_float(reinterpret_cast<const c10::Half*>(row + D)[d / kKvBlock]);
}
template <typename K>
inline __m256 block_scale(const K*, int64_t, int64_t) {
  return _mm256_setzero_ps();  // unused: float rows have no scale
}
inline __m256 block_scale(const int8_t* row, int64_t d, int64_t D) {
  return _mm256_set1_ps(kv_scale(row, d, D));
}
template <typename K>
inline __m256 row8(const K* row, int64_t d, __m256) {
  return load8(row + d);
}
inline __m256 row8(const int8_t* row, int64_t d, __m256 scale) {
  return _mm256_mul_ps(value8(row, d), scale);
}
template <typename K>
inline __m256 row8(const K* row, int64_t d, int64_t D) {
  return row8(row, d, block_scale(row, d, D));
}

// Scores of up to two query heads (G) against four keys at once: eight independent
// accumulators keep the FMA units busy, each key is widened once for both heads, and the
// four sums are reduced together instead of one horizontal sum per (key, head).
template <int G, typename K>
void scores_of_four_keys(const float* query, const K* keys, int64_t stride, int64_t D,
                         float* scores, int64_t padded) {
  __m256 acc[G][4];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 4; ++j) acc[g][j] = _mm256_setzero_ps();
  for (int64_t block = 0; block < D; block += kRowBlock<K>) {
    __m256 scale[4];
    for (int j = 0; j < 4; ++j) scale[j] = block_scale(keys + j * stride, block, D);
    for (int64_t d = block; d < block + kRowBlock<K>; d += 8) {
      __m256 q[G];
      for (int g = 0; g < G; ++g) q[g] = _mm256_loadu_ps(query + g * D + d);
      for (int j = 0; j < 4; ++j) {
        const __m256 k = row8(keys + j * stride, d, scale[j]);
        for (int g = 0; g < G; ++g) acc[g][j] = _mm256_fmadd_ps(k, q[g], acc[g][j]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    _mm_storeu_ps(scores + g * padded, hsum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]));
}

// What row l's values in block b (of kKvBlock columns) are multiplied by for query head
// g: its softmax weight, or where the values are an int8 cache's codes, that weight times
// the block's scale (fold_scales), so that the codes go into the sums as they are: one
// multiply per block and head instead of one per value and no scale to convert per
// block and row. Attention over 4096 tokens of an int8 cache, 28 layers from cache, 10.1
// -> 9.3 ms (Intel Xeon, 2 threads; from memory 14.4-16.0 -> 14.1-14.4).
struct ValueWeights {
  const float* w;
  int64_t row, head, block;  // strides: a float cache's weights are p [groups, padded]

  float at(int64_t g, int64_t l, int64_t b) const { return w[l * row + g * head + b * block]; }
};

template <typename K>
constexpr bool kFoldedScales = std::is_same_v<K, int8_t>;

// The ValueWeights of rows [first, last) of an int8 cache's values: softmax weights p
// [groups, padded] times each row's block scales, into folded [last - first, groups,
// D / kKvBlock].
void fold_scales(const float* p, int64_t padded, int64_t groups, const int8_t* values,
                 int64_t stride, int64_t D, int64_t first, int64_t last, float* folded) {
  const int64_t blocks = D / kKvBlock;
  for (int64_t l = first; l < last; ++l) {
    const int8_t* row = values + l * stride;
    float* out = folded + (l - first) * groups * blocks;
    int64_t b = 0;
    for (; b + 4 <= blocks; b += 4) {
      const __m128 scales = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + D + 2 * b)));
      for (int64_t g = 0; g < groups; ++g)
        _mm_storeu_ps(out + g * blocks + b, _mm_mul_ps(_mm_set1_ps(p[g * padded + l]), scales));
    }
    for (; b < blocks; ++b)
      for (int64_t g = 0; g < groups; ++g)
        out[g * blocks + b] = p[g * padded + l] * kv_scale(row, b * kKvBlock, D);
  }
}

// out[g][c] += sum over rows l in [first, last) of w(g0 + g, l) * values[l][c] for up to
// two heads (G) and the columns [c0, c1), 8 * V at a time, kept in registers over the
// rows: each value is widened once for both heads. Every output adds its rows in order,
// so a sweep split into blocks of rows gives the same sums as one sweep. Each 8 * V
// columns lie in one block of kKvBlock (head_values' sweeps start at multiples of 32).
// One call for all the columns: called per 32 columns, its setup and its accumulators'
// round trip through the stack were ~8% of attention over an int8 cache (Zen 3).
template <int G, int V, typename K>
void weighted_sum(const ValueWeights& w, int64_t g0, const K* values, int64_t stride, int64_t c0,
                  int64_t c1, int64_t first, int64_t last, float* out, int64_t D) {
  for (int64_t c = c0; c < c1; c += 8 * V) {
    __m256 acc[G][V];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
      for (int j = 0; j < V; ++j) acc[g][j] = _mm256_loadu_ps(out + g * D + c + 8 * j);
    const K* row = values + first * stride;
    for (int64_t l = first; l < last; ++l, row += stride) {
      __m256 weight[G];
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) weight[g] = _mm256_set1_ps(w.at(g0 + g, l, c / kKvBlock));
#pragma GCC unroll 8
      for (int j = 0; j < V; ++j) {
        const __m256 value = value8(row, c + 8 * j);
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) acc[g][j] = _mm256_fmadd_ps(weight[g], value, acc[g][j]);
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
      for (int j = 0; j < V; ++j) _mm256_storeu_ps(out + g * D + c + 8 * j, acc[g][j]);
  }
}

// The AVX-512 forms of the two above, for bfloat16 and int8 caches
// (set_avx512_attention), 32 values of a row at a time in two vectors. Of bfloat16, one
// 64-byte load, whose 32-bit lanes give the floats of the even-indexed values (shifted
// left) and of the odd ones (masked): no widening shuffle, and twice the lanes, so each
// key and value takes a third of the instructions; queries (and a value sweep's sums, in
// registers) are kept in that even/odd order. Of int8, one block: its codes in order,
// times its scale.
std::atomic<bool> avx512_attention{false};


template <typename K>
constexpr bool kWideAttention = std::is_same_v<K, c10::BFloat16> || std::is_same_v<K, int8_t>;
template <typename K>
constexpr bool kEvenOdd = std::is_same_v<K, c10::BFloat16>;

QK_AVX512 inline void widen32(const c10::BFloat16* row, int64_t d, int64_t, __m512& even,
                              __m512& odd) {
  const __m512i v = _mm512_loadu_si512(row + d);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

QK_AVX512 inline void widen32(const int8_t* row, int64_t d, int64_t D, __m512& low, __m512& high) {
  const __m512 scale = _mm512_set1_ps(kv_scale(row, d, D));
  const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d));
  low = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(codes))), scale);
  high = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(codes, 1))), scale);
}

// Every block of 32 floats of x in even/odd order: its 16 even-indexed values, then its
// 16 odd ones (D a multiple of 32).
QK_AVX512 inline void to_even_odd(float* x, int64_t D) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t d = 0; d < D; d += 32) {
    const __m512 lo = _mm512_loadu_ps(x + d), hi = _mm512_loadu_ps(x + d + 16);
    _mm512_storeu_ps(x + d, _mm512_permutex2var_ps(lo, even, hi));
    _mm512_storeu_ps(x + d + 16, _mm512_permutex2var_ps(lo, odd, hi));
  }
}

QK_AVX512 inline __m256 halves_added(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}

// One float of each of four zmm sums, their lanes added (as hsum4 does for ymm).
QK_AVX512 inline __m128 hsum4_512(__m512 a, __m512 b, __m512 c, __m512 d) {
  return hsum4(halves_added(a), halves_added(b), halves_added(c), halves_added(d));
}

// scores_of_four_keys, the query in widen32's order.
template <int G, typename K>
QK_AVX512 void scores_of_four_keys_wide(const float* query, const K* keys, int64_t stride,
                                        int64_t D, float* scores, int64_t padded) {
  __m512 first[G][4], second[G][4];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 4; ++j) first[g][j] = second[g][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    __m512 q1[G], q2[G];
    for (int g = 0; g < G; ++g) {
      q1[g] = _mm512_loadu_ps(query + g * D + d);
      q2[g] = _mm512_loadu_ps(query + g * D + d + 16);
    }
    for (int j = 0; j < 4; ++j) {
      __m512 k1, k2;
      widen32(keys + j * stride, d, D, k1, k2);
      for (int g = 0; g < G; ++g) {
        first[g][j] = _mm512_fmadd_ps(k1, q1[g], first[g][j]);
        second[g][j] = _mm512_fmadd_ps(k2, q2[g], second[g][j]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    __m512 sum[4];
    for (int j = 0; j < 4; ++j) sum[j] = _mm512_add_ps(first[g][j], second[g][j]);
    _mm_storeu_ps(scores + g * padded, hsum4_512(sum[0], sum[1], sum[2], sum[3]));
  }
}

// Integer scores over an int8 cache (set_integer_scores: where AVX-512 attention runs,
// with AVX512-VNNI; scores_int below otherwise): the queries quantized as cache rows are
// (codes, a float16 scale per block of 32), as llama.cpp's q8_0 keys meet q8_0 queries,
// and vpdpbusd multiplies the keys' codes plus 128 (their sign bit flipped: unsigned, as
// it takes them) by the query's codes, four products a lane, each lane's sum starting at
// minus 128 times its four query codes: the codes' own products. Each lane's sum is scaled
// by its block's two scales in float. About half the instructions of widening each key to
// floats (0.87x those of putting the keys' signs on the query's codes instead); the scores
// move by the queries' rounding (~0.4% of each).
std::atomic<bool> integer_scores_allowed{false};

#define QK_VNNI_ATTENTION QK_TARGET("avx512f,avx512bw,avx512dq,avx512vnni,fma,f16c")

// A row's float16 block scales (D / 32 of them: D is 64, 128, 256 or 512) as floats, the
// rest zeros: loaded as they lie (copied into a zeroed buffer first, each load waited for
// the copy's stores, and the integer scores took longer than the float ones).
QK_VNNI_ATTENTION inline __m512 row_scales(const int8_t* row, int64_t D) {
  const int8_t* at = row + D;
  __m256i halves;
  switch (D) {
    case 64:
      halves = _mm256_zextsi128_si256(_mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(at)));
      break;
    case 128:
      halves = _mm256_zextsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at)));
      break;
    case 256:
      halves = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
      break;
    default:
      halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
  }
  return _mm512_cvtph_ps(halves);
}

// Blocks of at most this many rows have the next block's rows asked for while their own
// are read (paged caches' blocks): 16 sequences' ~100 positions of paged attention on two
// cores, 10-15% faster, as the loads of one block no longer wait for the math of the
// last. A longer block (a contiguous cache) has its own rows asked for kAheadRows ahead:
// the hardware prefetcher stops at every 4 KiB page, and decode attention over 28 layers
// at 4096 tokens of context took 1.2x as long without (bf16 cache) and 1.3x (int8) on an
// Intel Xeon, 2 threads (8-24 rows ahead alike).
constexpr int64_t kPrefetchRows = 64;
constexpr int64_t kAheadRows = 16;

// The rows to ask for while a block's row l is read: row l of `rows`, for l < count.
template <typename K>
struct RowsAhead {
  const K* rows;
  int64_t count;
};

// For block `block` of L rows: the next block's rows (`following`, or none) where blocks
// are short, else the block's own rows kAheadRows further on.
template <typename K>
RowsAhead<K> rows_ahead(const K* block, int64_t L, int64_t stride, bool short_blocks,
                        const K* following) {
  if (short_blocks) return {following, following == nullptr ? 0 : L};
  return {block + kAheadRows * stride, L - kAheadRows};
}

template <typename K>
inline void prefetch_rows(const K* rows, int64_t count, int64_t stride) {
  const char* bytes = reinterpret_cast<const char*>(rows);
  for (int64_t b = 0; b < count * stride * static_cast<int64_t>(sizeof(K)); b += 64)
    _mm_prefetch(bytes + b, _MM_HINT_T0);
}

// The float16 scales of an int8 row's blocks [d / 32, + blocks) (blocks 2 or 4) as floats,
// the rest zeros, in both halves of a vector: scores_int's lanes.
inline __m256 four_scales(const int8_t* row, int64_t d, int64_t D, int64_t blocks) {
  const int8_t* at = row + D + 2 * (d / kKvBlock);
  const __m128i halves = blocks == 4 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(at))
                                     : _mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(at));
  const __m128 scales = _mm_cvtph_ps(halves);
  return _mm256_set_m128(scales, scales);
}

// scores_vnni's AVX2 form (where AVX-512 attention does not run), of `count` keys, J (4 or
// 1) at a time, and head_dim D (64, 128, 256 or 512): per block of 32 columns, the query's
// |codes| against the key's codes with the query's signs (maddubs, madd: eight int32 sums
// of four products; the queries' |codes| taken once a call, where each key's were taken
// per key: 0.95x the scores' time); a key's blocks, four at a time, summed in integers to
// one lane a block (twice: the vector's halves; hadd) and scaled by their blocks' two
// scales in one multiply-add. A key's score does not depend on J (one key alone reduces as four do).
// Attention over 4096 tokens of an int8 cache, the 0.6B shape's 28 layers from cache (Zen
// 3, 2 threads): 15.0 ms with each block's sums converted and scaled, 12.2 reduced first.
// A call runs a tile of keys (block_scores_int), the queries' scales taken once, and asks for
// `ahead`'s rows as it goes: one call per four keys was ~4% of that attention.
template <int G, int J, int64_t D>
void scores_int(const int8_t* q, int64_t width, const int8_t* keys, int64_t stride, int64_t count,
                float* scores, int64_t padded, RowsAhead<int8_t> ahead) {
  constexpr int64_t kGroup = 4 * kKvBlock;  // the columns of one vector of block sums
  constexpr int64_t kGroups = (D + kGroup - 1) / kGroup, kBlocks = std::min(kGroup, D) / kKvBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 q_scales[G][kGroups];
  for (int g = 0; g < G; ++g)
    for (int64_t group = 0; group < kGroups; ++group)
      q_scales[g][group] = four_scales(q + g * width, group * kGroup, D, kBlocks);
  __m256i q_codes[G][D / kKvBlock], q_magnitudes[G][D / kKvBlock];
  for (int g = 0; g < G; ++g)
    for (int64_t b = 0; b < D / kKvBlock; ++b) {
      q_codes[g][b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + g * width + b * kKvBlock));
      q_magnitudes[g][b] = _mm256_abs_epi8(q_codes[g][b]);
    }
  for (int64_t l = 0; l < count; l += J, keys += J * stride, scores += J) {
    if (l < ahead.count) prefetch_rows(ahead.rows + l * stride, std::min<int64_t>(J, ahead.count - l), stride);
    __m256 acc[G][4];
    for (int j = 0; j < J; ++j) {
      const int8_t* row = keys + j * stride;
      for (int g = 0; g < G; ++g) acc[g][j] = _mm256_setzero_ps();
      for (int64_t group = 0; group < kGroups; ++group) {
        const int64_t d = group * kGroup;
        __m256i sums[G][4];
        for (int64_t b = 0; b < 4; ++b) {
          for (int g = 0; g < G; ++g) sums[g][b] = _mm256_setzero_si256();
          if (b >= kBlocks) continue;
          const int64_t c = d + b * kKvBlock;
          const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c));
          for (int g = 0; g < G; ++g) {
            const int64_t block = c / kKvBlock;
            const __m256i signed_key = _mm256_sign_epi8(key, q_codes[g][block]);
            sums[g][b] = _mm256_madd_epi16(_mm256_maddubs_epi16(q_magnitudes[g][block], signed_key), ones);
          }
        }
        const __m256 k_scales = four_scales(row, d, D, kBlocks);
        for (int g = 0; g < G; ++g) {
          // Lanes: blocks 0-3's sums over their columns 0-15, then over 16-31.
          const __m256i per_block = _mm256_hadd_epi32(_mm256_hadd_epi32(sums[g][0], sums[g][1]),
                                                      _mm256_hadd_epi32(sums[g][2], sums[g][3]));
          const __m256 scales = _mm256_mul_ps(k_scales, q_scales[g][group]);
          acc[g][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(per_block), scales, acc[g][j]);
        }
      }
    }
    for (int g = 0; g < G; ++g) {
      for (int j = J; j < 4; ++j) acc[g][j] = acc[g][0];
      const __m128 sums = hsum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
      if constexpr (J == 4)
        _mm_storeu_ps(scores + g * padded, sums);
      else
        scores[g * padded] = _mm_cvtss_f32(sums);
    }
  }
}

// scores_int of head_dim D.
template <int G, int J>
auto scores_int_of(int64_t D) {
  return D == 64 ? scores_int<G, J, 64>
                 : (D == 128 ? scores_int<G, J, 128> : (D == 256 ? scores_int<G, J, 256> : scores_int<G, J, 512>));
}

// The scores of `count` keys (rows `stride` apart), J (4 or 1) at a time, for G query heads
// (cache rows q, `width` bytes apart) of head_dim D (a multiple of 64: a vector holds two
// blocks): scores [G, padded]. A call runs a tile of keys (block_scores_int), the queries'
// codes, starting sums and scales taken once, and asks for `ahead`'s rows as it goes: one
// call per four keys spent a third of its time reducing each call's sums and reloading
// what the compiler had spilled (`perf`).
template <int G, int J, int64_t D>
QK_VNNI_ATTENTION void scores_vnni(const int8_t* q, int64_t width, const int8_t* keys, int64_t stride,
                                   int64_t count, float* scores, int64_t padded, RowsAhead<int8_t> ahead) {
  constexpr int64_t C = D / 64;
  // Lanes 0-7 hold block 2c's sums, lanes 8-15 block 2c + 1's.
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
  __m512i blocks[C], codes[G][C], start[G][C];
  __m512 q_scale[G][C];
  for (int64_t c = 0; c < C; ++c) blocks[c] = _mm512_add_epi32(halves, _mm512_set1_epi32(static_cast<int>(2 * c)));
  for (int g = 0; g < G; ++g) {
    const __m512 scales = row_scales(q + g * width, D);
    for (int64_t c = 0; c < C; ++c) {
      codes[g][c] = _mm512_loadu_si512(q + g * width + 64 * c);
      start[g][c] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, flip, codes[g][c]));
      q_scale[g][c] = _mm512_permutexvar_ps(blocks[c], scales);
    }
  }
  for (int64_t l = 0; l < count; l += J, keys += J * stride, scores += J) {
    if (l < ahead.count) prefetch_rows(ahead.rows + l * stride, std::min<int64_t>(J, ahead.count - l), stride);
    __m512 acc[G][J];
    for (int j = 0; j < J; ++j) {
      const int8_t* row = keys + j * stride;
      const __m512 key_scales = row_scales(row, D);
      for (int g = 0; g < G; ++g) acc[g][j] = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; ++c) {
        const __m512i key = _mm512_xor_si512(_mm512_loadu_si512(row + 64 * c), flip);
        const __m512 k_scale = _mm512_permutexvar_ps(blocks[c], key_scales);
        for (int g = 0; g < G; ++g) {
          const __m512i sums = _mm512_dpbusd_epi32(start[g][c], key, codes[g][c]);
          acc[g][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(k_scale, q_scale[g][c]), acc[g][j]);
        }
      }
    }
    for (int g = 0; g < G; ++g) {
      if constexpr (J == 4)
        _mm_storeu_ps(scores + g * padded, hsum4_512(acc[g][0], acc[g][1], acc[g][2], acc[g][3]));
      else
        scores[g * padded] = _mm512_reduce_add_ps(acc[g][0]);
    }
  }
}

// scores_vnni of head_dim D.
template <int G, int J>
auto scores_vnni_of(int64_t D) {
  return D == 64 ? scores_vnni<G, J, 64>
                 : (D == 128 ? scores_vnni<G, J, 128> : (D == 256 ? scores_vnni<G, J, 256> : scores_vnni<G, J, 512>));
}

template <typename K>
QK_AVX512 float score_wide(const float* query, const K* key, int64_t D) {
  __m512 a = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    __m512 k1, k2;
    widen32(key, d, D, k1, k2);
    a = _mm512_fmadd_ps(k1, _mm512_loadu_ps(query + d), a);
    a = _mm512_fmadd_ps(k2, _mm512_loadu_ps(query + d + 16), a);
  }
  return _mm512_reduce_add_ps(a);
}

// An int8 row's 32 codes from column d as floats (weighted_sum_wide's values: their
// scales are in the weights).
QK_AVX512 inline void codes32(const int8_t* row, int64_t d, __m512& low, __m512& high) {
  low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d))));
  high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d + 16))));
}

// weighted_sum over the columns [begin, end), 32 * C at a time: the same multiply-adds in
// the same order for every output, so the same sums bit for bit; out stays in natural
// order.
template <int G, int C, typename K>
QK_AVX512 void weighted_sum_wide(const ValueWeights& w, int64_t g0, const K* values,
                                 int64_t stride, int64_t begin, int64_t end, int64_t first,
                                 int64_t last, float* out, int64_t D) {
  const __m512i to_even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i to_odd = _mm512_add_epi32(to_even, _mm512_set1_epi32(1));
  const __m512i to_low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i to_high = _mm512_add_epi32(to_low, _mm512_set1_epi32(8));
  for (int64_t c0 = begin; c0 < end; c0 += 32 * C) {
    __m512 one[G][C], two[G][C];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < C; ++c) {
        const __m512 lo = _mm512_loadu_ps(out + g * D + c0 + 32 * c);
        const __m512 hi = _mm512_loadu_ps(out + g * D + c0 + 32 * c + 16);
        one[g][c] = kEvenOdd<K> ? _mm512_permutex2var_ps(lo, to_even, hi) : lo;
        two[g][c] = kEvenOdd<K> ? _mm512_permutex2var_ps(lo, to_odd, hi) : hi;
      }
    // A weight per head, or with folded scales per head and block.
    constexpr int kWeights = kFoldedScales<K> ? C : 1;
    for (int64_t l = first; l < last; ++l) {
      __m512 weight[G][kWeights];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < kWeights; ++c) weight[g][c] = _mm512_set1_ps(w.at(g0 + g, l, c0 / 32 + c));
      for (int c = 0; c < C; ++c) {
        __m512 v1, v2;
        if constexpr (kFoldedScales<K>)
          codes32(values + l * stride, c0 + 32 * c, v1, v2);
        else
          widen32(values + l * stride, c0 + 32 * c, D, v1, v2);
        for (int g = 0; g < G; ++g) {
          const __m512 by = weight[g][kFoldedScales<K> ? c : 0];
          one[g][c] = _mm512_fmadd_ps(by, v1, one[g][c]);
          two[g][c] = _mm512_fmadd_ps(by, v2, two[g][c]);
        }
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < C; ++c) {
        float* o = out + g * D + c0 + 32 * c;
        if constexpr (kEvenOdd<K>) {
          _mm512_storeu_ps(o, _mm512_permutex2var_ps(one[g][c], to_low, two[g][c]));
          _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(one[g][c], to_high, two[g][c]));
        } else {
          _mm512_storeu_ps(o, one[g][c]);
          _mm512_storeu_ps(o + 16, two[g][c]);
        }
      }
  }
}

// One KV head's keys and values as attention reads them: ``rows`` rows, in blocks of
// ``block_rows`` (the last may be shorter), rows k_stride (v_stride) elements apart. A
// contiguous cache is one block; a paged one's blocks lie where its block table says.
// K is the cache's element type (int8: quantized rows).
template <typename K>
struct KeyBlocks {
  const K *k, *v;
  int64_t k_stride, v_stride, rows, block_rows;
  const int32_t* table;  // block j's first row is table[j] * block_rows; none: j * block_rows

  int64_t first_row(int64_t j) const {
    return (table == nullptr ? j : int64_t{table[j]}) * block_rows;
  }
  int64_t blocks() const { return (rows + block_rows - 1) / block_rows; }
  const K* keys(int64_t j) const { return k + first_row(j) * k_stride; }
  const K* values(int64_t j) const { return v + first_row(j) * v_stride; }
};

// One key's score, for the keys past the last whole four.
template <typename K>
float score_of_key(const float* query, const K* key, int64_t D) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(row8(key, d, D), _mm256_loadu_ps(query + d), a);
  return hsum(a);
}

// The integer scores of L contiguous keys for every query head of one KV head: AVX512-VNNI's
// (scores_vnni) where AVX-512 attention runs (`wide`), else AVX2's (scores_int), kKeyTile
// keys a call: the first pair of heads asks for `ahead`'s rows, the others read the tile's
// keys from L1.
constexpr int64_t kKeyTile = 64;

void block_scores_int(const int8_t* q_rows, int64_t groups, const int8_t* keys, int64_t stride,
                      int64_t L, int64_t D, float* scores, int64_t padded, bool wide,
                      RowsAhead<int8_t> ahead) {
  auto two = scores_int_of<2, 4>(D), one = scores_int_of<1, 4>(D), single = scores_int_of<1, 1>(D);
#if QK_X86  // AVX-512 attention runs on x86 alone: no VNNI code in an ARM build
  if (wide) two = scores_vnni_of<2, 4>(D), one = scores_vnni_of<1, 4>(D), single = scores_vnni_of<1, 1>(D);
#endif
  const int64_t q_width = kv_row_width(D, at::kChar), whole = L / 4 * 4;
  for (int64_t t = 0; t < whole; t += kKeyTile) {
    const RowsAhead<int8_t> tile{ahead.count > t ? ahead.rows + t * stride : nullptr, ahead.count - t};
    for (int64_t g = 0; g < groups; g += 2)
      (groups - g >= 2 ? two : one)(q_rows + g * q_width, q_width, keys + t * stride, stride,
                                    std::min(kKeyTile, whole - t), scores + g * padded + t, padded,
                                    g == 0 ? tile : RowsAhead<int8_t>{nullptr, 0});
  }
  for (int64_t l = whole; l < L; ++l)
    for (int64_t g = 0; g < groups; ++g)
      single(q_rows + g * q_width, q_width, keys + l * stride, stride, 1, scores + g * padded + l, padded,
             RowsAhead<int8_t>{nullptr, 0});
}

// Every query head of one KV head against L contiguous keys: scores [groups, padded].
// Keys go four at a time, through all the heads in pairs, so each is read from memory
// once. ``q_rows``: the queries as int8 cache rows, for integer scores.
template <typename K>
void block_scores(const float* query, int64_t groups, const K* keys, int64_t stride, int64_t L,
                  int64_t D, float* scores, int64_t padded, bool wide, RowsAhead<K> ahead,
                  const int8_t* q_rows) {
  if constexpr (std::is_same_v<K, int8_t>) {
    if (q_rows != nullptr) return block_scores_int(q_rows, groups, keys, stride, L, D, scores, padded, wide, ahead);
  }
  auto two = scores_of_four_keys<2, K>, one = scores_of_four_keys<1, K>;
  auto single = score_of_key<K>;
  if constexpr (kWideAttention<K>) {
    if (wide)
      two = scores_of_four_keys_wide<2, K>, one = scores_of_four_keys_wide<1, K>,
      single = score_wide<K>;
  }
  int64_t l = 0;
  for (; l + 4 <= L; l += 4) {
    if (l < ahead.count) prefetch_rows(ahead.rows + l * stride, std::min<int64_t>(4, ahead.count - l), stride);
    for (int64_t g = 0; g < groups; g += 2)
      (groups - g >= 2 ? two : one)(query + g * D, keys + l * stride, stride, D, scores + g * padded + l, padded);
  }
  for (; l < L; ++l)
    for (int64_t g = 0; g < groups; ++g) scores[g * padded + l] = single(query + g * D, keys + l * stride, D);
}

// The scores of all of kv's keys, block by block, asking for rows ahead as they go (of
// short blocks, the next block, after the last the first of values). Blocks of whole fours
// of keys score them as one contiguous sweep would.
template <typename K>
void head_scores(const float* query, int64_t groups, const KeyBlocks<K>& kv, int64_t D,
                 float* scores, int64_t padded, bool wide, const int8_t* q_rows) {
  const bool short_blocks = kv.block_rows <= kPrefetchRows;
  for (int64_t first = 0, j = 0; first < kv.rows; first += kv.block_rows, ++j) {
    const int64_t L = std::min(kv.block_rows, kv.rows - first);
    const K* following = j + 1 < kv.blocks() ? kv.keys(j + 1) : kv.values(0);
    block_scores(query, groups, kv.keys(j), kv.k_stride, L, D, scores + first, padded, wide,
                 rows_ahead(kv.keys(j), L, kv.k_stride, short_blocks, following), q_rows);
  }
}

// acc [groups, D] = softmax weights [groups, padded] times the values, kValueRows rows at
// a time: every block of columns and pair of heads reads the block's rows from L1, and
// memory is read front to back. Sweeping all rows once per block of columns (a cache
// line of every row per sweep) was 1.1-1.4x slower at 1024-4096 tokens of context.
constexpr int64_t kValueRows = 16;

// ``after``: the keys to ask for during the last block (the next task's), or none.
// ``folded``: room for kValueRows rows' ValueWeights of an int8 cache (fold_scales).
template <typename K>
void head_values(const float* p_all, int64_t padded, int64_t groups, const KeyBlocks<K>& kv,
                 int64_t D, float* acc, bool wide, const K* after, float* folded) {
  std::fill(acc, acc + groups * D, 0.0f);
  const int64_t stride = kv.v_stride;
  const bool short_blocks = kv.block_rows <= kPrefetchRows;
  for (int64_t row = 0, j = 0; row < kv.rows; row += kv.block_rows, ++j) {
    const float* p = p_all + row;
    const K* values = kv.values(j);
    const int64_t L = std::min(kv.block_rows, kv.rows - row);
    const RowsAhead<K> ahead =
        rows_ahead(values, L, stride, short_blocks, j + 1 < kv.blocks() ? kv.values(j + 1) : after);
    for (int64_t first = 0; first < L; first += kValueRows) {
      const int64_t last = std::min(L, first + kValueRows);
      if (first < ahead.count)
        prefetch_rows(ahead.rows + first * stride, std::min(last, ahead.count) - first, stride);
      ValueWeights w{p, 1, padded, 0};
      if constexpr (kFoldedScales<K>) {
        fold_scales(p, padded, groups, values, stride, D, first, last, folded);
        const int64_t blocks = D / kKvBlock;
        w = {folded - first * groups * blocks, groups * blocks, blocks, 1};
      }
      // Columns a sweep takes: 64 (AVX-512) or 32 at a time, the rest 32 or 8 at a time.
      const int64_t whole = D / (wide ? 64 : 32) * (wide ? 64 : 32);
      for (int64_t g = 0; g < groups; g += 2) {
        float* out = acc + g * D;
        const bool two = groups - g >= 2;
        if constexpr (kWideAttention<K>) {
          if (wide) {
            (two ? weighted_sum_wide<2, 2, K> : weighted_sum_wide<1, 2, K>)(w, g, values, stride, 0, whole, first,
                                                                            last, out, D);
            (two ? weighted_sum_wide<2, 1, K> : weighted_sum_wide<1, 1, K>)(w, g, values, stride, whole, D, first,
                                                                            last, out, D);
            continue;
          }
        }
        (two ? weighted_sum<2, 4, K> : weighted_sum<1, 4, K>)(w, g, values, stride, 0, whole, first, last, out, D);
        (two ? weighted_sum<2, 1, K> : weighted_sum<1, 1, K>)(w, g, values, stride, whole, D, first, last, out, D);
      }
    }
  }
}

// Attention of ``rows`` query tokens, q [rows, H, D] -> out [rows, H * D], where
// key_blocks(r, kh) gives the KeyBlocks of row r's KV head kh. Scores, softmax and the
// weighted sum in float32, the result rounded once, as SDPA does. One task per (row, KV
// head), whose keys and values are each read once for all the query heads that share
// them (two at a time from the registers, the rest from cache). Queries of type S, a
// cache of K.
template <typename S, typename K, typename Locate>
void attention_rows(const S* qp, S* op, int64_t rows, int64_t H, int64_t KVH, int64_t D,
                    Locate key_blocks) {
  const __m256 scale8 = _mm256_set1_ps(1.0f / std::sqrt(static_cast<float>(D)));
  const int64_t groups = H / KVH;
  const bool wide = kWideAttention<K> && avx512_attention && D % 32 == 0;
  const bool integer_scores = std::is_same_v<K, int8_t> && integer_scores_allowed &&
                              (D == 64 || D == 128 || D == 256 || D == 512);
  qk::parallel_for(0, rows * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, query(groups * D), acc(groups * D), sums(groups);
    std::vector<float> folded(kFoldedScales<K> ? kValueRows * groups * (D / kKvBlock) : 0);
    // With integer_scores, the queries quantized as rows of an int8 cache.
    const int64_t q_width = kv_row_width(D, at::kChar);
    std::vector<int8_t> q_rows(integer_scores ? groups * q_width : 0);
    for (int64_t i = begin; i < end; ++i) {
      // KV head by KV head: the rows of a prompt read its keys and values from memory once.
      const int64_t kh = i / rows, r = i % rows, first = r * H + kh * groups;
      const KeyBlocks<K> kv = key_blocks(r, kh);
      const int64_t L = kv.rows, padded = (L + 15) / 16 * 16;
      // Room past L, to a multiple of 16, for softmax_numerators.
      if (static_cast<int64_t>(scores.size()) < groups * padded) scores.resize(groups * padded);
      for (int64_t d = 0; d < groups * D; d += 8)
        _mm256_storeu_ps(query.data() + d, _mm256_mul_ps(load8(qp + first * D + d), scale8));
      if (wide && kEvenOdd<K>) to_even_odd(query.data(), groups * D);
      for (int64_t g = 0; integer_scores && g < groups; ++g)
        quantize_kv_row(query.data() + g * D, q_rows.data() + g * q_width, D);
      head_scores(query.data(), groups, kv, D, scores.data(), padded, wide,
                  integer_scores ? q_rows.data() : nullptr);
      for (int64_t g = 0; g < groups; ++g)
        sums[g] = (avx512_attention ? rows16::softmax_numerators : rows8::softmax_numerators)(
            scores.data() + g * padded, L);
      const K* after = i + 1 < end ? key_blocks((i + 1) % rows, (i + 1) / rows).keys(0) : nullptr;
      head_values(scores.data(), padded, groups, kv, D, acc.data(), wide, after, folded.data());
      for (int64_t g = 0; g < groups; ++g) {
        const __m256 sum = _mm256_set1_ps(sums[g]);
        for (int64_t d = 0; d < D; d += 8)
          store8(op + (first + g) * D + d, _mm256_div_ps(_mm256_loadu_ps(acc.data() + g * D + d), sum));
      }
    }
  });
}

}  // namespace

void set_avx512_attention(bool enabled) { avx512_attention = enabled; }
void set_avx512_rows(bool enabled) { avx512_rows = enabled; }
void set_integer_scores(bool enabled) { integer_scores_allowed = enabled; }

namespace {

// Calls f with the queries' and the cache's element types: the cache stores the queries'
// dtype, or int8 rows.
template <typename F>
void with_kv_dtypes(at::ScalarType q_dtype, at::ScalarType cache_dtype, const char* name, F f) {
  with_dtype(q_dtype, name, [&](auto tag) {
    using S = decltype(tag);
    if (cache_dtype == at::kChar) return f(S{}, int8_t{});
    TORCH_CHECK(cache_dtype == q_dtype, name, ": the KV cache must be of the queries' dtype or int8");
    f(S{}, S{});
  });
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return attend(q, kv_rows(k, v));
}

// The queries of the cache's last T positions, q [B, H, T, D], over the cached rows kv
// [B, KVH, L, D], row t seeing the first L - T + t + 1 (causal) -> [B, T, H * D]: a decode
// step's token (T = 1), or a prompt's tokens after those cached before them.
at::Tensor attend(const at::Tensor& q_in, const KVRows& kv) {
  RECORD_FUNCTION("qwen3chat::decode_attention", std::vector<c10::IValue>());
  const auto q = q_in.transpose(1, 2).contiguous();  // [B, T, H, D]: attention_rows' rows
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t KVH = kv.heads, L = kv.rows;
  TORCH_CHECK(T <= L && kv.batch == B && H % KVH == 0 && D % kAttentionHeadDimBlock == 0 &&
                  kv.dim == D,
              "decode_attention: shapes do not match");
  auto out = at::empty({B, T, H * D}, q.options());
  with_kv_dtypes(q.scalar_type(), kv.dtype, "decode_attention", [&](auto tag, auto cache_tag) {
    using S = decltype(tag);
    using K = decltype(cache_tag);
    const K* kp = static_cast<const K*>(kv.k);
    const K* vp = static_cast<const K*>(kv.v);
    const int64_t* ks = kv.k_strides;
    const int64_t* vs = kv.v_strides;
    attention_rows<S, K>(q.data_ptr<S>(), out.data_ptr<S>(), B * T, H, KVH, D, [&](int64_t r, int64_t kh) {
      const int64_t b = r / T, seen = L - T + r % T + 1;
      return KeyBlocks<K>{kp + b * ks[0] + kh * ks[1], vp + b * vs[0] + kh * vs[1], ks[2], vs[2],
                          seen, L, nullptr};
    });
  });
  return out;
}

namespace {

// The kernel's attention of the cache's rows ``rows`` (indices), their queries q [n, H, D]
// -> [n, H * D].
at::Tensor kernel_attention(const at::Tensor& q, const PagedKV& cache, int64_t layer,
                            const std::vector<int64_t>& rows) {
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), KVH = cache.heads;
  auto out = at::empty({n, H * D}, q.options());
  with_kv_dtypes(q.scalar_type(), cache.dtype, "paged_attention", [&](auto tag, auto cache_tag) {
    using S = decltype(tag);
    using K = decltype(cache_tag);
    const int64_t width = kv_row_width(D, cache.dtype);
    const int64_t head = cache.slots * width, first = layer * KVH * head;
    const K* kp = static_cast<const K*>(cache.k_cache.data_ptr()) + first;
    const K* vp = static_cast<const K*>(cache.v_cache.data_ptr()) + first;
    attention_rows<S, K>(q.data_ptr<S>(), out.data_ptr<S>(), n, H, KVH, D, [&](int64_t r, int64_t kh) {
      const int64_t i = rows[r];
      return KeyBlocks<K>{kp + kh * head, vp + kh * head, width, width, cache.positions[i] + 1,
                          cache.block_size, cache.table(i)};
    });
  });
  return out;
}

// Rows [a, b) of one sequence, at consecutive positions up to its last cached one (a
// prompt's chunk), q [b - a, H, D]: SDPA over the sequence's rows gathered from its blocks
// (an int8 cache's dequantized to q's dtype), as Attention.attend runs a single sequence's
// prompt -> [b - a, H * D].
at::Tensor prompt_attention(const at::Tensor& q, const PagedKV& cache, int64_t layer, int64_t a,
                            int64_t b) {
  const int64_t T = b - a, L = cache.positions[b - 1] + 1;
  auto slots = at::empty({L}, at::kLong);
  int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t p = 0; p < L; ++p) sp[p] = cache.slot_at(cache.table(a), p);
  auto k = cache.k_cache[layer].index_select(1, slots), v = cache.v_cache[layer].index_select(1, slots);
  if (cache.dtype == at::kChar) k = dequantize_kv(k, q.scalar_type()), v = dequantize_kv(v, q.scalar_type());
  const auto query = q.transpose(0, 1).unsqueeze(0);  // [1, H, T, D]
  // From position 0 plain causal, else each row up to its own position.
  std::optional<at::Tensor> mask;
  if (cache.positions[a] > 0)
    mask = at::arange(L, slots.options()).unsqueeze(0).le(cache.positions_.slice(0, a, b).unsqueeze(1));
  const auto out = at::scaled_dot_product_attention(query, k.unsqueeze(0), v.unsqueeze(0), mask, 0.0,
                                                    !mask.has_value(), std::nullopt, true);
  return out[0].transpose(0, 1).reshape({T, -1});
}

}  // namespace

// q [N, H, D], row i at positions[i] of its sequence, over that sequence's positions
// 0..positions[i] in the paged cache's layer -> [N, H * D]. Long runs of a sequence's rows
// (a prompt's: kPromptKernelRows, kPromptSdpaWork) go to prompt_attention: row by row, a
// 2048-token prompt's attention made the server's prefill 3x the chat's.
at::Tensor attend(const at::Tensor& q_in, const PagedKV& cache, int64_t layer) {
  RECORD_FUNCTION("qwen3chat::paged_attention", std::vector<c10::IValue>());
  const auto q = q_in.contiguous();
  TORCH_CHECK(q.dim() == 3 && q.size(0) == cache.rows,
              "paged_attention: expected q [N, H, D] for the N rows of positions");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), KVH = cache.heads;
  TORCH_CHECK(H % KVH == 0 && D % kAttentionHeadDimBlock == 0 && cache.dim == D &&
                  layer >= 0 && layer < cache.layers,
              "paged_attention: q [N, H, D] does not match the cache's layer (heads, head_dim)");
  std::vector<int64_t> kernel_rows;
  std::vector<std::pair<int64_t, int64_t>> prompts;
  for (int64_t a = 0, b = 1; a < N; a = b++) {
    while (b < N && cache.row_seq[b] == cache.row_seq[a] && cache.positions[b] == cache.positions[b - 1] + 1) ++b;
    if (b - a > kPromptKernelRows && (b - a) * (cache.positions[b - 1] + 1) >= kPromptSdpaWork)
      prompts.emplace_back(a, b);
    else
      for (int64_t i = a; i < b; ++i) kernel_rows.push_back(i);
  }
  if (prompts.empty()) return kernel_attention(q, cache, layer, kernel_rows);
  auto out = at::empty({N, H * D}, q.options());
  for (const auto& [a, b] : prompts) out.slice(0, a, b).copy_(prompt_attention(q.slice(0, a, b), cache, layer, a, b));
  if (!kernel_rows.empty()) {
    const auto index = at::tensor(kernel_rows, at::kLong);
    out.index_copy_(0, index, kernel_attention(q.index_select(0, index), cache, layer, kernel_rows));
  }
  return out;
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, int64_t layer, const at::Tensor& positions,
                           const at::Tensor& row_seq, const at::Tensor& block_tables,
                           int64_t block_size) {
  return attend(q, paged_kv(k_cache, v_cache, positions, row_seq, block_tables, block_size), layer);
}

// gate_up [..., 2I] -> silu(gate) * up [..., I], each rounded as two torch operations.
at::Tensor silu_mul(const at::Tensor& gate_up_in) {
  RECORD_FUNCTION("qwen3chat::silu_mul", std::vector<c10::IValue>());
  const auto gate_up = gate_up_in.contiguous();
  const int64_t width = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * width);
  TORCH_CHECK(width % kSwigluBlock == 0, "silu_mul: the width must be a multiple of 8");
  auto sizes = gate_up.sizes().vec();
  sizes.back() = width;
  auto out = at::empty(sizes, gate_up.options());
  with_dtype(gate_up.scalar_type(), "silu_mul", [&](auto tag) {
    using S = decltype(tag);
    const S* gp = gate_up.data_ptr<S>();
    S* op = out.data_ptr<S>();
    const bool wide = wide_rows(width);
    const int64_t step = wide ? 16 : 8;
    qk::parallel_for(0, rows * width / step, 4096 / step, [&](int64_t begin, int64_t end) {
      (wide ? rows16::silu_mul_steps<S> : rows8::silu_mul_steps<S>)(gp, op, width, begin, end);
    });
  });
  return out;
}

void silu_rounded(float* x, int64_t n, at::ScalarType dtype) {
  with_dtype(dtype, "silu_rounded", [&](auto tag) {
    using S = decltype(tag);
    (wide_rows(n) ? rows16::silu_in_place<S> : rows8::silu_in_place<S>)(x, n);
  });
}

// An int8 cache's rows [..., width] (any strides but the last's) as values of ``dtype``
// [..., D]: each code times its block's scale in float32, rounded once, as kv_cache.py's
// dequantize_rows(rows).to(dtype) computes it; what SDPA reads for a prompt over the
// cache, at memory speed (the torch code's temporaries took 20 of a layer's 25 ms for 8
// tokens over 4104 rows of the 0.6B shape).
at::Tensor dequantize_kv(const at::Tensor& rows, at::ScalarType dtype) {
  RECORD_FUNCTION("qwen3chat::dequantize_kv", std::vector<c10::IValue>());
  TORCH_CHECK(rows.scalar_type() == at::kChar && rows.dim() >= 1 && rows.stride(-1) == 1,
              "dequantize_kv: expected int8 rows [..., width] with the last dimension contiguous");
  const int64_t width = rows.size(-1), D = kv_head_dim(width, at::kChar);
  const int64_t count = rows.numel() / width, dims = rows.dim() - 1;
  auto sizes = rows.sizes().vec();
  sizes.back() = D;
  auto out = at::empty(sizes, rows.options().dtype(dtype));
  const int8_t* base = rows.data_ptr<int8_t>();
  with_dtype(dtype, "dequantize_kv", [&](auto tag) {
    using S = decltype(tag);
    S* op = out.data_ptr<S>();
    qk::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        int64_t offset = 0;  // row i's, from its index in each leading dimension
        for (int64_t d = dims - 1, rest = i; d >= 0; rest /= rows.size(d), --d)
          offset += rest % rows.size(d) * rows.stride(d);
        const int8_t* row = base + offset;
        for (int64_t b = 0; b < D; b += kKvBlock) {
          const __m256 scale = _mm256_set1_ps(kv_scale(row, b, D));
          for (int64_t c = b; c < b + kKvBlock; c += 8) store8(op + i * D + c, _mm256_mul_ps(value8(row, c), scale));
        }
      }
    });
  });
  return out;
}

// a + b of two tensors of one shape and dtype, rounded as torch's add rounds: a decoder
// layer's residual sums, without a TensorIterator's setup (microseconds each).
at::Tensor add_residual(const at::Tensor& a_in, const at::Tensor& b_in) {
  const auto a = a_in.contiguous(), b = b_in.contiguous();
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.numel() % 8 == 0,
              "add_residual: the tensors must match, with a multiple of 8 elements");
  auto out = at::empty_like(a);
  with_dtype(a.scalar_type(), "add_residual", [&](auto tag) {
    using S = decltype(tag);
    const S* ap = a.data_ptr<S>();
    const S* bp = b.data_ptr<S>();
    S* op = out.data_ptr<S>();
    for (int64_t i = 0; i < a.numel(); i += 8) store8(op + i, _mm256_add_ps(load8(ap + i), load8(bp + i)));
  });
  return out;
}
