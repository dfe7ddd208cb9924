// The native CPU kernels (AVX2 + FMA), one declaration per entry point; bindings.cpp
// exposes them to Python and kernels/__init__.py says when each is used.
//
// They are written in x86 intrinsics. Elsewhere (ARM) SIMDe's headers translate the same
// calls to NEON, so one source serves both; the integer products have NEON dot-product
// and int8 matrix multiply forms of their own (linear.cpp, QK_DOT). Functions for
// instruction sets the build does not assume carry QK_TARGET (QK_DOTPROD_BEGIN and
// QK_I8MM_BEGIN on ARM) and run only where the CPU allows them.
//
// Each entry point opens a profiler scope, RECORD_FUNCTION("qwen3chat::<name>"), so that
// torch's profiler (bench --profile) shows the time spent in the kernels, which it cannot
// see otherwise; with no profiler running a scope costs a few nanoseconds.
#pragma once
// Tensor's own header here, and in each file the header of each operator it calls (not
// ATen/ATen.h, every operator's): the first-use build parses these once per file, and
// ATen.h's parse was most of the build's time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QK_TARGET(features) __attribute__((target(features)))
#define QK_X86 1
#else
// Elsewhere code only x86 runs (AVX512-VNNI, AMX, interleaved weights) is left
// uninstantiated (`if constexpr (QK_X86)`): through SIMDe it was most of an ARM build.
#define QK_X86 0
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/fma.h>
// The x86-only variants compile to (unused) NEON there.
#define QK_TARGET(features)
// What SIMDe releases before 0.8 (Debian 12's) lack, from what they have: the AVX-512
// ones only for the x86-only variants to compile.
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif
#ifndef _cvtsh_ss
inline float _cvtsh_ss(uint16_t h) { return c10::Half(h, c10::Half::from_bits()); }
#endif
#ifndef _cvtss_sh
inline uint16_t _cvtss_sh(float f, int) { return c10::Half(f).x; }
#endif
#ifndef _mm256_dpbusd_avx_epi32  // AVX-VNNI's name for AVX512-VNNI's ymm form
#define _mm256_dpbusd_avx_epi32(sums, u, s) _mm256_dpbusd_epi32(sums, u, s)
#endif
// AMX tiles have no NEON form: their kernel compiles to a trap (set_amx_int8 stays off).
#define _tile_loadconfig(config) __builtin_trap()
#define _tile_release() __builtin_trap()
#define _tile_loadd(tile, base, stride) __builtin_trap()
#define _tile_stored(tile, base, stride) __builtin_trap()
#define _tile_zero(tile) __builtin_trap()
#define _tile_dpbsud(sums, a, b) __builtin_trap()
// Each of 16 lanes of a as a lane of the result type.
template <typename To, typename ToLane, typename FromLane, typename From>
inline To qk_lanes16(From a) {
  FromLane in[64 / sizeof(FromLane)];
  ToLane out[16];
  std::memcpy(in, &a, sizeof(a));
  for (int i = 0; i < 16; ++i) out[i] = static_cast<ToLane>(in[i]);
  To r;
  std::memcpy(&r, out, sizeof(r));
  return r;
}
#ifndef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps(a) qk_lanes16<__m512, float, int32_t>(a)
#endif
#ifndef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32(a) qk_lanes16<__m512i, int32_t, int8_t>(a)
#endif
#ifndef _mm512_cvtph_ps
#define _mm512_cvtph_ps(a) qk_lanes16<__m512, float, c10::Half>(a)
#endif
#ifndef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32(a) qk_lanes16<__m512i, int32_t, uint16_t>(a)
#endif
#ifndef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16(a) qk_lanes16<__m256i, int16_t, int32_t>(a)
#endif
#ifndef _mm512_cvtps_ph
#define _mm512_cvtps_ph(a, rounding) qk_lanes16<__m256i, c10::Half, float>(a)
#endif
#ifndef _mm512_cvtps_epi32
inline __m512i _mm512_cvtps_epi32(__m512 a) {
  float v[16];
  int32_t r[16];
  std::memcpy(v, &a, sizeof(a));
  for (int i = 0; i < 16; ++i) r[i] = static_cast<int32_t>(std::nearbyint(v[i]));
  __m512i out;
  std::memcpy(&out, r, sizeof(out));
  return out;
}
#endif
#ifndef _mm512_extractf32x8_ps
#define _mm512_extractf32x8_ps(a, i) \
  _mm256_loadu_ps(reinterpret_cast<const float*>(&(a)) + 8 * (i))
