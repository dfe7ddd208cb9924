// Linear layers over float, bfloat16, half, group-wise int8 and group-wise int4 weights.
//
// Decode multiplies one activation row by every weight, so it is bound by how fast the
// weights stream from memory. torch's bf16 matrix-vector product stops near 17 GB/s
// here, its int8/int4 kernels are compute bound (7-11 GB/s) and dequantizing per matmul
// moves several times the bytes. These kernels read each weight once:
// - float weights are widened in registers against float32 activations, so results
//   match a float32 product to rounding;
// - int8 and int4 weights are multiplied as integers, 32 at a time (maddubs), with the
//   activations quantized to int8 per block of 32 (scale max|x| / 127, round to nearest),
//   as llama.cpp does for Q8_0 and Q4_0: widening every code to float instead makes the
//   kernel compute bound at about half the memory bandwidth on AVX2.
//
// Prefill (many rows) is compute bound. Panels of float or 16-bit weight rows (16 with
// AVX2, 32 with AVX-512) are widened to float32 in L2 and every activation row runs past
// them in a register-tiled kernel of our own (panel_gemm; 5-100x faster than torch's
// 16-bit GEMM on AVX2, 1.1-1.5x MKL's float32 GEMM on AVX-512). Quantized weights run
// an integer GEMM of their own (integer_gemm), with the activations quantized as in
// decode, so a prompt and a decode step compute alike.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

using qk::hsum;
using qk::load8;

namespace {

// How far ahead of the row being multiplied its thread asks for quantized weight rows
// (into L2, so that the activations stay in L1). Their integer dot products keep the core
// busy, and the hardware prefetcher alone then keeps too few reads in flight: one core's
// int4 product runs ~35% faster with a 4 KiB lead, two cores' 5-15% (2 and 8 KiB were no
// better). Float rows gain on Intel too (see float_matvec).
constexpr int64_t kPrefetchBytes = 4096;

// Activation rows a matvec ``dots`` call takes at once (see matvec).
constexpr int64_t kMatvecRows = 4;

// ``dot(n, m)``, weight row n times activation row m, for every pair: [M, N] in x's dtype.
// Weight row n is the row_bytes at rows_in + n * row_bytes (asked for ahead). ``dot`` may
// instead be ``dots(n, m, count, out)``: weight row n times rows m .. m + count - 1
// (count <= kMatvecRows) into out, for kernels that decode a weight row once for them.
template <typename Dot>
at::Tensor matvec(const at::Tensor& x, int64_t N, Dot dot, const void* rows_in, int64_t row_bytes) {
  const int64_t M = x.size(0);
  auto out = at::empty({M, N}, x.options());
  const char* rows = static_cast<const char*>(rows_in);
  qk::with_dtype(x.scalar_type(), "linear", [&](auto tag) {
    using T = decltype(tag);
    T* op = out.data_ptr<T>();
    qk::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        // A prefetch never faults, so running past the matrix's end is harmless.
        for (int64_t line = 0; line < row_bytes; line += 64)
          _mm_prefetch(rows + n * row_bytes + kPrefetchBytes + line, _MM_HINT_T1);
        if constexpr (std::is_invocable_v<Dot, int64_t, int64_t, int64_t, float*>) {
          float out[kMatvecRows];
          for (int64_t m = 0; m < M; m += kMatvecRows) {
            const int64_t count = std::min(kMatvecRows, M - m);
            dot(n, m, count, out);
            for (int64_t c = 0; c < count; ++c) op[(m + c) * N + n] = static_cast<T>(out[c]);
          }
        } else {
          for (int64_t m = 0; m < M; ++m) op[m * N + n] = static_cast<T>(dot(n, m));
        }
      }
    });
  });
  return out;
}

// A weight row's 32 values from w as four vectors of eight floats. bfloat16 without a
// widening shuffle: a 32-bit lane holding two bf16 values is the float of the even one
// shifted left by 16, and the float of the odd one with the low half masked off; the
// activations are stored to match (float_rows' split 16: in each block of 16, the eight
// even-indexed values, then the eight odd ones).
template <typename T>
inline void widen32(const T* w, __m256 v[4]) {
  for (int s = 0; s < 4; ++s) v[s] = load8(w + 8 * s);
}
inline void widen32(const c10::BFloat16* w, __m256 v[4]) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16));
  v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
  v[1] = _mm256_castsi256_ps(_mm256_and_si256(v0, high));
  v[2] = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
  v[3] = _mm256_castsi256_ps(_mm256_and_si256(v1, high));
}

// C activation rows (K apart) times one weight row, into out[c * ldo]: four accumulators
// per output over its 32 values at a time (one chain would wait on FMA latency), added as
// (a0 + a1) + (a2 + a3) and then across lanes. A row's result is the same whatever C is:
// a decode step's one row and the same row among up to kChainMaxRows (a drafting pass,
// a few sequences' rows) get the same bits.
template <int C, typename T, typename O>
inline void chain_dots(const T* w, const float* x, int64_t K, O* out, int64_t ldo) {
  __m256 acc[C][4];
  for (int c = 0; c < C; ++c)
    for (int s = 0; s < 4; ++s) acc[c][s] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m256 v[4];
    widen32(w + k, v);
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s)
#pragma GCC unroll 3
      for (int c = 0; c < C; ++c)
        acc[c][s] = _mm256_fmadd_ps(v[s], _mm256_loadu_ps(x + c * K + k + 8 * s), acc[c][s]);
  }
  for (int c = 0; c < C; ++c)
    out[c * ldo] = static_cast<O>(hsum(_mm256_add_ps(_mm256_add_ps(acc[c][0], acc[c][1]),
                                                     _mm256_add_ps(acc[c][2], acc[c][3]))));
}

// The AVX-512 form of chain_dots (set_avx512_products): 32 weights a step as two
// vectors of 16 floats, half the instructions of the AVX2 loop for the same bytes, which
// leaves more reads in flight (float16 decode of the 0.6B shape: 1.25x on an Intel Xeon
// with two threads, before prefetching; see float_matvec). bfloat16 is widened by shift
// and mask as above, so its activations are kept with the 16 even-indexed values of each
// block of 32 first.
std::atomic<bool> avx512_products{false};

#define QK_AVX512_DOT QK_TARGET("avx512f,avx512bw,avx512dq,fma,f16c")

QK_AVX512_DOT inline void weights32(const float* w, __m512& a, __m512& b) {
  a = _mm512_loadu_ps(w), b = _mm512_loadu_ps(w + 16);
}
QK_AVX512_DOT inline void weights32(const c10::Half* w, __m512& a, __m512& b) {
  a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  b = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16)));
}
QK_AVX512_DOT inline void weights32(const c10::BFloat16* w, __m512& even, __m512& odd) {
  const __m512i v = _mm512_loadu_si512(w);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// chain_dots with AVX-512: 64 values a step as four vectors of 16 (the last 32 of a row
// whose K is an odd multiple of 32 into the first two accumulators).
template <int C, typename T, typename O>
QK_AVX512_DOT void chain_dots_wide(const T* w, const float* x, int64_t K, O* out, int64_t ldo) {
  __m512 acc[C][4];
  for (int c = 0; c < C; ++c)
    for (int s = 0; s < 4; ++s) acc[c][s] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    __m512 v[4];
    weights32(w + k, v[0], v[1]);
    weights32(w + k + 32, v[2], v[3]);
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s)
#pragma GCC unroll 3
      for (int c = 0; c < C; ++c)
        acc[c][s] = _mm512_fmadd_ps(v[s], _mm512_loadu_ps(x + c * K + k + 16 * s), acc[c][s]);
  }
  if (k < K) {
    __m512 v0, v1;
    weights32(w + k, v0, v1);
    for (int c = 0; c < C; ++c) {
      acc[c][0] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + c * K + k), acc[c][0]);
      acc[c][1] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + c * K + k + 16), acc[c][1]);
    }
  }
  for (int c = 0; c < C; ++c)
    out[c * ldo] = static_cast<O>(_mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[c][0], acc[c][1]), _mm512_add_ps(acc[c][2], acc[c][3]))));
}

// A decode step's activation rows [M, K] as float32 in a buffer of the calling thread:
// a step makes about a hundred products, and converting through tensor operations cost
// microseconds each. With split 16 (32), each block of 16 (32) holds its even-indexed
// values, then its odd ones (widen32's (weights32's) order for bfloat16 weights).
const float* float_rows(const at::Tensor& x, int split = 0) {
  thread_local std::vector<float> buffer;
  const int64_t count = x.numel();
  // From a 64-byte boundary: a 64-byte load that crosses a cache line costs two (rows_dot's
  // AVX-512 form, its rows in L1: 1.9x slower off the boundary).
  buffer.resize(count + 16);
  float* out = buffer.data() + (64 - reinterpret_cast<uintptr_t>(buffer.data()) % 64) % 64 / 4;
  qk::with_dtype(x.scalar_type(), "linear", [&](auto tag) {
    using T = decltype(tag);
    const T* p = x.data_ptr<T>();
    if (split == 0) {
      for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(p[i]);
      return;
    }
    for (int64_t b = 0; b < count; b += split)
      for (int j = 0; j < split / 2; ++j) {
        out[b + j] = static_cast<float>(p[b + 2 * j]);
        out[b + split / 2 + j] = static_cast<float>(p[b + 2 * j + 1]);
      }
  });
  return out;
}

// Eight int32 sums of four products each, of 32 unsigned and 32 signed bytes.
inline __m256i dot_u8_i8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

#if !QK_X86
QK_DOTPROD_BEGIN
// ARM's dot-product instruction, for integer_row.inc's block products and
// integer_rows.inc's kernel: it sums four signed byte products into an int32 lane as
// maddubs and madd do in two steps (with weights as they are, no sign trick): the same
// eight int32 sums, as two NEON vectors, which are SIMDe's __m256i.
inline __m256i joined(int32x4_t low, int32x4_t high) {
  const int32x4_t halves[2] = {low, high};
  __m256i v;
  std::memcpy(&v, halves, sizeof(v));
  return v;
}

inline int32x4_t sdot(int32x4_t sum, uint8x16_t codes, const int8_t* x) {
  return vdotq_s32(sum, vreinterpretq_s8_u8(codes), vld1q_s8(x));
}

// sums + the four byte products, in each int32 lane, of x's four bytes there and the four
// at w (the integer GEMM's step: eight rows' codes against four of a weight row's).
inline __m256i sdot_broadcast(__m256i sums, const int8_t* w, __m256i x) {
  int32_t four;
  std::memcpy(&four, w, sizeof(four));
  const int8x16_t wv = vreinterpretq_s8_s32(vdupq_n_s32(four));
  int32x4_t s[2];
  int8x16_t xv[2];
  std::memcpy(s, &sums, sizeof(s));
  std::memcpy(xv, &x, sizeof(xv));
  return joined(vdotq_s32(s[0], wv, xv[0]), vdotq_s32(s[1], wv, xv[1]));
}
QK_ARM_END
#endif

void check_rows(const at::Tensor& x, int64_t K, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && K % kMatrixColumnBlock == 0, name,
              ": expected x [M, K] with K a multiple of 32 matching the weights");
}

// Activations quantized per block of 32: codes, the blocks' scales and the blocks' sums
// of the float values (which int4's zero points multiply), in buffers of the calling
// thread (see float_rows). In pair order (for dot_u4_pair), each pair of blocks b, b + 1
// of a row holds b's codes 0-15, b + 1's codes 0-15, b's codes 16-31, b + 1's 16-31.
struct QuantizedRows {
  const int8_t* codes;
  const float* scales;
  const float* sums;
};

// One block of 32 activations quantized: scale max|x| / 127, codes x * (127 / max|x|)
// rounded to nearest even (the default mode, as nearbyint does), the 32 codes in order;
// also the sum of the block's floats.
template <typename T>
inline __m256i quantize_block(const T* v, float& scale, float& sum) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 x[4], top = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    x[j] = load8(v + 8 * j);
    top = _mm256_max_ps(top, _mm256_and_ps(x[j], magnitude));
  }
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  const float high = _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
  const __m256 inverse = _mm256_set1_ps(high > 0.0f ? 127.0f / high : 0.0f);
  __m256i q[4];
  for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(x[j], inverse));
  const __m256i words = _mm256_packs_epi32(q[0], q[1]), words2 = _mm256_packs_epi32(q[2], q[3]);
  scale = high / 127.0f;
  sum = qk::hsum(_mm256_add_ps(_mm256_add_ps(x[0], x[1]), _mm256_add_ps(x[2], x[3])));
  // packs works within 128-bit lanes: restore the order of the 32 values.
  return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words, words2),
                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Where code k of a block goes in pair order, from the start of the block's pair
