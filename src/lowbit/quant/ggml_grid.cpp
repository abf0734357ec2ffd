#include "lowbit/quant/ggml_grid.h"

#include <cmath>
#include <cstring>

#include "lowbit/core/error.h"
#include "lowbit/core/ggml_blocks.h"

namespace lowbit {

namespace {
namespace g = ggml;

float inv(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }
// Truncation of v clipped to [0, hi] (the reference quantizers' "+ 0.5 then truncate"); NaN -> 0.
int trunc_clip(float v, int hi) { return v >= 0 ? (v < float(hi) + 1 ? int(v) : hi) : 0; }
int round_clip(float v, int lo, int hi) {
  if (!(v == v)) return 0;
  return v <= float(lo) ? lo : v >= float(hi) ? hi : int(std::round(v));
}
// A 4-bit code at position j of a 32-value block: j < 16 low nibble of qs[j], else high of qs[j-16].
void put_nibble(uint8_t* qs, int j, int q) {
  uint8_t& b = qs[j & 15];
  b = j < 16 ? uint8_t((b & 0xF0) | (q & 0xF)) : uint8_t((b & 0x0F) | ((q & 0xF) << 4));
}
void put_high_bit(uint8_t* qh, int j, int bit) {
  qh[j / 8] = uint8_t((qh[j / 8] & ~(1u << (j % 8))) | (unsigned(bit & 1) << (j % 8)));
}
uint16_t u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
int nearest_iq4(float x) {
  int best = 0;
  float bd = std::fabs(x - float(g::iq4nl_value(0)));
  for (int k = 1; k < 16; ++k) {
    const float d = std::fabs(x - float(g::iq4nl_value(k)));
    if (d < bd) bd = d, best = k;
  }
  return best;
}
}  // namespace

bool ggml_block_grid_supported(const QuantFormat& f) {
  if (!f.is_ggml_block()) return false;
  switch (f.id) {
    case QuantFormatId::Q4_0: case QuantFormatId::Q4_1: case QuantFormatId::Q5_0: case QuantFormatId::Q5_1:
    case QuantFormatId::Q8_0: case QuantFormatId::IQ4_NL:
      return f.group_size == 32 && f.quantize_row != nullptr && f.dequantize_row != nullptr;
    default:
      return false;
  }
}

const char* ggml_block_grid_names() { return "q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl"; }

void ggml_grid_fit_block(const QuantFormat& f, const float* x, uint8_t* block) {
  LB_CHECK(ggml_block_grid_supported(f), "ggml grid: format ", f.name, " has no per-value grid (", ggml_block_grid_names(), " do)");
  f.quantize_row(x, f.group_size, block);
}

float ggml_grid_round(const QuantFormat& f, uint8_t* block, int j, float x) {
  LB_CHECK(j >= 0 && j < 32, "ggml grid: position ", j, " outside a 32-value block");
  switch (f.id) {
    case QuantFormatId::Q4_0: {
      const float d = fmt_f16_to_f32(u16(block));
      put_nibble(block + 2, j, trunc_clip(x * inv(d) + 8.5f, 15));
      break;
    }
    case QuantFormatId::Q4_1: {
      const float d = fmt_f16_to_f32(u16(block)), m = fmt_f16_to_f32(u16(block + 2));
      put_nibble(block + 4, j, trunc_clip((x - m) * inv(d) + 0.5f, 15));
      break;
    }
    case QuantFormatId::Q5_0: {
      const float d = fmt_f16_to_f32(u16(block));
      const int q = trunc_clip(x * inv(d) + 16.5f, 31);
      put_high_bit(block + 2, j, q >> 4);
      put_nibble(block + 6, j, q);
      break;
    }
    case QuantFormatId::Q5_1: {
      const float d = fmt_f16_to_f32(u16(block)), m = fmt_f16_to_f32(u16(block + 2));
      const int q = trunc_clip((x - m) * inv(d) + 0.5f, 31);
      put_high_bit(block + 4, j, q >> 4);
      put_nibble(block + 8, j, q);
      break;
    }
    case QuantFormatId::Q8_0: {
      const float d = fmt_f16_to_f32(u16(block));
      block[2 + j] = uint8_t(int8_t(round_clip(x * inv(d), -127, 127)));
      break;
    }
    case QuantFormatId::IQ4_NL: {
      const float d = fmt_f16_to_f32(u16(block));
      put_nibble(block + 2, j, d != 0.0f ? nearest_iq4(x / d) : 8);  // level 1 ~ 0 for an all-zero block
      break;
    }
    default:
      throw_error("ggml grid: format ", f.name, " has no per-value grid (", ggml_block_grid_names(), " do)");
  }
  float y[32];
  f.dequantize_row(block, 32, y);
  return y[j];
}

}  // namespace lowbit
