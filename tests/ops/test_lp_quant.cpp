// The operand quantizer of low-precision training (ops/lp_quant.h, issue 18) and the codecs it adds
// to the format table (E5M2, stochastic E2M1): checked against grids written out here and brute-force
// nearest-value searches in f64 (not the codecs the op uses), the stochastic rounding's expectation
// with fixed seeds, the scale rules (per-tensor current / given, MX power-of-two, NVFP4 two-level),
// 2-D tiles, and the randomized Hadamard transform (orthogonal, its own inverse's partner, inner
// products of two operands preserved).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "lowbit/core/error.h"
#include "lowbit/core/format_traits.h"
#include "lowbit/ops/lp_fp8.h"
#include "lowbit/ops/lp_quant.h"
#include "lowbit/ops/ops.h"

using namespace lowbit;
using ops::LpFormat;
using ops::LpQuantSpec;
using ops::LpRounding;

namespace {

std::vector<double> e2m1_grid() { return {0, 0.5, 1, 1.5, 2, 3, 4, 6}; }
std::vector<double> e4m3_grid() {
  std::vector<double> g;
  for (int m = 0; m < 8; ++m) g.push_back(m * std::ldexp(1.0, -9));
  for (int e = 1; e < 16; ++e)
    for (int m = 0; m < 8; ++m) {
      if (e == 15 && m == 7) continue;  // NaN
      g.push_back((1 + m / 8.0) * std::ldexp(1.0, e - 7));
    }
  return g;  // 0 .. 448
}
std::vector<double> e5m2_grid() {
  std::vector<double> g;
  for (int m = 0; m < 4; ++m) g.push_back(m * std::ldexp(1.0, -16));
  for (int e = 1; e < 31; ++e)
    for (int m = 0; m < 4; ++m) g.push_back((1 + m / 4.0) * std::ldexp(1.0, e - 15));
  return g;  // 0 .. 57344
}
// Nearest grid value, ties to the even code, saturating at the last value.
double round_to_grid(double x, const std::vector<double>& g) {
  const double a = std::fabs(x);
  size_t best = 0;
  for (size_t i = 1; i < g.size(); ++i) {
    const double d = std::fabs(a - g[i]), db = std::fabs(a - g[best]);
    if (d < db || (d == db && i % 2 == 0)) best = i;
  }
  if (a >= g.back()) best = g.size() - 1;
  return x < 0 ? -g[best] : g[best];
}

Tensor rnd(int64_t r, int64_t c, uint64_t seed, double std = 1.0) { return Tensor::randn({r, c}, seed, std, DType::F32); }
Tensor quant(const Tensor& x, const LpQuantSpec& s, ops::LpQuantStats* st = nullptr) {
  Tensor y;
  ops::lp_quantize(x, s, y, st);
  return y;
}
LpQuantSpec spec(LpFormat f, int tr = 1, int tc = 16) {
  LpQuantSpec s;
  s.format = f;
  s.tile_rows = tr;
  s.tile_cols = tc;
  return s;
}

// The op's formulas in f64 with the grids above (scales in f32 as the op computes them).
Tensor reference(const Tensor& x, const LpQuantSpec& s) {
  const int64_t R = x.size(0), C = x.size(1);
  const std::vector<float> v = x.to_vector();
  std::vector<float> out(v.size());
  double amax = 0;
  for (float a : v) amax = std::max(amax, std::fabs(double(a)));
  if (s.format == LpFormat::E4M3 || s.format == LpFormat::E5M2) {
    const auto& g = s.format == LpFormat::E4M3 ? e4m3_grid() : e5m2_grid();
    const float sc = s.tensor_scale > 0 ? s.tensor_scale : float(amax) / float(g.back());
    for (size_t i = 0; i < v.size(); ++i) out[i] = float(round_to_grid(double(v[i] / sc), g) * sc);
    return Tensor::from_vector(out, x.shape());
  }
  const float gscale = float(amax) / (448.0f * 6.0f);
  for (int64_t r0 = 0; r0 < R; r0 += s.tile_rows)
    for (int64_t c0 = 0; c0 < C; c0 += s.tile_cols) {
      const int64_t r1 = std::min(R, r0 + int64_t(s.tile_rows)), c1 = std::min(C, c0 + int64_t(s.tile_cols));
      float bmax = 0;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) bmax = std::max(bmax, std::fabs(v[size_t(r * C + c)]));
      float S = 0;
      if (bmax > 0) {
        if (s.format == LpFormat::NVFP4) S = float(round_to_grid(double(bmax / 6.0f / gscale), e4m3_grid())) * gscale;
        else if (s.format == LpFormat::E2M1) S = bmax / 6.0f;
        else S = float(std::ldexp(1.0, int(std::floor(std::log2(double(bmax)))) - 2));
      }
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) {
          const size_t k = size_t(r * C + c);
          out[k] = S > 0 ? float(round_to_grid(double(v[k] / S), e2m1_grid()) * S) : 0.0f;
        }
    }
  return Tensor::from_vector(out, x.shape());
}

