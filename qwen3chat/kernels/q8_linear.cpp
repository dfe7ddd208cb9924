// Group-wise int8 weight times float activations, streaming the int8 codes once.
//
// torch has no fused kernel for int8 weights with one scale per group (GGUF Q8_0 has
// groups of 32; --quantize int8 one group per row), and its per-row int8 kernel is
// compute bound on AVX2;
// and dequantizing to float per matmul moves 5x the bytes. This reads each code once,
// widens it in registers and accumulates in float32, so a decode step runs near the
// memory bandwidth. Activations stay float32: results match the dequantized reference
// to float32 rounding.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

namespace {

inline float horizontal_sum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// Eight int8 codes widened to eight floats.
inline __m256 widen(const int8_t* q) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

}  // namespace

// x [M, K] float32, codes [N, K] int8, scales [N, K / group] float32 -> [M, N] float32;
// group is a multiple of 32 that divides K.
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && codes.dtype() == torch::kInt8 &&
                  scales.dtype() == torch::kFloat32,
              "q8_linear: expected float32 x, int8 codes, float32 scales");
  x = x.contiguous();
  codes = codes.contiguous();
  scales = scales.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), G = scales.size(1);
  const int64_t group = G > 0 ? K / G : 0;
  TORCH_CHECK(codes.size(1) == K && scales.size(0) == N && G > 0 && group * G == K &&
                  group % 32 == 0,
              "q8_linear: shapes do not match");
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* row = cp + n * K;
      const float* row_scales = sp + n * G;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = xp + m * K;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
          const int8_t* q = row + g * group;
          const float* xv = xm + g * group;
          // Four independent accumulators: one chain would wait on FMA latency.
          __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
          for (int64_t j = 0; j < group; j += 32) {
            p0 = _mm256_fmadd_ps(widen(q + j), _mm256_loadu_ps(xv + j), p0);
            p1 = _mm256_fmadd_ps(widen(q + j + 8), _mm256_loadu_ps(xv + j + 8), p1);
            p2 = _mm256_fmadd_ps(widen(q + j + 16), _mm256_loadu_ps(xv + j + 16), p2);
            p3 = _mm256_fmadd_ps(widen(q + j + 24), _mm256_loadu_ps(xv + j + 24), p3);
          }
          __m256 part = _mm256_add_ps(_mm256_add_ps(p0, p1), _mm256_add_ps(p2, p3));
          acc = _mm256_fmadd_ps(part, _mm256_set1_ps(row_scales[g]), acc);
        }
        op[m * N + n] = horizontal_sum(acc);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q8_linear", &q8_linear, "group-wise int8 weight x float32 activations");
}