#endif
#ifndef _mm512_reduce_add_ps
inline float _mm512_reduce_add_ps(__m512 a) {
  float v[16], sum = 0.0f;
  std::memcpy(v, &a, sizeof(a));
  for (float x : v) sum += x;
  return sum;
}
#endif
#endif
#if !QK_X86
#include <arm_neon.h>
// ARM's dot product and int8 matrix multiply: the code between QK_DOTPROD_BEGIN (or
// QK_I8MM_BEGIN) and QK_ARM_END compiles for them alone, as QK_TARGET marks x86's, in a
// build for any 64-bit ARM CPU, and runs where the CPU has them (set_dotprod, set_i8mm). A
// pragma, not an attribute, so that the lambdas and templates defined there get the target
// too. clang's needs an arm_neon.h that declares the intrinsics for such functions
// (clang 22 does; clang 14 declares them only in a file compiled for them).
#define QK_STRINGIFY(x) #x
#if defined(__clang__)
#define QK_ARM_TARGET(for_gcc, for_clang) \
  _Pragma(QK_STRINGIFY(clang attribute push(__attribute__((target(for_clang))), apply_to = function)))
#define QK_ARM_END _Pragma("clang attribute pop")
#else
#define QK_ARM_TARGET(for_gcc, for_clang) \
  _Pragma("GCC push_options") _Pragma(QK_STRINGIFY(GCC target(for_gcc)))
#define QK_ARM_END _Pragma("GCC pop_options")
#endif
#define QK_DOTPROD_BEGIN QK_ARM_TARGET("arch=armv8.2-a+dotprod", "dotprod")
#define QK_I8MM_BEGIN QK_ARM_TARGET("arch=armv8.2-a+dotprod+i8mm", "dotprod,i8mm")
#endif


// Linear layers, ``x [M, K] @ W.T -> [M, N]`` in x's dtype (linear.cpp). Below a
// threshold of rows the weights stream once, each weight row against every activation
// row; from it on a GEMM runs. Float and 16-bit weights widen panels of weight rows to
// float32 for a GEMM of our own (panel_gemm), which pays off over many rows, so streaming
// them wins up to 63 rows on AVX2 and 31 where AVX-512 runs (linear.cpp's rows_dot;
// Qwen3-0.6B, 8 rows, before it, against tiles widened for float32 GEMM: 165 ms against
// 345 in bf16, 215 against 570 in float32). Quantized weights
// multiply as integers with nothing widened, and their GEMM overtakes streaming at 6-7
// rows on AVX2 (0.7x its speed at 4 rows, 1.25x at 8) and at 4 where it runs AVX512-VNNI.
// What the kernels cover, checked here and exported to Python (bindings.cpp's LIMITS),
// where model/native.py sends everything else to the torch code.
constexpr int64_t kMatrixColumnBlock = 32;  // a product's inputs, and quantization groups
constexpr int64_t kNormBlock = 8;           // RMSNorm's width
constexpr int64_t kSwigluBlock = 8;         // silu_mul's output width
constexpr int64_t kHeadDimBlock = 16;       // q/k norm + RoPE, and so the decode step
constexpr int64_t kMaxHeadDim = 512;
constexpr int64_t kAttentionHeadDimBlock = 8;  // decode attention
// A paged KV cache's block of slots: whole groups of the 4 keys attention scores at once
// and of its 16 value rows, so that a sequence's paged attention adds in the same order,
// bit for bit, as over the same keys in one contiguous block.
constexpr int64_t kPagedBlockAlign = 16;
// A sequence's run of more than kPromptKernelRows prompt rows whose rows times keys (those
// of its last row) reach kPromptSdpaWork attends through SDPA over the sequence's rows
// gathered (dequantized from an int8 cache), as a single sequence's prompt does; the
// kernel takes the rest row by row, each row reading the cached rows again. (16 prompts of
// 62 tokens took 5% longer to prefill through SDPA, whose calls cost more than their
// work; of 200 tokens 17% less.)
constexpr int64_t kPromptKernelRows = 16;
constexpr int64_t kPromptSdpaWork = 8192;

