#include "lowbit/ops/blockwise8.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "lowbit/core/threads.h"

namespace lowbit::ops {

namespace {

struct DynamicType {
  std::array<float, 256> values{};
  std::array<float, 255> midpoints{};  // midpoints[k] between values[k] and values[k + 1]
  uint8_t zero_code = 0;
};

// Magnitudes of the tree codes with `bits` bits after the sign: e zero bits, the indicator, and
// bits - 1 - e fraction bits, e = 0 .. bits - 1 (computed in double, rounded once to f32).
void add_magnitudes(int bits, double sign, std::vector<double>& out) {
  for (int e = 0; e < bits; ++e) {
    const int frac_bits = bits - 1 - e;
    const int64_t bins = int64_t(1) << frac_bits;
    const double scale = std::pow(10.0, -double(e));
    for (int64_t f = 0; f < bins; ++f) out.push_back(sign * scale * (0.1 + 0.9 * double(f + 1) / double(bins)));
  }
}

DynamicType build(bool is_signed) {
  std::vector<double> v;
  v.push_back(0.0);
  if (is_signed) {
    add_magnitudes(7, 1.0, v);
    add_magnitudes(7, -1.0, v);
    v.push_back(1e-7);  // the tree's negative zero, given the next exponent class's value
  } else {
    add_magnitudes(8, 1.0, v);
  }
  std::sort(v.begin(), v.end());
  DynamicType t;
  for (size_t k = 0; k < 256; ++k) t.values[k] = float(v[k]);
  for (size_t k = 0; k < 255; ++k) t.midpoints[k] = float(0.5 * (v[k] + v[k + 1]));
  t.zero_code = uint8_t(std::find(t.values.begin(), t.values.end(), 0.0f) - t.values.begin());
  return t;
}

const DynamicType& type(bool is_signed) {
  static const DynamicType s = build(true), u = build(false);
  return is_signed ? s : u;
}

}  // namespace

const std::array<float, 256>& dynamic_map(bool is_signed) { return type(is_signed).values; }

uint8_t dynamic_zero_code(bool is_signed) { return type(is_signed).zero_code; }

uint8_t dynamic_encode(float x, bool is_signed) {
  const auto& m = type(is_signed).midpoints;
  // The number of midpoints <= x is the rank of the nearest value (NaN compares false: code 0).
  return uint8_t(std::upper_bound(m.begin(), m.end(), x) - m.begin());
}

float blockwise8_encode_block(const float* x, int64_t n, bool is_signed, uint8_t* codes) {
  float absmax = 0;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    finite = finite && std::isfinite(x[i]);
    absmax = std::max(absmax, std::fabs(x[i]));
  }
  if (!finite || absmax == 0) {
    // All zeros, or a non-finite block (a diverged run): zero codes, and a NaN absmax in the latter
    // case so the NaN stays visible after decoding.
    std::fill(codes, codes + n, dynamic_zero_code(is_signed));
    return finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
  }
  const auto& m = type(is_signed).midpoints;
  const float inv = 1.0f / absmax;
  for (int64_t i = 0; i < n; ++i)
    codes[i] = uint8_t(std::upper_bound(m.begin(), m.end(), x[i] * inv) - m.begin());
  return absmax;
}

void blockwise8_decode_block(const uint8_t* codes, float absmax, int64_t n, bool is_signed, float* out) {
  const auto& v = type(is_signed).values;
  for (int64_t i = 0; i < n; ++i) out[i] = v[codes[i]] * absmax;
}

void blockwise8_encode(const float* x, int64_t n, bool is_signed, uint8_t* codes, float* absmax) {
  parallel_for(blockwise8_blocks(n), 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kBlockwise8Block, len = std::min(kBlockwise8Block, n - lo);
      absmax[b] = blockwise8_encode_block(x + lo, len, is_signed, codes + lo);
    }
  });
}

void blockwise8_decode(const uint8_t* codes, const float* absmax, int64_t n, bool is_signed, float* out) {
  parallel_for(blockwise8_blocks(n), 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kBlockwise8Block, len = std::min(kBlockwise8Block, n - lo);
      blockwise8_decode_block(codes + lo, absmax[b], len, is_signed, out + lo);
    }
  });
}

}  // namespace lowbit::ops