void expect_equal(const Tensor& a, const Tensor& b, const std::string& what) {
  const auto x = a.to_vector(), y = b.to_vector();
  ASSERT_EQ(x.size(), y.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < x.size() && bad < 5; ++i)
    if (x[i] != y[i]) ADD_FAILURE() << what << ": element " << i << " " << x[i] << " vs " << y[i], ++bad;
}

}  // namespace

TEST(LpCodecs, E5M2EveryCodeRoundTripsAndRoundsToNearestEven) {
  const auto g = e5m2_grid();
  for (int c = 0; c < 256; ++c) {
    const float v = e5m2_to_float(uint8_t(c));
    if (!std::isfinite(v)) continue;  // 0x7c.. inf / NaN
    EXPECT_EQ(float_to_e5m2(v), uint8_t(c)) << "code " << c;
    EXPECT_EQ(double(std::fabs(v)), g[size_t(c & 0x7f)]) << "code " << c;
  }
  // midpoints and their neighbours, saturation, inf and NaN
  for (size_t i = 0; i + 1 < g.size(); ++i)
    for (double t : {0.25, 0.5, 0.75}) {
      const double x = g[i] + t * (g[i + 1] - g[i]);
      EXPECT_EQ(double(e5m2_to_float(float_to_e5m2(float(x)))), round_to_grid(x, g)) << x;
      EXPECT_EQ(double(e5m2_to_float(float_to_e5m2(float(-x)))), -round_to_grid(x, g)) << -x;
    }
  EXPECT_EQ(e5m2_to_float(float_to_e5m2(60000.0f)), 57344.0f);
  EXPECT_EQ(e5m2_to_float(float_to_e5m2(INFINITY)), 57344.0f);
  EXPECT_EQ(e5m2_to_float(float_to_e5m2(-1e30f)), -57344.0f);
  EXPECT_EQ(std::fabs(e5m2_to_float(float_to_e5m2(NAN))), 57344.0f);
  EXPECT_TRUE(std::isinf(e5m2_to_float(0x7c)));
  EXPECT_TRUE(std::isnan(e5m2_to_float(0x7e)));
}

TEST(LpCodecs, StochasticE2M1IsUnbiasedAndExactOnTheGrid) {
  // On the grid: every draw gives the value itself.
  for (double v : e2m1_grid())
    for (float u : {0.0f, 0.3f, 0.999999f}) {
      EXPECT_EQ(double(e2m1_to_float(float_to_e2m1_stochastic(float(v), u))), v);
      EXPECT_EQ(double(e2m1_to_float(float_to_e2m1_stochastic(float(-v), u))), -v);
    }
  // Beyond 6: saturates.
  EXPECT_EQ(e2m1_to_float(float_to_e2m1_stochastic(7.5f, 0.9f)), 6.0f);
  // Between grid values: only the two neighbours, the mean is the value (fixed seed, 4 sigma).
  const int n = 200000;
  for (double x : {0.1, 0.7, 1.3, 2.2, 3.9, 4.5, 5.99, -0.35, -2.75}) {
    double sum = 0;
    const double lo = std::fabs(x) < 2 ? std::floor(std::fabs(x) * 2) / 2 : std::fabs(x) < 4 ? std::floor(std::fabs(x)) : 4;
    const double hi = std::fabs(x) < 2 ? lo + 0.5 : std::fabs(x) < 4 ? lo + 1 : 6;
    for (int i = 0; i < n; ++i) {
      const double q = e2m1_to_float(float_to_e2m1_stochastic(float(x), ops::lp::uniform(42, uint64_t(i))));
      ASSERT_TRUE(std::fabs(q) == lo || std::fabs(q) == hi) << x << " -> " << q;
      sum += q;
    }
    const double p = (std::fabs(x) - lo) / (hi - lo), sigma = (hi - lo) * std::sqrt(p * (1 - p) / n);
    EXPECT_NEAR(sum / n, x, 4 * sigma + 1e-9) << "stochastic rounding of " << x;
  }
}

