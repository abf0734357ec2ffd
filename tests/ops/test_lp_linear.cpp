// autograd/lp_linear.h (issue 18): the low-precision linear layer's forward and straight-through
// backward are exactly the GEMMs of the recipe on the quantized operands (composed here from
// ops::lp_quantize and ops::gemm with the recipe's specs), f32 precision is `linear` (whose
// gradient the finite-difference checks of test_grad.cpp cover; checked here again in f64), the
// fp8 delayed scaling uses and records the amax history as intended, and the straight-through
// gradients stay close to the f32 gradients (the estimator's premise).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>
#include <string>

#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/lp_linear.h"
#include "lowbit/core/error.h"
#include "lowbit/ops/ops.h"

using namespace lowbit;

namespace {

Tensor rnd(int64_t r, int64_t c, uint64_t seed, DType dt = DType::F32) { return Tensor::randn({r, c}, seed, 1.0, dt); }
Tensor q(const Tensor& x, const ops::LpQuantSpec& s) {
  Tensor y;
  ops::lp_quantize(x, s, y);
  return y;
}
Tensor mm(const Tensor& a, bool ta, const Tensor& b, bool tb) {
  Tensor c = Tensor::empty({ta ? a.size(1) : a.size(0), tb ? b.size(0) : b.size(1)}, a.dtype());
  ops::gemm(a, ta, b, tb, c);
  return c;
}
void expect_same(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.shape(), b.shape()) << what;
  const auto x = a.to_vector(), y = b.to_vector();
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(x[i], y[i]) << what << " element " << i;
}
double rel_err(const Tensor& a, const Tensor& b) {
  const auto x = a.to_vector(), y = b.to_vector();
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) num += (x[i] - y[i]) * double(x[i] - y[i]), den += double(y[i]) * y[i];
  return std::sqrt(num / den);
}

struct Grads {
  Tensor y, dx, dw;
};
Grads run(const LpRecipe& r, const Tensor& xv, const Tensor& wv, const Tensor& g, uint64_t seed,
          std::shared_ptr<LpLinearState> st = nullptr) {
  Var x(xv.clone(), true), w(wv.clone(), true);
  Var y = lp_linear(x, w, r, st, seed);
  Tensor out = y.value().clone();
  backward(y, g);
  return {out, x.grad(), w.grad()};
}

}  // namespace

TEST(LpLinear, ParseNamesTheChoices) {
  EXPECT_EQ(parse_lp_precision("nvfp4"), LpPrecision::NVFP4);
  try {
    parse_lp_precision("fp6");
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("--precision"), std::string::npos) << m;
    EXPECT_NE(m.find("'fp6'"), std::string::npos) << m;
    EXPECT_NE(m.find("f32, bf16, fp8, mxfp4, nvfp4"), std::string::npos) << m;
  }
  LpRecipe r;
  r.amax_history = 0;
  EXPECT_THROW(check_lp_recipe(r), Error);
}

TEST(LpLinear, F32IsLinearWithItsGradient) {
  // f64 central differences of L = sum(c * y) for the f32 precision (plain linear).
  const Tensor xv = rnd(5, 7, 1, DType::F64), wv = rnd(3, 7, 2, DType::F64), c = rnd(5, 3, 3, DType::F64);
  const Grads g = run(LpRecipe{}, xv, wv, c, 0);
  auto loss = [&](const Tensor& x, const Tensor& w) {
    const Tensor y = mm(x, false, w, true);  // f64 throughout (to_vector would round to f32)
    double s = 0;
    for (int64_t i = 0; i < y.numel(); ++i) s += y.data<double>()[i] * c.data<double>()[i];
    return s;
  };
  const double h = 1e-6;
  for (int64_t i = 0; i < xv.numel(); ++i) {
    Tensor a = xv.clone(), b = xv.clone();
    a.data<double>()[i] += h, b.data<double>()[i] -= h;
    EXPECT_NEAR(g.dx.data<double>()[i], (loss(a, wv) - loss(b, wv)) / (2 * h), 1e-6);
  }
  for (int64_t i = 0; i < wv.numel(); ++i) {
    Tensor a = wv.clone(), b = wv.clone();
    a.data<double>()[i] += h, b.data<double>()[i] -= h;
    EXPECT_NEAR(g.dw.data<double>()[i], (loss(xv, a) - loss(xv, b)) / (2 * h), 1e-6);
  }
}