// (b & ~1): codes 0-15 at (b & 1) * 16, codes 16-31 at 32 + (b & 1) * 16.
inline int64_t pair_offset(int64_t b, int64_t k) { return (b & 1) * 16 + (k / 16) * 32 + k % 16; }

QuantizedRows quantize_rows(const float* xp, int64_t M, int64_t K, bool pair_order) {
  const int64_t B = K / 32;
  thread_local std::vector<int8_t> codes;
  thread_local std::vector<float> scales, sums;
  codes.resize(M * K);
  scales.resize(M * B);
  sums.resize(M * B);
  for (int64_t b = 0; b < M * B; ++b) {
    const __m256i bytes = quantize_block(xp + b * 32, scales[b], sums[b]);
    int8_t* out = codes.data() + b * 32;
    if (pair_order) {
      // Blocks never pair across rows: B is even in pair order.
      out = codes.data() + (b & ~int64_t{1}) * 32;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + pair_offset(b, 0)), _mm256_castsi256_si128(bytes));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + pair_offset(b, 16)), _mm256_extracti128_si256(bytes, 1));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bytes);
    }
  }
  return {codes.data(), scales.data(), sums.data()};
}

// Quantized weights times many rows (prefill): integer products as in decode, with eight
// activation rows side by side. For each step of four inputs, one 32-byte vector holds the
// four int8 codes of each of eight rows, a weight row's four codes are broadcast against
// it, and maddubs leaves each row's partial dot product in its own 32-bit lane. So every
// weight is loaded once per eight rows and no tile is widened to float. One maddubs does
// 32 multiply-adds to an FMA's 8: int4 products run twice as fast as widened tiles in
// float32 GEMM did, int8 ones (which pay for signs and a widening per step) 1.3x.
constexpr int kGroupRows = 8;   // activation rows per vector, one per 32-bit lane
constexpr int kWeightRows = 4;  // weight rows per pass: 4 + 4 accumulators stay in registers
// With AVX512-VNNI a 64-byte vector holds the four codes of 16 rows, and vpdpbusd does a
// maddubs, its widening and the add in one instruction: the same integer sums, twice the
// rows per instruction. vpdpbusd can issue twice a cycle but takes several cycles to
// finish, so its kernel takes eight weight rows a pass and two blocks at a time: 16
// independent sums, where four rows and one block left it waiting on its own results.
constexpr int kWideGroupRows = 16;
constexpr int kWideWeightRows = 8;

// Where quantize_groups puts a group's codes: by steps of four, [K / 4][row][4], in
// quantize_rows' pair order for int4 rows (pair_steps), by steps of eight, [K / 8][row][8]
// (ARM's smmla, whose operand is two rows' eight codes side by side), or by rows, [row][K]
// (AMX's).
enum class CodeLayout { steps, pair_steps, eights, rows };

// The activations x [M, K] quantized as quantize_rows does, straight into the kernels'
// layout, G rows a group (rows past M zeros): codes [group] in ``layout``, block scales
// and sums [group][K / 32][row], and with code_sums -128 times each block's sum of
// codes, [group][K / 32][row] (see vnni_start).
// In buffers of the calling thread, filled by both threads: widened, quantized and then
// regrouped on the calling thread alone, they took a tenth of a 16-row int4 product on
// two threads (the 0.6B shape's layers, Intel Xeon).
struct RowGroups {
  const int8_t* codes;
  const float* scales;
  const float* sums;
  const int32_t* code_sums;
  int64_t count;
};

constexpr int64_t kQuantizeGrain = 4096;

template <int G>
RowGroups quantize_groups(const at::Tensor& x, CodeLayout layout, bool code_sums) {
  const int64_t M = x.size(0), K = x.size(1), B = K / 32, count = (M + G - 1) / G;
  thread_local std::vector<int32_t> codes, biases;
  thread_local std::vector<float> scales, sums;
  codes.resize(count * G * K / 4);
  scales.resize(count * B * G);
  sums.resize(count * B * G);
  biases.resize(code_sums ? count * B * G : 0);
  // The buffers by pointer: inside the loop's body, their names would be the workers' own.
  int32_t* const cp = codes.data();
  int32_t* const bp = biases.data();
  float* const sp = scales.data();
  float* const up = sums.data();
  qk::with_dtype(x.scalar_type(), "linear", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    // In parallel by blocks (pairs in pair order), not rows: a cache line of codes holds
    // a step of every row of a group, and two threads writing one line took longer than
    // the serial loops.
    const bool pair_order = layout == CodeLayout::pair_steps;
    const int64_t per = pair_order ? 2 : 1, units = B / per;
    // A thread's share at least kQuantizeGrain values: a decode step's row (1024-3072
    // values) took longer to hand to the other thread than to quantize.
    const int64_t grain = std::max<int64_t>(1, kQuantizeGrain / (per * 32 * G));
    qk::parallel_for(0, count * units, grain, [&](int64_t begin, int64_t end) {
      alignas(32) int32_t fours[8];
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t group = unit / units, live = std::min<int64_t>(G, M - group * G);
        int32_t* steps = cp + group * G * K / 4;
        for (int64_t b = unit % units * per; b < (unit % units + 1) * per; ++b) {
          // The steps (of four codes) that take the block's codes 0-15 and 16-31.
          const int64_t low = pair_order ? (b & ~int64_t{1}) * 8 + (b & 1) * 4 : b * 8;
          const int64_t high = low + (pair_order ? 8 : 4);
          for (int64_t lane = 0; lane < G; ++lane) {
            const int64_t at = (group * B + b) * G + lane;
            if (lane < live) {
              _mm256_store_si256(reinterpret_cast<__m256i*>(fours),
                                 quantize_block(xp + (group * G + lane) * K + b * 32, sp[at], up[at]));
            } else {  // a last group's rows past M: products of zero
              std::fill_n(fours, 8, 0);
              sp[at] = up[at] = 0.0f;
            }
            if (layout == CodeLayout::rows) {
              std::copy_n(fours, 8, steps + lane * K / 4 + b * 8);
            } else if (layout == CodeLayout::eights) {
              for (int i = 0; i < 8; ++i) steps[((b * 4 + i / 2) * G + lane) * 2 + i % 2] = fours[i];
            } else {
              for (int i = 0; i < 4; ++i) {
                steps[(low + i) * G + lane] = fours[i];
                steps[(high + i) * G + lane] = fours[4 + i];
              }
            }
            if (code_sums) {
              int32_t total = 0;
              for (int i = 0; i < 32; ++i) total += reinterpret_cast<const int8_t*>(fours)[i];
              bp[at] = -128 * total;
            }
          }
        }
      }
    });
  });
  return {reinterpret_cast<const int8_t*>(cp), sp, up, bp, count};
}

// Weight rows expanded for a pass of row_group_products: one unsigned byte per value and
// per block of 32 the scale and, for int4, the offset (zero - 8 * scale). Rows past N are
// zeros. The AVX2 kernel takes int4 codes in order and int8 as |code|, with the codes
// themselves for their signs; the VNNI one (vnni) int8 codes plus 128 and int4 codes
// in quantize_rows' pair order. Without zero points (GGUF's Q4_0) every offset is
// -8 * scale, and the kernels use that (see vnni_finish).
struct WeightRows {
  std::vector<uint8_t> unsigned_codes;
  std::vector<const int8_t*> signed_codes;
  std::vector<float> scales, offsets;
  bool vnni;
  // int8 codes held as w + 128 (either VNNI kernel's: their sums start at x's code_sums,
  // see vnni_start), else as |w| beside the signed codes.
  bool biased;
  bool zero_points;
  // The next pass's weights, asked for a few cache lines per block while this pass
  // multiplies (see integer_gemm_of): null once asked for.
  const char* ahead = nullptr;
  int64_t ahead_lines = 0;  // per block

  void prefetch_ahead(int64_t b) const {
    if (ahead == nullptr) return;
    for (int64_t line = b * ahead_lines; line < (b + 1) * ahead_lines; ++line)
      _mm_prefetch(ahead + line * 64, _MM_HINT_T1);
  }

  WeightRows(int64_t K, int rows, bool vnni, bool biased, bool zero_points)
      : unsigned_codes(rows * K), signed_codes(rows), scales(rows * K / 32),
        offsets(rows * K / 32), vnni(vnni), biased(biased), zero_points(zero_points) {}

  // Row j's per-block scales and offsets from its per-group ones.
  template <typename Scale, typename Offset>
  void set_blocks(int64_t j, int64_t B, int64_t per_group, Scale scale, Offset offset) {
    for (int64_t b = 0, g = 0; b < B; ++g) {
      const float s = scale(g), o = offset(g);
      for (int64_t e = 0; e < per_group; ++e, ++b) scales[j * B + b] = s, offsets[j * B + b] = o;
    }
  }

  // set_blocks where every block is its own group (GGUF's Q8_0 and Q4_0, --quantize int4),
  // from the float16 scales (and int4 zeros) eight at a time: a row's scalar conversions
  // cost as much as its products at 16 activation rows. int4's offset is zero - 8 * scale.
  void set_block_halves(int64_t j, int64_t B, const c10::Half* s, const c10::Half* z, bool int4) {
    float* sc = scales.data() + j * B;
    float* of = offsets.data() + j * B;
    int64_t b = 0;
    for (; b + 8 <= B; b += 8) {
      const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + b)));
      _mm256_storeu_ps(sc + b, v);
      __m256 o = int4 ? _mm256_mul_ps(v, _mm256_set1_ps(-8.0f)) : _mm256_setzero_ps();
      if (int4 && z != nullptr)
        o = _mm256_add_ps(o, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + b))));
      _mm256_storeu_ps(of + b, o);
    }
    for (; b < B; ++b) {
      sc[b] = qk::to_float(s[b]);
      of[b] = int4 ? (z != nullptr ? qk::to_float(z[b]) : 0.0f) - 8.0f * sc[b] : 0.0f;
    }
  }
};

// integer_rows.inc's builds (row_group_products): AVX2's, and on x86 AVX-VNNI's where the
// CPU has it and AVX512-VNNI's kernel does not run (Intel's client CPUs since Alder Lake,
// its E-core Xeons). Each runs over a pass's groups in its own build (group_products), so
// each is inlined there, AVX-VNNI's too, which is built for more than the GEMM (called once
// a group, AVX2's 16-row int4 products took 1.3-1.4x as long). With AVX2 alone on an
// Intel Xeon (two cores, the 0.6B shape's 28 layers of int4 feed-forward products): 128
// rows 181-188 ms AVX2, 148-152 AVX-VNNI; 16 rows 26.3 and 24.1. Q8_0's: 128 rows 320 and
// 155, 16 rows 45.5 and 28.1. On ARM, AVX2's is NEON through SIMDe, and integer_row.inc
// and integer_rows.inc are built a second time for the dot product (QK_DOT), which runs
// where the CPU has it: one build serves every 64-bit ARM CPU.
#define QK_DOT 0
namespace row_ints {
#include "integer_row.inc"
}  // namespace row_ints

namespace ints {
#define QK_INTS inline
#define QK_AVX_VNNI 0
#include "integer_rows.inc"
#undef QK_AVX_VNNI
#undef QK_INTS
}  // namespace ints

#if QK_X86
namespace ints_vnni {
#define QK_INTS inline QK_TARGET("avx2,fma,f16c,avxvnni")
#define QK_AVX_VNNI 1
#include "integer_rows.inc"
#undef QK_AVX_VNNI
#undef QK_INTS
}  // namespace ints_vnni
#undef QK_DOT
#else
#undef QK_DOT
#define QK_DOT 1
QK_DOTPROD_BEGIN
namespace row_ints_dot {
#include "integer_row.inc"
}  // namespace row_ints_dot

