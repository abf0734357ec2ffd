// BitLinear b1.58 (autograd/bitlinear.h, ops/ternary.h): the quantizers against the paper's
// formulas written as plain f64 loops, and the straight-through backward against central
// differences of its surrogate y = (x + c_x) . (W + c_W)^T with the offsets held constant; the
// same for H-BitLinear (BitNet v2: online Hadamard transform, b-bit per-token activations, absmax
// or the papers' INT4 absmean).
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cstdint>
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

// ---- H-BitLinear (BitNet v2): online Hadamard transform, b-bit per-token activations ---------

namespace {
// The transform as an explicit n x n matrix K = diag(signs) (H_p / sqrt(p) (x) S), n = p * m,
// H_p the Sylvester Hadamard matrix (entry (a, a') = (-1)^popcount(a & a')), written out here
// independently of ops::hadamard_transform. Returned as [n_in, n_out] values.
std::vector<double> explicit_k(const std::vector<double>& signs, const std::vector<double>& S, int64_t m) {
  const int64_t n = int64_t(signs.size()), p = n / m;
  std::vector<double> K(size_t(n * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t a = i / m, b = i % m, a2 = j / m, c = j % m;
      const double h = (std::popcount(uint64_t(a & a2)) % 2 ? -1.0 : 1.0) / std::sqrt(double(p));
      K[size_t(i * n + j)] = signs[size_t(i)] * h * (m == 1 ? 1.0 : S[size_t(b * m + c)]);
    }
  return K;
}
// A 3 x 3 orthogonal matrix: two Givens rotations.
std::vector<double> givens3() {
  const double c1 = std::cos(0.7), s1 = std::sin(0.7), c2 = std::cos(-1.9), s2 = std::sin(-1.9);
  const double A[3][3] = {{c1, -s1, 0}, {s1, c1, 0}, {0, 0, 1}}, B[3][3] = {{1, 0, 0}, {0, c2, -s2}, {0, s2, c2}};
  std::vector<double> r(9, 0.0);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 3; ++k) r[size_t(i * 3 + j)] += A[i][k] * B[k][j];
  return r;
}
// Per-token symmetric absmax on the b-bit grid (BitNet's absmax quantizer at b bits).
std::vector<double> ref_act_bits(const std::vector<double>& x, int64_t M, int64_t C, int bits) {
  const double qmax = std::ldexp(1.0, bits - 1) - 1, qmin = -std::ldexp(1.0, bits - 1);
  std::vector<double> y(x.size());
  for (int64_t r = 0; r < M; ++r) {
    double amax = 0;
    for (int64_t c = 0; c < C; ++c) amax = std::max(amax, std::fabs(x[size_t(r * C + c)]));
    const double s = amax / qmax;
    for (int64_t c = 0; c < C; ++c)
      y[size_t(r * C + c)] = s > 0 ? std::min(qmax, std::max(qmin, std::nearbyint(x[size_t(r * C + c)] / s))) * s : 0.0;
  }
  return y;
}
// BitNet v2's (and a4.8's) INT4 absmean quantizer as the papers write it: per token
// beta = mean|x|, x~ = beta / sqrt(7) * RoundClip(sqrt(7) / (beta + eps) * x, -8, 7) (eps: beta
// clamped to >= 1e-5, as the kernels do).
std::vector<double> ref_act_absmean(const std::vector<double>& x, int64_t M, int64_t C) {
  std::vector<double> y(x.size());
  for (int64_t r = 0; r < M; ++r) {
    double beta = 0;
    for (int64_t c = 0; c < C; ++c) beta += std::fabs(x[size_t(r * C + c)]);
    beta = std::max(beta / double(C), 1e-5);
    for (int64_t c = 0; c < C; ++c) {
      const double q = std::min(7.0, std::max(-8.0, std::nearbyint(std::sqrt(7.0) / beta * x[size_t(r * C + c)])));
      y[size_t(r * C + c)] = q * beta / std::sqrt(7.0);
    }
  }
  return y;
}
std::vector<double> ref_act_q(const std::vector<double>& x, int64_t M, int64_t C, int bits, ops::ActScale scale) {
  return scale == ops::ActScale::AbsMean ? ref_act_absmean(x, M, C) : ref_act_bits(x, M, C, bits);
}
struct HCase {
  int64_t n, m;
};
Tensor tensor_of(const std::vector<double>& v, Shape s) { return Tensor::from_vector(v, s); }
}  // namespace

