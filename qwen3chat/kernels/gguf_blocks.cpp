// GGUF block types with no packed form of their own here (Q5_0, Q5_1, Q2_K, Q3_K, Q5_K,
// Q6_K, IQ4_NL, IQ4_XS: every Q4_K_M file holds Q6_K tensors) decoded and requantized at
// load (int8 per 32, or int4 under --quantize int4), a row at a time, straight from the
// file's blocks. Through gguf-py's numpy decoding this took 2.3 s of the 0.6B shape's Q4_K_M load (3.9 s) and held each tensor in float32
// first (its embedding table: 620 MB). Each decoder does gguf-py's float32 operations in
// its order, and the row goes through quantize.cpp's rounding: the same codes and scales
// as quantizing gguf-py's floats (tests/test_gguf_blocks.py). Q4_K's blocks are taken as
// they are instead, re-paired into quant.py's int4 layout.
#include <ATen/ops/empty.h>

#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Each decoder's inner loop runs over values that share their scales, which the compiler
// vectorises.

// Q5_0, 32 values: f16 d, 32 high bits, 16 bytes of low nibbles; w = d * (q - 16).
void q5_0(const uint8_t* b, float* out) {
  const float d = half_at(b);
  uint32_t high;
  std::memcpy(&high, b + 2, 4);
  for (int e = 0; e < 32; ++e) {
    const int q = (b[6 + e % 16] >> (e / 16 * 4) & 0xF) | static_cast<int>(high >> e & 1) << 4;
    out[e] = d * static_cast<float>(q - 16);
  }
}

// Q5_1, 32 values: f16 d, f16 m, 32 high bits, 16 bytes of low nibbles; w = d * q + m.
void q5_1(const uint8_t* b, float* out) {
  const float d = half_at(b), m = half_at(b + 2);
  uint32_t high;
  std::memcpy(&high, b + 4, 4);
  for (int e = 0; e < 32; ++e) {
    const int q = (b[8 + e % 16] >> (e / 16 * 4) & 0xF) | static_cast<int>(high >> e & 1) << 4;
    out[e] = qk::rounded(d * static_cast<float>(q)) + m;
  }
}

// Q2_K, 256 values in 16 sub-blocks of 16: 16 bytes of 4-bit scale and min, 64 bytes of
// 2-bit codes (value e: byte e / 128 * 32 + e % 32, bits e % 128 / 32 * 2), f16 d, f16
// dmin; w = d * scale * q - dmin * min.
void q2_k(const uint8_t* b, float* out) {
  const float d = half_at(b + 80), dmin = half_at(b + 82);
  for (int j = 0; j < 16; ++j) {
    const float scale = d * static_cast<float>(b[j] & 0xF);
    const float min = dmin * static_cast<float>(b[j] >> 4);
    const uint8_t* codes = b + 16 + j / 8 * 32 + j % 2 * 16;
    const int shift = j % 8 / 2 * 2;
    for (int i = 0; i < 16; ++i)
      out[j * 16 + i] = qk::rounded(scale * static_cast<float>(codes[i] >> shift & 3)) - min;
  }
}

// Q3_K, 256 values in 16 sub-blocks of 16: 32 bytes of high bits (value e: byte e % 32,
// bit e / 32; set means no offset), 64 bytes of 2-bit codes (as Q2_K's), 12 bytes of
// 6-bit scales (low nibbles, then high pairs), f16 d; w = d * (scale - 32) * (q - 4 * !high).
void q3_k(const uint8_t* b, float* out) {
  const uint8_t* scales = b + 96;
  const float d = half_at(b + 108);
  for (int j = 0; j < 16; ++j) {
    const int low = scales[j % 8] >> (j / 8 * 4) & 0xF, high = scales[8 + j % 4] >> (j / 4 * 2) & 3;
    const float scale = d * static_cast<float>(static_cast<int8_t>(low | high << 4) - 32);
    const uint8_t* codes = b + 32 + j / 8 * 32 + j % 2 * 16;
    const uint8_t* mask = b + j % 2 * 16;
    const int shift = j % 8 / 2 * 2, bit = j / 2;
    for (int i = 0; i < 16; ++i) {
      const int q = (codes[i] >> shift & 3) - ((mask[i] >> bit & 1) ^ 1) * 4;
      out[j * 16 + i] = scale * static_cast<float>(q);
    }
  }
}

// Q4_K's and Q5_K's 12 bytes of 6-bit scales and mins, sub-block j's pair.
inline void scale_min(const uint8_t* s, int j, int* scale, int* min) {
  if (j < 4) {
    *scale = s[j] & 63;
    *min = s[4 + j] & 63;
  } else {
    *scale = (s[8 + j - 4] & 0xF) | (s[j - 4] >> 2 & 0x30);
    *min = (s[8 + j - 4] >> 4) | (s[4 + j - 4] >> 2 & 0x30);
  }
}