// Float, bfloat16 and half products of up to this many rows add each row as a one-row
// step does (linear.cpp's chain_dots), so a drafting pass of as many rows (the pending
// token and up to six guesses) gives each row the step's bits; beyond it rows_dot's
// shared weights run faster (above).
constexpr int64_t kChainMaxRows = 7;
constexpr int64_t kIntegerGemmMinRows = 8;
constexpr int64_t kVnniGemmMinRows = 4;  // where the integer GEMM runs AVX512-VNNI
// Where the CPU multiplies bfloat16 natively (AVX512-BF16, which the OS allows: Python
// asks torch, set_native_bf16_gemm), bfloat16 products of this many rows or more go to
// torch's own GEMM (oneDNN's vdpbf16ps kernels) with nothing widened: on an Intel Xeon
// with AVX512-BF16 (2 threads, [16, 1024] x [1024, 3072]) 236 us against 742 widened,
// 212 against 324 streamed at 4 rows, while one row streams faster (127 us against 202).
constexpr int64_t kNativeBf16GemmMinRows = 4;
void set_native_bf16_gemm(bool enabled);
// Integer GEMMs (prompt chunks, several sequences' rows) with AVX512-VNNI where the CPU and
// the OS allow it (Python asks torch): bit for bit the AVX2 kernel's results.
void set_avx512_vnni(bool enabled);
// Where AVX512-VNNI's kernel does not run, the AVX2 one with AVX-VNNI's ymm vpdpbusd where
// the CPU has it (cpu_avx_vnni: cpuid): bit for bit the same results.
void set_avx_vnni(bool enabled);
bool cpu_avx_vnni();
// On ARM, integer GEMMs with the int8 matrix multiply (smmla) in a build for it (Python
// turns it on where the CPU has it): bit for bit the dot-product kernel's results.
void set_dotprod(bool enabled);
void set_i8mm(bool enabled);
// Subnormal floats flushed to zero on the calling thread and at::parallel_for's workers
// (x86; elsewhere nothing): see subnormals.cpp. The pool's workers flush their own.
void flush_subnormals();
void flush_subnormals_here();

namespace qk {
void run_parallel(int64_t begin, int64_t end, int64_t grain, void* body,
                  void (*call)(void*, int64_t, int64_t));
// f(begin, end) over parts of [begin, end) of at least `grain` (about) on the kernels' own
// threads, at::get_num_threads() of them, where at::parallel_for would run it (see
// thread_pool.cpp for why not there).
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  run_parallel(begin, end, grain, const_cast<F*>(&f), [](void* body, int64_t b, int64_t e) {
    (*static_cast<const F*>(body))(b, e);
  });
}
// One float row as quantize_rows stores it (quantize.cpp): `bits` 8 or 4, a scale (and
// for 4 a zero) per `group` values; `scratch` holds `cols` int32s.
void quantize_row_codes(const float* w, int64_t cols, int64_t group, int64_t bits,
                        int32_t* scratch, void* codes, float* scales, float* zeros);
