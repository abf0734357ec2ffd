// INT4 training's quantizers (ops/lp_int4.h) and the int4 layer (autograd/lp_linear.h; Xi et al. 2023,
// arXiv 2306.11987): the Hadamard quantizer against the written-out INT4 rule and an explicit
// Hadamard matrix, its product preserved by the shared transform and its gain on outlier rows; the
// water-filling probabilities; bit splitting's error bound; the unbiasedness of bit splitting +
// leverage-score sampling in expectation (fixed seeds, a statistical bound from the measured
// spread); the layer composed from the ops; its backward's expectation equal to the straight-through
// gradient, and its weight gradient the central differences of the surrogate product.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/lp_linear.h"
#include "lowbit/core/error.h"
#include "lowbit/ops/lp_int4.h"
#include "lowbit/ops/lp_quant_math.h"
#include "lowbit/ops/ops.h"

using namespace lowbit;

namespace {

Tensor rnd(int64_t r, int64_t c, uint64_t seed, DType dt = DType::F32) { return Tensor::randn({r, c}, seed, 1.0, dt); }
Tensor mm(const Tensor& a, bool ta, const Tensor& b, bool tb) {
  Tensor c = Tensor::empty({ta ? a.size(1) : a.size(0), tb ? b.size(0) : b.size(1)}, a.dtype());
  ops::gemm(a, ta, b, tb, c);
  return c;
}
Tensor hq(const Tensor& x, int32_t block, uint64_t seed, bool back, ops::LpInt4Stats* st = nullptr) {
  Tensor y;
  ops::lp_int4_hq(x, block, seed, back, y, st);
  return y;
}
Tensor hq_row(const Tensor& x, int32_t block, uint64_t seed, bool back, ops::LpInt4Stats* st = nullptr) {
  Tensor y;
  ops::lp_int4_hq(x, block, seed, back, y, st, true);
  return y;
}
double rel_err(const Tensor& a, const Tensor& b) {
  const auto x = a.to_vector(), y = b.to_vector();
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) num += (x[i] - y[i]) * double(x[i] - y[i]), den += double(y[i]) * y[i];
  return std::sqrt(num / den);
}
// Element-wise running sums of a - b over draws (the unbiasedness checks); worst() is the largest
// |mean| in standard errors.
struct BiasStats {
  std::vector<double> s1, s2;
  int n = 0;
  void add(const Tensor& a, const Tensor& b) {
    const auto x = a.to_vector(), y = b.to_vector();
    s1.resize(x.size(), 0.0);
    s2.resize(x.size(), 0.0);
    for (size_t i = 0; i < x.size(); ++i) s1[i] += x[i] - y[i], s2[i] += double(x[i] - y[i]) * (x[i] - y[i]);
    ++n;
  }
  double worst() const {
    double w = 0;
    for (size_t i = 0; i < s1.size(); ++i) {
      const double mean = s1[i] / n, var = std::max(0.0, s2[i] / n - mean * mean);
      w = std::max(w, std::fabs(mean) / (std::sqrt(var / n) + 1e-7));
    }
    return w;
  }
};
void expect_same(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.shape(), b.shape()) << what;
  const auto x = a.to_vector(), y = b.to_vector();
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(x[i], y[i]) << what << " element " << i;
}

}  // namespace