namespace ints_dot {
#define QK_INTS inline
#define QK_AVX_VNNI 0
#include "integer_rows.inc"
#undef QK_AVX_VNNI
#undef QK_INTS
}  // namespace ints_dot
QK_ARM_END
#undef QK_DOT
#endif

std::atomic<bool> dotprod{false};

std::atomic<bool> avx_vnni{false};
std::atomic<bool> i8mm{false};

#if !QK_X86
QK_I8MM_BEGIN
// row_group_products with ARM's int8 matrix multiply (FEAT_I8MM: Graviton 3 and 4, Apple
// M2 on, Cortex-A510/A710/X2 on): smmla multiplies two rows of eight int8 codes by two
// others into a 2 x 2 tile of int32 sums, 32 multiply-adds where sdot does 16. The
// activations come by steps of eight (CodeLayout::eights), so one 16-byte load is two
// rows' operand; a step takes four such pairs against two pairs of weight rows (int8 codes
// as they are, int4 ones 0-15 as signed bytes), 8 tiles a step. The tiles' float sums are
// scaled lane by lane in the AVX2 kernel's float steps (each lane's row and weight row's
// scales broadcast to it), then taken apart into rows: exact integer sums and the same
// float steps, so the same bits as the dot-product kernel.
template <bool Int4>
void row_group_products_i8mm(const RowGroups& x, int64_t group, int64_t K, const WeightRows& w,
                             float out[kWeightRows][kGroupRows]) {
  constexpr int P = kGroupRows / 2, Q = kWeightRows / 2;  // pairs of rows, of weight rows
  const int64_t B = K / 32;
  const int8_t* xc = x.codes + group * kGroupRows * K;
  const int8_t* rows[kWeightRows];
  for (int j = 0; j < kWeightRows; ++j)
    rows[j] = Int4 ? reinterpret_cast<const int8_t*>(w.unsigned_codes.data() + j * K) : w.signed_codes[j];
  float32x4_t acc[P][Q];
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < Q; ++q) acc[p][q] = vdupq_n_f32(0.0f);
  for (int64_t b = 0; b < B; ++b) {
    w.prefetch_ahead(b);
    int32x4_t sums[P][Q];
    for (int p = 0; p < P; ++p)
      for (int q = 0; q < Q; ++q) sums[p][q] = vdupq_n_s32(0);
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      const int64_t k = b * 32 + t * 8;
      int8x16_t wv[Q];
      for (int q = 0; q < Q; ++q) wv[q] = vcombine_s8(vld1_s8(rows[2 * q] + k), vld1_s8(rows[2 * q + 1] + k));
      for (int p = 0; p < P; ++p) {
        const int8x16_t xv = vld1q_s8(xc + k * kGroupRows + p * 16);
        for (int q = 0; q < Q; ++q) sums[p][q] = vmmlaq_s32(sums[p][q], xv, wv[q]);
      }
    }
    // A tile's lanes are (row 2p, weight row 2q), (2p, 2q + 1), (2p + 1, 2q), (2p + 1, 2q + 1).
    const int64_t at = (group * B + b) * kGroupRows;
    const float32x4_t xd[2] = {vld1q_f32(x.scales + at), vld1q_f32(x.scales + at + 4)};
    const float32x4_t xs[2] = {vld1q_f32(x.sums + at), vld1q_f32(x.sums + at + 4)};
    const auto per_weight = [&](const std::vector<float>& v, int q) {
      const float32x2_t two = {v[2 * q * B + b], v[(2 * q + 1) * B + b]};
      return vcombine_f32(two, two);
    };
    for (int q = 0; q < Q; ++q) {
      const float32x4_t ws = per_weight(w.scales, q);
      const float32x4_t offset = Int4 ? per_weight(w.offsets, q) : ws;
      for (int p = 0; p < P; ++p) {
        const float32x4_t xdp = p % 2 ? vzip2q_f32(xd[p / 2], xd[p / 2]) : vzip1q_f32(xd[p / 2], xd[p / 2]);
        const float32x4_t xsp = p % 2 ? vzip2q_f32(xs[p / 2], xs[p / 2]) : vzip1q_f32(xs[p / 2], xs[p / 2]);
        const float32x4_t dot = vcvtq_f32_s32(sums[p][q]);
        if (Int4 && !w.zero_points) {  // see vnni_finish
          const float32x4_t part = vfmaq_f32(vmulq_f32(xsp, vdupq_n_f32(-8.0f)), dot, xdp);
          acc[p][q] = vfmaq_f32(acc[p][q], part, ws);
          continue;
        }
        acc[p][q] = vfmaq_f32(acc[p][q], dot, vmulq_f32(xdp, ws));
        if constexpr (Int4) acc[p][q] = vfmaq_f32(acc[p][q], offset, xsp);
      }
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int half = 0; half < 2; ++half) {
      vst1q_f32(out[2 * q] + 4 * half, vuzp1q_f32(acc[2 * half][q], acc[2 * half + 1][q]));
      vst1q_f32(out[2 * q + 1] + 4 * half, vuzp2q_f32(acc[2 * half][q], acc[2 * half + 1][q]));
    }
}
QK_ARM_END
#endif

#define QK_VNNI QK_TARGET("avx512f,avx512bw,avx512vnni,fma")

// Adds step t (four inputs) of the block whose codes start at `first` to the sums of the
// VNNI kernel's weight rows. In pair order an int4 block's codes 0-15 come first in its
// pair's 64, and its codes 16-31 at 32 on.
template <bool Int4>
QK_VNNI inline void vnni_step(const int8_t* xc, const WeightRows& w, int64_t K, int64_t first,
                              int t, __m512i sums[kWideWeightRows]) {
  const int64_t k = first + (Int4 ? (t / 4) * 32 + (t % 4) * 4 : t * 4);
  const __m512i xv = _mm512_loadu_si512(xc + k * kWideGroupRows);
  for (int j = 0; j < kWideWeightRows; ++j) {
    // Broadcast straight from memory: a load, not a shuffle competing with vpdpbusd.
    const __m512i four = _mm512_broadcastd_epi32(_mm_loadu_si32(w.unsigned_codes.data() + j * K + k));
    sums[j] = _mm512_dpbusd_epi32(sums[j], four, xv);
  }
}

// Where block b's integer sums start: int8 weights go in as unsigned w + 128, so the sums
// start at -128 times the activation codes' sum (exact, as int32 lanes do not saturate):
// two instructions fewer per product than signing x by w, and none at the block's end.
template <bool Int4>
QK_VNNI inline void vnni_start(const RowGroups& x, int64_t group, int64_t B, int64_t b,
                               __m512i sums[kWideWeightRows]) {
  const __m512i start = Int4 ? _mm512_setzero_si512()
                             : _mm512_loadu_si512(x.code_sums + (group * B + b) * kWideGroupRows);
  for (int j = 0; j < kWideWeightRows; ++j) sums[j] = start;
}

// Unpacks an int4 row's codes (GGUF's block layout) into pair order as the int4 expand
// below does, 128 at a time with 64-byte vectors (the products of 16 rows with the 0.6B
// shape's [1024, 6144] int4 weights: 6% faster); how many it did (a multiple of 128).
QK_VNNI inline int64_t unpack_u4_wide(const uint8_t* row, int64_t K, uint8_t* codes) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {
    const __m512i bytes = _mm512_loadu_si512(row + k / 2);
    const __m512i low = _mm512_and_si512(bytes, mask);
    const __m512i high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), mask);
    // Each pair's 32 low-nibble codes, then its 32 high ones (a permute SIMDe has).
    const __m512i first = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
    const __m512i second = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
    _mm512_storeu_si512(codes + k, _mm512_permutex2var_epi64(low, first, high));
    _mm512_storeu_si512(codes + k + 64, _mm512_permutex2var_epi64(low, second, high));
  }
  return k;
}

// Unpacks an int4 row's codes (GGUF's block layout) as the int4 expand below does for the
// AVX2 kernel (each block's 16 low nibbles, then its 16 high ones), two blocks at a time
// with 32-byte vectors (one at a time: the 0.6B shape's 28 layers of 16-row int4
// feed-forward products 1.08x as long on two AVX2 cores of an Intel Xeon); how many it did
// (a multiple of 64).
inline int64_t unpack_u4_pairs(const uint8_t* row, int64_t K, uint8_t* codes) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k / 2));
    const __m256i low = _mm256_and_si256(bytes, mask);
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + k), _mm256_permute2x128_si256(low, high, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + k + 32), _mm256_permute2x128_si256(low, high, 0x31));
  }
  return k;
}

// Block b's sums into the float accumulators, as the AVX2 kernel does. A block's cost here
// is that of four of its eight vpdpbusd (both take the same two ports), so int4 rows
// without zero points, whose offsets are -8 * scale, take scale * (xd * sum - 8 * xsum):
// three instructions a row rather than four (16 rows of the 0.6B shape's [1024, 6144]
// int4 product on an Intel Xeon: 5% faster).
template <bool Int4>
QK_VNNI inline void vnni_finish(const RowGroups& x, const WeightRows& w, int64_t group, int64_t B,
                                int64_t b, __m512i sums[kWideWeightRows],
                                __m512 acc[kWideWeightRows]) {
  const int64_t at = (group * B + b) * kWideGroupRows;
  const __m512 xd = _mm512_loadu_ps(x.scales + at);
  const __m512 xsum = _mm512_loadu_ps(x.sums + at);
  if (Int4 && !w.zero_points) {
    const __m512 xsum8 = _mm512_mul_ps(xsum, _mm512_set1_ps(-8.0f));
    for (int j = 0; j < kWideWeightRows; ++j) {
      const __m512 part = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[j]), xd, xsum8);
      acc[j] = _mm512_fmadd_ps(part, _mm512_set1_ps(w.scales[j * B + b]), acc[j]);
    }
    return;
  }
  for (int j = 0; j < kWideWeightRows; ++j) {
    const __m512 scale = _mm512_mul_ps(xd, _mm512_set1_ps(w.scales[j * B + b]));
    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[j]), scale, acc[j]);
    if constexpr (Int4) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(w.offsets[j * B + b]), xsum, acc[j]);
  }
}

// row_group_products with AVX512-VNNI, kWideGroupRows activation rows and kWideWeightRows
// weight rows at a time, taking blocks in pairs: the integer sums are the same, and the
// float steps after them the same in each lane and in block order, so the results are bit
// for bit the AVX2 kernel's. int4 takes an even number of blocks. Compiled for those
// instructions alone; called only where the CPU and the OS allow them (set_avx512_vnni).
template <bool Int4>
QK_VNNI void row_group_products_vnni(const RowGroups& x, int64_t group, int64_t K,
                                     const WeightRows& w,
                                     float out[kWideWeightRows][kWideGroupRows]) {
  constexpr int R = kWideWeightRows;
  const int64_t B = K / 32;
  const int8_t* xc = x.codes + group * kWideGroupRows * K;
  __m512 acc[R];
  for (int j = 0; j < R; ++j) acc[j] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= B; b += 2) {
    w.prefetch_ahead(b);
    w.prefetch_ahead(b + 1);
    __m512i even[R], odd[R];
    vnni_start<Int4>(x, group, B, b, even);
    vnni_start<Int4>(x, group, B, b + 1, odd);
    // Unrolled whole: a loop over t made GCC shuffle the sums between registers each step.
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      vnni_step<Int4>(xc, w, K, b * 32, t, even);
      vnni_step<Int4>(xc, w, K, b * 32 + (Int4 ? 16 : 32), t, odd);
    }
    vnni_finish<Int4>(x, w, group, B, b, even, acc);
    vnni_finish<Int4>(x, w, group, B, b + 1, odd, acc);
  }
  if (b < B) {  // int8's last block of an odd count
    __m512i sums[R];
    vnni_start<Int4>(x, group, B, b, sums);
    for (int t = 0; t < 8; ++t) vnni_step<Int4>(xc, w, K, b * 32, t, sums);
    vnni_finish<Int4>(x, w, group, B, b, sums, acc);
  }
  for (int j = 0; j < R; ++j) _mm512_storeu_ps(out[j], acc[j]);
}