// quantize_rows' outputs for a [rows, cols] matrix, unfilled, once the layout is checked
// (`name` says whose).
std::vector<at::Tensor> quantized_outputs(int64_t rows, int64_t cols, int64_t bits,
                                          int64_t group, const at::TensorOptions& options,
                                          const char* name);
}  // namespace qk
// Q4_0 products of kAmxMinRows rows or more (prompts, batches of 9+ sequences) with
// AMX-INT8 tiles where the CPU has them and the OS grants them (Python asks torch): bit
// for bit the AVX512-VNNI kernel's results.
constexpr int64_t kAmxMinRows = 9;
void set_amx_int8(bool enabled);
// Attention over bfloat16 and int8 caches with AVX-512 (F, BW, DQ) where the CPU and OS
// allow it.
void set_avx512_attention(bool enabled);
// RMSNorm, q/k norm with RoPE, SwiGLU and the delta rule (row_ops.inc) with AVX-512,
// likewise; wide_rows says whether rows of this many values take it (a multiple of 16).
void set_avx512_rows(bool enabled);
bool wide_rows(int64_t width);
// Attention's scores over an int8 cache as integer products (AVX512-VNNI where AVX-512
// attention runs, AVX2's maddubs where it does not).
void set_integer_scores(bool enabled);
// One-row (decode) products of float, bfloat16 and half weights with AVX-512, likewise.
void set_avx512_products(bool enabled);

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight);
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales);
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& zeros);

// Round-to-nearest quantization of a float, bfloat16 or half matrix [R, C] at load, as
// quant.py's quantize does it (quantize.cpp): {codes, scales} for 8 bits (int8 codes),
// {codes, scales, zeros} for 4 (codes packed two per byte); scales and zeros float32.
std::vector<at::Tensor> quantize_rows(const at::Tensor& weight, int64_t bits,
                                      int64_t group_size);

// Codes [R, bytes] (int8, or int4 packed two per byte; R a multiple of 16) as the
// AVX512-VNNI kernel reads them (quant.py's QuantizedWeight): each 16 rows' 4-byte words
// transposed, [R / 16][bytes / 4][16], int8 codes as unsigned (code + 128), written to
// `out`, which may be `codes` itself: in place, no memory to fault in beside the weights
// (quantize.cpp).
void interleave_rows(const at::Tensor& codes, const at::Tensor& out, int64_t bits);
// Rows `ids` of codes held so (with their float16 scales and zeros, [R / 16, groups, 16]) as
// float32 dequantizes them, then in `dtype`: a quantized table's embedding lookup.
at::Tensor interleaved_rows(const at::Tensor& codes, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& zeros, const at::Tensor& ids,
                            int64_t bits, at::ScalarType dtype);
// GGUF blocks [R, blocks * block_bytes] whose leading `halves` float16 fields (Q8_0's and
// Q4_0's d; Q4_1's d and m) are followed by their codes, split in one pass over the file:
// the codes into `codes` (one-byte, [R, blocks * (block_bytes - 2 * halves)]), the fields
// returned as float32 [R, blocks, halves] (gguf_blocks.cpp).
at::Tensor split_blocks(const at::Tensor& blocks, int64_t block_bytes, int64_t halves,
                        const at::Tensor& codes);
// GGUF blocks [R, bytes] of a type gguf_block_types() names (ggml's ids), decoded as
// gguf-py decodes them and requantized to `bits` with groups of `group_size` as
// quantize_rows does (gguf_blocks.cpp), which it returns as quantize_rows does.
std::vector<at::Tensor> requantize_blocks(const at::Tensor& blocks, int64_t type, int64_t bits,
                                          int64_t group_size);
std::vector<int64_t> gguf_block_types();
// Q4_K blocks [R, bytes] as quant.py's int4 layout, gguf_quants.py's _q4_k in one pass:
// the codes packed two per byte into `codes` ([R, values / 2]), {scales, zeros} (float32,
// one per 32) returned.
std::vector<at::Tensor> repack_q4_k(const at::Tensor& blocks, const at::Tensor& codes);

