// ggml's quantization blocks (the tensor data of GGUF files), as plain structs with ggml's byte
// layout, and their reference dequantization, callable on host and device. Written from the layout
// description of ggml (ggml-common.h) and gguf-py's quants.py; the float operations are done in the
// order gguf-py's numpy code does them, so the results are bit-identical to
// `gguf.quants.dequantize` (f16 fields are read exactly; each product/difference is one f32 op).
// Included by core/format_traits.h; the format table rows live in quant/format.cpp.
#pragma once
#include <cstdint>
#include <cstring>

namespace lowbit::ggml {

constexpr int QK4_0 = 32, QK4_1 = 32, QK5_0 = 32, QK5_1 = 32, QK8_0 = 32, QK4_NL = 32, QK_K = 256;

// f16 fields are raw IEEE half bits.
struct block_q4_0 { uint16_t d; uint8_t qs[QK4_0 / 2]; };                 // w = d * (q - 8)
struct block_q4_1 { uint16_t d, m; uint8_t qs[QK4_1 / 2]; };              // w = d * q + m
struct block_q5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[QK5_0 / 2]; };  // w = d * (q - 16)
struct block_q5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[QK5_1 / 2]; };
struct block_q8_0 { uint16_t d; int8_t qs[QK8_0]; };                      // w = d * q
struct block_q2_K { uint8_t scales[QK_K / 16]; uint8_t qs[QK_K / 4]; uint16_t d, dmin; };
struct block_q3_K { uint8_t hmask[QK_K / 8]; uint8_t qs[QK_K / 4]; uint8_t scales[12]; uint16_t d; };
struct block_q4_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[QK_K / 2]; };
struct block_q5_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[QK_K / 8]; uint8_t qs[QK_K / 2]; };
struct block_q6_K { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; uint16_t d; };
struct block_tq1_0 { uint8_t qs[(QK_K - 4 * QK_K / 64) / 5]; uint8_t qh[QK_K / 64]; uint16_t d; };
struct block_tq2_0 { uint8_t qs[QK_K / 4]; uint16_t d; };
struct block_iq4_nl { uint16_t d; uint8_t qs[QK4_NL / 2]; };
struct block_iq4_xs { uint16_t d; uint16_t scales_h; uint8_t scales_l[QK_K / 64]; uint8_t qs[QK_K / 2]; };

static_assert(sizeof(block_q4_0) == 18, "block_q4_0 layout");
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 layout");
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 layout");
static_assert(sizeof(block_q5_1) == 24, "block_q5_1 layout");
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 layout");
static_assert(sizeof(block_q2_K) == 84, "block_q2_K layout");
static_assert(sizeof(block_q3_K) == 110, "block_q3_K layout");
static_assert(sizeof(block_q4_K) == 144, "block_q4_K layout");
static_assert(sizeof(block_q5_K) == 176, "block_q5_K layout");
static_assert(sizeof(block_q6_K) == 210, "block_q6_K layout");
static_assert(sizeof(block_tq1_0) == 54, "block_tq1_0 layout");
static_assert(sizeof(block_tq2_0) == 66, "block_tq2_0 layout");
static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl layout");
static_assert(sizeof(block_iq4_xs) == 136, "block_iq4_xs layout");

