// The randomized Hadamard transform against its explicit matrix, and fake quantization against its
// formula (ops/hadamard.cpp, issue 16).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "lowbit/ops/ops.h"

using namespace lowbit;

namespace {
// Sylvester H_p (p a power of two), entries +-1.
std::vector<double> sylvester(int64_t p) {
  std::vector<double> h(size_t(p * p), 1.0);
  for (int64_t s = 1; s < p; s *= 2)
    for (int64_t i = 0; i < s; ++i)
      for (int64_t j = 0; j < s; ++j) {
        const double v = h[size_t(i * p + j)];
        h[size_t(i * p + j + s)] = v;
        h[size_t((i + s) * p + j)] = v;
        h[size_t((i + s) * p + j + s)] = -v;
      }
  return h;
}

// K = H_p / sqrt(p) (x) S as an explicit [n, n] matrix.
std::vector<double> kron_matrix(int64_t p, int64_t m, const Tensor& small) {
  const auto h = sylvester(p);
  const int64_t n = p * m;
  std::vector<double> k(size_t(n * n));
  for (int64_t a = 0; a < p; ++a)
    for (int64_t b = 0; b < m; ++b)
      for (int64_t a2 = 0; a2 < p; ++a2)
        for (int64_t b2 = 0; b2 < m; ++b2)
          k[size_t((a * m + b) * n + a2 * m + b2)] =
              h[size_t(a * p + a2)] / std::sqrt(double(p)) * (m > 1 ? small.item(b * m + b2) : 1.0);
  return k;
}
}  // namespace

TEST(Hadamard, EqualsExplicitMatrixProduct) {
  for (DType dt : {DType::F64, DType::F32})
    for (auto [p, m] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {2, 1}, {8, 1}, {4, 3}, {64, 9}, {16, 5}}) {
      const int64_t n = p * m, M = 3;
      const Tensor x = Tensor::randn({M, n}, 7, 1.0, dt);
      const Tensor small = m > 1 ? Tensor::randn({m, m}, 8, 1.0, dt) : Tensor();  // any matrix works here
      Tensor signs = Tensor::randn({n}, 9, 1.0, dt);
      for (int64_t i = 0; i < n; ++i) {
        const double s = signs.item(i) < 0 ? -1.0 : 1.0;
        if (dt == DType::F64) signs.data<double>()[i] = s;
        else signs.data<float>()[i] = float(s);
      }
      const auto K = kron_matrix(p, m, small);
      const double tol = dt == DType::F64 ? 1e-12 : 2e-5;
      for (bool transpose : {false, true}) {
        Tensor y = Tensor::empty({M, n}, dt);
        ops::hadamard_transform(x, signs, small, transpose, y);
        for (int64_t r = 0; r < M; ++r)
          for (int64_t j = 0; j < n; ++j) {
            double want = 0;
            if (!transpose)  // (x * s) K
              for (int64_t i = 0; i < n; ++i) want += x.item(r * n + i) * signs.item(i) * K[size_t(i * n + j)];
            else {  // (x K^T) * s
              for (int64_t i = 0; i < n; ++i) want += x.item(r * n + i) * K[size_t(j * n + i)];
              want *= signs.item(j);
            }
            ASSERT_NEAR(y.item(r * n + j), want, tol * std::sqrt(double(n))) << "p=" << p << " m=" << m << " t=" << transpose;
          }
      }
    }
}

TEST(Hadamard, RejectsBadArguments) {
  Tensor x = Tensor::zeros({2, 12}), y = Tensor::zeros({2, 12});
  EXPECT_THROW(ops::hadamard_transform(x, Tensor(), Tensor(), false, y), Error);  // 12 is not a power of two
  EXPECT_THROW(ops::hadamard_transform(x, Tensor(), Tensor::zeros({5, 5}), false, y), Error);  // 12 = 5 * ?
  EXPECT_THROW(ops::hadamard_transform(x, Tensor::zeros({8}), Tensor::zeros({3, 3}), false, y), Error);  // signs size
  EXPECT_THROW(ops::hadamard_transform(x, Tensor(), Tensor::zeros({3, 3}, DType::F64), false, y), Error);  // dtype
  Tensor y2 = Tensor::zeros({2, 8});
  EXPECT_THROW(ops::hadamard_transform(x, Tensor(), Tensor::zeros({3, 3}), false, y2), Error);  // y shape
  EXPECT_NO_THROW(ops::hadamard_transform(x, Tensor(), Tensor::zeros({3, 3}), false, y));
}

namespace {
// The formula of ops.h, written out once more for one group.
std::vector<double> fq_formula(const std::vector<double>& g, int bits, bool asym, double clip) {
  double lo = 0, hi = 0;
  for (double v : g) lo = std::min(lo, v), hi = std::max(hi, v);
  lo *= clip;
  hi *= clip;
  std::vector<double> out;
  for (double v : g) {
    if (asym) {
      const double qm = std::pow(2.0, bits) - 1, s = (hi - lo) / qm;
      if (s == 0) { out.push_back(0); continue; }
      const double z = std::nearbyint(-lo / s);
      out.push_back((std::clamp(std::nearbyint(v / s) + z, 0.0, qm) - z) * s);
    } else {
      const double qm = std::pow(2.0, bits - 1) - 1, s = std::max(hi, -lo) / qm;
      if (s == 0) { out.push_back(0); continue; }
      out.push_back(std::clamp(std::nearbyint(v / s), -qm - 1, qm) * s);
    }
  }
  return out;
}
}  // namespace