// block 0: y = s clamp(rint(x / s), -7, 7) with s = amax / 7, written out; block 32: the same rule on
// x H, H the explicit matrix of lp::rht_apply (columns = transformed unit vectors), orthogonal; the
// tail columns (C % 32) untransformed; `back` is Q(x H) H^T.
TEST(LpInt4, HadamardQuantizerIsTheWrittenOutRule) {
  const int64_t R = 6, C = 72;  // 2 blocks of 32 and a tail of 8
  const Tensor x = rnd(R, C, 3);
  const auto xv = x.to_vector();
  ops::LpInt4Stats st;
  const auto y0 = hq(x, 0, 0, false, &st).to_vector();
  float amax = 0;
  for (float v : xv) amax = std::max(amax, std::fabs(v));
  EXPECT_EQ(st.amax, double(amax));
  const float s = amax / 7.0f;
  for (size_t i = 0; i < xv.size(); ++i) {
    ASSERT_EQ(y0[i], std::clamp(std::nearbyint(xv[i] / s), -7.0f, 7.0f) * s) << i;
    ASSERT_LE(std::fabs(y0[i] - xv[i]), 0.5f * s * (1 + 1e-6f)) << i;
  }
  // The explicit 32 x 32 transform of seed 9: row k of M = the transform of unit vector e_k.
  const uint64_t seed = 9;
  std::vector<double> M(32 * 32);
  for (int k = 0; k < 32; ++k) {
    std::vector<float> e(32, 0.0f);
    e[size_t(k)] = 1.0f;
    ops::lp::rht_apply(e.data(), 1, 32, seed, false);
    for (int j = 0; j < 32; ++j) M[size_t(k * 32 + j)] = e[size_t(j)];
  }
  for (int a = 0; a < 32; ++a)
    for (int b = 0; b < 32; ++b) {
      double d = 0;
      for (int j = 0; j < 32; ++j) d += M[size_t(a * 32 + j)] * M[size_t(b * 32 + j)];
      ASSERT_NEAR(d, a == b ? 1.0 : 0.0, 1e-6) << a << "," << b;
    }
  std::vector<double> v(xv.size());  // x H in f64
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      if (c >= 64) {
        v[size_t(r * C + c)] = xv[size_t(r * C + c)];
        continue;
      }
      const int64_t b0 = c / 32 * 32;
      double acc = 0;
      for (int k = 0; k < 32; ++k) acc += double(xv[size_t(r * C + b0 + k)]) * M[size_t(k * 32 + (c - b0))];
      v[size_t(r * C + c)] = acc;
    }
  const auto y = hq(x, 32, seed, false, &st).to_vector();
  double vmax = 0;
  for (double a : v) vmax = std::max(vmax, std::fabs(a));
  EXPECT_NEAR(st.amax, vmax, 1e-5 * vmax);
  const double sh = st.scale;
  for (size_t i = 0; i < v.size(); ++i) {
    const double q = double(y[i]) / sh;
    ASSERT_NEAR(q, std::nearbyint(q), 1e-4) << i;  // on the grid
    ASSERT_LE(std::fabs(q), 7.0) << i;
    ASSERT_LE(std::fabs(double(y[i]) - v[i]), 0.5 * sh * (1 + 1e-4)) << i;  // nearest grid value (up to f32)
  }
  // back: Q(x H) H^T, in x's basis; the tail is the plain quantized value
  const auto yb = hq(x, 32, seed, true).to_vector();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      double want = y[size_t(r * C + c)];
      if (c < 64) {
        const int64_t b0 = c / 32 * 32;
        want = 0;
        for (int k = 0; k < 32; ++k) want += double(y[size_t(r * C + b0 + k)]) * M[size_t((c - b0) * 32 + k)];
      }
      ASSERT_NEAR(yb[size_t(r * C + c)], want, 1e-5) << r << "," << c;
    }
}

// One seed on both operands: Q(x H) Q(W H)^T = Q(x H) H^T (Q(W H) H^T)^T = x_eff W_eff^T (H orthogonal);
// on activations with outlier channels, HQ's product is much nearer x W^T than plain INT4's.
TEST(LpInt4, SharedTransformKeepsTheProductAndTamesOutliers) {
  Tensor x = rnd(64, 128, 5);
  const Tensor w = rnd(48, 128, 6);
  float* xp = x.data<float>();
  for (int64_t t = 0; t < 64; ++t) xp[t * 128 + 7] *= 30.0f, xp[t * 128 + 77] *= 20.0f;  // outlier channels
  const Tensor ref = mm(x, false, w, true);
  const Tensor yh = mm(hq(x, 32, 11, false), false, hq(w, 32, 11, false), true);
  const Tensor ye = mm(hq(x, 32, 11, true), false, hq(w, 32, 11, true), true);
  EXPECT_LT(rel_err(yh, ye), 1e-5);
  const Tensor yp = mm(hq(x, 0, 0, false), false, hq(w, 0, 0, false), true);
  const double eh = rel_err(yh, ref), ep = rel_err(yp, ref);
  std::printf("relative L2 error of the product: HQ (block 32) %.4f, plain INT4 %.4f\n", eh, ep);
  EXPECT_LT(eh, 0.8 * ep);  // measured 0.218 against 0.330 (one absmax scale per tensor either way)
}

