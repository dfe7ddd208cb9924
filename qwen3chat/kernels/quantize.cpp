// Round-to-nearest quantization of weight rows at load (``--quantize``, and GGUF block
// types that are requantized): quant.py's ``quantize`` in one pass over the
// weights instead of about ten tensor operations, each over the whole matrix. The float32
// operations are the same and in the same order (each rounded where torch rounds), so
// both give the same codes bit for bit; the torch code is the path without a build, and
// what this is tested against (tests/test_quant.py).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// A float rounded to float16 (to nearest, ties to even, as torch's .half()) and back.
inline float through_half(float v) { return _cvtsh_ss(_cvtss_sh(v, kRoundNearest)); }

// quant.py's _half: a scale rounded to float16, at least its smallest step (a constant
// group would otherwise get a zero scale).
inline float half_scale(float s) { return std::max(through_half(s), 0x1p-24f); }

inline float hmin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_min_ss(m, _mm_shuffle_ps(m, m, 1)));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

// One row: its codes (one per value, as int32) and each group's scale (and zero).
// int8: code = round(w / scale), scale = max|w| / 127. int4: code = round((w - zero) /
// scale + 8), scale = (max - min) / 15, zero = min + 8 * scale.
template <typename T>
void quantize_row(const T* w, int64_t cols, int64_t group, int64_t bits, int32_t* codes,
                  float* scales, float* zeros) {
  for (int64_t start = 0, g = 0; start < cols; start += group, ++g) {
    __m256 lo = _mm256_set1_ps(INFINITY), hi = _mm256_set1_ps(-INFINITY);
    for (int64_t k = start; k < start + group; k += 8) {
      const __m256 v = qk::load8(w + k);
      lo = _mm256_min_ps(lo, v);
      hi = _mm256_max_ps(hi, v);
    }
    const float low = hmin(lo), high = hmax(hi);
    float scale, zero = 0.0f, offset = 0.0f, least, most;
    if (bits == 8) {
      scale = half_scale(std::max(-low, high) / 127.0f);
      least = -127.0f, most = 127.0f;
    } else {
      scale = half_scale((high - low) / 15.0f);
      zero = through_half(low + 8.0f * scale);  // 8 * scale is exact: no rounding to fuse
      zeros[g] = zero;
      offset = 8.0f, least = 0.0f, most = 15.0f;
    }
    scales[g] = scale;
    const __m256 vzero = _mm256_set1_ps(zero), vscale = _mm256_set1_ps(scale);
    const __m256 voffset = _mm256_set1_ps(offset);
    const __m256 vleast = _mm256_set1_ps(least), vmost = _mm256_set1_ps(most);
    for (int64_t k = start; k < start + group; k += 8) {
      // (w - 0) / scale + 0 is w / scale exactly, so int8 shares int4's expression.
      __m256 q = _mm256_div_ps(_mm256_sub_ps(qk::load8(w + k), vzero), vscale);
      q = _mm256_round_ps(_mm256_add_ps(q, voffset), kRoundNearest);
      q = _mm256_min_ps(_mm256_max_ps(q, vleast), vmost);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + k), _mm256_cvtps_epi32(q));
    }
  }
}

// A row's codes (one int32 each) as stored: int8 one a byte, or int4 two a byte in
// quant.py's pack_int4 order (in each block of 32, byte j holds codes j and j + 16).
void store_codes(const int32_t* row, int64_t cols, int64_t bits, void* out) {
  if (bits == 8) {
    int8_t* codes = static_cast<int8_t*>(out);
    for (int64_t k = 0; k < cols; ++k) codes[k] = static_cast<int8_t>(row[k]);
    return;
  }
  uint8_t* codes = static_cast<uint8_t*>(out);
  for (int64_t b = 0; b < cols; b += 32)
    for (int j = 0; j < 16; ++j)
      codes[b / 2 + j] = static_cast<uint8_t>(row[b + j] | (row[b + j + 16] << 4));
}

}  // namespace