// The small operations of a decoder layer (layer_ops.cpp).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor qk_norm_rope(const at::Tensor& qkv, const at::Tensor& q_weight,
                        const at::Tensor& k_weight, const at::Tensor& cos, const at::Tensor& sin,
                        double eps, int64_t num_heads, int64_t num_kv_heads,
                        const at::Tensor& k_out, const at::Tensor& v_out);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
at::Tensor dequantize_kv(const at::Tensor& rows, at::ScalarType dtype);
at::Tensor silu_mul(const at::Tensor& gate_up);
// x <- silu(x) rounded to dtype, n float32 values (a multiple of 8) in place, as torch's
// SiLU in dtype (layer_ops.cpp).
void silu_rounded(float* x, int64_t n, at::ScalarType dtype);
at::Tensor add_residual(const at::Tensor& a, const at::Tensor& b);

// The k largest values of each row of logits [rows, vocab] (float32, bfloat16 or half)
// and their ids, largest first, equal values in id order (top_k.cpp): {float32, int64}
// [rows, k].
std::tuple<at::Tensor, at::Tensor> top_k(const at::Tensor& logits, int64_t k);

// Gated DeltaNet's steps between its two projections (delta_net.cpp): the input
// projection's rows proj [B, T, conv + value + 2 Hv] (T tokens each, in order: a decode
// step's one or a prompt's) -> [B, T, value], moving on the conv history
// [B, conv, kernel - 1] (activations' dtype) and the delta state [B, Hv, dk, dv]
// (float32) in place. ``tiled``: value head h reads key head h % Hk (else h / (Hv / Hk)).
// With ``slots`` (int64 [B]) the states are pools [P, ...] and row b moves on slot
// slots[b] (the server's sequences, each with its own slot).
// A prompt's tokens go through the conv and norms kStepBlock at a time; key and value
// heads of a multiple of kDeltaDimBlock values, a conv of up to kMaxConvKernel taps.
constexpr int64_t kStepBlock = 64;
constexpr int64_t kDeltaDimBlock = 8;
constexpr int64_t kMaxConvKernel = 8;
// One value head's inputs to the delta rule over a block of n tokens (row_ops.inc's
// delta_rule): token t's key k + t * kq_stride, query q + t * kq_stride (float32), value
// v + t * v_stride, its decay, strength and k . q.
template <typename T>
struct DeltaTokens {
  const float* k;
  const float* q;
  int64_t kq_stride;
  const T* v;
  int64_t v_stride;
  const float* decay;
  const float* beta;
  const float* kq;
  int64_t n;
};
at::Tensor gated_delta_step(const at::Tensor& proj, const at::Tensor& conv_weight,
                            const at::Tensor& conv_state, const at::Tensor& A,
                            const at::Tensor& dt_bias, const at::Tensor& norm,
                            const at::Tensor& state, int64_t num_k_heads, int64_t head_k_dim,
                            int64_t head_v_dim, bool tiled, double eps,
                            const c10::optional<at::Tensor>& slots = c10::nullopt);

// A KV cache stores rows of D values in the activations' dtype, or (int8, kv_cache.py's
// ``--kv-cache int8``) as D int8 codes followed by a float16 scale per block of kKvBlock
// values: a row of kv_row_width(D) bytes. ``dim`` below is always D.
constexpr int64_t kKvBlock = 32;
inline int64_t kv_row_width(int64_t D, at::ScalarType dtype) {
  return dtype == at::kChar ? D + D / kKvBlock * 2 : D;
}
// D of a cache whose rows are ``width`` elements of ``dtype`` (checked).
int64_t kv_head_dim(int64_t width, at::ScalarType dtype);

// Rows [B, KVH, L, D] of keys and values, D contiguous, by address and strides (batch,
// head, row): from two views (kv_rows), or from a layer of the KV cache [layers, B, KVH,
// max_seq_len, D] (cache_rows), which a decode step then reaches without the half dozen
// view operations (about a microsecond each) that slicing the cache takes.
struct KVRows {
  void *k, *v;
  int64_t k_strides[3], v_strides[3];
  int64_t batch, heads, rows, dim;
  at::ScalarType dtype;
};
KVRows kv_rows(const at::Tensor& k, const at::Tensor& v);
KVRows cache_rows(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t layer,
                  int64_t first, int64_t count);