TEST(HBitLinear, AbsmeanQuantizerMatchesThePaperFormula) {
  const int64_t M = 6, C = 24;
  Tensor x = rnd({M, C}, 41, 1.5);
  for (int64_t c = 0; c < C; ++c) x.set_item(3 * C + c, 0.0);  // an all-zero token: beta clamps, codes 0
  x.set_item(1 * C + 4, 30.0);                                    // an outlier: clipped to 7 s
  Tensor y;
  ops::act_quant_int4_absmean(x, y);
  const auto ref = ref_act_absmean(values(x), M, C);
  for (int64_t i = 0; i < x.numel(); ++i) EXPECT_NEAR(y.item(i), ref[size_t(i)], 1e-12 * (1 + std::fabs(ref[size_t(i)]))) << i;
  for (int64_t r = 0; r < M; ++r) {
    double beta = 0;
    for (int64_t c = 0; c < C; ++c) beta += std::fabs(x.item(r * C + c));
    const double s = std::max(beta / double(C), 1e-5) / std::sqrt(7.0);
    for (int64_t c = 0; c < C; ++c) {  // codes are integers in [-8, 7]
      const double q = y.item(r * C + c) / s;
      EXPECT_NEAR(q, std::nearbyint(q), 1e-9);
      EXPECT_GE(q, -8.0 - 1e-9);
      EXPECT_LE(q, 7.0 + 1e-9);
    }
  }
  EXPECT_NEAR(y.item(1 * C + 4), 7.0 * [&] {
    double b = 0;
    for (int64_t c = 0; c < C; ++c) b += std::fabs(x.item(C + c));
    return b / double(C) / std::sqrt(7.0);
  }(), 1e-12);
  for (int64_t c = 0; c < C; ++c) EXPECT_EQ(y.item(3 * C + c), 0.0);
  // f32 agrees with the f64 formula to f32 rounding.
  Tensor y32;
  ops::act_quant_int4_absmean(x.to(DType::F32), y32);
  for (int64_t i = 0; i < x.numel(); ++i) EXPECT_NEAR(y32.item(i), ref[size_t(i)], 1e-5 * (1 + std::fabs(ref[size_t(i)])));
  EXPECT_STREQ(ops::act_scale_name(ops::parse_act_scale("absmean")), "absmean");
  EXPECT_STREQ(ops::act_scale_name(ops::parse_act_scale("absmax")), "absmax");
  // The autograd function is the op forward and the identity backward.
  Var xv(x, true);
  Var q = int4_absmean_fake_quant(xv);
  for (int64_t i = 0; i < x.numel(); ++i) EXPECT_EQ(q.value().item(i), y.item(i));
  backward(sum(mul(q, Var(rnd({M, C}, 42)))));
  const Tensor g = rnd({M, C}, 42);
  for (int64_t i = 0; i < x.numel(); ++i) EXPECT_EQ(xv.grad().item(i), g.item(i));
}

