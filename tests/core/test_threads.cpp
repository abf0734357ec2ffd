// The thread pool (core/threads.h), the split BLAS products (core/blas.h) and the vectorised
// float kernels (core/vecmath.h) against plain loops.
#include <gtest/gtest.h>

#include <cstring>

#include <atomic>
#include <cmath>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "lowbit/core/blas.h"
#include "lowbit/core/threads.h"
#include "lowbit/core/vecmath.h"

using namespace lowbit;

namespace {
struct ThreadsRestore {
  int n = num_threads();
  ~ThreadsRestore() { set_num_threads(n); }
};
std::vector<float> random_floats(size_t n, uint32_t seed, float lo = -1, float hi = 1) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}
}  // namespace

TEST(Threads, ParallelForCoversEveryIndexOnce) {
  ThreadsRestore restore;
  for (int t : {1, 2, 3, 5}) {
    set_num_threads(t);
    EXPECT_EQ(num_threads(), t);
    for (int64_t n : {0, 1, 7, 1000, 100003}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      parallel_for(n, 16, [&](int64_t b, int64_t e) {
        ASSERT_LE(0, b);
        ASSERT_LE(b, e);
        ASSERT_LE(e, n);
        for (int64_t i = b; i < e; ++i) hits[size_t(i)]++;
      });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[size_t(i)].load(), 1) << "n " << n << " threads " << t;
      std::vector<std::atomic<int>> each(static_cast<size_t>(n));
      parallel_each(n, [&](int64_t i) { each[size_t(i)]++; });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(each[size_t(i)].load(), 1);
    }
  }
  set_num_threads(0);
  EXPECT_EQ(num_threads(), default_num_threads());
  EXPECT_GE(default_num_threads(), 1);
  EXPECT_NE(threads_summary().find("threads"), std::string::npos);
}

TEST(Threads, NestedCallsRunSeriallyAndExceptionsPropagate) {
  ThreadsRestore restore;
  set_num_threads(3);
  std::atomic<int64_t> total{0};
  parallel_each(6, [&](int64_t) {
    parallel_for(1000, 1, [&](int64_t b, int64_t e) { total += e - b; });  // runs inline
  });
  EXPECT_EQ(total.load(), 6000);
  EXPECT_THROW(parallel_for(100000, 1, [&](int64_t b, int64_t) {
                 if (b > 0) throw std::runtime_error("chunk failed");
               }),
               std::runtime_error);
  EXPECT_THROW(parallel_each(10, [&](int64_t i) {
                 if (i == 7) throw std::runtime_error("item failed");
               }),
               std::runtime_error);
  // The pool still works after a failure.
  std::atomic<int> n{0};
  parallel_each(10, [&](int64_t) { n++; });
  EXPECT_EQ(n.load(), 10);
}

TEST(Threads, ParallelSumIsDeterministic) {
  ThreadsRestore restore;
  std::vector<float> x = random_floats(200001, 3);
  auto sum = [&] {
    return parallel_sum(int64_t(x.size()), 1000, [&](int64_t b, int64_t e) {
      double s = 0;
      for (int64_t i = b; i < e; ++i) s += x[size_t(i)];
      return s;
    });
  };
  set_num_threads(2);
  const double a = sum();
  for (int r = 0; r < 5; ++r) EXPECT_EQ(sum(), a);
  double ref = 0;
  for (float v : x) ref += v;
  EXPECT_NEAR(a, ref, 1e-9 * x.size());
}