// The layer computes exactly the recipe's GEMMs: y = Q(x) Q(W)^T, dx = Q(dy) Q_d(W),
// dW = Q_w(dy)^T Q_w(x), each Q with its spec (tiles, rounding, Hadamard, seed), composed by hand.
TEST(LpLinear, ForwardAndBackwardAreTheRecipesGemms) {
  const Tensor xv = rnd(48, 40, 11), wv = rnd(24, 40, 12), g = rnd(48, 24, 13);
  const uint64_t seed = 0xABCDEF;
  for (LpPrecision p : {LpPrecision::BF16, LpPrecision::FP8, LpPrecision::MXFP4, LpPrecision::NVFP4})
    for (bool full : {true, false}) {
      LpRecipe r;
      r.precision = p;
      r.delayed_scaling = false;  // current scaling: no state
      r.weight_2d = r.hadamard = r.stochastic_grads = full;
      const std::string what = std::string(lp_precision_name(p)) + (full ? " full" : " naive");
      const Grads got = run(r, xv, wv, g, seed);
      const Tensor xq = q(xv, lp_operand_spec(r, LpOperand::FpropX, seed));
      const Tensor wq = q(wv, lp_operand_spec(r, LpOperand::FpropW, seed));
      expect_same(got.y, mm(xq, false, wq, true), what + " y");
      const Tensor gd = q(g, lp_operand_spec(r, LpOperand::DgradDy, seed));
      const bool fp4 = p == LpPrecision::MXFP4 || p == LpPrecision::NVFP4;
      const Tensor wd = fp4 ? q(wv, lp_operand_spec(r, LpOperand::DgradW, seed)) : wq;
      expect_same(got.dx, mm(gd, false, wd, false), what + " dx");
      const Tensor gw = fp4 ? q(g, lp_operand_spec(r, LpOperand::WgradDy, seed)) : gd;
      const Tensor xw = fp4 ? q(xv, lp_operand_spec(r, LpOperand::WgradX, seed)) : xq;
      expect_same(got.dw, mm(gw, true, xw, false), what + " dW");
      if (fp4 && full) {  // 2-D weight tiles: dgrad reads the forward's quantized weight
        expect_same(wd, wq, what + " one Q(W)");
        EXPECT_EQ(lp_operand_spec(r, LpOperand::WgradDy, seed).rht_seed, lp_operand_spec(r, LpOperand::WgradX, seed).rht_seed);
      }
    }
}

// fp4-dge (Wang et al. 2025): y = (Q(clamp x) + r) Q(W)^T with r = x - clamp x (the sparse
// high-precision compensation, added at the operand), dx = E5M2(dy) Q(W), dW = (E5M2(dy)^T x_eff) *
// f'(W / S) (the DGE), composed by hand from the ops; the naive recipe (k = 1, no clamping) is
// direct E2M1 casting with straight-through gradients.
TEST(LpLinear, Fp4DgeIsTheRecipesGemms) {
  Tensor xv = rnd(64, 40, 31);
  const Tensor wv = rnd(24, 40, 32), g = rnd(64, 24, 33);
  xv.data<float>()[7] = 40.0f, xv.data<float>()[100] = -25.0f;  // outliers
  const uint64_t seed = 77;
  for (bool full : {true, false}) {
    LpRecipe r;
    r.precision = LpPrecision::FP4_DGE;
    r.occ_quantile = 0.99;
    if (!full) r.dge_k = 1.0f, r.occ_quantile = 1.0;
    const std::string what = full ? "fp4-dge" : "fp4-dge naive";
    const Grads got = run(r, xv, wv, g, seed);
    const ops::LpQuantSpec sx = lp_operand_spec(r, LpOperand::FpropX, seed), sw = lp_operand_spec(r, LpOperand::FpropW, seed);
    EXPECT_EQ(sx.format, ops::LpFormat::E2M1);
    EXPECT_EQ(lp_operand_spec(r, LpOperand::DgradDy, seed).format, ops::LpFormat::E5M2);
    Tensor xe;
    if (full) {
      Tensor xc, res;
      ops::LpOccStats st;
      ops::lp_occ_split(xv, 0.99, xc, res, &st);
      EXPECT_GE(st.outliers, 2);
      xe = q(xc, sx);
      ops::add(xe, res, xe);
      // the outliers reach the product: x_eff's error there is the clamped part's quantization error
      const float e7 = std::fabs(q(xc, sx).to_vector()[7] - xc.to_vector()[7]);
      EXPECT_EQ(xc.to_vector()[7] + res.to_vector()[7], 40.0f);
      EXPECT_NEAR(xe.to_vector()[7], 40.0f, e7 + 1e-5f);
    } else {
      xe = q(xv, sx);
    }
    const Tensor wq = q(wv, sw);
    expect_same(got.y, mm(xe, false, wq, true), what + " y");
    const Tensor gd = q(g, lp_operand_spec(r, LpOperand::DgradDy, seed));
    expect_same(got.dx, mm(gd, false, wq, false), what + " dx");
    Tensor dw = mm(gd, true, xe, false);
    if (full) ops::lp_dge_scale(wv, sw, r.dge_k, r.dge_clip, dw);
    expect_same(got.dw, dw, what + " dW");
  }
}