// Q5_K, 256 values in 8 sub-blocks of 32: f16 d, f16 dmin, 12 bytes of scales and mins,
// 32 bytes of high bits (sub-block j's in bit j), 128 bytes of low nibbles (sub-blocks 2c
// and 2c + 1 in bytes c * 32 on); w = d * scale * q - dmin * min.
void q5_k(const uint8_t* b, float* out) {
  const float d = half_at(b), dmin = half_at(b + 2);
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    scale_min(b + 4, j, &sc, &m);
    const float scale = d * static_cast<float>(sc), min = dmin * static_cast<float>(m);
    const uint8_t* codes = b + 48 + j / 2 * 32;
    const int shift = j % 2 * 4;
    for (int i = 0; i < 32; ++i) {
      const int q = (codes[i] >> shift & 0xF) | (b[16 + i] >> j & 1) << 4;
      out[j * 32 + i] = qk::rounded(scale * static_cast<float>(q)) - min;
    }
  }
}

// Q6_K, 256 values in 16 sub-blocks of 16: 128 bytes of low nibbles, 64 bytes of 2-bit
// high parts, 16 int8 scales, f16 d; w = d * scale * (q - 32). Value e = h * 128 + k * 32
// + i: its low nibble in byte h * 64 + k % 2 * 32 + i (bits k / 2 * 4), its high part in
// byte 128 + h * 32 + i (bits 2k).
void q6_k(const uint8_t* b, float* out) {
  const float d = half_at(b + 208);
  for (int j = 0; j < 16; ++j) {
    const int h = j / 8, k = j % 8 / 2, i0 = j % 2 * 16;
    const float scale = d * static_cast<float>(static_cast<int8_t>(b[192 + j]));
    const uint8_t* lows = b + h * 64 + k % 2 * 32 + i0;
    const uint8_t* highs = b + 128 + h * 32 + i0;
    for (int i = 0; i < 16; ++i) {
      const int q = (lows[i] >> (k / 2 * 4) & 0xF) | (highs[i] >> (2 * k) & 3) << 4;
      out[j * 16 + i] = scale * static_cast<float>(q - 32);
    }
  }
}

// IQ4_NL's and IQ4_XS's 16 non-uniform levels.
constexpr int8_t kIq4Levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                   1,    13,   25,  38,  53,  69,  89,  113};

// IQ4_NL, 32 values: f16 d, 16 bytes of 4-bit level indices (value i low nibble, i + 16
// high); w = d * level.
void iq4_nl(const uint8_t* b, float* out) {
  const float d = half_at(b);
  for (int e = 0; e < 32; ++e)
    out[e] = d * static_cast<float>(kIq4Levels[b[2 + e % 16] >> (e / 16 * 4) & 0xF]);
}

// IQ4_XS, 256 values in 8 sub-blocks of 32: f16 d, 16 bits of 2-bit scale highs, 4 bytes of
// 4-bit scale lows, then each sub-block's 16 bytes as IQ4_NL's; w = d * (scale - 32) * level.
void iq4_xs(const uint8_t* b, float* out) {
  const float d = half_at(b);
  const int highs = b[2] | b[3] << 8;
  for (int j = 0; j < 8; ++j) {
    const int low = b[4 + j / 2] >> (j % 2 * 4) & 0xF, high = highs >> (2 * j) & 3;
    const float scale = d * static_cast<float>(static_cast<int8_t>(low | high << 4) - 32);
    const uint8_t* levels = b + 8 + j * 16;
    for (int i = 0; i < 32; ++i)
      out[j * 32 + i] = scale * static_cast<float>(kIq4Levels[levels[i % 16] >> (i / 16 * 4) & 0xF]);
  }
}

struct BlockType {
  int64_t id, values, bytes;  // ggml's type id; a block's values and bytes
  void (*decode)(const uint8_t*, float*);
};

constexpr BlockType kTypes[] = {
    {6, 32, 22, q5_0}, {7, 32, 24, q5_1}, {10, 256, 84, q2_k},
    {11, 256, 110, q3_k}, {13, 256, 176, q5_k}, {14, 256, 210, q6_k},
    {20, 32, 18, iq4_nl}, {23, 256, 136, iq4_xs},
};

}  // namespace

