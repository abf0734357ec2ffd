// ops::fp_fake_quant (FP8 E4M3 per token, MXFP4, NVFP4; issue 16) against its formulas, with the
// E4M3 and E2M1 grids written out here (not the codecs the op uses): nearest grid value, ties to
// the even code, saturating at the largest finite value.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "lowbit/core/error.h"
#include "lowbit/ops/fp_act_quant.h"

using namespace lowbit;

namespace {

// Non-negative grid values in code order (code i = value i; the sign is a separate bit).
std::vector<double> e2m1_grid() { return {0, 0.5, 1, 1.5, 2, 3, 4, 6}; }
std::vector<double> e4m3_grid() {
  std::vector<double> g;
  for (int m = 0; m < 8; ++m) g.push_back(m * std::ldexp(1.0, -9));  // subnormals m/8 * 2^-6
  for (int e = 1; e < 16; ++e)
    for (int m = 0; m < 8; ++m) {
      if (e == 15 && m == 7) continue;  // NaN
      g.push_back((1 + m / 8.0) * std::ldexp(1.0, e - 7));
    }
  return g;  // 127 values, 0 .. 448
}

double round_to_grid(double x, const std::vector<double>& g) {
  const double a = std::fabs(x);
  size_t best = 0;
  for (size_t i = 1; i < g.size(); ++i) {
    const double d = std::fabs(a - g[i]), db = std::fabs(a - g[best]);
    if (d < db || (d == db && i % 2 == 0)) best = i;  // tie: the even code
  }
  if (a >= g.back()) best = g.size() - 1;
  return x < 0 ? -g[best] : g[best];
}

// The formulas of ops/fp_act_quant.h, in f64 with the grids above (scales rounded to f32 as the op does).
std::vector<double> reference(const std::vector<float>& x, int64_t M, int64_t N, ops::FpActFormat f, double clip) {
  const auto e2 = e2m1_grid(), e4 = e4m3_grid();
  std::vector<double> y(x.size());
  for (int64_t r = 0; r < M; ++r) {
    double amax = 0;
    for (int64_t c = 0; c < N; ++c) amax = std::max(amax, std::fabs(double(x[size_t(r * N + c)])));
    if (f == ops::FpActFormat::Fp8E4M3) {
      const double s = double(float(clip * amax / 448.0));
      for (int64_t c = 0; c < N; ++c) y[size_t(r * N + c)] = s > 0 ? round_to_grid(x[size_t(r * N + c)] / s, e4) * s : 0;
      continue;
    }
    const int64_t B = f == ops::FpActFormat::Fp4Mx ? 32 : 16;
    const double g = double(float(clip * amax / (448.0 * 6.0)));
    for (int64_t c0 = 0; c0 < N; c0 += B) {
      const int64_t n = std::min(B, N - c0);
      double bmax = 0;
      for (int64_t k = 0; k < n; ++k) bmax = std::max(bmax, std::fabs(double(x[size_t(r * N + c0 + k)])));
      bmax *= clip;
      double S = 0;
      if (f == ops::FpActFormat::Fp4Mx) S = bmax > 0 ? std::ldexp(1.0, int(std::floor(std::log2(bmax))) - 2) : 0;
      else S = g > 0 ? round_to_grid(double(float(bmax / 6.0 / g)), e4) * g : 0;
      for (int64_t k = 0; k < n; ++k) {
        const double v = x[size_t(r * N + c0 + k)];
        y[size_t(r * N + c0 + k)] = S > 0 ? round_to_grid(double(float(v / S)), e2) * S : 0;
      }
    }
  }
  return y;
}

}  // namespace

