// BitLinear b1.58 (autograd/bitlinear.h, ops/ternary.h): the quantizers against the paper's
// formulas written as plain f64 loops, and the straight-through backward against central
// differences of its surrogate y = (x + c_x) . (W + c_W)^T with the offsets held constant.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "grad_check.h"
#include "lowbit/autograd/bitlinear.h"
#include "lowbit/ops/ternary.h"

using namespace lowbit;
using lowbit::test::grad_check;
using lowbit::test::project;

namespace {
Tensor rnd(Shape s, uint64_t seed, double std = 1.0) { return Tensor::randn(s, seed, std, DType::F64); }

std::vector<double> values(const Tensor& t) {
  std::vector<double> v(size_t(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[size_t(i)] = t.item(i);
  return v;
}

// The paper's formulas, independently of the kernels.
double ref_gamma(const std::vector<double>& w, bool median) {
  std::vector<double> a;
  for (double x : w) a.push_back(std::fabs(x));
  double g = 0;
  if (median) {
    std::sort(a.begin(), a.end());
    g = a[(a.size() - 1) / 2];
  } else {
    for (double x : a) g += x;
    g /= double(a.size());
  }
  return std::max(g, 1e-5);
}
std::vector<double> ref_ternary(const std::vector<double>& w, bool median) {
  const double g = ref_gamma(w, median);
  std::vector<double> q;
  for (double x : w) q.push_back(std::min(1.0, std::max(-1.0, std::nearbyint(x / g))) * g);
  return q;
}
std::vector<double> ref_act(const std::vector<double>& x, int64_t M, int64_t C) {
  std::vector<double> y(x.size());
  for (int64_t r = 0; r < M; ++r) {
    double amax = 0;
    for (int64_t c = 0; c < C; ++c) amax = std::max(amax, std::fabs(x[size_t(r * C + c)]));
    const double s = 127.0 / std::max(amax, 1e-5);
    for (int64_t c = 0; c < C; ++c)
      y[size_t(r * C + c)] = std::min(127.0, std::max(-128.0, std::nearbyint(x[size_t(r * C + c)] * s))) / s;
  }
  return y;
}
}  // namespace

TEST(BitLinear, QuantizersMatchThePaperFormulas) {
  for (bool median : {false, true}) {
    const Tensor w = rnd({7, 13}, 3, 0.05);
    Tensor q;
    const double g = ops::ternary_fake_quant(w, median ? ops::TernaryScale::AbsMedian : ops::TernaryScale::AbsMean, q);
    EXPECT_DOUBLE_EQ(g, ref_gamma(values(w), median));
    const auto ref = ref_ternary(values(w), median);
    int zeros = 0;
    for (int64_t i = 0; i < w.numel(); ++i) {
      EXPECT_DOUBLE_EQ(q.item(i), ref[size_t(i)]) << i;
      const double c = q.item(i) / g;
      EXPECT_TRUE(c == -1.0 || c == 0.0 || c == 1.0) << c;  // ternary codes
      zeros += c == 0.0;
    }
    EXPECT_GT(zeros, 0);  // ~1/3 of Gaussian weights fall within gamma/2 of 0 for the mean scale
  }
  // An all-zero tensor: gamma clamps to 1e-5, every code is 0.
  Tensor z = Tensor::zeros({2, 3}, DType::F32), zq;
  EXPECT_FLOAT_EQ(float(ops::ternary_fake_quant(z, ops::TernaryScale::AbsMean, zq)), 1e-5f);
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(zq.item(i), 0.0);

  const Tensor x = rnd({5, 11}, 4, 2.0);
  Tensor xq;
  ops::act_quant_int8(x, xq);
  const auto ra = ref_act(values(x), 5, 11);
  for (int64_t i = 0; i < x.numel(); ++i) EXPECT_DOUBLE_EQ(xq.item(i), ra[size_t(i)]) << i;
  // f32 agrees with the f64 formula to f32 rounding.
  Tensor x32 = x.to(DType::F32), xq32;
  ops::act_quant_int8(x32, xq32);
  for (int64_t i = 0; i < x.numel(); ++i) EXPECT_NEAR(xq32.item(i), ra[size_t(i)], 1e-5 * (1 + std::fabs(ra[size_t(i)])));
}

TEST(BitLinear, ForwardIsTheProductOfQuantizedOperands) {
  const int64_t M = 4, K = 9, N = 6;
  const Tensor x = rnd({M, K}, 1), w = rnd({N, K}, 2, 0.1);
  for (bool acts : {true, false}) {
    BitLinearOptions o;
    o.quantize_activations = acts;
    const Var y = bitlinear(Var(x), Var(w), o);
    const auto wq = ref_ternary(values(w), false);
    const auto xq = acts ? ref_act(values(x), M, K) : values(x);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k) s += xq[size_t(m * K + k)] * wq[size_t(n * K + k)];
        EXPECT_NEAR(y.value().item(m * N + n), s, 1e-12);
      }
  }
  // quantize = false is the plain linear layer.
  BitLinearOptions off;
  off.quantize = false;
  const Var y = bitlinear(Var(x), Var(w), off), ref = linear(Var(x), Var(w));
  for (int64_t i = 0; i < y.numel(); ++i) EXPECT_DOUBLE_EQ(y.value().item(i), ref.value().item(i));
}