TEST(LpInt4, LeverageProbabilitiesFillTheBudget) {
  const std::vector<double> s = {100, 0, 1, 2, 3, 0, 50, 1, 1, 4};
  std::vector<double> p(s.size());
  ops::lp_lss_probabilities(s.data(), int64_t(s.size()), 4.0, p.data());
  EXPECT_NEAR(std::accumulate(p.begin(), p.end(), 0.0), 4.0, 1e-12);
  EXPECT_EQ(p[0], 1.0);  // the large scores saturate
  EXPECT_EQ(p[6], 1.0);
  EXPECT_EQ(p[1], 0.0);
  EXPECT_EQ(p[5], 0.0);
  const double c = p[2] / s[2];  // the rest proportional to the score, below 1
  for (size_t i : {3u, 4u, 7u, 8u, 9u}) EXPECT_NEAR(p[i], c * s[i], 1e-12) << i;
  EXPECT_NEAR(c, 2.0 / 12.0, 1e-12);
  // at most `budget` nonzero scores: every one kept for certain
  ops::lp_lss_probabilities(s.data(), int64_t(s.size()), 8.0, p.data());
  for (size_t i = 0; i < s.size(); ++i) EXPECT_EQ(p[i], s[i] > 0 ? 1.0 : 0.0) << i;
}

// Bit splitting alone: hi on the coarse grid s_hi = amax / 7, y = hi + lo within s_lo = s_hi / 14 of g.
TEST(LpInt4, BitSplittingIsWithinTheFineStep) {
  const Tensor g = rnd(40, 24, 8);
  Tensor hi, lo, y;
  ops::LpSplitStats st;
  ops::lp_int4_bitsplit(g, 3, hi, lo, &st);
  ops::LpLssStats ls;
  ops::lp_int4_lss(hi, lo, Tensor(), false, 4, y, &ls);
  const auto gv = g.to_vector(), yv = y.to_vector(), hv = hi.to_vector(), lv = lo.to_vector();
  float amax = 0;
  for (float v : gv) amax = std::max(amax, std::fabs(v));
  EXPECT_FLOAT_EQ(float(st.scale_hi), amax / 7.0f);
  EXPECT_FLOAT_EQ(float(st.scale_lo), amax / 98.0f);
  for (size_t i = 0; i < gv.size(); ++i) {
    ASSERT_LE(std::fabs(yv[i] - gv[i]), float(st.scale_lo) * 1.0001f) << i;
    ASSERT_EQ(yv[i], hv[i] + lv[i]) << i;  // sample = false: every row, unscaled
    const float qh = hv[i] / float(st.scale_hi), ql = lv[i] / float(st.scale_lo);
    ASSERT_EQ(qh, std::nearbyint(qh)) << i;  // both halves on their INT4 grids
    ASSERT_EQ(ql, std::nearbyint(ql)) << i;
    ASSERT_LE(std::fabs(qh), 7.0f) << i;
    ASSERT_LE(std::fabs(ql), 7.0f) << i;
    ASSERT_LE(std::fabs(gv[i] - hv[i]), 0.5f * float(st.scale_hi) * 1.0001f) << i;  // hi: round to nearest
  }
  EXPECT_EQ(ls.kept, ls.nonzero);
}