TEST(FpActQuant, MatchesItsFormulas) {
  const int64_t M = 5, N = 72;  // 72: a short last block for MX (32) and NV (16 x 4 + 8)
  std::vector<float> x(size_t(M * N));
  const Tensor g = Tensor::randn({M, N}, 3);
  for (int64_t i = 0; i < M * N; ++i) x[size_t(i)] = g.data<float>()[i];
  x[3] = 40.f;                                        // an outlier channel
  x[size_t(N + 10)] = -1e-4f;                         // tiny values
  for (int64_t c = 0; c < N; ++c) x[size_t(2 * N + c)] = 0;  // an all-zero row
  for (int64_t c = 0; c < 16; ++c) x[size_t(3 * N + 32 + c)] = 0;  // an all-zero block
  for (auto f : {ops::FpActFormat::Fp8E4M3, ops::FpActFormat::Fp4Mx, ops::FpActFormat::Fp4Nv})
    for (double clip : {1.0, 0.8}) {
      const Tensor xt = Tensor::from_vector(x, {M, N});
      Tensor y = Tensor::empty({M, N});
      ops::fp_fake_quant(xt, f, clip, y);
      const auto ref = reference(x, M, N, f, clip);
      for (int64_t i = 0; i < M * N; ++i)
        ASSERT_NEAR(double(y.data<float>()[i]), ref[size_t(i)], 1e-6 * std::max(1.0, std::fabs(ref[size_t(i)])))
            << "format " << int(f) << " clip " << clip << " at " << i << " x " << x[size_t(i)];
      // f64 gives the same values (the codecs are f32).
      Tensor y64 = Tensor::empty({M, N}, DType::F64);
      ops::fp_fake_quant(xt.to(DType::F64), f, clip, y64);
      for (int64_t i = 0; i < M * N; ++i) ASSERT_NEAR(y64.data<double>()[i], ref[size_t(i)], 1e-6 * std::max(1.0, std::fabs(ref[size_t(i)])));
    }
}

TEST(FpActQuant, HandValues) {
  // FP8: row max 448 -> s = 1, so values on the grid stay; 17 lies between 16 and 18 (step 2): tie -> 16 (even code).
  {
    const Tensor x = Tensor::from_vector(std::vector<float>{448, 17, -3.25f, 0.001953125f}, {1, 4});
    Tensor y = Tensor::empty({1, 4});
    ops::fp_fake_quant(x, ops::FpActFormat::Fp8E4M3, 1.0, y);
    EXPECT_FLOAT_EQ(y.data<float>()[0], 448);
    EXPECT_FLOAT_EQ(y.data<float>()[1], 16);
    EXPECT_FLOAT_EQ(y.data<float>()[2], -3.25f);
    EXPECT_FLOAT_EQ(y.data<float>()[3], 0.001953125f);  // the smallest subnormal
  }
  // MX: block max 6 -> X = 2^(2 - 2) = 1: the E2M1 grid itself; 2.5 ties between 2 and 3 -> 2 (even code).
  {
    const Tensor x = Tensor::from_vector(std::vector<float>{6, 2.5f, -0.3f, 5.1f}, {1, 4});
    Tensor y = Tensor::empty({1, 4});
    ops::fp_fake_quant(x, ops::FpActFormat::Fp4Mx, 1.0, y);
    EXPECT_FLOAT_EQ(y.data<float>()[0], 6);
    EXPECT_FLOAT_EQ(y.data<float>()[1], 2);
    EXPECT_FLOAT_EQ(y.data<float>()[2], -0.5f);
    EXPECT_FLOAT_EQ(y.data<float>()[3], 6);
  }
  // MX with max 7: X = 2^(2 - 2) = 1 still, 7 saturates to 6 (the MX rule keeps the power of two).
  {
    const Tensor x = Tensor::from_vector(std::vector<float>{7, 1}, {1, 2});
    Tensor y = Tensor::empty({1, 2});
    ops::fp_fake_quant(x, ops::FpActFormat::Fp4Mx, 1.0, y);
    EXPECT_FLOAT_EQ(y.data<float>()[0], 6);
    EXPECT_FLOAT_EQ(y.data<float>()[1], 1);
  }
  // NV: one block with max 7 -> g = 7 / 2688, s_b = e4m3(448) = 448: S = 7/6 exactly (to f32), 7 -> 6 S = 7.
  {
    const Tensor x = Tensor::from_vector(std::vector<float>{7, 1}, {1, 2});
    Tensor y = Tensor::empty({1, 2});
    ops::fp_fake_quant(x, ops::FpActFormat::Fp4Nv, 1.0, y);
    EXPECT_NEAR(y.data<float>()[0], 7, 1e-5);
    EXPECT_NEAR(y.data<float>()[1], 7.0 / 6.0, 1e-5);  // 1 / (7/6) = 0.857 -> 1
  }
  Tensor y = Tensor::empty({1, 2});
  EXPECT_THROW(ops::fp_fake_quant(Tensor::zeros({1, 2}), ops::FpActFormat::Fp8E4M3, 0.0, y), Error);
  EXPECT_THROW(ops::fp_fake_quant(Tensor::zeros({1, 2}), ops::FpActFormat(9), 1.0, y), Error);
}