// The layer's weight gradient is the exact gradient of its smooth surrogate: with no clamping and
// dy on the E5M2 grid (so that its quantization is exact), L(W) = sum C * (Q(x) . (S f(W / S))^T)
// — f the DGE's power function, S the per-row scales held at W's — has the f64 central differences
// dL/dW = (C^T Q(x)) * f'(W / S), which lp_linear's f64 backward gives (unclipped: clip 1000).
TEST(LpLinear, Fp4DgeWeightGradientIsTheSurrogatesDerivative) {
  const int64_t T = 16, in = 24, out = 8;
  const Tensor xv = Tensor::randn({T, in}, 41, 1.0, DType::F64), wv = Tensor::randn({out, in}, 42, 0.1, DType::F64);
  std::vector<double> cv(size_t(T * out));
  std::mt19937 rng(3);
  for (auto& c : cv) c = (1 + 0.25 * double(rng() % 4)) * std::ldexp(1.0, int(rng() % 5) - 2) * (rng() % 2 ? 1 : -1);
  cv[0] = 1.75 * 4;  // the amax: s = 2^-15 * 2^2, every value on the grid exactly
  const Tensor C = Tensor::from_vector(std::vector<float>(cv.begin(), cv.end()), {T, out}).to(DType::F64);
  LpRecipe r;
  r.precision = LpPrecision::FP4_DGE;
  r.occ_quantile = 1.0;
  r.dge_k = 5.0f;
  r.dge_clip = 1000.0f;
  expect_same(q(C, lp_operand_spec(r, LpOperand::DgradDy, 1)), C, "dy on the E5M2 grid");
  const Grads got = run(r, xv, wv, C, 1);
  const std::vector<float> xq = q(xv, lp_operand_spec(r, LpOperand::FpropX, 1)).to_vector();
  const std::vector<float> w = wv.to_vector();
  std::vector<double> S(static_cast<size_t>(out));
  for (int64_t o = 0; o < out; ++o) {
    float m = 0;
    for (int64_t i = 0; i < in; ++i) m = std::max(m, std::fabs(float(w[size_t(o * in + i)])));
    S[size_t(o)] = double(m / 6.0f);
  }
  // L as a function of one weight (o, i): the other terms are constant
  const auto term = [&](int64_t o, int64_t i, double wi) {
    const double s = S[size_t(o)], sur = s * ops::lp::dge_smooth(wi / s, 5.0);
    double acc = 0;
    for (int64_t t = 0; t < T; ++t) acc += cv[size_t(t * out + o)] * double(xq[size_t(t * in + i)]) * sur;
    return acc;
  };
  const std::vector<float> dw = got.dw.to_vector();
  int checked = 0;
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) {
      const double wi = double(float(w[size_t(o * in + i)])), s = S[size_t(o)], a = std::fabs(wi / s);
      const double d = a < 2 ? 0.5 : a < 4 ? 1 : 2, lo = a < 2 ? std::floor(a / 0.5) * 0.5 : a < 4 ? std::floor(a) : 4;
      const double t = (a - lo) / d;
      if (t < 0.03 || t > 0.97 || std::fabs(t - 0.5) < 0.03 || a >= 5.99) continue;  // kinks and poles of f'
      const double h = 1e-7 * s;
      const double fd = (term(o, i, wi + h) - term(o, i, wi - h)) / (2 * h);
      ASSERT_NEAR(dw[size_t(o * in + i)], fd, 1e-3 * std::max(1.0, std::fabs(fd))) << "w[" << o << "," << i << "] v " << wi / s;
      ++checked;
    }
  EXPECT_GT(checked, out * in / 2);
}

