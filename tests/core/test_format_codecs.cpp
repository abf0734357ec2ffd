// The FP8 E5M2 codec and the stochastic E2M1 rounding of core/format_traits.h (issue 18: moved there
// from ops/lp_quant_math.h, unchanged): every code decodes as an IEEE half's top byte, and the
// codecs' outputs over a dense sweep of inputs (every 997th f32 bit pattern, every grid value, every
// midpoint between neighbours and the f32 values next to both) hash to the values the pre-move
// code gave — so the move changed no result, bit for bit. The rounding itself is checked against
// a grid reference in tests/ops/test_lp_quant.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "lowbit/core/format_traits.h"

namespace lowbit {
namespace {

struct Fnv {
  uint64_t h = 0xcbf29ce484222325ull;
  void add(uint32_t v) {
    for (int k = 0; k < 4; ++k) h = (h ^ ((v >> (8 * k)) & 0xffu)) * 0x100000001b3ull;
  }
};

// The inputs of the sweeps: every 997th f32 bit pattern, plus each grid value g of `grid` (sorted
// magnitudes), the midpoints between neighbours, their negatives and the f32 values next to each.
std::vector<float> sweep_inputs(const std::vector<float>& grid, bool stride) {
  std::vector<float> v;
  if (stride)
    for (uint64_t u = 0; u <= 0xffffffffull; u += 997) v.push_back(bits_f32(uint32_t(u)));
  std::vector<float> pts = grid;
  for (size_t i = 0; i + 1 < grid.size(); ++i) pts.push_back(0.5f * (grid[i] + grid[i + 1]));
  for (float p : pts)
    for (float s : {p, -p}) {
      v.push_back(s);
      v.push_back(std::nextafter(s, INFINITY));
      v.push_back(std::nextafter(s, -INFINITY));
    }
  return v;
}

TEST(FormatCodecs, E5m2DecodesAsTheTopByteOfAHalf) {
  for (int c = 0; c < 256; ++c) {
    const float v = e5m2_to_float(uint8_t(c)), h = fmt_f16_to_f32(uint16_t(c << 8));
    if (std::isnan(h)) {
      EXPECT_TRUE(std::isnan(v)) << c;
      EXPECT_EQ(std::signbit(v), std::signbit(h)) << c;
    } else {
      EXPECT_EQ(f32_bits(v), f32_bits(h)) << c;
    }
  }
}

TEST(FormatCodecs, E5m2AndStochasticE2m1UnchangedByTheMove) {
  Fnv dec;
  std::vector<float> grid;
  for (int c = 0; c < 256; ++c) {
    dec.add(f32_bits(e5m2_to_float(uint8_t(c))));
    if (c <= 0x7b) grid.push_back(e5m2_to_float(uint8_t(c)));  // the finite non-negative values
  }
  Fnv enc;
  int64_t n = 0;
  for (float x : sweep_inputs(grid, true)) enc.add(float_to_e5m2(x)), ++n;
  const std::vector<float> e2m1 = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  Fnv sto;
  const float us[] = {0.0f, 1e-7f, 0.2f, 0.25f, 0.4999999f, 0.5f, 0.75f, 0.9999999f};
  int64_t m = 0;
  for (uint64_t u = 0; u <= 0xffffffffull; u += 4099)
    for (float r : us) sto.add(float_to_e2m1_stochastic(bits_f32(uint32_t(u)), r)), ++m;
  for (float p : sweep_inputs(e2m1, false))
      for (float r : us) sto.add(float_to_e2m1_stochastic(p, r)), ++m;
  std::printf("decode %016llx encode %016llx (%lld) stochastic %016llx (%lld)\n", (unsigned long long)dec.h,
              (unsigned long long)enc.h, (long long)n, (unsigned long long)sto.h, (long long)m);
  EXPECT_EQ(dec.h, 0xa4c9f019470b0385ull);
  EXPECT_EQ(enc.h, 0x6b3932951bcac6c6ull);
  EXPECT_EQ(sto.h, 0x856a102e03519da4ull);
}

}  // namespace
}  // namespace lowbit