namespace qk {

void quantize_row_codes(const float* w, int64_t cols, int64_t group, int64_t bits,
                        int32_t* scratch, void* codes, float* scales, float* zeros) {
  quantize_row(w, cols, group, bits, scratch, scales, zeros);
  store_codes(scratch, cols, bits, codes);
}

std::vector<at::Tensor> quantized_outputs(int64_t rows, int64_t cols, int64_t bits,
                                          int64_t group, const at::TensorOptions& options,
                                          const char* name) {
  TORCH_CHECK(bits == 8 || bits == 4, name, ": 8 or 4 bits");
  TORCH_CHECK(group > 0 && group % 8 == 0 && cols % group == 0, name,
              ": groups of a multiple of 8 that divide the row");
  TORCH_CHECK(bits == 8 || cols % 32 == 0, name, ": int4 rows in blocks of 32");
  const auto floats = options.dtype(at::kFloat);
  auto scales = at::empty({rows, cols / group}, floats);
  if (bits == 8) return {at::empty({rows, cols}, options.dtype(at::kChar)), scales};
  return {at::empty({rows, cols / 2}, options.dtype(at::kByte)), scales,
          at::empty({rows, cols / group}, floats)};
}

}  // namespace qk

std::vector<at::Tensor> quantize_rows(const at::Tensor& weight_in, int64_t bits,
                                      int64_t group_size) {
  RECORD_FUNCTION("qwen3chat::quantize_rows", {});
  const auto weight = weight_in.contiguous();
  TORCH_CHECK(weight.dim() == 2, "quantize_rows: a 2-D weight");
  const int64_t rows = weight.size(0), cols = weight.size(1), groups = cols / group_size;
  auto out = qk::quantized_outputs(rows, cols, bits, group_size, weight.options(),
                                   "quantize_rows");
  uint8_t* cp = static_cast<uint8_t*>(out[0].data_ptr());
  float* sp = out[1].data_ptr<float>();
  float* zp = bits == 4 ? out[2].data_ptr<float>() : nullptr;
  qk::with_dtype(weight.scalar_type(), "quantize_rows", [&](auto tag) {
    using T = decltype(tag);
    const T* wp = weight.data_ptr<T>();
    qk::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> row(cols);
      for (int64_t r = begin; r < end; ++r) {
        quantize_row(wp + r * cols, cols, group_size, bits, row.data(), sp + r * groups,
                     zp ? zp + r * groups : nullptr);
        store_codes(row.data(), cols, bits, cp + r * cols * bits / 8);
      }
    });
  });
  return out;
}

// Each 16 rows' 4-byte words transposed, int8 codes made unsigned: see kernels.h. A group's
// rows are read into a buffer first, so `out` may be `codes` itself.
void interleave_rows(const at::Tensor& codes, const at::Tensor& out, int64_t bits) {
  RECORD_FUNCTION("qwen3chat::interleave_rows", {});
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(0) % 16 == 0 && codes.size(1) % 4 == 0,
              "interleave_rows: contiguous uint8 codes, rows a multiple of 16, of whole words");
  TORCH_CHECK(out.scalar_type() == at::kByte && out.is_contiguous() &&
                  out.numel() == codes.numel(),
              "interleave_rows: a contiguous uint8 output of the codes' size");
  TORCH_CHECK(bits == 8 || bits == 4, "interleave_rows: 8 or 4 bits");
  const int64_t words = codes.size(1) / 4, group_bytes = 64 * words;
  const uint32_t flip = bits == 8 ? 0x80808080u : 0u;  // int8 code + 128, byte by byte
  const uint8_t* in = codes.data_ptr<uint8_t>();
  uint8_t* to = out.data_ptr<uint8_t>();
  qk::parallel_for(0, codes.size(0) / 16, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> rows(16 * words);
    for (int64_t g = begin; g < end; ++g) {
      std::memcpy(rows.data(), in + g * group_bytes, group_bytes);
      uint32_t* group = reinterpret_cast<uint32_t*>(to + g * group_bytes);
      for (int64_t w = 0; w < words; ++w)
        for (int64_t r = 0; r < 16; ++r) group[w * 16 + r] = rows[r * words + w] ^ flip;
    }
  });
}

