// fp4-dge's two pieces (ops/lp_quant.h, issue 18; Wang et al. 2025, arXiv 2501.17116):
//   the differentiable gradient estimator — lp::dge_derivative against the paper's formula written
//   out here from the E2M1 grid (not the op's interval search), its clipping, f64 central
//   differences of the smooth step lp::dge_smooth, and ops::lp_dge_scale as the backward of the
//   surrogate W~ = S f(W / S) (per-row scales held constant) by f64 finite differences;
//   outlier clamping and compensation — ops::lp_occ_split's thresholds against a brute-force sort,
//   clamped + residual = x element for element, the residual sparse (outliers only);
//   bad arguments refused naming the op and the value.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "lowbit/core/error.h"
#include "lowbit/ops/lp_quant.h"
#include "lowbit/ops/ops.h"

using namespace lowbit;
using ops::LpFormat;
using ops::LpQuantSpec;

namespace {

// The paper's derivative, written out: |v| in the E2M1 interval [lo, hi] (the grid below; |v| >= 6
// closes [4, 6]), u = 2 (|v| - lo) / (hi - lo) - 1, f' = (1/k) |u|^(1/k - 1), at most clip.
double dge_formula(double v, double k, double clip) {
  const double g[] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  const double a = std::min(std::fabs(v), 6.0);
  int i = 0;
  while (i < 6 && a >= g[i + 1]) ++i;  // g[i] <= a < g[i + 1]; a = 6: i = 6 -> [4, 6]
  const double lo = g[i], hi = g[i + 1];
  const double u = std::fabs(2 * (a - lo) / (hi - lo) - 1);
  return std::min(std::pow(u, 1 / k - 1) / k, clip);
}

LpQuantSpec per_row_e2m1() {
  LpQuantSpec s;
  s.format = LpFormat::E2M1;
  s.tile_rows = 1;
  s.tile_cols = 1 << 30;
  return s;
}

}  // namespace

TEST(LpDge, DerivativeIsThePapersFormulaAndClips) {
  for (double k : {1.0, 2.0, 5.0, 10.0})
    for (double clip : {1.5, 3.0, 1000.0}) {
      int clipped = 0;
      for (int i = -1400; i <= 1400; ++i) {
        const float v = float(i) * 0.005f;  // -7 .. 7 (beyond 6: the last interval's end)
        const double want = dge_formula(double(v), k, clip);
        const double got = ops::lp::dge_derivative(v, float(k), float(clip));
        ASSERT_NEAR(got, want, 1e-5 * std::max(1.0, want)) << "v " << v << " k " << k << " clip " << clip;
        ASSERT_LE(got, clip) << v;
        clipped += got == float(clip);
      }
      if (k > 1) {
        EXPECT_GT(clipped, 0) << "k " << k << " clip " << clip;  // at least the midpoints
      }
    }
  // Landmarks: 1/k at every grid value (both ends of each interval), the clip at each midpoint
  // (u = 0: the derivative is infinite), 1 everywhere for k = 1 (the straight-through estimator).
  for (float gv : {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -3.0f}) EXPECT_FLOAT_EQ(ops::lp::dge_derivative(gv, 5, 3), 0.2f) << gv;
  for (float mid : {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, -5.0f}) EXPECT_EQ(ops::lp::dge_derivative(mid, 5, 3), 3.0f) << mid;
  for (float v : {0.1f, 0.25f, 2.7f, 5.0f, 6.0f}) EXPECT_EQ(ops::lp::dge_derivative(v, 1, 3), 1.0f) << v;
}

TEST(LpDge, DerivativeIsTheSmoothStepsSlope) {
  // f passes through the grid values and the interval midpoints (u = 0), is odd, and f' (unclipped)
  // is its f64 central difference away from the grid values and midpoints (where f' is not smooth).
  for (double k : {2.0, 5.0, 8.0}) {
    for (double gv : {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}) {
      EXPECT_NEAR(ops::lp::dge_smooth(gv, k), gv, 1e-12) << gv;
      EXPECT_NEAR(ops::lp::dge_smooth(-gv, k), -gv, 1e-12) << gv;
    }
    for (double mid : {0.25, 1.25, 2.5, 5.0}) EXPECT_NEAR(ops::lp::dge_smooth(mid, k), mid, 1e-12) << mid;
    int checked = 0;
    std::mt19937 rng(7);
    std::uniform_real_distribution<double> U(-5.99, 5.99);
    for (int n = 0; n < 2000; ++n) {
      const double v = U(rng);
      const double a = std::fabs(v);
      double lo = 0, hi = 0;
      for (double gv : {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0})
        if (gv <= a) lo = gv;
        else if (hi == 0) hi = gv;
      const double d = hi - lo, dist = std::min({a - lo, hi - a, std::fabs(a - lo - d / 2)});
      if (dist < 0.02 * d) continue;
      const double h = 1e-6;
      const double fd = (ops::lp::dge_smooth(v + h, k) - ops::lp::dge_smooth(v - h, k)) / (2 * h);
      const double got = ops::lp::dge_derivative(float(v), float(k), 1e30f);
      ASSERT_NEAR(got, fd, 1e-3 * std::max(1.0, fd)) << "v " << v << " k " << k;
      ++checked;
    }
    EXPECT_GT(checked, 1500);
  }
}