TEST(LpLinear, StraightThroughGradientsTrackTheF32Ones) {
  // Relative L2 distance of the low-precision results to the f32 ones: the quantization noise of
  // each format (measured: bf16 0.2 %, fp8 4-6 %, nvfp4 15-18 %, mxfp4 16-21 %), well below 1 (not a different
  // direction). Bounds with ~2x headroom.
  const Tensor xv = rnd(64, 64, 21), wv = rnd(32, 64, 22), g = rnd(64, 32, 23);
  const Grads ref = run(LpRecipe{}, xv, wv, g, 0);
  const std::pair<LpPrecision, double> cases[] = {
      {LpPrecision::BF16, 0.01}, {LpPrecision::FP8, 0.12}, {LpPrecision::MXFP4, 0.45}, {LpPrecision::NVFP4, 0.35}};
  for (const auto& [p, tol] : cases) {
    LpRecipe r;
    r.precision = p;
    const Grads got = run(r, xv, wv, g, 5, std::make_shared<LpLinearState>());
    std::printf("%-6s relative L2 distance to f32: y %.4f  dx %.4f  dW %.4f\n", lp_precision_name(p),
                rel_err(got.y, ref.y), rel_err(got.dx, ref.dx), rel_err(got.dw, ref.dw));
    EXPECT_LT(rel_err(got.y, ref.y), tol) << lp_precision_name(p) << " y";
    EXPECT_LT(rel_err(got.dx, ref.dx), tol) << lp_precision_name(p) << " dx";
    EXPECT_LT(rel_err(got.dw, ref.dw), tol) << lp_precision_name(p) << " dW";
  }
}

TEST(LpLinear, Fp8DelayedScalingUsesTheHistory) {
  LpRecipe r;
  r.precision = LpPrecision::FP8;
  r.amax_history = 2;
  auto st = std::make_shared<LpLinearState>();
  const Tensor wv = rnd(8, 16, 2), g = rnd(4, 8, 3);
  Tensor big = rnd(4, 16, 1);
  ops::scale(big, 10.0, big);
  const Tensor small = rnd(4, 16, 4);
  // call 1: empty history -> current scaling; records x, w and dy amaxes
  const Grads a = run(r, big, wv, g, 1, st);
  ASSERT_EQ(st->history[LpLinearState::X].size(), 1u);
  ASSERT_EQ(st->history[LpLinearState::DY].size(), 1u);
  ops::LpQuantStats sb;
  ops::LpQuantSpec cur;
  cur.format = ops::LpFormat::E4M3;
  Tensor tmp;
  ops::lp_quantize(big, cur, tmp, &sb);
  EXPECT_FLOAT_EQ(st->history[LpLinearState::X][0], float(sb.amax));
  // call 2 with small x: its scale is the history's (big's amax / 448), not its own
  const Grads b = run(r, small, wv, g, 2, st);
  ops::LpQuantSpec del = cur;
  del.tensor_scale = float(sb.amax) / 448.0f;
  const Tensor wq = q(wv, [&] {
    ops::LpQuantSpec s = cur;
    s.tensor_scale = st->history[LpLinearState::W][0] / 448.0f;
    return s;
  }());
  expect_same(b.y, mm(q(small, del), false, wq, true), "delayed x scale");
  EXPECT_EQ(st->history[LpLinearState::X].size(), 2u);
  // call 3 and 4: the history keeps 2 entries, the oldest (big) drops out
  run(r, small, wv, g, 3, st);
  EXPECT_EQ(st->history[LpLinearState::X].size(), 2u);
  EXPECT_LT(*std::max_element(st->history[LpLinearState::X].begin(), st->history[LpLinearState::X].end()), float(sb.amax));
  // validation (no graph) records nothing
  {
    NoGradGuard ng;
    Var x(small), w(wv, true);
    lp_linear(x, w, r, st, 0);
  }
  EXPECT_EQ(st->history[LpLinearState::X].size(), 2u);
  // current scaling: the state is left alone
  r.delayed_scaling = false;
  auto st2 = std::make_shared<LpLinearState>();
  run(r, small, wv, g, 5, st2);
  EXPECT_TRUE(st2->history[LpLinearState::X].empty());
  (void)a;
}