TEST(HBitLinear, ForwardIsTheWrittenOutFormula) {
  const int64_t M = 5, N = 7;
  for (HCase hc : {HCase{16, 1}, HCase{12, 3}})
    for (int bits : {4, 8, 0, -4}) {  // -4: 4 bits with the absmean scale
      const ops::ActScale scale = bits < 0 ? ops::ActScale::AbsMean : ops::ActScale::AbsMax;
      bits = std::abs(bits);
      const int64_t K = hc.n;
      std::vector<double> signs;
      for (int64_t i = 0; i < K; ++i) signs.push_back((i * 7 + 3) % 5 < 2 ? -1.0 : 1.0);
      const std::vector<double> S = hc.m == 3 ? givens3() : std::vector<double>{};
      const Tensor sg = tensor_of(signs, {K}), sm = hc.m == 3 ? tensor_of(S, {3, 3}) : Tensor();
      // An outlier channel, as the attention output / SwiGLU product have.
      Tensor x = rnd({M, K}, 21);
      for (int64_t r = 0; r < M; ++r) x.set_item(r * K + 2, 25.0 * x.item(r * K + 2));
      const Tensor w = rnd({N, K}, 22, 0.1);
      const Var y = h_bitlinear(Var(x), Var(w), sg, sm, bits, {}, scale);
      const auto Km = explicit_k(signs, S, hc.m);
      const auto xv = values(x);
      std::vector<double> xr(size_t(M * K), 0.0);
      for (int64_t r = 0; r < M; ++r)
        for (int64_t j = 0; j < K; ++j)
          for (int64_t i = 0; i < K; ++i) xr[size_t(r * K + j)] += xv[size_t(r * K + i)] * Km[size_t(i * K + j)];
      const auto xq = bits ? ref_act_q(xr, M, K, bits, scale) : xr;
      const auto wq = ref_ternary(values(w), false);
      for (int64_t r = 0; r < M; ++r)
        for (int64_t o = 0; o < N; ++o) {
          double s = 0;
          for (int64_t k = 0; k < K; ++k) s += xq[size_t(r * K + k)] * wq[size_t(o * K + k)];
          EXPECT_NEAR(y.value().item(r * N + o), s, 1e-12 * (1 + std::fabs(s)))
              << hc.n << " bits " << bits << " " << ops::act_scale_name(scale);
        }
      if (bits == 4) {  // at most 16 levels per token
        for (int64_t r = 0; r < M; ++r) {
          std::vector<double> lv(xq.begin() + r * K, xq.begin() + (r + 1) * K);
          std::sort(lv.begin(), lv.end());
          EXPECT_LE(std::unique(lv.begin(), lv.end()) - lv.begin(), 16);
        }
      }
    }
  // The Hadamard transform spreads the outlier: the 4-bit error of the rotated input is smaller
  // than that of the input itself (same bits, same quantizer).
  const int64_t K = 64;
  Tensor x = rnd({8, K}, 23);
  for (int64_t r = 0; r < 8; ++r) x.set_item(r * K + 5, 40.0 * x.item(r * K + 5));
  std::vector<double> signs(size_t(K), 1.0);
  const auto Km = explicit_k(signs, {}, 1);
  const auto xv = values(x);
  std::vector<double> xr(xv.size(), 0.0);
  for (int64_t r = 0; r < 8; ++r)
    for (int64_t j = 0; j < K; ++j)
      for (int64_t i = 0; i < K; ++i) xr[size_t(r * K + j)] += xv[size_t(r * K + i)] * Km[size_t(i * K + j)];
  auto err = [](const std::vector<double>& a, const std::vector<double>& b) {
    double e = 0;
    for (size_t i = 0; i < a.size(); ++i) e += (a[i] - b[i]) * (a[i] - b[i]);
    return e;
  };
  // (K is orthogonal: the error in the rotated basis is the error of the rotated-back input.)
  EXPECT_LT(err(ref_act_bits(xr, 8, K, 4), xr), 0.5 * err(ref_act_bits(xv, 8, K, 4), xv));
}