TEST(LpDge, ScaleOpIsTheSurrogatesBackward) {
  // L(W) = sum G * S_r f(W / S_r) with the per-row scale S_r = max |W_r| / 6 held at W's: its f64
  // gradient by central differences is G * f'(W / S_r) — what lp_dge_scale makes of G, clipped.
  const int64_t R = 6, C = 40;
  const Tensor w = Tensor::randn({R, C}, 3, 0.05, DType::F64), G = Tensor::randn({R, C}, 4, 1.0, DType::F64);
  const auto wv = w.to_vector(), gv = G.to_vector();
  std::vector<double> S(R, 0);
  for (int64_t r = 0; r < R; ++r) {
    float m = 0;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, std::fabs(float(wv[size_t(r * C + c)])));
    S[size_t(r)] = double(m / 6.0f);  // the op's f32 scale
  }
  const double k = 5;
  for (float clip : {1e6f, 3.0f}) {
    Tensor g = G.clone();
    ops::lp_dge_scale(w, per_row_e2m1(), float(k), clip, g);
    const auto out = g.to_vector();
    int checked = 0, clipped = 0;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const size_t i = size_t(r * C + c);
        const double s = S[size_t(r)], v = double(float(wv[i])) / s;
        // away from the grid values and midpoints (f' kinks / poles) by 2 % of the step
        const double a = std::fabs(v);
        const double d = a < 2 ? 0.5 : a < 4 ? 1 : 2, lo = a < 2 ? std::floor(a / 0.5) * 0.5 : a < 4 ? std::floor(a) : 4;
        const double t = (a - lo) / d;
        if (t < 0.02 || t > 0.98 || std::fabs(t - 0.5) < 0.005 || a >= 5.99) continue;
        const double h = 1e-7 * s;
        const double fd = gv[i] * s * (ops::lp::dge_smooth((double(float(wv[i])) + h) / s, k) -
                                       ops::lp::dge_smooth((double(float(wv[i])) - h) / s, k)) / (2 * h);
        const double slope = fd / gv[i];
        const double want = gv[i] * std::min(slope, double(clip));
        ASSERT_NEAR(out[i], want, 1e-3 * std::max(1.0, std::fabs(want))) << "row " << r << " col " << c << " v " << v;
        ++checked;
        clipped += slope > clip;
      }
    EXPECT_GT(checked, R * C / 2) << clip;
    if (clip < 10) {
      EXPECT_GT(clipped, 0);
    }
  }
}

TEST(LpOcc, ThresholdsAreTheQuantilesOfASort) {
  for (auto [R, C, seed] : {std::tuple{64, 48, 1}, std::tuple{7, 13, 2}, std::tuple{1, 1000, 3}})
    for (double alpha : {0.6, 0.9, 0.99, 0.999}) {
      const Tensor x = Tensor::randn({R, C}, uint64_t(seed), 1.0, DType::F32);
      Tensor xc, res;
      ops::LpOccStats st;
      ops::lp_occ_split(x, alpha, xc, res, &st);
      std::vector<float> v = x.to_vector();
      std::sort(v.begin(), v.end());
      const auto q = [&](double p) {  // linear interpolation between order statistics
        const double pos = p * double(v.size() - 1);
        const size_t i = size_t(std::floor(pos));
        return i + 1 < v.size() ? double(v[i]) + (pos - double(i)) * (double(v[i + 1]) - double(v[i])) : double(v[i]);
      };
      EXPECT_EQ(st.hi, double(float(q(alpha)))) << R << "x" << C << " alpha " << alpha;
      EXPECT_EQ(st.lo, double(float(q(1 - alpha)))) << R << "x" << C << " alpha " << alpha;
      int64_t above = 0;
      for (float a : v) above += a > float(st.hi) || a < float(st.lo);
      EXPECT_EQ(st.outliers, above);
    }
}