// x [M, K] @ W.T for N quantized weight rows; expand(n, j, rows) writes weight row n into
// row j of rows (n < N). G activation rows by R weight rows at a time: the AVX2 kernel's
// or (G = kWideGroupRows) the VNNI one's. zero_points: int4 offsets other than -8 * scale.
//
// Weight row n's codes are the row_bytes at weights + n * row_bytes. Expanding a pass's
// rows read them from memory while the core waited, and multiplying them waited on no
// memory: at 16 activation rows each took about as long as the other. The kernel asks for
// the next pass's codes while it multiplies, a few lines per block, so the two overlap.
template <bool Int4, int G, int R, typename Expand>
at::Tensor integer_gemm_of(const at::Tensor& x, int64_t N, Expand expand, const void* weights,
                           int64_t row_bytes, bool zero_points) {
  constexpr bool vnni = G == kWideGroupRows;
  const bool with_avx_vnni = !vnni && avx_vnni;
  const bool with_dot = !QK_X86 && dotprod;
  const bool with_i8mm = !QK_X86 && !vnni && i8mm;
  const bool biased = !Int4 && (vnni || with_avx_vnni);
  const int64_t M = x.size(0), K = x.size(1);
  const CodeLayout layout = Int4 && vnni ? CodeLayout::pair_steps
                            : with_i8mm  ? CodeLayout::eights
                                         : CodeLayout::steps;
  const RowGroups groups = quantize_groups<G>(x, layout, biased);
  auto out = at::empty({M, N}, x.options());
  qk::with_dtype(x.scalar_type(), "linear", [&](auto tag) {
    using T = decltype(tag);
    T* op = out.data_ptr<T>();
    qk::parallel_for(0, (N + R - 1) / R, 1, [&](int64_t begin, int64_t end) {
      WeightRows rows(K, R, vnni, biased, zero_points);
      const std::vector<int8_t> zero_row(K, 0);
      // Group g's sums (out[j][i]: weight row n0 + j, activation row g * G + i) into the output.
      int64_t n0 = 0, count = 0;
      const auto store = [&](int64_t g, const float (&lanes)[R][G]) {
        const int64_t live = std::min<int64_t>(G, M - g * G);
        if (R == 8 && count == R) {  // an output row's 8 values at once: scalar conversions
          const __m256i across = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                    _mm256_set1_epi32(G));  // cost 10%
          for (int64_t i = 0; i < live; ++i)
            qk::store8(op + (g * G + i) * N + n0, _mm256_i32gather_ps(&lanes[0][i], across, 4));
        } else if (R == 4 && G == 8 && count == R) {
          // Output rows i and i + 4's four values from a 4 x 8 transpose, rounded eight at
          // a time (converted one by one: the 0.6B shape's 28 layers of 16-row int4
          // feed-forward products 1.04x as long on two AVX2 cores of an Intel Xeon).
          const __m256 t0 = _mm256_unpacklo_ps(_mm256_load_ps(lanes[0]), _mm256_load_ps(lanes[1]));
          const __m256 t1 = _mm256_unpackhi_ps(_mm256_load_ps(lanes[0]), _mm256_load_ps(lanes[1]));
          const __m256 t2 = _mm256_unpacklo_ps(_mm256_load_ps(lanes[2]), _mm256_load_ps(lanes[3]));
          const __m256 t3 = _mm256_unpackhi_ps(_mm256_load_ps(lanes[2]), _mm256_load_ps(lanes[3]));
          const __m256 pairs[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                                   _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
          for (int64_t i = 0; i < 4; ++i) {
            alignas(32) T both[8];
            qk::store8(both, pairs[i]);
            for (int64_t half = 0; half < 2 && i + 4 * half < live; ++half)
              std::memcpy(op + (g * G + i + 4 * half) * N + n0, both + 4 * half, 4 * sizeof(T));
          }
        } else {
          for (int64_t i = 0; i < live; ++i)
            for (int64_t j = 0; j < count; ++j)
              op[(g * G + i) * N + n0 + j] = static_cast<T>(lanes[j][i]);
        }
      };
      // The VNNI and int8 matrix multiply kernels a call per group; the others over every
      // group in their own build (group_products).
      alignas(64) float lanes[R][G];
      const auto by_group = [&](auto kernel) {
        for (int64_t g = 0; g < groups.count; ++g) {
          if (g == 1) rows.ahead = nullptr;  // asked for by the first group
          kernel(g, lanes);
          store(g, lanes);
        }
      };
      for (int64_t pass = begin; pass < end; ++pass) {
        n0 = pass * R, count = std::min<int64_t>(R, N - n0);
        for (int64_t j = 0; j < R; ++j) {
          if (j < count) {
            expand(n0 + j, j, rows);
          } else {  // past N: products of zero
            std::fill_n(rows.unsigned_codes.data() + j * K, K, 0);
            rows.signed_codes[j] = zero_row.data();
            rows.set_blocks(j, K / 32, 1, [](int64_t) { return 0.0f; }, [](int64_t) { return 0.0f; });
          }
        }
        const int64_t lines = (R * row_bytes + 63) / 64, B = K / 32;
        rows.ahead = static_cast<const char*>(weights) + (n0 + R) * row_bytes;
        rows.ahead_lines = (lines + B - 1) / B;
        if constexpr (vnni)
          by_group([&](int64_t g, auto& out) { row_group_products_vnni<Int4>(groups, g, K, rows, out); });
#if QK_X86
        else if (with_avx_vnni)
          ints_vnni::group_products<Int4>(groups, K, rows, store);
#else
        else if (with_i8mm)
          by_group([&](int64_t g, auto& out) { row_group_products_i8mm<Int4>(groups, g, K, rows, out); });
        else if (with_dot)
          ints_dot::group_products<Int4>(groups, K, rows, store);
#endif
        else
          ints::group_products<Int4>(groups, K, rows, store);
      }
    });
  });
  return out;
}

std::atomic<bool> avx512_vnni{false};

// int4 and int8 in groups of 32 (and int8 with one scale a row) interleaved by 16 rows
// (quant.py's QuantizedWeight does it at load on x86 CPUs): int4
// codes [N / 16, K / 32, 4, 16, 4], each 16 weight rows' block of 32 as four steps of the
// 16 rows' four bytes (step s: codes 4s..4s+3 in the low nibbles, 16 + 4s.. in the high
// ones); int8's [N / 16, K / 32, 8, 16, 4] (step s: codes 4s..4s+3), held as unsigned
// w + 128 as vpdpbusd takes them (the sums start at -128 times the activations' codes, as
// vnni_start's do); float16 scales and int4 zero points [N / 16, K / 32, 16]. One
// 64-byte load is then four codes of 16 weight rows, which vpdpbusd multiplies against one
// activation row's four codes broadcast from memory: a pass takes 16 weight rows against
// a group of activation rows, their int32 sums in registers and float sums in L1, and
// stores each output row's 16 values as they are. integer_gemm unpacks every pass's rows
// and gathers its outputs: the 0.6B shape's 28 layers of Q4_0 products took 27.5 ms there
// and 20.2 this way at 16 rows, 25 and 12 at 4, 12.0-12.9 and 10.5-11.0 at one (Intel
// Xeon, 2 threads). One row of Q8_0 takes a vpdpbusd per 64 weights where the AVX2 kernel
// takes four instructions per 32 (sign, sign, maddubs, madd). The same sums in the same
// order as integer_gemm's kernels: the same bits, at any number of rows.
#define QK_VNNI_Q4 QK_TARGET("avx512f,avx512bw,avx512vnni,fma,f16c")

// sums + codes times the four bytes at x in every lane, x broadcast by the instruction
// itself ({1to16}): from the intrinsics GCC emits a vpbroadcastd of its own before each
// vpdpbusd, and the extra instruction cost 3-7% of 16-row products.
QK_VNNI_Q4 inline __m512i dpbusd_broadcast(__m512i sums, __m512i codes, const int32_t* x) {
#if defined(__x86_64__) || defined(_M_X64)
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(sums) : "v"(codes), "m"(*x));
  return sums;
#else
  return _mm512_dpbusd_epi32(sums, codes, _mm512_set1_epi32(*x));
#endif
}

// Bytes of a block of 32 inputs of 16 interleaved weight rows.
template <bool Int4>
constexpr int64_t kX16BlockBytes = Int4 ? 256 : 512;

// 16 interleaved weight rows' float16 scales, `step` apart a block (16, or 0 for int8's
// one scale a row), and int4 zero points laid out as the scales (null: Q4_0's).
struct X16Scales {
  const c10::Half* scales;
  int64_t step;
  const c10::Half* zeros;

  // Block b's 16 scales: two halves joined in registers (stored and loaded as one, the
  // load waited for the stores each block: a fifth of the kernel's time).
  QK_VNNI_Q4 __m512 scales16(int64_t b) const {
    const __m256 first = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b * step)));
    const __m256 second = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b * step + 8)));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(first)),
                                               _mm256_castps_pd(second), 1));
  }

  // Block b's 16 offsets, zero - 8 * scale, as WeightRows::set_block_halves makes them.
  QK_VNNI_Q4 __m512 offsets16(int64_t b, __m512 ws16) const {
    const __m512 zero = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zeros + b * 16)));
    return _mm512_add_ps(_mm512_mul_ps(ws16, _mm512_set1_ps(-8.0f)), zero);
  }
};

// acc plus a block's int32 sums of activation row `at` (of x's scales and sums) by 16
// weight rows (scales ws16; offsets, or null) in vnni_finish's float steps: Q4_0 scale *
// (xd * sum - 8 * xsum), with xsum8 the rows' -8 * xsum; int4 with zero points (xd *
// scale) * sum + offset * xsum; int8 (xd * scale) * sum.
template <bool Int4>
QK_VNNI_Q4 inline __m512 x16_finish(__m512 acc, __m512i sums, __m512 ws16, const __m512* offsets,
                                    const RowGroups& x, const float* xsum8, int64_t at) {
  const __m512 sum = _mm512_cvtepi32_ps(sums), xd = _mm512_set1_ps(x.scales[at]);
  if (Int4 && offsets == nullptr)
    return _mm512_fmadd_ps(_mm512_fmadd_ps(sum, xd, _mm512_set1_ps(xsum8[at])), ws16, acc);
  acc = _mm512_fmadd_ps(sum, _mm512_mul_ps(xd, ws16), acc);
  return Int4 ? _mm512_fmadd_ps(*offsets, _mm512_set1_ps(x.sums[at]), acc) : acc;
}

// The A activation rows of group `group` times 16 weight rows (their codes w, scales ws)
// into acc; the next weight rows' codes (next, or null) are asked for a block at a time.
template <int A, bool Int4>
QK_VNNI_Q4 void x16_pass(const uint8_t* w, const X16Scales& ws, const RowGroups& x,
                         const float* xsum8, int64_t group, int64_t B, const uint8_t* next,
                         float acc[A][16]) {
  constexpr int64_t bytes = kX16BlockBytes<Int4>;
  const __m512i mask = _mm512_set1_epi8(0x0F);
  for (int a = 0; a < A; ++a) _mm512_store_ps(acc[a], _mm512_setzero_ps());
  for (int64_t b = 0; b < B; ++b) {
    if (next != nullptr)
      for (int line = 0; line < bytes / 64; ++line) _mm_prefetch(reinterpret_cast<const char*>(next + b * bytes + line * 64), _MM_HINT_T0);
    const int32_t* xb = reinterpret_cast<const int32_t*>(x.codes) + (group * B + b) * 8 * A;
    const int64_t at = (group * B + b) * A;
    __m512i sums[A];
#pragma GCC unroll 16
    for (int a = 0; a < A; ++a)
      sums[a] = Int4 ? _mm512_setzero_si512() : _mm512_set1_epi32(x.code_sums[at + a]);
    if constexpr (Int4) {
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const __m512i packed = _mm512_loadu_si512(w + b * bytes + s * 64);
        const __m512i low = _mm512_and_si512(packed, mask);
        const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), mask);
#pragma GCC unroll 16
        for (int a = 0; a < A; ++a) {
          sums[a] = dpbusd_broadcast(sums[a], low, xb + s * A + a);
          sums[a] = dpbusd_broadcast(sums[a], high, xb + (s + 4) * A + a);
        }
      }
    } else {
#pragma GCC unroll 8
      for (int s = 0; s < 8; ++s) {
        const __m512i codes = _mm512_loadu_si512(w + b * bytes + s * 64);
#pragma GCC unroll 16
        for (int a = 0; a < A; ++a) sums[a] = dpbusd_broadcast(sums[a], codes, xb + s * A + a);
      }
    }
    const __m512 ws16 = ws.scales16(b);
    const __m512 off16 = Int4 && ws.zeros != nullptr ? ws.offsets16(b, ws16) : ws16;
    const __m512* offsets = Int4 && ws.zeros != nullptr ? &off16 : nullptr;