// The 16 non-linear levels of iq4_nl / iq4_xs.
LB_HD_INLINE int iq4nl_value(int i) {
  constexpr int8_t k[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
  return k[i & 15];
}

// q4_K / q5_K: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes.
LB_HD_INLINE void k4_scale_min(int j, const uint8_t* q, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// q3_K: signed 6-bit scale of sub-block j (0..15), minus 32.
LB_HD_INLINE int q3k_scale(int j, const uint8_t* s) {
  const int lo = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
  const int hi = (s[8 + (j % 4)] >> (2 * (j / 4))) & 3;
  return (lo | (hi << 4)) - 32;
}

// ---- dequantization of one block into QK values -----------------------------------------------

LB_HD_INLINE void dequantize_block(const block_q4_0& b, float* y) {
  const float d = fmt_f16_to_f32(b.d);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * float((b.qs[j] & 0xF) - 8);
    y[j + 16] = d * float((b.qs[j] >> 4) - 8);
  }
}
LB_HD_INLINE void dequantize_block(const block_q4_1& b, float* y) {
  const float d = fmt_f16_to_f32(b.d), m = fmt_f16_to_f32(b.m);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * float(b.qs[j] & 0xF) + m;
    y[j + 16] = d * float(b.qs[j] >> 4) + m;
  }
}
LB_HD_INLINE uint32_t qh_word(const uint8_t* qh) {
  return uint32_t(qh[0]) | uint32_t(qh[1]) << 8 | uint32_t(qh[2]) << 16 | uint32_t(qh[3]) << 24;
}
LB_HD_INLINE void dequantize_block(const block_q5_0& b, float* y) {
  const float d = fmt_f16_to_f32(b.d);
  const uint32_t qh = qh_word(b.qh);
  for (int j = 0; j < 16; ++j) {
    const int x0 = int((b.qs[j] & 0xF) | (((qh >> j) & 1u) << 4)) - 16;
    const int x1 = int((b.qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4)) - 16;
    y[j] = d * float(x0);
    y[j + 16] = d * float(x1);
  }
}
LB_HD_INLINE void dequantize_block(const block_q5_1& b, float* y) {
  const float d = fmt_f16_to_f32(b.d), m = fmt_f16_to_f32(b.m);
  const uint32_t qh = qh_word(b.qh);
  for (int j = 0; j < 16; ++j) {
    const uint32_t x0 = (b.qs[j] & 0xFu) | (((qh >> j) & 1u) << 4);
    const uint32_t x1 = (b.qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4);
    y[j] = d * float(x0) + m;
    y[j + 16] = d * float(x1) + m;
  }
}
LB_HD_INLINE void dequantize_block(const block_q8_0& b, float* y) {
  const float d = fmt_f16_to_f32(b.d);
  for (int j = 0; j < QK8_0; ++j) y[j] = float(b.qs[j]) * d;
}
LB_HD_INLINE void dequantize_block(const block_q2_K& b, float* y) {
  const float d = fmt_f16_to_f32(b.d), dmin = fmt_f16_to_f32(b.dmin);
  // value i = h*128 + s*32 + l (h half, s shift step, l < 32): bits 2s of qs[h*32 + l],
  // sub-block of 16 = i / 16.
  for (int i = 0; i < QK_K; ++i) {
    const int h = i / 128, s = (i / 32) % 4, l = i % 32;
    const uint8_t sc = b.scales[i / 16];
    const float dl = d * float(sc & 0xF), ml = dmin * float(sc >> 4);
    y[i] = dl * float((b.qs[h * 32 + l] >> (2 * s)) & 3) - ml;
  }
}
LB_HD_INLINE void dequantize_block(const block_q3_K& b, float* y) {
  const float d = fmt_f16_to_f32(b.d);
  for (int i = 0; i < QK_K; ++i) {
    const int h = i / 128, s = (i / 32) % 4, l = i % 32;
    const int lo = (b.qs[h * 32 + l] >> (2 * s)) & 3;
    const int hbit = (b.hmask[l] >> (i / 32)) & 1;  // hmask bit (i/32) of byte l
    const float dl = d * float(q3k_scale(i / 16, b.scales));
    y[i] = dl * float(lo - (hbit ? 0 : 4));
  }
}
LB_HD_INLINE void dequantize_block(const block_q4_K& b, float* y) {
  const float d = fmt_f16_to_f32(b.d), dmin = fmt_f16_to_f32(b.dmin);
  // Sub-block j (32 values): 64-value chunk j/2, low nibbles for even j, high for odd j.
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    k4_scale_min(j, b.scales, sc, m);
    const float d1 = d * float(sc), m1 = dmin * float(m);
    const uint8_t* q = b.qs + (j / 2) * 32;
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) y[j * 32 + l] = d1 * float((q[l] >> shift) & 0xF) - m1;
  }
}
LB_HD_INLINE void dequantize_block(const block_q5_K& b, float* y) {
  const float d = fmt_f16_to_f32(b.d), dmin = fmt_f16_to_f32(b.dmin);
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    k4_scale_min(j, b.scales, sc, m);
    const float d1 = d * float(sc), m1 = dmin * float(m);
    const uint8_t* q = b.qs + (j / 2) * 32;
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) {
      const int v = ((q[l] >> shift) & 0xF) | (((b.qh[l] >> j) & 1) << 4);
      y[j * 32 + l] = d1 * float(v) - m1;
    }
  }
}
LB_HD_INLINE void dequantize_block(const block_q6_K& b, float* y) {
  const float d = fmt_f16_to_f32(b.d);
  // value i = h*128 + k*32 + l: low nibble of ql[h*64 + (k%2)*32 + l] (k < 2) or its high nibble
  // (k >= 2); high 2 bits at bits 2k of qh[h*32 + l]; scale i / 16.
  for (int i = 0; i < QK_K; ++i) {
    const int h = i / 128, k = (i / 32) % 4, l = i % 32;
    const int lo = (b.ql[h * 64 + (k % 2) * 32 + l] >> (4 * (k / 2))) & 0xF;
    const int hi = (b.qh[h * 32 + l] >> (2 * k)) & 3;
    const float dl = d * float(b.scales[i / 16]);
    y[i] = dl * float((lo | (hi << 4)) - 32);
  }
}
// tq1_0: base-3 digits packed 5 (qs) or 4 (qh) per byte as ceil(v * 256 / 243); digit k of byte
// v is ((uint8)(v * 3^k) * 3) >> 8.
LB_HD_INLINE int tq1_digit(uint8_t v, int k) {
  constexpr uint8_t pow3[5] = {1, 3, 9, 27, 81};
  const uint8_t q = uint8_t(v * pow3[k]);
  return int((uint16_t(q) * 3) >> 8) - 1;
}
LB_HD_INLINE void dequantize_block(const block_tq1_0& b, float* y) {
  const float d = fmt_f16_to_f32(b.d);
  for (int k = 0; k < 5; ++k)
    for (int l = 0; l < 32; ++l) y[k * 32 + l] = d * float(tq1_digit(b.qs[l], k));
  for (int k = 0; k < 5; ++k)
    for (int l = 0; l < 16; ++l) y[160 + k * 16 + l] = d * float(tq1_digit(b.qs[32 + l], k));
  for (int k = 0; k < 4; ++k)
    for (int l = 0; l < 4; ++l) y[240 + k * 4 + l] = d * float(tq1_digit(b.qh[l], k));
}
LB_HD_INLINE void dequantize_block(const block_tq2_0& b, float* y) {
  const float d = fmt_f16_to_f32(b.d);
  for (int i = 0; i < QK_K; ++i) {
    const int h = i / 128, k = (i / 32) % 4, l = i % 32;
    y[i] = d * float(int((b.qs[h * 32 + l] >> (2 * k)) & 3) - 1);
  }
}
LB_HD_INLINE void dequantize_block(const block_iq4_nl& b, float* y) {
  const float d = fmt_f16_to_f32(b.d);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * float(iq4nl_value(b.qs[j] & 0xF));
    y[j + 16] = d * float(iq4nl_value(b.qs[j] >> 4));
  }
}
LB_HD_INLINE void dequantize_block(const block_iq4_xs& b, float* y) {
  const float d = fmt_f16_to_f32(b.d);
  for (int ib = 0; ib < QK_K / 32; ++ib) {
    const int ls = ((b.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF) | (((b.scales_h >> (2 * ib)) & 3) << 4);
    const float dl = d * float(ls - 32);
    const uint8_t* q = b.qs + ib * 16;
    for (int l = 0; l < 16; ++l) {
      y[ib * 32 + l] = dl * float(iq4nl_value(q[l] & 0xF));
      y[ib * 32 + 16 + l] = dl * float(iq4nl_value(q[l] >> 4));
    }
  }
}

// Dequantizes n_blocks consecutive blocks of type B from raw bytes (any alignment).
template <class B>
LB_HD_INLINE void dequantize_blocks(const uint8_t* src, int64_t n_blocks, int block_values, float* y) {
  for (int64_t i = 0; i < n_blocks; ++i) {
    B b;
    std::memcpy(&b, src + i * int64_t(sizeof(B)), sizeof(B));
    dequantize_block(b, y + i * block_values);
  }
}

}  // namespace lowbit::ggml