TEST(LpCodecs, BranchFreeE2M1PathsEqualTheCodecs) {
  // lp::e2m1_round_nearest / e2m1_round_stochastic (the tile loops' fast paths) against
  // e2m1_to_float(float_to_e2m1(...)) and the stochastic codec: every midpoint and its float
  // neighbours, a dense sweep of [-8, 8], and a spread of draws.
  std::vector<float> xs;
  for (double a : e2m1_grid())
    for (double b : e2m1_grid())
      if (b > a) {
        const float m = float((a + b) / 2);
        for (float x : {m, std::nextafter(m, 0.0f), std::nextafter(m, 10.0f), float(a), float(b)}) xs.push_back(x), xs.push_back(-x);
      }
  for (int i = -80000; i <= 80000; ++i) xs.push_back(float(i) * 1e-4f);
  xs.push_back(1e30f), xs.push_back(-1e30f), xs.push_back(INFINITY), xs.push_back(0.0f);
  for (float x : xs) {
    ASSERT_EQ(ops::lp::e2m1_round_nearest(x), e2m1_to_float(float_to_e2m1(x))) << x;
    for (float u : {0.0f, 0.1f, 0.5f, 0.75f, 0.9999f}) ASSERT_EQ(ops::lp::e2m1_round_stochastic(x, u), e2m1_to_float(float_to_e2m1_stochastic(x, u))) << x << " u " << u;
  }
}

TEST(LpCodecs, UniformDrawsAreUniform) {
  // mean 1/2 and variance 1/12 over 1e5 counters (fixed seed), every draw in [0, 1)
  const int n = 100000;
  double s = 0, s2 = 0;
  for (int i = 0; i < n; ++i) {
    const double u = ops::lp::uniform(7, uint64_t(i));
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    s += u, s2 += u * u;
  }
  EXPECT_NEAR(s / n, 0.5, 4 * std::sqrt(1.0 / 12 / n));
  EXPECT_NEAR(s2 / n - (s / n) * (s / n), 1.0 / 12, 0.002);
}

// Each format against the f64 reference: tiles along rows, columns and 2-D, odd shapes (partial
// tiles), a spread of magnitudes so that some blocks use subnormal E4M3 scales.
TEST(LpQuantize, MatchesTheReferenceForEveryFormatAndTile) {
  Tensor x = rnd(37, 45, 3);
  {  // rows of very different magnitudes
    float* p = x.data<float>();
    for (int64_t r = 0; r < 37; ++r)
      for (int64_t c = 0; c < 45; ++c) p[r * 45 + c] *= float(std::ldexp(1.0, int(r % 9) * 3 - 12));
  }
  for (LpFormat f : {LpFormat::E4M3, LpFormat::E5M2}) expect_equal(quant(x, spec(f)), reference(x, spec(f)), ops::lp_format_name(f));
  for (LpFormat f : {LpFormat::NVFP4, LpFormat::MXFP4})
    for (auto [tr, tc] : {std::pair{1, 16}, std::pair{16, 1}, std::pair{16, 16}, std::pair{1, 32}, std::pair{32, 32}}) {
      const LpQuantSpec s = spec(f, tr, tc);
      expect_equal(quant(x, s), reference(x, s), std::string(ops::lp_format_name(f)) + " " + std::to_string(tr) + "x" + std::to_string(tc));
    }
  // e2m1 (fp4-dge): one f32 scale amax / 6 per tile, whole rows (per token / channel) and 16-blocks
  for (auto [tr, tc] : {std::pair{1, 1 << 30}, std::pair{1, 16}, std::pair{16, 1}}) {
    const LpQuantSpec s = spec(LpFormat::E2M1, tr, tc);
    expect_equal(quant(x, s), reference(x, s), "e2m1 " + std::to_string(tr) + "x" + std::to_string(tc));
  }
  // bf16: round to nearest even; none: the value.
  expect_equal(quant(x, spec(LpFormat::BF16)), x.to(DType::BF16).to(DType::F32), "bf16");
  expect_equal(quant(x, spec(LpFormat::None)), x, "none");
}