// Unbiased in expectation: the mean of the estimate over 3000 seeds is g (every element within 5
// standard errors, the error measured from the draws) and the mean of y^T x is g^T x, for gradients
// with the structural sparsity the paper exploits (a few large token rows); the sampling keeps T of
// the 2T stacked rows on average.
TEST(LpInt4, BitSplitLssIsUnbiased) {
  const int64_t T = 32, N = 12, K = 10, n_seeds = 3000;
  Tensor g = rnd(T, N, 21);
  float* gp = g.data<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < N; ++c) gp[t * N + c] *= t % 8 == 0 ? 4.0f : 0.1f;  // a few large rows
  const Tensor x = rnd(T, K, 22);
  const auto gv = g.to_vector();
  const Tensor ref = mm(g, true, x, false);
  const auto rv = ref.to_vector();
  for (bool partner : {false, true}) {
    std::vector<double> sum(size_t(T * N), 0), sq(size_t(T * N), 0), dsum(size_t(N * K), 0), dsq(size_t(N * K), 0);
    double kept = 0;
    for (int64_t s = 0; s < n_seeds; ++s) {
      Tensor hi, lo, y;
      ops::LpLssStats st;
      ops::lp_int4_bitsplit(g, uint64_t(1000 + s), hi, lo);
      ops::lp_int4_lss(hi, lo, partner ? x : Tensor(), true, uint64_t(5000 + s), y, &st);
      kept += double(st.kept);
      const auto yv = y.to_vector();
      for (size_t i = 0; i < yv.size(); ++i) sum[i] += yv[i], sq[i] += double(yv[i]) * yv[i];
      const auto dv = mm(y, true, x, false).to_vector();
      for (size_t i = 0; i < dv.size(); ++i) dsum[i] += dv[i], dsq[i] += double(dv[i]) * dv[i];
    }
    const auto check = [&](const std::vector<double>& sm, const std::vector<double>& s2, const auto& want,
                           const char* what) {
      double worst = 0;
      for (size_t i = 0; i < sm.size(); ++i) {
        const double mean = sm[i] / n_seeds, var = std::max(0.0, s2[i] / n_seeds - mean * mean);
        const double se = std::sqrt(var / n_seeds) + 1e-7;
        worst = std::max(worst, std::fabs(mean - double(want[i])) / se);
      }
      std::printf("%s, %s: largest |mean - exact| = %.2f standard errors\n", partner ? "wgrad scores" : "dgrad scores",
                  what, worst);
      EXPECT_LT(worst, 5.0) << what;
    };
    check(sum, sq, gv, "dy estimate");
    check(dsum, dsq, rv, "dy^T x");
    EXPECT_NEAR(kept / n_seeds, double(T), 0.5) << "rows kept on average";
  }
}

