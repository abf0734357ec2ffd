#include "lowbit/ops/blockwise8.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <vector>

#include "lowbit/core/threads.h"

namespace lowbit::ops {

namespace {

// Encoding looks the code up by the top bits of x's float pattern (sign, exponent, 7 mantissa bits:
// buckets of 1/128 of an octave), which gives the number of midpoints at or below the bucket's
// smallest value; the few midpoints inside a bucket (at most `steps`, 2 for these tables: the
// tables' spacing is never under 0.9/128 of their decade) are then counted with branch-free
// compares. Exponents below kExpLo (|x| < 2^-26, under half the smallest nonzero value 1e-7) give
// the zero code; |x| >= 2 saturates.
constexpr int kExpLo = 101, kExpCount = 127 - kExpLo + 1, kBuckets = kExpCount * 128;

struct DynamicType {
  std::array<float, 256> values{};
  // midpoints[k] between values[k] and values[k + 1]; midpoints[255] = +inf pads the search.
  std::array<float, 256> midpoints{};
  std::array<uint8_t, 2 * kBuckets> start{};  // [sign][exponent - kExpLo][top 7 mantissa bits]
  int steps = 0;
  uint8_t zero_code = 0;
};

uint8_t rank_of(const std::array<float, 256>& mid, float x) {  // midpoints <= x, by plain search
  return uint8_t(std::upper_bound(mid.begin(), mid.end(), x) - mid.begin());
}

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
  t.midpoints[255] = std::numeric_limits<float>::infinity();
  t.zero_code = uint8_t(std::find(t.values.begin(), t.values.end(), 0.0f) - t.values.begin());
  for (uint32_t sign = 0; sign < 2; ++sign)
    for (uint32_t e = 0; e < uint32_t(kExpCount); ++e)
      for (uint32_t m = 0; m < 128; ++m) {
        const uint32_t lo_bits = (sign << 31) | ((e + kExpLo) << 23) | (m << 16);
        // The bucket's smallest and largest values (for negative floats the pattern runs backwards).
        const float a = std::bit_cast<float>(lo_bits), b = std::bit_cast<float>(lo_bits | 0xFFFFu);
        const float lo = sign ? b : a, hi = sign ? a : b;
        const uint8_t first = rank_of(t.midpoints, lo);
        t.start[size_t(sign * kBuckets + e * 128 + m)] = first;
        t.steps = std::max(t.steps, int(rank_of(t.midpoints, hi)) - int(first));
      }
  return t;
}

const DynamicType& type(bool is_signed) {
  static const DynamicType s = build(true), u = build(false);
  return is_signed ? s : u;
}

// The number of midpoints <= x (the rank of the nearest table value); NaN gives code 0.
inline uint8_t nearest_code(const DynamicType& t, float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x), sign = u >> 31, e = (u >> 23) & 0xFFu;
  if (e < uint32_t(kExpLo)) return t.zero_code;
  if (e > 127) return (e == 255 && (u & 0x7FFFFFu)) || sign ? 0 : 255;
  unsigned code = t.start[size_t(sign * kBuckets + (e - kExpLo) * 128 + ((u >> 16) & 0x7Fu))];
  for (int k = 0; k < t.steps; ++k) code += t.midpoints[code] <= x ? 1u : 0u;
  return uint8_t(code);
}

}  // namespace

const std::array<float, 256>& dynamic_map(bool is_signed) { return type(is_signed).values; }

uint8_t dynamic_zero_code(bool is_signed) { return type(is_signed).zero_code; }

uint8_t dynamic_encode(float x, bool is_signed) {
  return nearest_code(type(is_signed), x);
}

int dynamic_bucket_steps(bool is_signed) { return type(is_signed).steps; }

float blockwise8_encode_block(const float* x, int64_t n, bool is_signed, uint8_t* codes) {
  if (n <= 0) return 0.0f;
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
  const DynamicType& t = type(is_signed);
  const float inv = 1.0f / absmax;
  if (std::isfinite(inv)) {
    for (int64_t i = 0; i < n; ++i) codes[i] = nearest_code(t, x[i] * inv);
  } else {  // a subnormal absmax: 1 / absmax overflows (and 0 * inf would be NaN)
    for (int64_t i = 0; i < n; ++i) codes[i] = nearest_code(t, x[i] / absmax);
  }
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