TEST(LpQuantize, RoundTripOfValuesOnTheGrid) {
  // E4M3 / E5M2 with the scale that maps the amax onto the largest value: grid values times s come back.
  for (LpFormat f : {LpFormat::E4M3, LpFormat::E5M2}) {
    const auto g = f == LpFormat::E4M3 ? e4m3_grid() : e5m2_grid();
    const double s = 0.03125;  // a power of two: g * s exact
    std::vector<float> v;
    for (double a : g) v.push_back(float(a * s)), v.push_back(float(-a * s));
    const Tensor x = Tensor::from_vector(v, {1, int64_t(v.size())});
    ops::LpQuantStats st;
    expect_equal(quant(x, spec(f), &st), x, ops::lp_format_name(f));
    EXPECT_EQ(st.amax, g.back() * s);
    EXPECT_EQ(st.tensor_scale, s);
  }
  // NVFP4 / MXFP4: blocks of E2M1 values times a scale s whose amax is 6 s. MX: s a power of two.
  // NV: s an E4M3 value, and the tensor amax 6 * 448 makes the tensor scale g = 1 exactly.
  for (LpFormat f : {LpFormat::NVFP4, LpFormat::MXFP4}) {
    std::vector<float> v;
    const double nv[4] = {448, 1, 0.5, 0.125 * 1.375};
    for (int b = 0; b < 4; ++b) {
      const double sc = f == LpFormat::NVFP4 ? nv[b] : std::ldexp(1.0, 2 * b - 3);
      for (double a : e2m1_grid()) v.push_back(float(a * sc)), v.push_back(float(-a * sc));
    }
    const Tensor x = Tensor::from_vector(v, {4, 16});
    expect_equal(quant(x, spec(f, 1, 16)), x, ops::lp_format_name(f));
  }
}

TEST(LpQuantize, ScaleRules) {
  // Current scaling: the amax maps onto 448. A given (delayed) scale smaller than amax / 448
  // saturates the values above 448 s; a larger one leaves them on a coarser grid.
  std::vector<float> v = {1.0f, -2.0f, 10.0f, 0.01f};
  const Tensor x = Tensor::from_vector(v, {1, 4});
  ops::LpQuantStats st;
  LpQuantSpec s = spec(LpFormat::E4M3);
  quant(x, s, &st);
  EXPECT_EQ(st.amax, 10.0);
  EXPECT_FLOAT_EQ(float(st.tensor_scale), 10.0f / 448.0f);
  s.tensor_scale = 4.0f / 448.0f;  // a history whose largest amax was 4: 10 saturates to 4
  std::vector<float> q = quant(x, s, &st).to_vector();
  EXPECT_FLOAT_EQ(q[2], 4.0f);
  EXPECT_FLOAT_EQ(q[1], -2.0f);
  EXPECT_EQ(st.tensor_scale, double(s.tensor_scale));
  s.tensor_scale = 1e5f / 448.0f;  // coarse: 0.01 / s falls below half the smallest subnormal (2^-10)
  q = quant(x, s).to_vector();
  EXPECT_EQ(q[3], 0.0f);
  // MX: the scale is a power of two, 2^(floor(log2 amax) - 2): amax 7 -> S 1, 7 saturates at 6.
  const Tensor m = Tensor::from_vector(std::vector<float>{7.0f, 1.2f, 0.0f, 0.3f}, {1, 4});
  q = quant(m, spec(LpFormat::MXFP4, 1, 4)).to_vector();
  EXPECT_EQ(q[0], 6.0f);
  EXPECT_EQ(q[1], 1.0f);
  EXPECT_EQ(q[3], 0.5f);  // 0.3 -> nearest of {0, 0.5}
  // With stochastic rounding the MX scale rounds up instead (2^ceil(log2(7/6)) = 2): nothing saturates.
  EXPECT_EQ(ops::lp::tile_scale(LpFormat::MXFP4, 7.0f, 0, true), 2.0f);
  EXPECT_EQ(ops::lp::tile_scale(LpFormat::MXFP4, 6.0f, 0, true), 1.0f);
  EXPECT_EQ(ops::lp::tile_scale(LpFormat::MXFP4, 7.0f, 0, false), 1.0f);
  // NVFP4: g = amax / 2688, the block scale an E4M3 value: the block holding the amax gets 448 g.
  ops::LpQuantStats sn;
  quant(m, spec(LpFormat::NVFP4, 1, 2), &sn);
  EXPECT_FLOAT_EQ(float(sn.tensor_scale), 7.0f / 2688.0f);
  EXPECT_EQ(ops::lp::tile_scale(LpFormat::NVFP4, 7.0f, float(sn.tensor_scale), false),
            e4m3_to_float(float_to_e4m3(7.0f / 6.0f / float(sn.tensor_scale))) * float(sn.tensor_scale));
  // All-zero tensors and tiles stay zero; NaN gives NaN.
  expect_equal(quant(Tensor::zeros({3, 16}), spec(LpFormat::NVFP4)), Tensor::zeros({3, 16}), "zeros");
  const Tensor bad = Tensor::from_vector(std::vector<float>{1.0f, NAN}, {1, 2});
  EXPECT_TRUE(std::isnan(quant(bad, spec(LpFormat::E4M3)).to_vector()[0]));
}