TEST(LpOcc, ClampedPlusResidualIsX) {
  // randn with planted outliers of every size (up to 1e6 x the thresholds): clamped stays within
  // the thresholds, the residual is zero but at the outliers, and clamped + residual is x exactly.
  const int64_t R = 128, C = 64;
  Tensor x = Tensor::randn({R, C}, 11, 1.0, DType::F32);
  float* p = x.data<float>();
  std::mt19937 rng(5);
  for (int i = 0; i < 40; ++i) p[rng() % (R * C)] *= float(std::pow(10.0, double(rng() % 7))) * (i % 2 ? 1 : -1);
  for (double alpha : {0.99, 0.999, 1.0}) {
    Tensor xc, res;
    ops::LpOccStats st;
    ops::lp_occ_split(x, alpha, xc, res, &st);
    const auto xv = x.to_vector(), cv = xc.to_vector(), rv = res.to_vector();
    int64_t nonzero = 0;
    for (size_t i = 0; i < xv.size(); ++i) {
      ASSERT_EQ(cv[i] + rv[i], xv[i]) << "element " << i << " alpha " << alpha;
      ASSERT_GE(cv[i], float(st.lo));
      ASSERT_LE(cv[i], float(st.hi));
      if (rv[i] != 0) {
        ++nonzero;
        ASSERT_TRUE(xv[i] > float(st.hi) || xv[i] < float(st.lo)) << i;
      } else {
        ASSERT_EQ(cv[i], xv[i]) << i;
      }
    }
    EXPECT_EQ(nonzero, st.outliers);
    // sparse: about 2 (1 - alpha) of the values
    EXPECT_LE(double(nonzero), 2 * (1 - alpha) * double(R * C) + 2) << alpha;
    if (alpha < 1) {
      EXPECT_GE(double(nonzero), 2 * (1 - alpha) * double(R * C) - 2) << alpha;
    }
  }
  // f64 too (gradient checks of the layer)
  Tensor xd = x.to(DType::F64), xc, res;
  ops::lp_occ_split(xd, 0.99, xc, res);
  const double *a = xd.data<double>(), *b = xc.data<double>(), *c = res.data<double>();
  for (int64_t i = 0; i < R * C; ++i) ASSERT_EQ(b[i] + c[i], a[i]) << i;
}

TEST(LpDge, BadArgumentsAreRefused) {
  const Tensor w = Tensor::randn({4, 16}, 1, 1.0, DType::F32);
  const auto err = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  Tensor g = w.clone();
  EXPECT_NE(err([&] { ops::lp_dge_scale(w, per_row_e2m1(), 0.5f, 3, g); }).find("k 0.5 must be finite and >= 1"), std::string::npos);
  EXPECT_NE(err([&] { ops::lp_dge_scale(w, per_row_e2m1(), 5, 0, g); }).find("clip 0 must be finite and > 0"), std::string::npos);
  LpQuantSpec e4;
  e4.format = LpFormat::E4M3;
  EXPECT_NE(err([&] { ops::lp_dge_scale(w, e4, 5, 3, g); }).find("lp_dge_scale: format e4m3"), std::string::npos);
  Tensor small = Tensor::zeros({4, 8}, DType::F32);
  EXPECT_NE(err([&] { ops::lp_dge_scale(w, per_row_e2m1(), 5, 3, small); }).find("lp_dge_scale"), std::string::npos);
  Tensor xc, res;
  EXPECT_NE(err([&] { ops::lp_occ_split(w, 0.5, xc, res); }).find("quantile 0.5 is outside (0.5, 1]"), std::string::npos);
  EXPECT_NE(err([&] { ops::lp_occ_split(w, 1.5, xc, res); }).find("quantile 1.5 is outside (0.5, 1]"), std::string::npos);
  EXPECT_NE(err([&] { ops::lp_occ_split(Tensor::zeros({2, 2, 2}), 0.9, xc, res); }).find("[rows, cols]"), std::string::npos);
}

TEST(LpOcc, CompensatedOperandIsCloserToX) {
  // Heavy-tailed activations (0.5 % of the values 30x larger): Q(clamp x) + r, per-token E2M1, is
  // nearer to x than Q(x) — the rows holding an outlier keep their resolution — and the error left
  // is the clamped part's quantization error alone.
  const int64_t R = 256, C = 128;
  Tensor x = Tensor::randn({R, C}, 21, 1.0, DType::F32);
  float* p = x.data<float>();
  std::mt19937 rng(9);
  for (int i = 0; i < R * C / 200; ++i) p[rng() % (R * C)] *= 30.0f;
  LpQuantSpec s = per_row_e2m1();
  const auto err = [&](const Tensor& a) {
    const auto u = a.to_vector(), v = x.to_vector();
    double num = 0, den = 0;
    for (size_t i = 0; i < u.size(); ++i) num += double(u[i] - v[i]) * (u[i] - v[i]), den += double(v[i]) * v[i];
    return std::sqrt(num / den);
  };
  Tensor direct, xc, res, qc;
  ops::lp_quantize(x, s, direct);
  for (double alpha : {0.99, 0.999}) {
    ops::lp_occ_split(x, alpha, xc, res);
    ops::lp_quantize(xc, s, qc);
    Tensor xe = qc.clone();
    ops::add(xe, res, xe);
    std::printf("alpha %.3f: relative L2 error of the operand %.4f (direct E2M1 %.4f)\n", alpha, err(xe), err(direct));
    EXPECT_LT(err(xe), 0.8 * err(direct)) << alpha;
  }
}