std::vector<at::Tensor> repack_q4_k(const at::Tensor& blocks_in, const at::Tensor& codes) {
  RECORD_FUNCTION("qwen3chat::repack_q4_k", {});
  const auto blocks = blocks_in.contiguous();
  constexpr int64_t kBytes = 144;
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte &&
                  blocks.size(1) % kBytes == 0,
              "repack_q4_k: uint8 rows of whole Q4_K blocks");
  const int64_t rows = blocks.size(0), per_row = blocks.size(1) / kBytes, groups = per_row * 8;
  TORCH_CHECK(codes.is_contiguous() && codes.scalar_type() == at::kByte &&
                  codes.numel() == rows * groups * 16,
              "repack_q4_k: contiguous uint8 codes, 16 bytes per 32 values");
  auto scales = at::empty({rows, groups}, blocks.options().dtype(at::kFloat));
  auto zeros = at::empty({rows, groups}, blocks.options().dtype(at::kFloat));
  const uint8_t* in = blocks.data_ptr<uint8_t>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float *sp = scales.data_ptr<float>(), *zp = zeros.data_ptr<float>();
  qk::parallel_for(0, rows * per_row, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* b = in + n * kBytes;
      const float d = half_at(b), dmin = half_at(b + 2);
      for (int j = 0; j < 8; ++j) {
        int sc, m;
        scale_min(b + 4, j, &sc, &m);
        const float scale = d * static_cast<float>(sc);
        sp[n * 8 + j] = scale;
        zp[n * 8 + j] = 8.0f * scale - dmin * static_cast<float>(m);  // 8 * scale is exact
        // Chunk j / 2's 32 bytes hold sub-block j's codes in their low (even j) or high
        // (odd j) nibbles, value i in byte i: pair i with i + 16.
        const uint8_t* qs = b + 16 + j / 2 * 32;
        uint8_t* out = cp + (n * 8 + j) * 16;
        for (int i = 0; i < 16; ++i)
          out[i] = j % 2 ? (qs[i] >> 4) | (qs[16 + i] & 0xF0) : (qs[i] & 0xF) | qs[16 + i] << 4;
      }
    }
  });
  return {scales, zeros};
}

at::Tensor split_blocks(const at::Tensor& blocks_in, int64_t block_bytes, int64_t halves,
                        const at::Tensor& codes) {
  RECORD_FUNCTION("qwen3chat::split_blocks", {});
  const auto blocks = blocks_in.contiguous();
  const int64_t code_bytes = block_bytes - 2 * halves;
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && halves >= 0 &&
                  code_bytes > 0 && blocks.size(1) % block_bytes == 0,
              "split_blocks: uint8 rows of whole blocks");
  const int64_t rows = blocks.size(0), per_row = blocks.size(1) / block_bytes;
  TORCH_CHECK(codes.is_contiguous() && codes.element_size() == 1 &&
                  codes.numel() == rows * per_row * code_bytes,
              "split_blocks: contiguous one-byte codes of the blocks' size");
  auto fields = at::empty({rows, per_row, halves}, blocks.options().dtype(at::kFloat));
  const uint8_t* in = blocks.data_ptr<uint8_t>();
  uint8_t* cp = static_cast<uint8_t*>(codes.data_ptr());
  float* fp = fields.data_ptr<float>();
  qk::parallel_for(0, rows * per_row, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* b = in + n * block_bytes;
      for (int64_t h = 0; h < halves; ++h) fp[n * halves + h] = half_at(b + 2 * h);
      std::memcpy(cp + n * code_bytes, b + 2 * halves, code_bytes);
    }
  });
  return fields;
}

std::vector<int64_t> gguf_block_types() {
  std::vector<int64_t> ids;
  for (const auto& t : kTypes) ids.push_back(t.id);
  return ids;
}

std::vector<at::Tensor> requantize_blocks(const at::Tensor& blocks_in, int64_t type,
                                          int64_t bits, int64_t group_size) {
  RECORD_FUNCTION("qwen3chat::requantize_blocks", {});
  const BlockType* kind = nullptr;
  for (const auto& t : kTypes)
    if (t.id == type) kind = &t;
  TORCH_CHECK(kind != nullptr, "requantize_blocks: GGUF type ", type, " is not decoded here");
  const auto blocks = blocks_in.contiguous();
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte,
              "requantize_blocks: uint8 rows of blocks");
  TORCH_CHECK(blocks.size(1) % kind->bytes == 0, "requantize_blocks: rows of whole blocks");
  const int64_t rows = blocks.size(0), per_row = blocks.size(1) / kind->bytes;
  const int64_t cols = per_row * kind->values, groups = cols / group_size;
  auto out = qk::quantized_outputs(rows, cols, bits, group_size, blocks.options(),
                                   "requantize_blocks");
  const uint8_t* in = blocks.data_ptr<uint8_t>();
  uint8_t* cp = static_cast<uint8_t*>(out[0].data_ptr());
  float* sp = out[1].data_ptr<float>();
  float* zp = bits == 4 ? out[2].data_ptr<float>() : nullptr;
  qk::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(cols);
    std::vector<int32_t> scratch(cols);
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* src = in + r * blocks.size(1);
      for (int64_t k = 0; k < per_row; ++k)
        kind->decode(src + k * kind->bytes, row.data() + k * kind->values);
      qk::quantize_row_codes(row.data(), cols, group_size, bits, scratch.data(),
                             cp + r * cols * bits / 8, sp + r * groups,
                             zp ? zp + r * groups : nullptr);
    }
  });
  return out;
}