#pragma GCC unroll 16
    for (int a = 0; a < A; ++a)
      _mm512_store_ps(acc[a], x16_finish<Int4>(_mm512_load_ps(acc[a]), sums[a], ws16, offsets, x,
                                               xsum8, at + a));
    // The float sums stay in L1: held in registers, they pushed the int32 sums out.
    asm volatile("" ::: "memory");
  }
}

// x16_pass for CPUs without AVX512-VNNI (AVX2): each 64-byte step of the interleaved
// codes as two 32-byte halves of 8 weight rows, maddubs against an activation row's four
// codes broadcast from memory, so each int32 lane sums one weight row's products and no
// row needs a horizontal sum or a lane shuffle (the row kernels' cost in decode). int4's
// codes (0-15) add eight maddubs in int16 lanes before one widening, as the integer
// GEMM's AVX2 kernel does; int8's stored w + 128 are flipped back to signed and taken as
// |w| against x with w's sign. The integer sums are exact and the float steps per block
// x16_finish's (and integer_gemm's): the same bits as those kernels at any number of rows.
// A is at most 4: two int sums a row must stay in the 16 registers. The 0.6B shape's four
// matrices a layer, 28 times from cache (Zen 3, 2 threads), against the row kernels and
// integer_gemm on rows: int4 1 row 11.9 -> 6.1 ms, 4 rows 37.9 -> 16.4, 128 rows 502 ->
// 478; int8 1 row 19.6 -> 15.1, 4 rows 69.0 -> 35.9, 128 rows 889 -> 763.
template <int A, bool Int4>
void x16_pass_avx2(const uint8_t* w, const X16Scales& ws, const RowGroups& x,
                   const float* xsum8, int64_t group, int64_t B, const uint8_t* next,
                   float acc[A][16]) {
  static_assert(A <= 4, "two int sums a row in registers");
  constexpr int64_t bytes = kX16BlockBytes<Int4>;
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 total[A][2];
  for (int a = 0; a < A; ++a) total[a][0] = total[a][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    if (next != nullptr)
      for (int line = 0; line < bytes / 64; ++line) _mm_prefetch(reinterpret_cast<const char*>(next + b * bytes + line * 64), _MM_HINT_T0);
    const int32_t* xb = reinterpret_cast<const int32_t*>(x.codes) + (group * B + b) * 8 * A;
    const uint8_t* wb = w + b * bytes;
    __m256i sums[A][2];
    for (int a = 0; a < A; ++a) sums[a][0] = sums[a][1] = _mm256_setzero_si256();
    if constexpr (Int4) {
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s)
        for (int h = 0; h < 2; ++h) {
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + s * 64 + h * 32));
          const __m256i low = _mm256_and_si256(packed, mask);
          const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
          for (int a = 0; a < A; ++a) {
            const __m256i products =
                _mm256_add_epi16(_mm256_maddubs_epi16(low, _mm256_set1_epi32(xb[s * A + a])),
                                 _mm256_maddubs_epi16(high, _mm256_set1_epi32(xb[(s + 4) * A + a])));
            sums[a][h] = _mm256_add_epi16(sums[a][h], products);
          }
        }
    } else {
#pragma GCC unroll 8
      for (int s = 0; s < 8; ++s)
        for (int h = 0; h < 2; ++h) {
          const __m256i codes = _mm256_xor_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + s * 64 + h * 32)), flip);
          const __m256i magnitude = _mm256_abs_epi8(codes);
          for (int a = 0; a < A; ++a)
            sums[a][h] = _mm256_add_epi32(
                sums[a][h], dot_u8_i8(magnitude, _mm256_sign_epi8(_mm256_set1_epi32(xb[s * A + a]), codes)));
        }
    }
    const int64_t at = (group * B + b) * A;
    for (int h = 0; h < 2; ++h) {
      const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws.scales + b * ws.step + 8 * h)));
      __m256 offset = scale;
      if (Int4 && ws.zeros != nullptr)
        offset = _mm256_add_ps(_mm256_mul_ps(scale, _mm256_set1_ps(-8.0f)),
                               _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws.zeros + b * 16 + 8 * h))));
      for (int a = 0; a < A; ++a) {
        const __m256i dot = Int4 ? _mm256_madd_epi16(sums[a][h], ones) : sums[a][h];
        const __m256 sum = _mm256_cvtepi32_ps(dot), xd = _mm256_set1_ps(x.scales[at + a]);
        if (Int4 && ws.zeros == nullptr) {
          total[a][h] = _mm256_fmadd_ps(_mm256_fmadd_ps(sum, xd, _mm256_set1_ps(xsum8[at + a])), scale, total[a][h]);
          continue;
        }
        total[a][h] = _mm256_fmadd_ps(sum, _mm256_mul_ps(xd, scale), total[a][h]);
        if constexpr (Int4) total[a][h] = _mm256_fmadd_ps(offset, _mm256_set1_ps(x.sums[at + a]), total[a][h]);
      }
    }
  }
  for (int a = 0; a < A; ++a)
    for (int h = 0; h < 2; ++h) _mm256_store_ps(acc[a] + 8 * h, total[a][h]);
}

// AMX-INT8 tiles (where the CPU has them and the OS grants a process their state:
// set_amx_int8) multiply 16 activation rows by 16 weight rows and a block of 32 inputs in
// one instruction: tdpbsud takes the activations by rows (signed) and the weights as
// interleaved int8 and int4 hold them, four bytes of each of 16 rows a step (unsigned;
// int4's once the nibbles are apart). Its int32 sums are vpdpbusd's, scaled in the same float
// steps: the same bits as x16_pass. From kAmxMinRows rows (a tile takes 16; VNNI's
// 8-row pass costs half of its 16-row one): the 0.6B shape's 28 layers of products on two
// threads, 128 rows 130 -> 106 ms, 32 rows 35 -> 29, 16 rows 19.0-20.5 -> 17.5-18.6, 12
// rows 1.11x (Intel Xeon, AMX allowed); a 16-sequence Q4_0 engine step 52.4 -> 49.4 ms.
std::atomic<bool> amx_int8{false};

#define QK_AMX_Q4 QK_TARGET("avx512f,avx512bw,avx512vnni,fma,f16c,amx-tile,amx-int8")

// Tiles 0 and 1 the sums of alternate blocks, 2 and 4 their activations [16 rows, 32
// bytes], 3 and 5 their weights [8 steps, 16 rows x 4 bytes]: a block's product runs
// while the last block's sums are scaled.
struct alignas(64) TileShapes {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes[16] = {64, 64, 32, 64, 32, 64};
  uint8_t rows[16] = {16, 16, 16, 8, 16, 8};
};

QK_AMX_Q4 void amx_begin() {
  static const TileShapes shapes;
  _tile_loadconfig(&shapes);
}

QK_AMX_Q4 void amx_end() { _tile_release(); }

// Block b of 16 weight rows' interleaved codes w as tdpbsud's weight tile at out: the four
// steps' low nibbles (codes 0-15), then their high ones (16-31).
QK_AMX_Q4 __attribute__((always_inline)) inline void q4x16_amx_unpack(const uint8_t* w, uint8_t* out) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  for (int s = 0; s < 4; ++s) {
    const __m512i packed = _mm512_loadu_si512(w + s * 64);
    _mm512_storeu_si512(out + s * 64, _mm512_and_si512(packed, mask));
    _mm512_storeu_si512(out + 256 + s * 64, _mm512_and_si512(_mm512_srli_epi16(packed, 4), mask));
  }
}

// Blocks a pass unpacks ahead of the block whose product it issues (2: ~15% slower).
constexpr int64_t kAmxUnpackAhead = 8;
// Slots of unpacked blocks a pass of one row group cycles through: a power of two above
// kAmxUnpackAhead + 1 (the block unpacked must not take the slot of one whose tile is yet
// to load). The 0.6B shape's 28 layers of feed-forward products of 16 rows on two
// threads 12.8-13.9 -> 11.4-12.3 ms (Intel Xeon, in-process alternation, 3 runs).
constexpr int64_t kAmxRing = 16;
static_assert((kAmxRing & (kAmxRing - 1)) == 0 && kAmxRing > kAmxUnpackAhead + 1);

// Block b's product into tile `sums` (its activations in tile `acts`, its weights in
// `wts`): a macro, as the tile intrinsics take the tiles' numbers as literal tokens.
#define QK_AMX_BLOCK(sums, acts, wts, b)              \
  do {                                                \
    _tile_loadd(acts, rows + (b) * 32, K);            \
    _tile_loadd(wts, tile(b), 64);                    \
    _tile_zero(sums);                                 \
    _tile_dpbsud(sums, acts, wts);                    \
  } while (0)

// total[a] += x16_finish on block b's sums of 16 activation rows (from `at` on in x) by
// 16 weight rows; Q8_0's sums start at code_sums here.
template <bool Int4>
QK_AMX_Q4 __attribute__((always_inline)) inline void amx_scale(
    const int32_t sums[16][16], const X16Scales& ws, int64_t b, const RowGroups& x,
    const float* xsum8, int64_t at, __m512 total[16]) {
  const __m512 ws16 = ws.scales16(b);
  const __m512 off16 = Int4 && ws.zeros != nullptr ? ws.offsets16(b, ws16) : ws16;
  const __m512* offsets = Int4 && ws.zeros != nullptr ? &off16 : nullptr;
#pragma GCC unroll 16
  for (int a = 0; a < 16; ++a) {
    __m512i sum = _mm512_load_si512(sums[a]);
    if constexpr (!Int4) sum = _mm512_add_epi32(sum, _mm512_set1_epi32(x.code_sums[at + a]));
    total[a] = x16_finish<Int4>(total[a], sum, ws16, offsets, x, xsum8, at + a);
  }
}

// x16_pass with tiles: the 16 activation rows of group `group` (codes by rows) times 16
// weight rows (scales ws) into acc, the next block's product issued before a block's sums
// are stored, and those scaled an iteration later (loaded right after their tile's store,
// they waited for it: the 0.6B shape's 28 layers of Q4_0 feed-forward products of 16 rows
// on two threads took 13.0-13.8 ms, now 12.2-13.0). int8's interleaved codes are the
// weight tiles as they are; int4's are unpacked at `unpacked`: with w (the first group's
// pass), the pass unpacks the rows' codes itself, kAmxUnpackAhead blocks ahead of the
// tiles that load them. The next rows' (next, or null) are asked for into L2 a block at a
// time. Per block of 16 by 16 rows on an Intel Xeon (one core, 16 rows of Q4_0): ~67-80
// cycles against x16_pass's ~95-105. Before the sums waited an iteration, the tiles and
// the vector work took turns (tiles and store ~23 cycles, the scaling ~15, together ~47);
// a block of 32 inputs is all one tile product can take, as each block has its own scales.
// Unpacked all before the pass, the rows' reads waited on memory with nothing to overlap
// (16 rows cost what VNNI's did); unpacked a block ahead, the tiles waited for the stores;
// asked for into L1 (as x16_pass does), the products ran no faster than VNNI's.
template <bool Int4>
QK_AMX_Q4 void x16_amx_pass(const uint8_t* w, uint8_t* unpacked, const X16Scales& ws,
                            const RowGroups& x, const float* xsum8, int64_t group, int64_t B,
                            int64_t K, const uint8_t* next, float acc[16][16]) {
  constexpr int64_t bytes = kX16BlockBytes<Int4>;
  alignas(64) int32_t sums[2][16][16];  // even blocks' sums, odd blocks'
  const int8_t* rows = x.codes + group * 16 * K;
  const int64_t at = group * B * 16;
  // With one group of rows no later pass reads the unpacked blocks: they take turns in
  // kAmxRing slots, which stay in L1 (written through a whole row's worth, a down
  // projection's 48 KiB, they went out to L2 and back).
  const int64_t ring = x.count == 1 ? kAmxRing - 1 : ~int64_t{0};
  const auto slot = [&](int64_t b) { return unpacked + (b & ring) * 512; };
  const auto tile = [&](int64_t b) -> const uint8_t* { return Int4 ? slot(b) : w + b * bytes; };
  __m512 total[16];
#pragma GCC unroll 16
  for (int a = 0; a < 16; ++a) total[a] = _mm512_setzero_ps();
  if (Int4 && w != nullptr)
    for (int64_t b = 0; b < std::min(B, kAmxUnpackAhead); ++b) q4x16_amx_unpack(w + b * 256, slot(b));
  QK_AMX_BLOCK(0, 2, 3, 0);
  for (int64_t b = 0; b < B; ++b) {
    if (next != nullptr)
      for (int line = 0; line < bytes / 64; ++line) _mm_prefetch(reinterpret_cast<const char*>(next + b * bytes + line * 64), _MM_HINT_T1);
    if (Int4 && w != nullptr && b + kAmxUnpackAhead < B)
      q4x16_amx_unpack(w + (b + kAmxUnpackAhead) * 256, slot(b + kAmxUnpackAhead));
    if (b % 2 == 0) {
      if (b + 1 < B) QK_AMX_BLOCK(1, 4, 5, b + 1);
      _tile_stored(0, sums[0], 64);
    } else {
      if (b + 1 < B) QK_AMX_BLOCK(0, 2, 3, b + 1);
      _tile_stored(1, sums[1], 64);
    }
    if (b > 0) amx_scale<Int4>(sums[(b - 1) % 2], ws, b - 1, x, xsum8, at + (b - 1) * 16, total);
  }
  amx_scale<Int4>(sums[(B - 1) % 2], ws, B - 1, x, xsum8, at + (B - 1) * 16, total);
#pragma GCC unroll 16
  for (int a = 0; a < 16; ++a) _mm512_store_ps(acc[a], total[a]);
}