TEST(BitLinear, RejectsBadInputs) {
  EXPECT_THROW(bitlinear(Var(rnd({2, 3}, 1)), Var(rnd({4, 5}, 2))), Error);
  EXPECT_THROW(bitlinear(Var(rnd({2, 3}, 1)), Var(rnd({4, 3}, 2).to(DType::F32))), Error);
  BitLinearOptions o;
  o.lambda = 1.5;
  EXPECT_THROW(bitlinear(Var(rnd({2, 3}, 1)), Var(rnd({4, 3}, 2)), o), Error);
  Tensor out;
  EXPECT_THROW(ops::act_quant_int8(rnd({2, 3, 4}, 1), out), Error);
  EXPECT_THROW(ops::ternary_fake_quant(Tensor::zeros({2, 2}, DType::I32), ops::TernaryScale::AbsMean, out), Error);
  EXPECT_THROW(ops::parse_ternary_scale("max"), Error);
}

// The analytic gradient of bitlinear (first call of f) against central differences of the
// surrogate (x + c_x) . (W + c_W)^T, whose offsets are the quantization errors at the base point.
TEST(BitLinear, StraightThroughGradientMatchesTheSurrogate) {
  for (double lambda : {1.0, 0.4})
    for (bool median : {false, true})
      for (bool acts : {true, false}) {
        BitLinearOptions o;
        o.lambda = lambda;
        o.quantize_activations = acts;
        o.scale = median ? ops::TernaryScale::AbsMedian : ops::TernaryScale::AbsMean;
        const Tensor x0 = rnd({5, 8}, 11), w0 = rnd({6, 8}, 12, 0.2);
        const Tensor wq = bitlinear_effective_weight(w0, o);
        Tensor xq = x0.clone();
        if (acts) {
          ops::act_quant_int8(x0, xq);
          for (int64_t i = 0; i < xq.numel(); ++i) xq.set_item(i, x0.item(i) + lambda * (xq.item(i) - x0.item(i)));
        }
        Tensor cx = x0.clone(), cw = w0.clone();
        for (int64_t i = 0; i < cx.numel(); ++i) cx.set_item(i, xq.item(i) - x0.item(i));
        for (int64_t i = 0; i < cw.numel(); ++i) cw.set_item(i, wq.item(i) - w0.item(i));
        int calls = 0;
        double first = 0;
        grad_check(
            [&](const std::vector<Var>& v) {
              if (calls++ == 0) {
                Var l = project(bitlinear(v[0], v[1], o));
                // The op's value equals the surrogate's at the base point.
                NoGradGuard ng;
                first = project(linear(add(v[0], Var(cx)), add(v[1], Var(cw)))).value().item();
                EXPECT_NEAR(l.value().item(), first, 1e-12 * (1 + std::fabs(first)));
                return l;
              }
              return project(linear(add(v[0], Var(cx)), add(v[1], Var(cw))));
            },
            {x0, w0});
      }
}