TEST(FakeQuant, HandExample) {
  // int4 symmetric, absmax 3.5: s = 0.5, codes 2, -4, 1, 7; 0.3 / 0.5 = 0.6 -> 1.
  Tensor x = Tensor::from_vector(std::vector<double>{1, -2, 0.3, 3.5}, {1, 4}), y = Tensor::empty({1, 4}, DType::F64);
  ops::fake_quant(x, 4, false, 1.0, 4, false, y);
  EXPECT_DOUBLE_EQ(y.item(0), 1.0);
  EXPECT_DOUBLE_EQ(y.item(1), -2.0);
  EXPECT_DOUBLE_EQ(y.item(2), 0.5);
  EXPECT_DOUBLE_EQ(y.item(3), 3.5);
  // int2 asymmetric over [-1, 2]: s = 1, z = 1, codes clamp to [0, 3]: -1, 0.4 -> 0, 2, 1.6 -> 2.
  Tensor x2 = Tensor::from_vector(std::vector<double>{-1, 0.4, 2, 1.6}, {1, 4});
  ops::fake_quant(x2, 2, true, 1.0, 4, false, y);
  EXPECT_DOUBLE_EQ(y.item(0), -1.0);
  EXPECT_DOUBLE_EQ(y.item(1), 0.0);
  EXPECT_DOUBLE_EQ(y.item(2), 2.0);
  EXPECT_DOUBLE_EQ(y.item(3), 2.0);
}

TEST(FakeQuant, MatchesFormulaPerRowAndPerColumn) {
  const int64_t M = 8, N = 12;
  Tensor x = Tensor::randn({M, N}, 5, 2.0, DType::F64);
  x.data<double>()[7] = 9.0;  // an outlier
  for (int bits : {2, 4, 8})
    for (bool asym : {false, true})
      for (double clip : {1.0, 0.8})
        for (bool per_column : {false, true})
          for (int64_t group : per_column ? std::vector<int64_t>{2, 4, 8} : std::vector<int64_t>{3, 6, 12}) {
            Tensor y = Tensor::empty({M, N}, DType::F64);
            ops::fake_quant(x, bits, asym, clip, group, per_column, y);
            const int64_t lines = per_column ? N : M, along = per_column ? M : N;
            for (int64_t l = 0; l < lines; ++l)
              for (int64_t g0 = 0; g0 < along; g0 += group) {
                std::vector<double> g;
                auto at = [&](int64_t k) { return per_column ? (g0 + k) * N + l : l * N + g0 + k; };
                for (int64_t k = 0; k < group; ++k) g.push_back(x.item(at(k)));
                const auto want = fq_formula(g, bits, asym, clip);
                for (int64_t k = 0; k < group; ++k) ASSERT_NEAR(y.item(at(k)), want[size_t(k)], 1e-12);
              }
          }
  // f32 agrees with f64 up to rounding, all-zero groups stay zero.
  Tensor xf = x.to(DType::F32), yf = Tensor::empty({M, N}), yd = Tensor::empty({M, N}, DType::F64);
  ops::fake_quant(xf, 8, false, 1.0, N, false, yf);
  ops::fake_quant(xf.to(DType::F64), 8, false, 1.0, N, false, yd);
  for (int64_t i = 0; i < M * N; ++i) EXPECT_NEAR(yf.item(i), yd.item(i), 1e-5);
  Tensor z = Tensor::zeros({2, 4}), yz = Tensor::empty({2, 4});
  ops::fake_quant(z, 4, true, 1.0, 4, false, yz);
  for (int64_t i = 0; i < 8; ++i) EXPECT_EQ(yz.item(i), 0.0);
}

TEST(FakeQuant, RejectsBadArguments) {
  Tensor x = Tensor::zeros({4, 6}), y = Tensor::zeros({4, 6});
  EXPECT_THROW(ops::fake_quant(x, 1, false, 1.0, 6, false, y), Error);
  EXPECT_THROW(ops::fake_quant(x, 4, false, 0.0, 6, false, y), Error);
  EXPECT_THROW(ops::fake_quant(x, 4, false, 1.5, 6, false, y), Error);
  EXPECT_THROW(ops::fake_quant(x, 4, false, 1.0, 4, false, y), Error);  // 4 does not divide 6
  EXPECT_THROW(ops::fake_quant(x, 4, false, 1.0, 3, true, y), Error);   // 3 does not divide 4 rows
  EXPECT_THROW(ops::fake_quant(x, 4, false, 1.0, 0, false, y), Error);
  Tensor y2 = Tensor::zeros({4, 5});
  EXPECT_THROW(ops::fake_quant(x, 4, false, 1.0, 6, false, y2), Error);
}