// The passes over interleaved codes, by the instructions they take.
enum class X16Kernel { avx2, vnni, amx };

// x [M, K] times interleaved int8 or int4 codes, scales and int4 zero points (null:
// Q4_0's), scale_blocks a row (K / 32, or 1 for int8's one scale a row): A activation
// rows a group (a power of two; rows past M are zeros), with tiles (amx, A = 16),
// x16_pass (vnni) or x16_pass_avx2.
template <int A, bool Int4, X16Kernel Kernel>
at::Tensor x16_linear_of(const at::Tensor& x, const uint8_t* codes, const c10::Half* scales,
                         const c10::Half* zeros, int64_t scale_blocks, int64_t N) {
  constexpr bool Amx = Kernel == X16Kernel::amx;
  static_assert(!Amx || A == 16, "tiles take 16 activation rows");
  constexpr int64_t bytes = kX16BlockBytes<Int4>;
  const int64_t M = x.size(0), K = x.size(1), B = K / 32;
  const RowGroups groups = quantize_groups<A>(x, Amx ? CodeLayout::rows : CodeLayout::steps,
                                              !Int4 && Kernel != X16Kernel::avx2);
  // Q4_0: -8 times the blocks' sums (exact), each broadcast from memory in the kernel.
  thread_local std::vector<float> scaled;
  scaled.resize(Int4 && zeros == nullptr ? groups.count * B * A : 0);
  for (size_t i = 0; i < scaled.size(); ++i) scaled[i] = groups.sums[i] * -8.0f;
  const float* xsum8 = scaled.data();
  auto out = at::empty({M, N}, x.options());
  qk::with_dtype(x.scalar_type(), "linear", [&](auto tag) {
    using T = decltype(tag);
    T* op = out.data_ptr<T>();
    qk::parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float acc[A][16];
      thread_local std::vector<uint8_t> unpacked;
      if constexpr (Amx) {
        unpacked.resize(Int4 ? B * 512 : 0);
        amx_begin();
      }
      for (int64_t n = begin; n < end; ++n) {
        const uint8_t* w = codes + n * B * bytes;
        const uint8_t* next = n + 1 < end ? w + B * bytes : nullptr;
        const X16Scales ws{scales + n * scale_blocks * 16, scale_blocks == 1 ? 0 : 16,
                           zeros == nullptr ? nullptr : zeros + n * B * 16};
        for (int64_t g = 0; g < groups.count; ++g) {
          if constexpr (Amx)
            x16_amx_pass<Int4>(Int4 && g > 0 ? nullptr : w, unpacked.data(), ws, groups, xsum8, g,
                               B, K, g == 0 ? next : nullptr, acc);
          else if constexpr (Kernel == X16Kernel::vnni)
            x16_pass<A, Int4>(w, ws, groups, xsum8, g, B, g == 0 ? next : nullptr, acc);
          else
            x16_pass_avx2<A, Int4>(w, ws, groups, xsum8, g, B, g == 0 ? next : nullptr, acc);
          for (int64_t a = 0; a < std::min<int64_t>(A, M - g * A); ++a)
            for (int half = 0; half < 2; ++half)
              qk::store8(op + (g * A + a) * N + n * 16 + 8 * half, _mm256_load_ps(acc[a] + 8 * half));
        }
      }
      if constexpr (Amx) amx_end();
    });
  });
  return out;
}

// Whether integer_gemm runs the VNNI kernel for K inputs (int4's takes blocks in pairs).
template <bool Int4>
bool vnni_gemm(int64_t K) {
  return QK_X86 && avx512_vnni && (!Int4 || K % 64 == 0);
}

// Rows from which quantized products run integer_gemm rather than a pass over the weights
// per row (or per four rows). The VNNI kernel's vector holds 16 rows, so 4 rows cost about
// what 16 do: on an Intel Xeon (2 threads, the 0.6B shape's 28 layers of int4 products)
// 5 rows took 35.4 ms in passes and take 27.3 in the GEMM, 7 rows 43.6 and 28.4, 4 rows
// about the same either way; the int8 LM head at 4 rows 15.3 and 10.8.
template <bool Int4>
int64_t integer_gemm_min_rows(int64_t K) {
  return vnni_gemm<Int4>(K) ? kVnniGemmMinRows : kIntegerGemmMinRows;
}

// integer_gemm_of with the widest kernel this CPU runs.
template <bool Int4, typename Expand>
at::Tensor integer_gemm(const at::Tensor& x, int64_t N, Expand expand, const void* weights,
                        int64_t row_bytes, bool zero_points = false) {
  if constexpr (QK_X86)
    if (vnni_gemm<Int4>(x.size(1)))
      return integer_gemm_of<Int4, kWideGroupRows, kWideWeightRows>(x, N, expand, weights,
                                                                    row_bytes, zero_points);
  return integer_gemm_of<Int4, kGroupRows, kWeightRows>(x, N, expand, weights, row_bytes,
                                                        zero_points);
}

template <int C, bool Wide, typename T, typename O>
inline void chain_dots_of(const T* w, const float* x, int64_t K, O* out, int64_t ldo) {
  if constexpr (Wide)
    chain_dots_wide<C>(w, x, K, out, ldo);
  else
    chain_dots<C>(w, x, K, out, ldo);
}

// Up to kChainMaxRows activation rows x [M, K] times float, bfloat16 or half weight rows
// w [N, K], streamed once (matvec): chain_dots against up to four activation rows at a
// time, in its AVX-512 form where that runs (AVX2's registers hold three rows' twelve
// accumulators, so four go as two pairs). Rows are asked for ahead, as quantized ones
// are: float16 decode of the 0.6B shape on an Intel Xeon 1.15-1.26x with the AVX-512 loop
// and 1.2-1.4x with the AVX2 one (AVX-512 turned off). The AVX2 loop on an AMD EPYC
// measured 0-5% slower with it, within that machine's noise.
template <bool Wide, typename T>
at::Tensor float_matvec(const at::Tensor& x, const T* w, int64_t N) {
  const int64_t K = x.size(1);
  const float* xp = float_rows(x, std::is_same_v<T, c10::BFloat16> ? (Wide ? 32 : 16) : 0);
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(T));
  if (x.size(0) == 1) {  // a decode step: no count to dispatch on per weight row
    return matvec(
        x, N,
        [&](int64_t n, int64_t) {
          float out;
          chain_dots_of<1, Wide>(w + n * K, xp, K, &out, 1);
          return out;
        },
        w, row_bytes);
  }
  return matvec(
      x, N,
      [&](int64_t n, int64_t m, int64_t count, float* out) {
        const T* row = w + n * K;
        const float* rows = xp + m * K;
        switch (count) {
          case 1: return chain_dots_of<1, Wide>(row, rows, K, out, 1);
          case 2: return chain_dots_of<2, Wide>(row, rows, K, out, 1);
          case 3: return chain_dots_of<3, Wide>(row, rows, K, out, 1);
          default:
            if constexpr (Wide) return chain_dots_of<4, Wide>(row, rows, K, out, 1);
            chain_dots_of<2, Wide>(row, rows, K, out, 1);
            chain_dots_of<2, Wide>(row, rows + 2 * K, K, out + 2, 1);
        }
      },
      w, row_bytes);
}

template <typename T>
at::Tensor float_matvec(const at::Tensor& x, const T* w, int64_t N) {
  if (avx512_products && x.size(1) % 32 == 0) return float_matvec<true>(x, w, N);
  return float_matvec<false>(x, w, N);
}

// kChainMaxRows + 1 to 63 activation rows times float, bfloat16 or half weights (several
// sequences' decode rows, a short prompt chunk; the AVX2 form here, the AVX-512 one below): weight
// rows are widened in registers once per group of four activation rows and multiplied
// against all four, three weight rows at a time (12 accumulators), each output one vector
// sum over the inputs in order, added across lanes at the end, so a row gets the same bits
// whatever rows are beside it. A pass over the weights per row (float_matvec) widened every
// weight once per row with one FMA per load, and float32 GEMM on widened tiles is built
// for many rows: on two Zen 3 cores (2026-12-03, bfloat16 [M, 1024] x [1024, 3072]) this
// ran 2-2.5x either at 4-16 rows, 1.4x at 32 and as fast as the GEMM at 64, where the
// GEMM takes over. Fewer rows keep float_matvec, whose four chains per output a row adds
// in the same order alone or beside others: this kernel in that order would need four
// times the accumulators, and in its own one chain per output, as one row's kernel (eight
// weight rows at a time), it streamed the 0.6B shape's float16 products 5-15% slower (Zen
// 3). float_matvec at 2 rows took 0.8x this kernel's time, at 4 the same, at 8 1.15x,
// at 16 1.45x (the 0.6B shape's 28 layers, Zen 3, 2026-12-07).
constexpr int kDotRows = 4;
constexpr int64_t kRowDotMaxRows = 64;
// Where AVX-512 runs, its panels catch up sooner (Intel Xeon model 167, 2026-12-07, the
// 0.6B shape's four products, 2 threads: bf16 weights 6.9-7.4 ms against 6.8-7.3 at 32
// rows, 10.5-10.8 against 9.1-10.1 at 48; float16 crosses at 20-24 rows).
constexpr int64_t kWideRowDotMaxRows = 32;
// Bytes of weight rows rows_dot takes through all the activation rows at a time (in L2).
constexpr int64_t kRowDotBlockBytes = 192 * 1024;

// out[c][j] = weight row j (of R, K apart) times activation row c (of C, K apart), stored
// as O (the activations' dtype, rounded as torch rounds).
template <int R, int C, typename T, typename O>
inline void row_dots(const T* w, const float* x, int64_t K, O* out, int64_t ldo) {
  __m256 acc[R][C];
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[j][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[R];
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) wv[j] = load8(w + j * K + k);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const __m256 xv = _mm256_loadu_ps(x + c * K + k);
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) acc[j][c] = _mm256_fmadd_ps(wv[j], xv, acc[j][c]);
    }
  }
  for (int j = 0; j < R; ++j)
    for (int c = 0; c < C; ++c) out[c * ldo + j] = static_cast<O>(hsum(acc[j][c]));
}