TEST(LpInt4, BadArgumentsAreRefused) {
  const Tensor x = rnd(4, 8, 1);
  Tensor y;
  EXPECT_THROW(ops::lp_int4_hq(x, 3, 0, false, y), Error);
  EXPECT_THROW(ops::lp_int4_hq(x, 512, 0, false, y), Error);
  EXPECT_THROW(ops::lp_int4_hq(Tensor::randn({8}, 1, 1.0), 0, 0, false, y), Error);
  try {
    ops::lp_int4_lss(x, x, rnd(5, 3, 2), true, 0, y);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("lp_int4_lss: partner"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ops::lp_int4_lss(x, rnd(4, 7, 2), Tensor(), true, 0, y), Error);
  Tensor bad = x.clone();
  bad.data<float>()[3] = NAN;
  ops::lp_int4_hq(bad, 0, 0, false, y);
  EXPECT_TRUE(std::isnan(y.to_vector()[0]));
  Tensor hi, lo;
  ops::lp_int4_bitsplit(bad, 0, hi, lo);
  EXPECT_TRUE(std::isnan(hi.to_vector()[0]));
  EXPECT_TRUE(std::isnan(lo.to_vector()[0]));
}

namespace {
struct Grads {
  Tensor y, dx, dw;
};
Grads run(const LpRecipe& r, const Tensor& xv, const Tensor& wv, const Tensor& g, uint64_t seed) {
  Var x(xv.clone(), true), w(wv.clone(), true);
  Var y = lp_linear(x, w, r, nullptr, seed);
  Tensor out = y.value().clone();
  backward(y, g);
  return {out, x.grad(), w.grad()};
}
LpRecipe int4(bool full) {
  LpRecipe r;
  r.precision = LpPrecision::INT4;
  r.hadamard = r.stochastic_grads = full;
  return r;
}
}  // namespace

// The layer is the recipe's GEMMs on the ops' operands: y = Q(x H) Q(W H)^T, dx = BS+LSS(dy) W_eff,
// dW = BS+LSS(dy; x_eff)^T x_eff with the documented seeds; naive: plain INT4 of x, W and dy.
TEST(LpInt4, LayerIsTheRecipesGemms) {
  const Tensor xv = rnd(48, 64, 31), wv = rnd(24, 64, 32), g = rnd(48, 24, 33);
  const uint64_t seed = 0x5EED;
  using ops::lp::mix64;
  for (bool full : {true, false}) {
    const Grads got = run(int4(full), xv, wv, g, seed);
    const int32_t hb = full ? kInt4HadamardBlock : 0;
    const uint64_t hs = mix64(seed ^ 4);
    const std::string what = full ? "int4" : "int4 naive";
    expect_same(got.y, mm(hq(xv, hb, hs, false), false, hq(wv, hb, hs, false), true), what + " y");
    const Tensor xe = hq(xv, hb, hs, full), we = hq(wv, hb, hs, full);
    Tensor gd, gw;
    if (full) {
      Tensor hi, lo;
      ops::lp_int4_bitsplit(g, mix64(seed ^ 5), hi, lo);
      ops::lp_int4_lss(hi, lo, Tensor(), true, mix64(seed ^ 6), gd);
      ops::lp_int4_lss(hi, lo, xe, true, mix64(seed ^ 7), gw);
    } else {
      gd = gw = hq(g, 0, 0, false);
    }
    expect_same(got.dx, mm(gd, false, we, false), what + " dx");
    expect_same(got.dw, mm(gw, true, xe, false), what + " dW");
  }
  EXPECT_EQ(parse_lp_precision("int4"), LpPrecision::INT4);
  EXPECT_STREQ(lp_precision_name(LpPrecision::INT4), "int4");
}

// The backward's expectation is the straight-through gradient of the forward's surrogate
// y = x_eff W_eff^T: over 400 seeds (each with its own transform), the mean of dW - dy^T x_eff and of
// dx - dy W_eff is zero within 5 standard errors; and one call's estimate is within 0.75 of it (L2).
TEST(LpInt4, BackwardIsUnbiasedForTheStraightThroughGradient) {
  const Tensor xv = rnd(32, 64, 41), wv = rnd(16, 64, 42), g = rnd(32, 16, 43);
  const int n = 400;
  BiasStats dw, dx;
  double rel = 0;
  for (int k = 0; k < n; ++k) {
    const uint64_t seed = 500 + uint64_t(k), hs = ops::lp::mix64(seed ^ 4);
    const Grads got = run(int4(true), xv, wv, g, seed);
    const Tensor xe = hq(xv, kInt4HadamardBlock, hs, true), we = hq(wv, kInt4HadamardBlock, hs, true);
    const Tensor dw_ste = mm(g, true, xe, false), dx_ste = mm(g, false, we, false);
    rel += rel_err(got.dw, dw_ste) / n;
    dw.add(got.dw, dw_ste);
    dx.add(got.dx, dx_ste);
  }
  std::printf("dW: worst bias %.2f standard errors, mean relative L2 to the STE gradient %.4f; dx: %.2f\n",
              dw.worst(), rel, dx.worst());
  EXPECT_LT(dw.worst(), 5.0);
  EXPECT_LT(dx.worst(), 5.0);
  // One call: noise, not a different direction. Measured 0.48 here: Gaussian dy has no structural
  // sparsity, so the budget of T rows covers only ~93 % of each coarse row's probability and every
  // call drops a few whole token rows (reweighting the kept ones) — the sampling's price.
  EXPECT_LT(rel, 0.75);
}

// The weight gradient is the derivative of the surrogate product: with dy on the INT4 grid (so that
// the naive recipe's quantization of it is exact), f64 central differences of
// L(W') = sum(C * (x_eff W'^T)) at W' = W_eff equal the layer's f64 dW; the same for dx in x_eff.
TEST(LpInt4, WeightGradientIsTheSurrogatesDerivative) {
  const int64_t T = 12, in = 64, out = 6;  // two Hadamard blocks
  const Tensor xv = Tensor::randn({T, in}, 51, 1.0, DType::F64), wv = Tensor::randn({out, in}, 52, 0.2, DType::F64);
  std::vector<double> cv(size_t(T * out));
  std::mt19937 rng(4);
  for (auto& c : cv) c = double(int(rng() % 15) - 7) * 0.25;
  cv[0] = 7 * 0.25;  // the amax: s = 0.25, every value on the grid
  const Tensor C = Tensor::from_vector(std::vector<float>(cv.begin(), cv.end()), {T, out}).to(DType::F64);
  expect_same(hq(C, 0, 0, false), C, "dy on the INT4 grid");
  LpRecipe r = int4(false);
  r.hadamard = true;  // HQ forward, plain INT4 gradients (exact here)
  const Grads got = run(r, xv, wv, C, 7);
  const uint64_t hs = ops::lp::mix64(7 ^ 4);
  const auto xe = hq(xv, kInt4HadamardBlock, hs, true).to_vector(), we = hq(wv, kInt4HadamardBlock, hs, true).to_vector();
  const auto L = [&](const std::vector<double>& xa, const std::vector<double>& wa) {
    double acc = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < out; ++o) {
        double y = 0;
        for (int64_t i = 0; i < in; ++i) y += xa[size_t(t * in + i)] * wa[size_t(o * in + i)];
        acc += cv[size_t(t * out + o)] * y;
      }
    return acc;
  };
  std::vector<double> xa(xe.begin(), xe.end()), wa(we.begin(), we.end());
  const double h = 1e-6;
  for (size_t k = 0; k < wa.size(); ++k) {
    const double w0 = wa[k];
    wa[k] = w0 + h;
    const double lp = L(xa, wa);
    wa[k] = w0 - h;
    const double lm = L(xa, wa);
    wa[k] = w0;
    ASSERT_NEAR(got.dw.item(int64_t(k)), (lp - lm) / (2 * h), 1e-6) << "w " << k;
  }
  for (size_t k = 0; k < xa.size(); ++k) {
    const double x0 = xa[k];
    xa[k] = x0 + h;
    const double lp = L(xa, wa);
    xa[k] = x0 - h;
    const double lm = L(xa, wa);
    xa[k] = x0;
    ASSERT_NEAR(got.dx.item(int64_t(k)), (lp - lm) / (2 * h), 1e-6) << "x " << k;
  }
}