TEST(LpQuantize, StochasticRoundingIsUnbiased) {
  // A block of 16 whose amax is 6 (MX scale 1, exact) and 15 values of 0.7: the mean of the
  // stochastically rounded values is 0.7 (4 sigma), round to nearest gives 0.5 everywhere.
  const int64_t blocks = 4096;
  std::vector<float> v(size_t(blocks * 16), 0.7f);
  for (int64_t b = 0; b < blocks; ++b) v[size_t(b * 16)] = 6.0f;
  const Tensor x = Tensor::from_vector(v, {blocks, 16});
  LpQuantSpec s = spec(LpFormat::MXFP4, 1, 16);
  s.rounding = LpRounding::Stochastic;
  s.seed = 1234;
  const auto q = quant(x, s).to_vector();
  double sum = 0;
  int64_t n = 0;
  for (int64_t i = 0; i < int64_t(q.size()); ++i)
    if (i % 16 != 0) sum += q[size_t(i)], ++n;
  EXPECT_NEAR(sum / double(n), 0.7, 4 * 0.5 * std::sqrt(0.4 * 0.6 / double(n)));
  s.rounding = LpRounding::Nearest;
  EXPECT_EQ(quant(x, s).to_vector()[1], 0.5f);
  // NVFP4 on random values: over 300 seeds the mean of each element approaches it (the largest
  // deviation of the means stays within 5 sigma of the rounding noise, while round to nearest keeps
  // a fixed error). Elements above 6 S (a block scale that E4M3 rounded down) saturate: not counted.
  const Tensor r = rnd(16, 16, 9);
  LpQuantSpec sn = spec(LpFormat::NVFP4, 1, 16);
  sn.rounding = LpRounding::Stochastic;
  std::vector<double> mean(256, 0.0);
  const int seeds = 300;
  ops::LpQuantStats st;
  for (int k = 0; k < seeds; ++k) {
    sn.seed = uint64_t(k) + 1;
    const auto q2 = quant(r, sn, &st).to_vector();
    for (size_t i = 0; i < 256; ++i) mean[i] += q2[i] / seeds;
  }
  const auto rv = r.to_vector();
  const auto nearest = quant(r, spec(LpFormat::NVFP4, 1, 16)).to_vector();
  double worst = 0, rne_err = 0;  // in units of the block's decode scale S
  int counted = 0;
  for (size_t i = 0; i < 256; ++i) {
    float bmax = 0;
    for (size_t c = (i / 16) * 16; c < (i / 16) * 16 + 16; ++c) bmax = std::max(bmax, std::fabs(rv[c]));
    const double S = ops::lp::tile_scale(LpFormat::NVFP4, bmax, float(st.tensor_scale), true);
    if (std::fabs(rv[i]) > 6 * S) continue;
    ++counted;
    worst = std::max(worst, std::fabs(mean[i] - rv[i]) / S);
    rne_err = std::max(rne_err, std::fabs(double(nearest[i]) - rv[i]) / S);
  }
  EXPECT_GT(counted, 230);
  // the grid step is at most 2 S, so one draw's error has sigma <= S: 5 sigma of the mean of 300
  EXPECT_LT(worst, 5.0 / std::sqrt(double(seeds)));
  EXPECT_GT(rne_err, worst);
  sn.seed = 1;
  const auto a = quant(r, sn).to_vector();
  sn.seed = 2;
  EXPECT_NE(a, quant(r, sn).to_vector());
}