TEST(Blas, SplitGemmMatchesNaiveForEveryTransposeAndShape) {
  ThreadsRestore restore;
  for (int t : {1, 2, 3}) {
    set_num_threads(t);
    for (auto [M, N, K] : {std::array<int64_t, 3>{300, 40, 70}, {40, 300, 70}, {1, 2000, 64}, {129, 129, 3}}) {
      for (bool ta : {false, true})
        for (bool tb : {false, true}) {
          const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 2, ldc = N + 1;
          std::vector<float> A = random_floats(size_t((ta ? K : M) * lda), 1), B = random_floats(size_t((tb ? N : K) * ldb), 2);
          std::vector<float> C = random_floats(size_t(M * ldc), 3), C0 = C;
          blas::gemm(ta, tb, M, N, K, 0.5f, A.data(), lda, B.data(), ldb, 2.0f, C.data(), ldc);
          double worst = 0;
          for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < N; ++j) {
              double s = 0;
              for (int64_t k = 0; k < K; ++k)
                s += double(ta ? A[size_t(k * lda + i)] : A[size_t(i * lda + k)]) *
                     double(tb ? B[size_t(j * ldb + k)] : B[size_t(k * ldb + j)]);
              worst = std::max(worst, std::abs(C[size_t(i * ldc + j)] - (0.5 * s + 2.0 * C0[size_t(i * ldc + j)])));
            }
          EXPECT_LT(worst, 1e-4) << M << "x" << N << "x" << K << " ta " << ta << " tb " << tb << " threads " << t;
          // Padding columns between rows are untouched.
          for (int64_t i = 0; i < M; ++i) ASSERT_EQ(C[size_t(i * ldc + N)], C0[size_t(i * ldc + N)]);
        }
    }
  }
}

TEST(VecMath, ExpSoftmaxAndSiluMatchLibm) {
  std::vector<float> x(1000);
  for (size_t i = 0; i < x.size(); ++i) x[i] = -87.0f + 174.0f * float(i) / float(x.size() - 1);
  double worst = 0;
  for (float v : x) {
    const double r = std::exp(double(v));
    worst = std::max(worst, std::abs(vec::exp1(v) - r) / r);
  }
  EXPECT_LT(worst, 3e-7);
  for (int64_t n : {0, 1, 15, 16, 17, 1000, 4099}) {
    std::vector<float> s = random_floats(size_t(n), 7, -30, 10), s0 = s;
    const float mx = vec::max(s.data(), n);
    float ref_mx = -std::numeric_limits<float>::infinity();
    for (float v : s) ref_mx = std::max(ref_mx, v);
    EXPECT_EQ(mx, ref_mx);
    const double sum64 = vec::exp_shift_sum_f64(s.data(), n, mx);
    const float sum = vec::exp_shift_sum(s.data(), n, mx);
    double ref = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double e = std::exp(double(s0[size_t(i)] - mx));  // the shift is a float subtraction
      ref += e;
      ASSERT_NEAR(s[size_t(i)], e, 3e-7 * e + 1e-37);
    }
    EXPECT_NEAR(sum, ref, 1e-6 * ref + 1e-30);
    EXPECT_NEAR(sum64, ref, 1e-6 * ref + 1e-30);
    vec::scale(s.data(), n, 0.5f);
    for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(s[size_t(i)], 0.5 * std::exp(double(s0[size_t(i)] - mx)), 1e-6);
    std::vector<float> g = random_floats(size_t(n), 8, -20, 20), u = random_floats(size_t(n), 9);
    std::vector<float> y(static_cast<size_t>(n)), z(static_cast<size_t>(n));
    vec::silu(g.data(), y.data(), n);
    vec::swiglu(g.data(), u.data(), z.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      const double sl = double(g[size_t(i)]) / (1.0 + std::exp(-double(g[size_t(i)])));
      ASSERT_NEAR(y[size_t(i)], sl, 1e-6 * (1 + std::abs(sl)));
      ASSERT_NEAR(z[size_t(i)], sl * u[size_t(i)], 1e-6 * (1 + std::abs(sl)));
    }
  }
}

// The strided f16 widening (KV-cache rows of one head) equals the per-row conversion, value for
// value, for widths with and without a vector tail and every row stride.
TEST(VecMath, F16RowsToF32EqualsRowByRow) {
  std::vector<uint16_t> src(4096);
  for (size_t i = 0; i < src.size(); ++i) src[i] = uint16_t((i * 2654435761u) >> 7);  // every kind of half, NaNs included
  for (int64_t width : {1, 15, 16, 17, 64, 100}) {
    for (int64_t ld : {width, width + 3, 3 * width}) {
      const int64_t n = 7;
      std::vector<float> got(size_t(n * width), -1.0f), want(size_t(n * width), -2.0f);
      vec::f16_rows_to_f32(src.data() + 5, ld, got.data(), n, width);
      for (int64_t r = 0; r < n; ++r) vec::f16_to_f32(src.data() + 5 + r * ld, want.data() + r * width, width);
      ASSERT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0) << "width " << width << " ld " << ld;
    }
  }
}