// ---- the ablations (--lp-int4-scale row, --lp-int4-grad bs / bs-lss-dgrad) -----------------------

// Per-row scales: y[r, c] = s_r clamp(rint(v[r, c] / s_r), -7, 7), s_r = amax(v row r) / 7, written out
// for block 0 (v = x) and block 32 (v = x with each row's two full groups transformed by lp::rht_apply,
// the tail of 8 left; `back` transforms the quantized groups back); an all-zero row gives zeros, and a
// row's result is that of the per-tensor quantizer on the row alone (a large row does not coarsen the
// others' grid).
TEST(LpInt4, PerRowScalesAreTheWrittenOutRule) {
  const int64_t R = 6, C = 72;
  Tensor x = rnd(R, C, 3);
  float* xp = x.data<float>();
  for (int64_t c = 0; c < C; ++c) xp[2 * C + c] *= 50.0f, xp[4 * C + c] = 0.0f;  // a large row, a zero row
  const uint64_t seed = 9;
  for (int32_t block : {0, 32}) {
    std::vector<float> v = x.to_vector();
    if (block)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < C / block; ++j) ops::lp::rht_apply(v.data() + r * C + j * block, 1, block, seed, false);
    ops::LpInt4Stats st;
    const auto y = hq_row(x, block, seed, false, &st).to_vector(), yb = hq_row(x, block, seed, true).to_vector();
    float amax = 0;
    std::vector<float> q(v.size());
    for (int64_t r = 0; r < R; ++r) {
      float m = 0;
      for (int64_t c = 0; c < C; ++c) m = std::max(m, std::fabs(v[size_t(r * C + c)]));
      amax = std::max(amax, m);
      const float s = m / 7.0f;
      for (int64_t c = 0; c < C; ++c) {
        const size_t i = size_t(r * C + c);
        q[i] = s > 0 ? std::clamp(std::nearbyint(v[i] / s), -7.0f, 7.0f) * s : 0.0f;
        ASSERT_EQ(y[i], q[i]) << "block " << block << " row " << r << " col " << c;
        if (r == 4) {
          ASSERT_EQ(y[i], 0.0f);
        }
      }
      // the row alone through the per-tensor quantizer
      Tensor xr = Tensor::empty({1, C}, DType::F32);
      std::copy(xp + r * C, xp + (r + 1) * C, xr.data<float>());
      const auto alone = hq(xr, block, seed, false).to_vector();
      for (int64_t c = 0; c < C; ++c) ASSERT_EQ(y[size_t(r * C + c)], alone[size_t(c)]) << "row " << r << " alone";
    }
    EXPECT_EQ(st.amax, double(amax));
    if (block)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < C / block; ++j) ops::lp::rht_apply(q.data() + r * C + j * block, 1, block, seed, true);
    for (size_t i = 0; i < q.size(); ++i) ASSERT_EQ(yb[i], q[i]) << "back, block " << block << " element " << i;
  }
}

