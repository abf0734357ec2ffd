#include "lowbit/quant/ggml_quants.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "lowbit/core/format_traits.h"

namespace lowbit::ggml {

namespace {

template <class B>
void store(const B& b, uint8_t* row, int64_t i) {
  std::memcpy(row + i * int64_t(sizeof(B)), &b, sizeof(B));
}

// The value of largest magnitude (first one on ties), with its sign.
float signed_absmax(const float* x, int n) {
  float amax = 0, max = 0;
  for (int j = 0; j < n; ++j)
    if (amax < std::fabs(x[j])) amax = std::fabs(x[j]), max = x[j];
  return max;
}

float absmax(const float* x, int n) {
  float amax = 0;
  for (int j = 0; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
  return amax;
}

void min_max(const float* x, int n, float& mn, float& mx) {
  mn = x[0], mx = x[0];
  for (int j = 1; j < n; ++j) mn = std::min(mn, x[j]), mx = std::max(mx, x[j]);
}

float inverse(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

// Truncation toward zero of a value known to lie in [0, hi + 1), clipped to hi.
int trunc_clip(float v, int hi) { return std::min(hi, std::max(0, int(v))); }

}  // namespace

void quantize_row_q4_0(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK4_0; ++i, x += QK4_0) {
    const float d = signed_absmax(x, QK4_0) / -8.0f, id = inverse(d);
    block_q4_0 b;
    b.d = fmt_f32_to_f16(d);
    for (int j = 0; j < 16; ++j)
      b.qs[j] = uint8_t(trunc_clip(x[j] * id + 8.5f, 15) | (trunc_clip(x[j + 16] * id + 8.5f, 15) << 4));
    store(b, row, i);
  }
}

void quantize_row_q4_1(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK4_1; ++i, x += QK4_1) {
    float mn, mx;
    min_max(x, QK4_1, mn, mx);
    const float d = (mx - mn) / 15.0f, id = inverse(d);
    block_q4_1 b;
    b.d = fmt_f32_to_f16(d);
    b.m = fmt_f32_to_f16(mn);
    for (int j = 0; j < 16; ++j)
      b.qs[j] = uint8_t(trunc_clip((x[j] - mn) * id + 0.5f, 15) | (trunc_clip((x[j + 16] - mn) * id + 0.5f, 15) << 4));
    store(b, row, i);
  }
}

void quantize_row_q5_0(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK5_0; ++i, x += QK5_0) {
    const float d = signed_absmax(x, QK5_0) / -16.0f, id = inverse(d);
    block_q5_0 b;
    b.d = fmt_f32_to_f16(d);
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      const int x0 = trunc_clip(x[j] * id + 16.5f, 31), x1 = trunc_clip(x[j + 16] * id + 16.5f, 31);
      b.qs[j] = uint8_t((x0 & 0xF) | ((x1 & 0xF) << 4));
      qh |= uint32_t(x0 >> 4) << j | uint32_t(x1 >> 4) << (j + 16);
    }
    for (int k = 0; k < 4; ++k) b.qh[k] = uint8_t(qh >> (8 * k));
    store(b, row, i);
  }
}

void quantize_row_q5_1(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK5_1; ++i, x += QK5_1) {
    float mn, mx;
    min_max(x, QK5_1, mn, mx);
    const float d = (mx - mn) / 31.0f, id = inverse(d);
    block_q5_1 b;
    b.d = fmt_f32_to_f16(d);
    b.m = fmt_f32_to_f16(mn);
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      const int x0 = trunc_clip((x[j] - mn) * id + 0.5f, 31), x1 = trunc_clip((x[j + 16] - mn) * id + 0.5f, 31);
      b.qs[j] = uint8_t((x0 & 0xF) | ((x1 & 0xF) << 4));
      qh |= uint32_t(x0 >> 4) << j | uint32_t(x1 >> 4) << (j + 16);
    }
    for (int k = 0; k < 4; ++k) b.qh[k] = uint8_t(qh >> (8 * k));
    store(b, row, i);
  }
}

void quantize_row_q8_0(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK8_0; ++i, x += QK8_0) {
    const float d = absmax(x, QK8_0) / 127.0f, id = inverse(d);
    block_q8_0 b;
    b.d = fmt_f32_to_f16(d);
    for (int j = 0; j < QK8_0; ++j) b.qs[j] = int8_t(std::round(x[j] * id));  // half away from zero
    store(b, row, i);
  }
}

namespace {
// Ternary digits {0, 1, 2} of one 256-value block: round(x / amax) + 1.
float ternary_digits(const float* x, uint8_t* q) {
  const float d = absmax(x, QK_K), id = inverse(d);
  for (int j = 0; j < QK_K; ++j) q[j] = uint8_t(int(std::round(x[j] * id)) + 1);
  return d;
}
// n base-3 digits (most significant first) -> ceil(v * 256 / 243), the byte tq1_digit decodes.
uint8_t pack_base3(const uint8_t* q, int stride, int n) {
  uint32_t v = 0;
  for (int k = 0; k < n; ++k) v = v * 3 + q[k * stride];
  for (int k = n; k < 5; ++k) v *= 3;
  return uint8_t((v * 256 + 242) / 243);
}
}  // namespace

void quantize_row_tq1_0(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK_K; ++i, x += QK_K) {
    uint8_t q[QK_K];
    block_tq1_0 b;
    b.d = fmt_f32_to_f16(ternary_digits(x, q));
    for (int l = 0; l < 32; ++l) b.qs[l] = pack_base3(q + l, 32, 5);
    for (int l = 0; l < 16; ++l) b.qs[32 + l] = pack_base3(q + 160 + l, 16, 5);
    for (int l = 0; l < 4; ++l) b.qh[l] = pack_base3(q + 240 + l, 4, 4);
    store(b, row, i);
  }
}

void quantize_row_tq2_0(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK_K; ++i, x += QK_K) {
    uint8_t q[QK_K];
    block_tq2_0 b;
    b.d = fmt_f32_to_f16(ternary_digits(x, q));
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 32; ++l) {
        uint8_t byte = 0;
        for (int k = 0; k < 4; ++k) byte = uint8_t(byte | (q[h * 128 + k * 32 + l] << (2 * k)));
        b.qs[h * 32 + l] = byte;
      }
    store(b, row, i);
  }
}

}  // namespace lowbit::ggml