// A paged KV cache, ``k_cache``/``v_cache`` [layers, KVH, slots, row] contiguous, and the
// rows of one step of a batch of sequences: row i is at ``positions[i]`` of sequence
// ``row_seq[i]``, whose position p lies in slot ``block_tables[row_seq[i]][p / block_size]
// * block_size + p % block_size``. Row i's key and value go to its own position's slot
// and it attends to its sequence's positions 0..positions[i]. paged_kv checks it all once
// (the tensors are held, so the pointers stay valid).
struct PagedKV {
  at::Tensor k_cache, v_cache, positions_, row_seq_, block_tables_;
  const int64_t *positions, *row_seq;
  const int32_t* block_tables;
  int64_t rows, layers, heads, slots, dim, block_size, max_blocks;
  at::ScalarType dtype;

  // Row i's sequence's block table.
  const int32_t* table(int64_t i) const { return block_tables + row_seq[i] * max_blocks; }
  // The slot of position p of the sequence whose block table is ``table``.
  int64_t slot_at(const int32_t* table, int64_t p) const {
    return int64_t{table[p / block_size]} * block_size + p % block_size;
  }
  // The slot of row i's own position.
  int64_t slot(int64_t i) const { return slot_at(table(i), positions[i]); }
};
PagedKV paged_kv(const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& positions, const at::Tensor& row_seq,
                 const at::Tensor& block_tables, int64_t block_size);

// qk_norm_rope and decode_attention on KVRows, or on a layer of a paged cache: qkv
// [N, (H + 2 KVH) * D] with cos/sin [N, D] gives q [N, H, D], and attention of q [N, H, D]
// gives [N, H * D]. The two layouts share the code, and differ in where rows lie.
at::Tensor qk_norm_rope_into(const at::Tensor& qkv, const at::Tensor& q_weight,
                             const at::Tensor& k_weight, const at::Tensor& cos,
                             const at::Tensor& sin, double eps, int64_t num_heads,
                             int64_t num_kv_heads, const KVRows& out);
at::Tensor qk_norm_rope_into(const at::Tensor& qkv, const at::Tensor& q_weight,
                             const at::Tensor& k_weight, const at::Tensor& cos,
                             const at::Tensor& sin, double eps, int64_t num_heads,
                             int64_t num_kv_heads, const PagedKV& cache, int64_t layer);
at::Tensor attend(const at::Tensor& q, const KVRows& kv);
at::Tensor attend(const at::Tensor& q, const PagedKV& cache, int64_t layer);
// The paged ones as Python calls them (for tests).
at::Tensor paged_qk_norm_rope(const at::Tensor& qkv, const at::Tensor& q_weight,
                              const at::Tensor& k_weight, const at::Tensor& cos,
                              const at::Tensor& sin, double eps, int64_t num_heads,
                              int64_t num_kv_heads, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, int64_t layer,
                              const at::Tensor& positions, const at::Tensor& row_seq,
                              const at::Tensor& block_tables, int64_t block_size);
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, int64_t layer, const at::Tensor& positions,
                           const at::Tensor& row_seq, const at::Tensor& block_tables,
                           int64_t block_size);

// A layer's weight matrix in the form its product kernel takes: ``bits`` 0 for a float,
// bfloat16 or half ``weight``, 8 or 4 for int8 codes or packed int4 codes with float16
// ``scales`` (and int4 ``zeros``), as quant.py's QuantizedWeight stores them.
struct Matrix {
  at::Tensor weight;
  c10::optional<at::Tensor> scales, zeros;
  int64_t bits = 0;
};

// ``x [..., K] @ W.T`` with the kernel of W's format (decode_layer.cpp).
at::Tensor matmul(const at::Tensor& x, const Matrix& w);