// Per-row bit splitting: hi = s_t rint(g / s_t) with s_t = amax(g row t) / 7, lo on the row's fine grid
// s_t / 14 (|code| <= 7), |g - hi - lo| <= s_t / 14; a zero row gives zeros; E[hi + lo] = g (the mean
// over 2000 seeds within 5 standard errors of every element, the error floored at 1e-4 of the row's
// fine step for the elements SR leaves exact).
TEST(LpInt4, PerRowBitSplittingIsTheWrittenOutRule) {
  const int64_t T = 12, N = 20;
  Tensor g = rnd(T, N, 8);
  float* gp = g.data<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < N; ++c) gp[t * N + c] *= t == 5 ? 0.0f : 0.01f * float((t + 1) * (t + 1));
  const auto gv = g.to_vector();
  std::vector<float> s(size_t(T), 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < N; ++c) s[size_t(t)] = std::max(s[size_t(t)], std::fabs(gv[size_t(t * N + c)]));
    s[size_t(t)] /= 7.0f;
  }
  const int n = 2000;
  std::vector<double> sum(gv.size(), 0), sq(gv.size(), 0);
  for (int k = 0; k < n; ++k) {
    Tensor hi, lo;
    ops::LpSplitStats st;
    ops::lp_int4_bitsplit(g, uint64_t(300 + k), hi, lo, &st, true);
    const auto hv = hi.to_vector(), lv = lo.to_vector();
    if (k == 0) {
      EXPECT_FLOAT_EQ(float(st.scale_hi), *std::max_element(s.begin(), s.end()));
      for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < N; ++c) {
          const size_t i = size_t(t * N + c);
          const float sh = s[size_t(t)], sl = sh / 14.0f;
          if (t == 5) {
            ASSERT_EQ(hv[i], 0.0f);
            ASSERT_EQ(lv[i], 0.0f);
            continue;
          }
          ASSERT_EQ(hv[i], std::clamp(std::nearbyint(gv[i] / sh), -7.0f, 7.0f) * sh) << i;
          const float ql = lv[i] / sl;
          ASSERT_NEAR(ql, std::nearbyint(ql), 1e-4f) << i;
          ASSERT_LE(std::fabs(ql), 7.0f + 1e-4f) << i;
          ASSERT_LE(std::fabs(gv[i] - hv[i] - lv[i]), sl * 1.0001f) << i;
        }
    }
    for (size_t i = 0; i < gv.size(); ++i) {
      const double e = double(hv[i]) + lv[i];
      sum[i] += e, sq[i] += e * e;
    }
  }
  double worst = 0;
  for (size_t i = 0; i < gv.size(); ++i) {
    const double mean = sum[i] / n, var = std::max(0.0, sq[i] / n - mean * mean);
    // the floor: f32 rounding of hi + lo (an ulp of g, ~1e-5 of the row's fine step) where SR draws nothing
    worst = std::max(worst, std::fabs(mean - gv[i]) / (std::sqrt(var / n) + 1e-4 * s[i / size_t(N)] / 14.0f));
  }
  std::printf("per-row bit splitting: largest |mean - g| = %.2f standard errors\n", worst);
  EXPECT_LT(worst, 5.0);
}

namespace {
LpRecipe int4_ablation(LpRecipe::Int4Grad grad, bool row, bool full = true) {
  LpRecipe r = int4(full);
  r.int4_grad = grad;
  r.int4_row_scales = row;
  return r;
}
}  // namespace