TEST(LpHadamard, OrthogonalAndInverse) {
  for (int n : {2, 4, 16, 32, 128}) {
    // The matrix of the transform, column by column, is orthogonal: M^T M = I.
    std::vector<float> M(size_t(n * n));
    for (int j = 0; j < n; ++j) {
      std::vector<float> e(size_t(n), 0.0f);
      e[size_t(j)] = 1;
      ops::lp::rht_apply(e.data(), 1, n, 99, false);
      for (int i = 0; i < n; ++i) M[size_t(i * n + j)] = e[size_t(i)];
    }
    double worst = 0;
    for (int a = 0; a < n; ++a)
      for (int b = 0; b < n; ++b) {
        double d = 0;
        for (int i = 0; i < n; ++i) d += double(M[size_t(i * n + a)]) * M[size_t(i * n + b)];
        worst = std::max(worst, std::fabs(d - (a == b ? 1.0 : 0.0)));
      }
    EXPECT_LT(worst, 1e-6) << "n " << n;
    // inverse(forward(x)) = x, with a stride
    std::vector<float> x(size_t(3 * n)), y;
    for (int i = 0; i < 3 * n; ++i) x[size_t(i)] = std::sin(0.37f * float(i)) * 3.0f;
    y = x;
    ops::lp::rht_apply(y.data() + 1, 3, n, 5, false);
    ops::lp::rht_apply(y.data() + 1, 3, n, 5, true);
    for (int i = 0; i < 3 * n; ++i) EXPECT_NEAR(y[size_t(i)], x[size_t(i)], 1e-5) << "n " << n << " i " << i;
  }
}

TEST(LpHadamard, WeightGradientProductIsPreserved) {
  // dW = dy^T x over the tokens: transforming both along the tokens with the same signs leaves the
  // product unchanged (format none isolates the transform); a last group shorter than 16 is kept.
  const Tensor dy = rnd(40, 12, 1), x = rnd(40, 9, 2);
  LpQuantSpec s = spec(LpFormat::None);
  s.rht_axis = 0;
  s.rht_size = 16;
  s.rht_seed = 77;
  const Tensor hd = quant(dy, s), hx = quant(x, s);
  Tensor want = Tensor::empty({12, 9}), got = Tensor::empty({12, 9});
  ops::gemm(dy, true, x, false, want);
  ops::gemm(hd, true, hx, false, got);
  const auto w = want.to_vector(), g = got.to_vector();
  for (size_t i = 0; i < w.size(); ++i) EXPECT_NEAR(g[i], w[i], 2e-5 * (1 + std::fabs(w[i])));
  // rows 32..39 (the partial group) are untouched; rows 0..31 are not
  const auto d = dy.to_vector(), h = hd.to_vector();
  for (size_t i = 32 * 12; i < d.size(); ++i) EXPECT_EQ(h[i], d[i]);
  EXPECT_NE(h[0], d[0]);
  // Along rows (axis 1) the same holds for x x^T.
  s.rht_axis = 1;
  s.rht_size = 4;
  const Tensor hr = quant(x, s);
  Tensor a = Tensor::empty({40, 40}), b = Tensor::empty({40, 40});
  ops::gemm(x, false, x, true, a);
  ops::gemm(hr, false, hr, true, b);
  const auto av = a.to_vector(), bv = b.to_vector();
  for (size_t i = 0; i < av.size(); ++i) EXPECT_NEAR(bv[i], av[i], 2e-5 * (1 + std::fabs(av[i])));
}