// The analytic gradient of h_bitlinear against central differences of its surrogate
// (x K + c_x) . (W + c_W)^T with K the explicit matrix and the offsets held at the base point.
TEST(HBitLinear, StraightThroughGradientMatchesTheSurrogate) {
  for (HCase hc : {HCase{8, 1}, HCase{12, 3}})
    for (int bits : {4, 8, -4}) {  // -4: 4 bits with the absmean scale
      const ops::ActScale scale = bits < 0 ? ops::ActScale::AbsMean : ops::ActScale::AbsMax;
      bits = std::abs(bits);
      const int64_t K = hc.n;
      std::vector<double> signs;
      for (int64_t i = 0; i < K; ++i) signs.push_back(i % 3 == 1 ? -1.0 : 1.0);
      const std::vector<double> S = hc.m == 3 ? givens3() : std::vector<double>{};
      const Tensor sg = tensor_of(signs, {K}), sm = hc.m == 3 ? tensor_of(S, {3, 3}) : Tensor();
      const auto Km = explicit_k(signs, S, hc.m);
      std::vector<double> kt(Km.size());  // K^T as a [out, in] weight: linear(x, K^T) = x K
      for (int64_t i = 0; i < K; ++i)
        for (int64_t j = 0; j < K; ++j) kt[size_t(j * K + i)] = Km[size_t(i * K + j)];
      const Tensor KT = tensor_of(kt, {K, K});
      const Tensor x0 = rnd({4, K}, 31), w0 = rnd({5, K}, 32, 0.2);
      Tensor xr;
      {
        NoGradGuard ng;
        xr = linear(Var(x0), Var(KT)).value().contiguous();
      }
      const auto xq = ref_act_q(values(xr), 4, K, bits, scale);
      const Tensor wq = bitlinear_effective_weight(w0, BitLinearOptions{});
      Tensor cx = xr.clone(), cw = w0.clone();
      for (int64_t i = 0; i < cx.numel(); ++i) cx.set_item(i, xq[size_t(i)] - xr.item(i));
      for (int64_t i = 0; i < cw.numel(); ++i) cw.set_item(i, wq.item(i) - w0.item(i));
      int calls = 0;
      grad_check(
          [&](const std::vector<Var>& v) {
            auto surrogate = [&] { return project(linear(add(linear(v[0], Var(KT)), Var(cx)), add(v[1], Var(cw)))); };
            if (calls++ == 0) {
              Var l = project(h_bitlinear(v[0], v[1], sg, sm, bits, {}, scale));
              NoGradGuard ng;
              const double s = surrogate().value().item();
              EXPECT_NEAR(l.value().item(), s, 1e-11 * (1 + std::fabs(s)));
              return l;
            }
            return surrogate();
          },
          {x0, w0});
    }
}

TEST(HBitLinear, RejectsBadInputs) {
  const Tensor x = rnd({2, 8}, 1), w = rnd({3, 8}, 2);
  EXPECT_THROW(h_bitlinear(Var(x), Var(w), Tensor(), Tensor(), 1), Error);
  EXPECT_THROW(h_bitlinear(Var(x), Var(w), Tensor(), Tensor(), 16), Error);
  EXPECT_THROW(h_bitlinear(Var(rnd({2, 12}, 1)), Var(rnd({3, 12}, 2)), Tensor(), Tensor(), 4), Error);  // 12: no S
  EXPECT_THROW(h_bitlinear(Var(rnd({2, 2, 8}, 1)), Var(w), Tensor(), Tensor(), 4), Error);
  // The absmean quantizer is 4-bit only; its op refuses what act_quant_int8 refuses.
  EXPECT_THROW(h_bitlinear(Var(x), Var(w), Tensor(), Tensor(), 8, {}, ops::ActScale::AbsMean), Error);
  Tensor out;
  EXPECT_THROW(ops::act_quant_int4_absmean(rnd({2, 3, 4}, 1), out), Error);
  EXPECT_THROW(ops::act_quant_int4_absmean(Tensor::zeros({2, 2}, DType::I32), out), Error);
  try {
    ops::parse_act_scale("absmin");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--act-quant: 'absmin' is not an activation quantizer"), std::string::npos)
        << e.what();
  }
}