// The most rows whose product over ``w`` adds each row's outputs as a one-row product does
// (and so gives a row the same bits beside others as alone), with the kernels this CPU
// runs as set now: kChainMaxRows for float weights (3 where bfloat16 goes to torch's
// native GEMM from 4 rows), one less than the integer GEMM's first row count for int8 and
// int4 (7 on AVX2), any rows for weights interleaved by 16 (linear.cpp).
int64_t step_order_rows(const Matrix& w);

// Everything one decode step of a decoder layer reads but the KV cache. A dense layer
// has gate_up and down; a mixture-of-experts layer has router and one matrix per expert
// (and in the hybrid generation a shared expert: shared_gate_up, shared_down and its
// one-row gate shared_gate). The hybrid generation's attention is ``gated`` (qkv gives
// each head's query and then its gate); its ``linear`` layers are Gated DeltaNet instead
// of attention (in_proj, the conv, A, dt_bias, linear_norm, out_proj). ``layer`` is the
// layer's index in the stacks of its kind's cache.
struct DecoderLayerWeights {
  int64_t layer = 0, num_heads = 0, num_kv_heads = 0;
  double eps = 1e-6;
  at::Tensor input_norm, post_norm, q_norm, k_norm;
  Matrix qkv, o_proj, gate_up, down, router;
  std::vector<Matrix> expert_gate_up, expert_down;
  int64_t top_k = 0;
  bool norm_topk_prob = false;
  Matrix shared_gate_up, shared_down, shared_gate;
  bool gated = false, linear = false, tiled = false;
  Matrix in_proj, out_proj;
  at::Tensor conv_weight, A, dt_bias, linear_norm;
  int64_t k_heads = 0, k_dim = 0, v_dim = 0;
  // Run across processes (distributed/): the name of the process group that sums a block's
  // outputs, for the attention block and the feed-forward one (empty: held whole here),
  // and the first expert of the range this process holds (its stacks hold only those).
  std::string attention_group, feed_forward_group;
  int64_t expert_first = 0;
};

// x [B, 1, hidden] at position ``start``: the layer's output, its key and value stored
// in the caches [layers, B, kv_heads, max_seq_len, head_dim], or a linear layer's states
// moved on in conv_cache [layers, B, conv, kernel - 1] and delta_cache [layers, B, Hv, dk,
// dv] (decode_layer.cpp).
at::Tensor decode_layer(const at::Tensor& x, const DecoderLayerWeights& w, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        int64_t start, const at::Tensor& conv_cache, const at::Tensor& delta_cache);
// x [N, hidden], the rows of a step of several sequences over a paged cache (cos/sin
// [N, head_dim] at each row's position): the layer's output, keys and values stored. A
// linear layer needs a step of one row per sequence: row i moves on slot row_states[i]
// of the state pools conv_cache [layers, P, conv, kernel - 1] and delta_cache [layers, P,
// Hv, dk, dv].
at::Tensor paged_layer(const at::Tensor& x, const DecoderLayerWeights& w, const at::Tensor& cos,
                       const at::Tensor& sin, const PagedKV& cache,
                       const at::Tensor& conv_cache = {}, const at::Tensor& delta_cache = {},
                       const at::Tensor& row_states = {});