// Native FP8 GEMMs (LpRecipe::native_gemm; on the CPU through fp8_gemm's reference body): the same
// products as the emulated layer up to the order of summation, for both scaling rules (delayed:
// from the second step the one-pass encoder with amaxes recorded later; the histories end equal),
// and shapes that are not multiples of 16 stay emulated (bit for bit).
TEST(LpLinear, NativeFp8GemmsComputeTheEmulatedProducts) {
  const Tensor xv = rnd(48, 64, 21), wv = rnd(32, 64, 22), g = rnd(48, 32, 23);
  for (bool delayed : {false, true}) {
    LpRecipe emu, nat;
    emu.precision = nat.precision = LpPrecision::FP8;
    emu.delayed_scaling = nat.delayed_scaling = delayed;
    nat.native_gemm = true;
    auto se = std::make_shared<LpLinearState>(), sn = std::make_shared<LpLinearState>();
    for (int step = 0; step < 3; ++step) {  // the second and third steps use the recorded histories
      Tensor gs = Tensor::empty(g.shape(), DType::F32), xs = Tensor::empty(xv.shape(), DType::F32);
      ops::scale(g, 1.0 + step, gs);
      ops::scale(xv, 1.0 - 0.2 * step, xs);
      const Grads e = run(emu, xs, wv, gs, 7, se), n = run(nat, xs, wv, gs, 7, sn);
      const std::string what = std::string(delayed ? "delayed" : "current") + " step " + std::to_string(step);
      EXPECT_LT(rel_err(n.y, e.y), 1e-6) << what;
      EXPECT_LT(rel_err(n.dx, e.dx), 1e-6) << what;
      EXPECT_LT(rel_err(n.dw, e.dw), 1e-6) << what;
    }
    sn->settle();  // the native delayed path records its amaxes when read (record_later)
    for (int role = 0; role < 3; ++role) EXPECT_EQ(sn->history[role], se->history[role]) << role;
  }
  LpRecipe nat;
  nat.precision = LpPrecision::FP8;
  nat.delayed_scaling = false;
  nat.native_gemm = true;
  LpRecipe emu = nat;
  emu.native_gemm = false;
  const Tensor x2 = rnd(40, 24, 31), w2 = rnd(20, 24, 32), g2 = rnd(40, 20, 33);  // not multiples of 16
  const Grads a = run(nat, x2, w2, g2, 7), b = run(emu, x2, w2, g2, 7);
  expect_same(a.y, b.y, "ragged y");
  expect_same(a.dx, b.dx, "ragged dx");
  expect_same(a.dw, b.dw, "ragged dW");
}

// NaN in an operand: the native product is NaN, as the emulated one (alpha = NaN, whatever a GEMM
// body does with a zero alpha).
TEST(LpLinear, NativeFp8NanOperandGivesNan) {
  LpRecipe r;
  r.precision = LpPrecision::FP8;
  r.delayed_scaling = false;
  r.native_gemm = true;
  Tensor xv = rnd(16, 16, 41);
  xv.data<float>()[5] = std::nanf("");
  const Tensor y = lp_linear(Var(xv), Var(rnd(16, 16, 42)), r, nullptr, 1).value();
  for (float v : y.to_vector()) EXPECT_TRUE(std::isnan(v));
}