// row_dots with AVX-512 (set_avx512_products): 32 weights a step, widened as dot_wide
// widens them (bfloat16 activations in float_rows' split-32 order), two FMAs into each
// output's one accumulator. On an Intel Xeon whose VM hides AVX512-BF16 (so bfloat16 rows
// have no oneDNN GEMM), 2 threads, the 0.6B shape's 28 layers of bf16 products: 8 rows
// 78 ms against 94-103 in a pass per row, 16 rows 127 against 158-168 in float32 GEMM on
// widened tiles (one thread, [16, 1024] x [1024, 3072]: 1.33 ms, the AVX2 form 1.57). Its
// rows in L1 it runs 4.0 G FMAs a second on a core that issues 5.9 (two a cycle); off a
// 64-byte boundary its activations' loads each cost two (2.1 G), and from L2 its weights
// (3.4 G): hence the blocks of rows_dot.
template <int R, int C, typename T, typename O>
QK_AVX512_DOT void row_dots_wide(const T* w, const float* x, int64_t K, O* out, int64_t ldo) {
  __m512 acc[R][C];
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512 low[R], high[R];
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) weights32(w + j * K + k, low[j], high[j]);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const __m512 x0 = _mm512_loadu_ps(x + c * K + k), x1 = _mm512_loadu_ps(x + c * K + k + 16);
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j)
        acc[j][c] = _mm512_fmadd_ps(high[j], x1, _mm512_fmadd_ps(low[j], x0, acc[j][c]));
    }
  }
  for (int j = 0; j < R; ++j)
    for (int c = 0; c < C; ++c) out[c * ldo + j] = static_cast<O>(_mm512_reduce_add_ps(acc[j][c]));
}

template <int R, int C, bool Wide, typename T, typename O>
inline void row_dots_of(const T* w, const float* x, int64_t K, O* out, int64_t ldo) {
  if constexpr (Wide)
    row_dots_wide<R, C>(w, x, K, out, ldo);
  else
    row_dots<R, C>(w, x, K, out, ldo);
}

// kDotRows or fewer activation rows (rows of them) against R weight rows.
template <int R, bool Wide, typename T, typename O>
inline void dot_rows(int64_t rows, const T* w, const float* x, int64_t K, O* out, int64_t ldo) {
  switch (rows) {
    case 4: return row_dots_of<R, 4, Wide>(w, x, K, out, ldo);
    case 3: return row_dots_of<R, 3, Wide>(w, x, K, out, ldo);
    case 2: return row_dots_of<R, 2, Wide>(w, x, K, out, ldo);
    default: return row_dots_of<R, 1, Wide>(w, x, K, out, ldo);
  }
}

// A block of `weights` weight rows against every activation row: kDotRows activation rows
// at a time against the whole block, R weight rows at a time (the last weights % R one by
// one), so those activation rows stay in L1 while the block comes from L2; the next block
// (`next`) is asked for into L2 a share at each step of every pass. A pass of R weight rows
// against all the activation rows in turn read them from L2 for every pass: the bf16 LM
// head of the 0.6B shape at 16 rows (Intel Xeon, 2 threads) 42.5-43.8 ms, 37.5-38.4 this
// way. The whole next block asked for during the first pass (which streams this block
// from memory unless it came in so) held that pass up: the 0.6B shape's bf16 products at 16
// rows 163-167 ms, 129-132 with the requests spread (8 rows 112 -> 100). Each output is
// still one row_dots sum: the same bits.
template <int R, bool Wide, typename T, typename O>
void dot_block(int64_t weights, const T* w, const T* next, const float* x, int64_t M, int64_t K,
               O* out, int64_t ldo) {
  const int64_t whole = weights / R * R, row_bytes = K * static_cast<int64_t>(sizeof(T));
  const int64_t passes = (M + kDotRows - 1) / kDotRows;
  const char* ahead = reinterpret_cast<const char*>(next);
  int64_t asked = 0;
  for (int64_t m = 0; m < M; m += kDotRows) {
    const int64_t rows = std::min<int64_t>(kDotRows, M - m), pass = m / kDotRows;
    for (int64_t j = 0, step; j < weights; j += step) {
      step = j < whole ? R : 1;
      // The next block's share of this step of all passes' (a prefetch past the matrix's
      // end never faults).
      const int64_t until = (pass * weights + j + step) * row_bytes / passes;
      for (; asked < until; asked += 64) _mm_prefetch(ahead + asked, _MM_HINT_T1);
      if (j < whole)
        dot_rows<R, Wide>(rows, w + j * K, x + m * K, K, out + m * ldo + j, ldo);
      else
        dot_rows<1, Wide>(rows, w + j * K, x + m * K, K, out + m * ldo + j, ldo);
    }
  }
}

template <typename T>
at::Tensor rows_dot(const at::Tensor& x, const T* w, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  const bool wide = avx512_products && K % 32 == 0;
  const float* xp = float_rows(x, wide && std::is_same_v<T, c10::BFloat16> ? 32 : 0);
  constexpr int64_t per_pass = 3;
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(T));
  const int64_t block = std::max<int64_t>(1, kRowDotBlockBytes / row_bytes / per_pass) * per_pass;
  auto out = at::empty({M, N}, x.options());
  qk::with_dtype(x.scalar_type(), "linear", [&](auto tag) {
    using O = decltype(tag);
    O* op = out.data_ptr<O>();
    qk::parallel_for(0, (N + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n0 = b * block, weights = std::min(block, N - n0);
        const T* next = w + (n0 + block) * K;
        if (wide)
          dot_block<per_pass, true>(weights, w + n0 * K, next, xp, M, K, op + n0, N);
        else
          dot_block<per_pass, false>(weights, w + n0 * K, next, xp, M, K, op + n0, N);
      }
    });
  });
  return out;
}

// Many activation rows times float, bfloat16 or half weights (kRowDotMaxRows rows or
// more with AVX2, kWideRowDotMaxRows with AVX-512): each thread takes panels of weight
// rows (16 with AVX2, 32 with AVX-512: two vectors either way), widens one to float32
// laid out k by k (pack_panel, in L2) and runs every activation row past it, C at a time
// (panel_rows: 2C accumulators, two loads and C broadcasts a step for 2C FMAs; C is 6 of
// AVX2's 16 registers, 12 of AVX-512's 32). Each output is one chain over k in order, so
// a row's result depends neither on the rows beside it nor on the vector width: both
// forms give the same bits. On two Zen 3 cores (2026-12-07, bfloat16 weights, 128 rows,
// [3072, 1024] ... [1024, 3072]) the AVX2 form ran 171-183 GFLOP/s, 88-90% of the FMA
// units' peak, where float32 GEMM (MKL) on tiles widened first ran 122-134. On two cores
// of an Intel Xeon (model 167, 2026-12-07; the 0.6B shape's four products, float16
// weights) the AVX-512 form ran 200-219 GFLOP/s at 128 rows and 228-240 at 512, where
// MKL on widened tiles ran 140 and 189-212, the AVX2 form 148-154 and 155-158 (float32
// weights: MKL straight on them 169-179 and 202-209, this 193-208 and 222-229). (GCC kept
// the accumulators' array in memory too, stored every step, until they were set and
// stored in unrolled loops: 31 GFLOP/s a core that way.)

// Weight rows [0, rows) of w (K apart; the rest of the panel's `width` zeros) as float32
// [K][width]: eight rows' eight values at a time, widened and transposed in registers.
template <typename T>
void pack_panel(const T* w, int64_t rows, int64_t K, int64_t width, float* panel) {
  for (int64_t h = 0; h < width; h += 8)
    for (int64_t k = 0; k < K; k += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = h + i < rows ? load8(w + (h + i) * K + k) : _mm256_setzero_ps();
      // Vector j of the transpose holds rows h..h+7 at column k + j.
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 u[8] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                           _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE),
                           _mm256_shuffle_ps(t4, t6, 0x44), _mm256_shuffle_ps(t4, t6, 0xEE),
                           _mm256_shuffle_ps(t5, t7, 0x44), _mm256_shuffle_ps(t5, t7, 0xEE)};
      for (int j = 0; j < 4; ++j) {
        _mm256_storeu_ps(panel + (k + j) * width + h, _mm256_permute2f128_ps(u[j], u[j + 4], 0x20));
        _mm256_storeu_ps(panel + (k + j + 4) * width + h, _mm256_permute2f128_ps(u[j], u[j + 4], 0x31));
      }
    }
}

// C activation rows x (K apart) times a packed panel of 2 * V::kWidth columns: out[c][0,
// cols) (ldo apart), as O (rounded as torch rounds). Written once over the vectors V and
// inlined into each instruction set's function below (a function's target cannot depend
// on its template arguments). GCC warns that the AVX-512 instance's vectors would change
// the ABI of a function not built for AVX-512; it is only ever inlined into one that is.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename V, int C, typename O>
[[gnu::always_inline]] inline void panel_body(const float* panel, const float* x, int64_t K, O* out, int64_t ldo,
                                              int64_t cols) {
  using F = typename V::F;
  constexpr int64_t width = 2 * V::kWidth;
  F acc[C][2];
#pragma GCC unroll 12
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = V::zero();
  for (int64_t k = 0; k < K; ++k) {
    const F w0 = V::load(panel + k * width), w1 = V::load(panel + k * width + V::kWidth);
#pragma GCC unroll 12
    for (int c = 0; c < C; ++c) {
      const F xv = V::set1(x[c * K + k]);
      acc[c][0] = V::fmadd(w0, xv, acc[c][0]);
      acc[c][1] = V::fmadd(w1, xv, acc[c][1]);
    }
  }
#pragma GCC unroll 12
  for (int c = 0; c < C; ++c) {
    if (cols == width) {
      V::store(out + c * ldo, acc[c][0]);
      V::store(out + c * ldo + V::kWidth, acc[c][1]);
      continue;
    }
    alignas(64) float sums[width];
    V::store(sums, acc[c][0]);
    V::store(sums + V::kWidth, acc[c][1]);
    for (int64_t j = 0; j < cols; ++j) out[c * ldo + j] = static_cast<O>(sums[j]);
  }
}
#pragma GCC diagnostic pop

template <int C, typename O>
void panel_rows(const float* panel, const float* x, int64_t K, O* out, int64_t ldo, int64_t cols) {
  panel_body<qk::Lanes8, C>(panel, x, K, out, ldo, cols);
}

template <int C, typename O>
QK_AVX512 void panel_rows_wide(const float* panel, const float* x, int64_t K, O* out, int64_t ldo, int64_t cols) {
  panel_body<qk::Lanes16, C>(panel, x, K, out, ldo, cols);
}

// The panel's rows a call takes: 6 with AVX2, 12 with AVX-512.
template <bool Wide>
constexpr int kPanelRows = Wide ? 12 : 6;

// panel_rows of 1 to C activation rows.
template <bool Wide, int C = kPanelRows<Wide>, typename O>
void panel_rows_of(int64_t rows, const float* panel, const float* x, int64_t K, O* out, int64_t ldo, int64_t cols) {
  if constexpr (C > 1)
    if (rows < C) return panel_rows_of<Wide, C - 1>(rows, panel, x, K, out, ldo, cols);
  if constexpr (Wide)
    panel_rows_wide<C>(panel, x, K, out, ldo, cols);
  else
    panel_rows<C>(panel, x, K, out, ldo, cols);
}

template <bool Wide, typename T>
at::Tensor panel_gemm(const at::Tensor& x, const T* w, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  constexpr int64_t width = Wide ? 32 : 16, C = kPanelRows<Wide>;
  const float* xp = float_rows(x);
  auto out = at::empty({M, N}, x.options());
  qk::with_dtype(x.scalar_type(), "linear", [&](auto tag) {
    using O = decltype(tag);
    O* op = out.data_ptr<O>();
    qk::parallel_for(0, (N + width - 1) / width, 1, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> panel;
      panel.resize(K * width);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t cols = std::min(width, N - b * width);
        pack_panel(w + b * width * K, cols, K, width, panel.data());
        for (int64_t m = 0; m < M; m += C)
          panel_rows_of<Wide>(std::min(C, M - m), panel.data(), xp + m * K, K, op + m * N + b * width, N, cols);
      }
    });
  });
  return out;
}