// Each ablation's layer is its GEMMs on the ops' operands: bs reads hi + lo (no sampling) in both
// backward GEMMs, bs-lss-dgrad samples dgrad's estimate only; row scales the operands per row (x and
// dy per token, W per output channel), for the full and the naive recipe.
TEST(LpInt4, AblationLayersAreTheirGemms) {
  const Tensor xv = rnd(48, 64, 31), wv = rnd(24, 64, 32), g = rnd(48, 24, 33);
  const uint64_t seed = 0x5EED, hs = ops::lp::mix64(seed ^ 4);
  using G = LpRecipe::Int4Grad;
  using ops::lp::mix64;
  const struct {
    G grad;
    bool row, full;
    const char* name;
  } cases[] = {{G::Bs, false, true, "bs"},         {G::BsLssDgrad, false, true, "bs-lss-dgrad"},
               {G::BsLss, true, true, "row"},      {G::Bs, true, true, "bs row"},
               {G::BsLss, true, false, "naive row"}};
  for (const auto& c : cases) {
    const Grads got = run(int4_ablation(c.grad, c.row, c.full), xv, wv, g, seed);
    const int32_t hb = c.full ? kInt4HadamardBlock : 0;
    const auto q = [&](const Tensor& t, bool back) {
      Tensor y;
      ops::lp_int4_hq(t, hb, hs, back, y, nullptr, c.row);
      return y;
    };
    expect_same(got.y, mm(q(xv, false), false, q(wv, false), true), std::string(c.name) + " y");
    const Tensor xe = q(xv, c.full), we = q(wv, c.full);
    Tensor gd, gw;
    if (c.full) {
      Tensor hi, lo;
      ops::lp_int4_bitsplit(g, mix64(seed ^ 5), hi, lo, nullptr, c.row);
      ops::lp_int4_lss(hi, lo, Tensor(), c.grad != G::Bs, mix64(seed ^ 6), gd);
      ops::lp_int4_lss(hi, lo, xe, c.grad == G::BsLss, mix64(seed ^ 7), gw);
    } else {
      ops::lp_int4_hq(g, 0, 0, false, gd, nullptr, c.row);
      gw = gd;
    }
    expect_same(got.dx, mm(gd, false, we, false), std::string(c.name) + " dx");
    expect_same(got.dw, mm(gw, true, xe, false), std::string(c.name) + " dW");
  }
}

// The ablations stay unbiased for the straight-through gradient (as
// BackwardIsUnbiasedForTheStraightThroughGradient, 400 seeds, 5 standard errors); without sampling
// one call's dW is much closer to it than with (bit splitting's only noise is the fine half's SR):
// measured here 0.013 (bs), against 0.48 for bs-lss (per-row scales: 0.37).
TEST(LpInt4, AblationBackwardsAreUnbiased) {
  const Tensor xv = rnd(32, 64, 41), wv = rnd(16, 64, 42), g = rnd(32, 16, 43);
  const int n = 400;
  using G = LpRecipe::Int4Grad;
  for (const auto& [grad, row] : {std::pair{G::Bs, false}, std::pair{G::BsLssDgrad, false}, std::pair{G::BsLss, true}}) {
    BiasStats dw, dx;
    double rel_w = 0, rel_x = 0;
    for (int k = 0; k < n; ++k) {
      const uint64_t seed = 500 + uint64_t(k), hs = ops::lp::mix64(seed ^ 4);
      const Grads got = run(int4_ablation(grad, row), xv, wv, g, seed);
      Tensor xe, we;
      ops::lp_int4_hq(xv, kInt4HadamardBlock, hs, true, xe, nullptr, row);
      ops::lp_int4_hq(wv, kInt4HadamardBlock, hs, true, we, nullptr, row);
      const Tensor dw_ste = mm(g, true, xe, false), dx_ste = mm(g, false, we, false);
      rel_w += rel_err(got.dw, dw_ste) / n, rel_x += rel_err(got.dx, dx_ste) / n;
      dw.add(got.dw, dw_ste);
      dx.add(got.dx, dx_ste);
    }
    const char* name = grad == G::Bs ? "bs" : grad == G::BsLssDgrad ? "bs-lss-dgrad" : "bs-lss row";
    std::printf("%s: dW worst bias %.2f standard errors, relative L2 %.4f; dx %.2f, relative L2 %.4f\n", name,
                dw.worst(), rel_w, dx.worst(), rel_x);
    EXPECT_LT(dw.worst(), 5.0) << name;
    EXPECT_LT(dx.worst(), 5.0) << name;
    if (grad != G::BsLss) {
      EXPECT_LT(rel_w, 0.1) << name << ": dW reads every split row";
    }
    if (grad == G::Bs) {
      EXPECT_LT(rel_x, 0.1) << name << ": dx reads every split row";
    }
  }
}