// Shared vector helpers.
namespace qk {

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// A product rounded to float32 before a sum uses it, as numpy and torch compute d * q - m: GCC
// would fuse the two into one FMA, even across statements.
inline float rounded(float v) {
#if defined(__clang__)
  return v;  // clang fuses only within one expression
#elif __GNUC__ >= 12
  return __builtin_assoc_barrier(v);
#else
  volatile float kept = v;
  return kept;
#endif
}

// One half as float32 in one F16C instruction (c10::Half's conversion is bit twiddling).
inline float to_float(c10::Half h) { return _cvtsh_ss(h.x); }

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

// Eight values of a float, bfloat16 or half array as float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Eight floats rounded to T and widened back, as torch rounds (to nearest, ties to even;
// a NaN stays a NaN): what an operation in T would have stored.
inline __m256 bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
  const __m256 rounded = _mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  const __m256 nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000));
  return _mm256_blendv_ps(rounded, nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
inline __m256 round_to(float, __m256 v) { return v; }
inline __m256 round_to(c10::BFloat16, __m256 v) { return bf16_bits(v); }
inline __m256 round_to(c10::Half, __m256 v) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Eight floats stored as T, rounded as torch rounds.
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i high = _mm256_srli_epi32(_mm256_castps_si256(bf16_bits(v)), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The float vectors the row operations (row_ops.inc) are written in: Lanes8 of AVX2 and
// Lanes16 of AVX-512 (for QK_AVX512 functions only). load widens float, bfloat16 or half
// values to float32; store and round round to them as torch does.
struct Lanes8 {
  using F = __m256;
  static constexpr int64_t kWidth = 8;
  template <typename T>
  static F load(const T* p) { return load8(p); }
  template <typename T>
  static void store(T* p, F v) { store8(p, v); }
  template <typename T>
  static F round(T tag, F v) { return round_to(tag, v); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F zero() { return _mm256_setzero_ps(); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F negate(F v) { return _mm256_xor_ps(v, _mm256_set1_ps(-0.0f)); }
  static F round_even(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^n for whole n in float's exponent range.
  static F pow2(F n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static float sum(F v) { return hsum(v); }
  static float max_of(F v) {
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
  // v's first n lanes, the rest `fill`.
  static F keep_first(F v, int64_t n, float fill) {
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(n)), _CMP_LT_OQ));
  }
};

#define QK_AVX512 QK_TARGET("avx512f,avx512bw,avx512dq,fma,f16c")

// bf16_bits of 16 floats.
QK_AVX512 inline __m512 bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  const __m512 rounded = _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  const __m512 nan = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000));
  return _mm512_mask_mov_ps(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nan);
}

struct Lanes16 {
  using F = __m512;
  static constexpr int64_t kWidth = 16;
  QK_AVX512 static F load(const float* p) { return _mm512_loadu_ps(p); }
  QK_AVX512 static F load(const c10::BFloat16* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  QK_AVX512 static F load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  QK_AVX512 static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  QK_AVX512 static void store(c10::BFloat16* p, F v) {
    const __m512i high = _mm512_srli_epi32(_mm512_castps_si512(bf16_bits(v)), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(high));
  }
  QK_AVX512 static void store(c10::Half* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  QK_AVX512 static F round(float, F v) { return v; }
  QK_AVX512 static F round(c10::BFloat16, F v) { return bf16_bits(v); }
  QK_AVX512 static F round(c10::Half, F v) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  QK_AVX512 static F set1(float x) { return _mm512_set1_ps(x); }
  QK_AVX512 static F zero() { return _mm512_setzero_ps(); }
  QK_AVX512 static F add(F a, F b) { return _mm512_add_ps(a, b); }
  QK_AVX512 static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  QK_AVX512 static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  QK_AVX512 static F div(F a, F b) { return _mm512_div_ps(a, b); }
  QK_AVX512 static F min(F a, F b) { return _mm512_min_ps(a, b); }
  QK_AVX512 static F max(F a, F b) { return _mm512_max_ps(a, b); }
  QK_AVX512 static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  QK_AVX512 static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  QK_AVX512 static F negate(F v) { return _mm512_xor_ps(v, _mm512_set1_ps(-0.0f)); }
  QK_AVX512 static F round_even(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  QK_AVX512 static F pow2(F n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  QK_AVX512 static float sum(F v) {
    return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
  }
  QK_AVX512 static float max_of(F v) {
    return Lanes8::max_of(_mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
  }
  QK_AVX512 static F keep_first(F v, int64_t n, float fill) {
    const unsigned lanes = n >= 16 ? 0xFFFFu : (1u << std::max<int64_t>(n, 0)) - 1;
    return _mm512_mask_mov_ps(_mm512_set1_ps(fill), lanes, v);
  }
};

}  // namespace qk