TEST(LpQuantize, BadArguments) {
  const Tensor x = rnd(4, 16, 1);
  LpQuantSpec s = spec(LpFormat::E4M3);
  s.rounding = LpRounding::Stochastic;
  EXPECT_THROW(quant(x, s), Error);  // stochastic rounding: E2M1 formats only
  s = spec(LpFormat::NVFP4, 0, 16);
  EXPECT_THROW(quant(x, s), Error);
  s = spec(LpFormat::NVFP4);
  s.rht_axis = 1;
  s.rht_size = 12;
  EXPECT_THROW(quant(x, s), Error);  // not a power of two
  s = spec(LpFormat::E4M3);
  s.tensor_scale = -1;
  EXPECT_THROW(quant(x, s), Error);
  EXPECT_THROW(quant(Tensor::zeros({2, 3, 4}), spec(LpFormat::E4M3)), Error);
}

// FP8 codes (native FP8 GEMMs): s * decode(code) is lp_quantize's value bit for bit, for both
// formats, current and delayed (saturating) scales, in both layouts; a re-encoding with the scale
// given and no stats gives the same codes; NaN gives NaN codes; the fp8_gemm reference body is the
// f32 product of the decoded values; bad arguments are refused.
TEST(LpQuantize, Fp8CodesAreTheQuantizedValues) {
  const Tensor x = Tensor::randn({37, 29}, 5, 3.0, DType::F32);
  for (ops::LpFormat f : {ops::LpFormat::E4M3, ops::LpFormat::E5M2})
    for (float given : {0.0f, 0.001f}) {
      ops::LpQuantSpec s;
      s.format = f;
      s.tensor_scale = given;
      Tensor y, c, ct, c2;
      ops::LpQuantStats sy, sc;
      ops::lp_quantize(x, s, y, &sy);
      ops::lp_quantize_fp8(x, s, c, &sc);
      ops::lp_quantize_fp8(x, s, ct, nullptr, true);
      EXPECT_EQ(sc.amax, sy.amax);
      EXPECT_EQ(sc.tensor_scale, sy.tensor_scale);
      ASSERT_EQ(c.shape(), (Shape{37, 29}));
      ASSERT_EQ(ct.shape(), (Shape{29, 37}));
      ops::LpQuantSpec again = s;
      again.tensor_scale = float(sc.tensor_scale);
      ops::lp_quantize_fp8(x, again, c2);
      const float* yp = y.data<float>();
      const uint8_t *cp = c.data<uint8_t>(), *tp = ct.data<uint8_t>(), *c2p = c2.data<uint8_t>();
      for (int64_t r = 0; r < 37; ++r)
        for (int64_t k = 0; k < 29; ++k) {
          const float v = ops::lp::fp8_value(f, cp[r * 29 + k]) * float(sc.tensor_scale);
          ASSERT_EQ(v, yp[r * 29 + k]) << ops::lp_format_name(f) << " " << r << "," << k;
          ASSERT_EQ(tp[k * 37 + r], cp[r * 29 + k]);
          ASSERT_EQ(c2p[r * 29 + k], cp[r * 29 + k]);
        }
    }
  Tensor xn = x.clone(), cn;
  xn.data<float>()[3] = std::nanf("");
  ops::LpQuantSpec s;
  s.format = ops::LpFormat::E4M3;
  ops::LpQuantStats st;
  ops::lp_quantize_fp8(xn, s, cn, &st);
  EXPECT_TRUE(std::isnan(st.amax));
  for (int64_t i = 0; i < cn.numel(); ++i) ASSERT_EQ(cn.data<uint8_t>()[i], 0x7f);
  // the reference GEMM: alpha * decode(a) decode(b)^T
  Tensor a, b;
  ops::LpQuantStats qa, qb;
  s.format = ops::LpFormat::E5M2;
  ops::lp_quantize_fp8(Tensor::randn({6, 32}, 1, 1.0, DType::F32), s, a, &qa);
  s.format = ops::LpFormat::E4M3;
  ops::lp_quantize_fp8(Tensor::randn({5, 32}, 2, 1.0, DType::F32), s, b, &qb);
  Tensor y = Tensor::empty({6, 5}, DType::F32);
  ops::fp8_gemm(a, ops::LpFormat::E5M2, b, ops::LpFormat::E4M3, 0.5f, y);
  for (int64_t i = 0; i < 6; ++i)
    for (int64_t j = 0; j < 5; ++j) {
      double ref = 0;
      for (int64_t k = 0; k < 32; ++k)
        ref += double(ops::lp::fp8_value(ops::LpFormat::E5M2, a.data<uint8_t>()[i * 32 + k])) *
               ops::lp::fp8_value(ops::LpFormat::E4M3, b.data<uint8_t>()[j * 32 + k]);
      EXPECT_NEAR(y.data<float>()[i * 5 + j], 0.5 * ref, 1e-5 * (1 + std::fabs(ref)));
    }
  auto err = [](auto fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  Tensor yy = Tensor::empty({6, 6}, DType::F32);
  EXPECT_NE(err([&] { ops::fp8_gemm(a, ops::LpFormat::E5M2, a, ops::LpFormat::E5M2, 1.0f, yy); }).find("e5m2 x e5m2"),
            std::string::npos);
  EXPECT_NE(err([&] { ops::fp8_gemm(a, ops::LpFormat::E4M3, b, ops::LpFormat::E4M3, 1.0f, yy); }).find("y has shape"),
            std::string::npos);
  EXPECT_NE(err([&] { ops::fp8_gemm(a, ops::LpFormat::NVFP4, b, ops::LpFormat::E4M3, 1.0f, y); }).find("not FP8"),
            std::string::npos);
  s.format = ops::LpFormat::NVFP4;
  Tensor cc;
  EXPECT_NE(err([&] { ops::lp_quantize_fp8(x, s, cc); }).find("has no FP8 codes"), std::string::npos);
}

// The one-pass encoder (native FP8 with delayed scaling): both layouts are lp_quantize_fp8's codes
// for the same scale, the amax is the tensor's, a NaN gives its own NaN code and a NaN amax, only
// the layouts asked for are written; bad arguments are refused.
TEST(LpQuantize, Fp8DualEncoderEqualsTheCodes) {
  const Tensor x = Tensor::randn({37, 29}, 9, 2.0, DType::F32);
  for (ops::LpFormat f : {ops::LpFormat::E4M3, ops::LpFormat::E5M2}) {
    ops::LpQuantSpec s;
    s.format = f;
    s.tensor_scale = 0.004f;
    Tensor ref, reft, c, ct;
    ops::LpQuantStats st;
    ops::lp_quantize_fp8(x, s, ref, &st);
    ops::lp_quantize_fp8(x, s, reft, nullptr, true);
    ops::LpAmax a;
    ops::lp_encode_fp8_dual(x, f, 0.004f, &c, &ct, &a);
    ASSERT_EQ(c.shape(), ref.shape());
    ASSERT_EQ(ct.shape(), reft.shape());
    for (int64_t i = 0; i < c.numel(); ++i) {
      ASSERT_EQ(c.data<uint8_t>()[i], ref.data<uint8_t>()[i]) << i;
      ASSERT_EQ(ct.data<uint8_t>()[i], reft.data<uint8_t>()[i]) << i;
    }
    EXPECT_TRUE(a.defined());
    EXPECT_EQ(a.get(), st.amax);
    Tensor only_t;
    ops::lp_encode_fp8_dual(x, f, 0.004f, nullptr, &only_t, nullptr);
    for (int64_t i = 0; i < only_t.numel(); ++i) ASSERT_EQ(only_t.data<uint8_t>()[i], reft.data<uint8_t>()[i]);
  }
  Tensor xn = x.clone(), cn;
  xn.data<float>()[40] = std::nanf("");
  ops::LpAmax an;
  ops::lp_encode_fp8_dual(xn, ops::LpFormat::E4M3, 0.004f, &cn, nullptr, &an);
  EXPECT_EQ(cn.data<uint8_t>()[40], 0x7f);
  EXPECT_TRUE(std::isnan(an.get()));
  auto err = [&](ops::LpFormat f, float scale, const Tensor& in) {
    try {
      Tensor c;
      ops::lp_encode_fp8_dual(in, f, scale, &c, nullptr, nullptr);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_NE(err(ops::LpFormat::NVFP4, 1.0f, x).find("is not FP8"), std::string::npos);
  EXPECT_NE(err(ops::LpFormat::E4M3, 0.0f, x).find("must be finite and > 0"), std::string::npos);
  EXPECT_NE(err(ops::LpFormat::E4M3, 1.0f, Tensor::zeros({4}, DType::F32)).find("f32 [rows, cols]"), std::string::npos);
  EXPECT_FALSE(ops::LpAmax().defined());
}