// Rows `ids` of a matrix held interleaved (interleave_rows' codes [R / 16, C / 32, steps, 16,
// 4]; float16 scales, and zeros, [R / 16, groups, 16]) as quant.py's
// QuantizedMatrix.dequantize gives them: each code (int4: less 8) times its group's scale,
// plus its zero, each rounded to float32, then to `dtype`. A quantized table's embedding
// lookup, which through torch (the rows' codes gathered, unpacked and widened) took ~15
// small operations, 0.16 ms of each decode step.
at::Tensor interleaved_rows(const at::Tensor& codes, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& zeros, const at::Tensor& ids,
                            int64_t bits, at::ScalarType dtype) {
  RECORD_FUNCTION("qwen3chat::interleaved_rows", {});
  TORCH_CHECK(codes.dim() == 5 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  scales.dim() == 3 && scales.size(0) == codes.size(0) && scales.size(2) == 16 &&
                  scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  (!zeros || (zeros->sizes() == scales.sizes() &&
                              zeros->scalar_type() == at::kHalf && zeros->is_contiguous())) &&
                  (bits == 8 || bits == 4) && ids.scalar_type() == at::kLong,
              "interleaved_rows: codes, scales (and zeros) as QuantizedWeight holds them "
              "interleaved, int64 ids");
  const int64_t R = codes.size(0) * 16, C = codes.size(1) * 32, groups = scales.size(1);
  TORCH_CHECK(C % groups == 0 && codes.numel() == R * C * bits / 8,
              "interleaved_rows: the codes do not hold ", bits, "-bit rows of ", C, " values");
  const auto index = ids.contiguous();
  const int64_t* idp = index.data_ptr<int64_t>();
  const int64_t n = index.numel(), group = C / groups, row_bytes = C * bits / 8;
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(idp[i] >= 0 && idp[i] < R, "interleaved_rows: id ", idp[i], " is not a row of ", R);
  auto out = at::empty({n, C}, codes.options().dtype(dtype));
  const uint8_t* base = codes.data_ptr<uint8_t>();
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  const c10::Half* zp = zeros ? zeros->data_ptr<c10::Half>() : nullptr;
  qk::with_dtype(dtype, "interleaved_rows", [&](auto tag) {
    using S = decltype(tag);
    S* op = out.data_ptr<S>();
    qk::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> row(row_bytes);
      std::vector<float> values(C);
      for (int64_t i = begin; i < end; ++i) {
        // Word w of row r in its 16 rows' group is the group's word w * 16 + r.
        const int64_t id = idp[i], first = id / 16 * groups * 16 + id % 16;
        const uint8_t* words = base + id / 16 * 16 * row_bytes + id % 16 * 4;
        for (int64_t w = 0; w < row_bytes / 4; ++w) std::memcpy(row.data() + 4 * w, words + 64 * w, 4);
        for (int64_t c = 0; c < C; c += 32) {
          // A block of 32: int8 codes stored + 128; int4's byte j holds codes j and j + 16.
          int32_t block[32];
          if (bits == 8) {
            for (int j = 0; j < 32; ++j) block[j] = static_cast<int8_t>(row[c + j] ^ 0x80);
          } else {
            const uint8_t* packed = row.data() + c / 2;
            for (int j = 0; j < 16; ++j) block[j] = (packed[j] & 15) - 8, block[j + 16] = (packed[j] >> 4) - 8;
          }
          const int64_t at = first + c / group * 16;
          const float scale = qk::to_float(sp[at]);
          for (int j = 0; j < 32; ++j) values[c + j] = qk::rounded(static_cast<float>(block[j]) * scale);
          if (zp != nullptr)
            for (int j = 0; j < 32; ++j) values[c + j] += qk::to_float(zp[at]);
        }
        for (int64_t c = 0; c < C; c += 8) qk::store8(op + i * C + c, _mm256_loadu_ps(values.data() + c));
      }
    });
  });
  return out;
}