// Float, bfloat16 or half weights times M activation rows: each row as a one-row step up
// to kChainMaxRows, blocks of weight rows past a few activation rows (rows_dot) up to the
// panels' threshold, packed panels from there.
template <typename T>
at::Tensor float_linear(const at::Tensor& x, const T* w, int64_t N) {
  const int64_t M = x.size(0);
  if (M <= kChainMaxRows) return float_matvec(x, w, N);
  if (M < (avx512_products ? kWideRowDotMaxRows : kRowDotMaxRows)) return rows_dot(x, w, N);
  // (ARM builds leave the AVX-512 form uninstantiated: see QK_X86.)
  if constexpr (QK_X86)
    if (avx512_products) return panel_gemm<true>(x, w, N);
  return panel_gemm<false>(x, w, N);
}

}  // namespace

// weight [N, K] float32, bfloat16 or half.
namespace {
std::atomic<bool> native_bf16_gemm{false};
}  // namespace

void set_native_bf16_gemm(bool enabled) { native_bf16_gemm = enabled; }

void set_avx512_vnni(bool enabled) { avx512_vnni = enabled; }

void set_avx_vnni(bool enabled) { avx_vnni = enabled; }

void set_dotprod(bool enabled) { dotprod = !QK_X86 && enabled; }

void set_i8mm(bool enabled) { i8mm = !QK_X86 && enabled; }

bool cpu_avx_vnni() {
#if defined(__x86_64__) || defined(_M_X64)
  // cpuid leaf 7, subleaf 1: EAX bit 4. Its ymm registers are AVX's, which the OS saves
  // wherever AVX2 runs (the build's floor).
  unsigned eax, ebx, ecx, edx;
  return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax >> 4 & 1);
#else
  return false;
#endif
}

void set_amx_int8(bool enabled) { amx_int8 = enabled; }

void set_avx512_products(bool enabled) { avx512_products = enabled; }

at::Tensor dense_linear(const at::Tensor& x_in, const at::Tensor& weight_in) {
  RECORD_FUNCTION("qwen3chat::dense_linear", std::vector<c10::IValue>());
  const auto weight = weight_in.contiguous();
  const auto x = x_in.contiguous();
  const int64_t N = weight.size(0), K = weight.size(1);
  check_rows(x, K, "dense_linear");
  switch (weight.scalar_type()) {
    case at::kFloat:
      return float_linear(x, weight.data_ptr<float>(), N);
    case at::kBFloat16:
      if (native_bf16_gemm && x.scalar_type() == at::kBFloat16 && x.size(0) >= kNativeBf16GemmMinRows)
        return at::mm(x, weight.t());
      return float_linear(x, weight.data_ptr<c10::BFloat16>(), N);
    case at::kHalf:
      return float_linear(x, weight.data_ptr<c10::Half>(), N);
    default:
      TORCH_CHECK(false, "dense_linear: weights must be float32, bfloat16 or float16");
  }
}

namespace {

// Interleaved int8 or int4 (codes [N / 16, K / 32, steps, 16, 4], scales [N / 16, K / 32,
// 16] or int8's one scale a row [N / 16, 1, 16], int4 zero points as the scales or none;
// see x16_linear_of): AVX512-VNNI's passes (AMX's from kAmxMinRows rows) where they run,
// AVX2's otherwise, all with the same bits.
template <bool Int4>
at::Tensor x16_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& zeros_in = c10::nullopt) {
  const char* name = Int4 ? "q4_linear" : "q8_linear";
  const int64_t steps = Int4 ? 4 : 8;
  const int64_t N = codes.size(0) * 16, B = codes.size(1), K = B * 32;
  const int64_t scale_blocks = scales.dim() == 3 ? scales.size(1) : 0;
  const auto zeros = zeros_in.has_value() ? zeros_in->contiguous() : at::Tensor();
  check_rows(x, K, name);
  TORCH_CHECK(codes.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf &&
                  codes.sizes() == at::IntArrayRef({N / 16, B, steps, 16, 4}) &&
                  scales.sizes() == at::IntArrayRef({N / 16, scale_blocks, 16}) &&
                  (scale_blocks == B || (!Int4 && scale_blocks == 1)) &&
                  (!zeros.defined() || (Int4 && zeros.scalar_type() == at::kHalf &&
                                        zeros.sizes() == scales.sizes())),
              name, ": expected interleaved uint8 codes [N / 16, K / 32, ", steps,
              ", 16, 4] and float16 scales [N / 16, K / 32, 16]",
              Int4 ? " (and zeros as the scales)" : " (or [N / 16, 1, 16])");
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  const c10::Half* zp = zeros.defined() ? zeros.data_ptr<c10::Half>() : nullptr;
  const int64_t M = x.size(0);
  constexpr auto avx2 = X16Kernel::avx2, vnni = X16Kernel::vnni, amx = X16Kernel::amx;
  if constexpr (!QK_X86) {
    TORCH_CHECK(false, name, ": weights are held interleaved on x86 only");
  } else {
    if (!avx512_vnni) {
      if (M <= 1) return x16_linear_of<1, Int4, avx2>(x, cp, sp, zp, scale_blocks, N);
      if (M <= 2) return x16_linear_of<2, Int4, avx2>(x, cp, sp, zp, scale_blocks, N);
      return x16_linear_of<4, Int4, avx2>(x, cp, sp, zp, scale_blocks, N);
    }
    if (amx_int8 && M >= kAmxMinRows) return x16_linear_of<16, Int4, amx>(x, cp, sp, zp, scale_blocks, N);
    if (M <= 1) return x16_linear_of<1, Int4, vnni>(x, cp, sp, zp, scale_blocks, N);
    if (M <= 2) return x16_linear_of<2, Int4, vnni>(x, cp, sp, zp, scale_blocks, N);
    if (M <= 4) return x16_linear_of<4, Int4, vnni>(x, cp, sp, zp, scale_blocks, N);
    if (M <= 8) return x16_linear_of<8, Int4, vnni>(x, cp, sp, zp, scale_blocks, N);
    return x16_linear_of<16, Int4, vnni>(x, cp, sp, zp, scale_blocks, N);
  }
}

}  // namespace

// codes [N, K] int8, scales [N, K / group] float16; group a multiple of 32. Or interleaved
// by 16 rows: codes 5-D uint8 (see x16_linear_of).
at::Tensor q8_linear(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scales_in) {
  RECORD_FUNCTION("qwen3chat::q8_linear", std::vector<c10::IValue>());
  const auto codes = codes_in.contiguous();
  const auto scales = scales_in.contiguous();
  const auto x = x_in.contiguous();
  if (codes.dim() == 5) return x16_linear<false>(x, codes, scales);
  const int64_t N = codes.size(0), K = codes.size(1), G = scales.size(1);
  const int64_t group = G > 0 ? K / G : 0;
  check_rows(x, K, "q8_linear");
  TORCH_CHECK(codes.scalar_type() == at::kChar && scales.scalar_type() == at::kHalf &&
                  scales.size(0) == N && group * G == K && group % kMatrixColumnBlock == 0,
              "q8_linear: expected int8 codes [N, K] and float16 scales [N, K / group]");
  const int8_t* cp = codes.data_ptr<int8_t>();
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  if (x.size(0) >= integer_gemm_min_rows<false>(K)) {
    const bool unsigned_codes = QK_X86 || !dotprod;
    return integer_gemm<false>(x, N, [&](int64_t n, int64_t j, WeightRows& rows) {
      const int8_t* row = cp + n * K;
      const __m256i sign_bits = _mm256_set1_epi8(static_cast<char>(0x80));
      // ARM's dot-product kernels take the codes as they are (signed_codes).
      for (int64_t k = 0; k < (unsigned_codes ? K : 0); k += 32) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows.unsigned_codes.data() + j * K + k),
                            rows.biased ? _mm256_xor_si256(v, sign_bits) : _mm256_abs_epi8(v));
      }
      rows.signed_codes[j] = row;
      if (group == 32) return rows.set_block_halves(j, K / 32, sp + n * G, nullptr, false);
      rows.set_blocks(
          j, K / 32, group / 32, [&](int64_t g) { return qk::to_float(sp[n * G + g]); },
          [](int64_t) { return 0.0f; });
    }, cp, K);
  }
#if !QK_X86
  if (dotprod) return row_ints_dot::q8_rows(x, cp, sp, N, group);
#endif
  return row_ints::q8_rows(x, cp, sp, N, group);
}


int64_t step_order_rows(const Matrix& w) {
  const auto& t = w.weight;
  if (w.bits == 0)
    return native_bf16_gemm && t.scalar_type() == at::kBFloat16 ? kNativeBf16GemmMinRows - 1
                                                                  : kChainMaxRows;
  // x16_linear_of's passes add every row alone.
  if (t.dim() == 5) return std::numeric_limits<int64_t>::max();
  const int64_t K = t.size(1) * (w.bits == 4 ? 2 : 1);
  return (w.bits == 4 ? integer_gemm_min_rows<true>(K) : integer_gemm_min_rows<false>(K)) - 1;
}

// packed [N, K / 2] uint8: in each block of 32 inputs, byte j holds code j in its low
// nibble and code j + 16 in its high one (GGUF Q4_0's order). w = (code - 8) * scale +
// zero, scales and zeros float16 [N, K / group] (no zeros: all 0); group a multiple of 32.
// Or interleaved by 16 rows: packed 5-D (see x16_linear_of).
at::Tensor q4_linear(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& scales_in,
                     const c10::optional<at::Tensor>& zeros_in) {
  RECORD_FUNCTION("qwen3chat::q4_linear", std::vector<c10::IValue>());
  const auto packed = packed_in.contiguous();
  const auto scales = scales_in.contiguous();
  const auto x = x_in.contiguous();
  if (packed.dim() == 5) return x16_linear<true>(x, packed, scales, zeros_in);
  const bool has_zeros = zeros_in.has_value();
  const auto zeros = has_zeros ? zeros_in->contiguous() : scales;
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = scales.size(1);
  const int64_t group = G > 0 ? K / G : 0;
  check_rows(x, K, "q4_linear");
  TORCH_CHECK(packed.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf &&
                  zeros.scalar_type() == at::kHalf &&
                  zeros.sizes() == scales.sizes() && scales.size(0) == N && group * G == K &&
                  group % kMatrixColumnBlock == 0,
              "q4_linear: expected uint8 packed [N, K / 2] and float16 scales/zeros [N, K / group]");
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  const c10::Half* zp = has_zeros ? zeros.data_ptr<c10::Half>() : nullptr;
  // w = code * scale + offset with offset = zero - 8 * scale.
  auto scale = [&](int64_t i) { return qk::to_float(sp[i]); };
  auto offset = [&](int64_t i) {
    return (zp ? qk::to_float(zp[i]) : 0.0f) - 8.0f * scale(i);
  };
  if (x.size(0) >= integer_gemm_min_rows<true>(K)) {
    return integer_gemm<true>(x, N, [&](int64_t n, int64_t j, WeightRows& rows) {
      const uint8_t* row = pp + n * K / 2;
      uint8_t* codes = rows.unsigned_codes.data() + j * K;
      // A block's 16 bytes: codes 0-15 low, 16-31 high. Taken as 32 bytes, two blocks'
      // low nibbles and then their high ones are pair order.
      // width: K by value (the byte stores would reload a captured reference each step).
      const int64_t width = K, step = rows.vnni ? 64 : 32;
      const int64_t first = rows.vnni ? unpack_u4_wide(row, width, codes) : unpack_u4_pairs(row, width, codes);
      for (int64_t k = first; k < width; k += step) {
        const __m256i bytes = rows.vnni
                                  ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k / 2))
                                  : _mm256_castsi128_si256(_mm_loadu_si128(
                                        reinterpret_cast<const __m128i*>(row + k / 2)));
        const __m256i low = _mm256_and_si256(bytes, _mm256_set1_epi8(0x0F));
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(0x0F));
        if (rows.vnni) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + k), low);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + k + 32), high);
        } else {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), _mm256_castsi256_si128(low));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k + 16), _mm256_castsi256_si128(high));
        }
      }
      if (group == 32)
        return rows.set_block_halves(j, K / 32, sp + n * G, zp ? zp + n * G : nullptr, true);
      rows.set_blocks(j, K / 32, group / 32, [&](int64_t g) { return scale(n * G + g); },
                      [&](int64_t g) { return offset(n * G + g); });
    }, pp, K / 2, has_zeros);
  }
#if !QK_X86
  if (dotprod) return row_ints_dot::q4_rows(x, pp, sp, zp, N, group);
#endif
  return row_ints::q4_rows(x, pp, sp, zp, N, group);
}
