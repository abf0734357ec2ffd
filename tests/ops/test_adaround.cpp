// AdaRound's element-wise ops (ops/adaround.h) against the per-weight rule written out, and their
// refusals. The loop they serve is tested in tests/methods/test_adaround.cpp (bit for bit against the
// host objective + Adam); their CUDA bodies in test_parity.cpp (Parity.AdaRound).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "lowbit/ops/adaround.h"

using namespace lowbit;

// The element-wise ops against the per-weight rule written out (f64 and f32), and their refusals.
TEST(AdaRoundOps, FollowTheRule) {
  const ops::adaround::Grid g{0, 3, 1.1, -0.1};
  // v: saturated low, mid, saturated high, near a clip; fl: inside, at the top (clamped), below.
  const std::vector<double> v = {-12.0, 0.3, 12.0, -2.2}, fl = {1, 3, -1, 2}, s = {0.5, 0.25, 2.0, 0.1},
                            z = {1, 2, 0, 1}, w = {0.2, 0.3, -0.4, 0.1}, eh = {0.7, -1.1, 0.4, 2.0};
  for (DType dt : {DType::F64, DType::F32}) {
    auto t = [&](const std::vector<double>& x) { return Tensor::from_vector(x, {2, 2}).to(dt); };
    Tensor V = t(v), E = Tensor::empty({2, 2}, dt), M = Tensor::zeros({2, 2}, dt), M2 = Tensor::zeros({2, 2}, dt);
    ops::adaround_soft_error(V, t(w), t(fl), t(s), t(z), g, E);
    const double tol = dt == DType::F64 ? 0.0 : 1e-6;
    for (int k = 0; k < 4; ++k) {
      const double sg = 1 / (1 + std::exp(-v[size_t(k)]));
      const double h = std::clamp(sg * 1.2 - 0.1, 0.0, 1.0);
      const double q = (std::clamp(fl[size_t(k)] + h, 0.0, 3.0) - z[size_t(k)]) * s[size_t(k)];
      EXPECT_NEAR(E.to(DType::F64).data<double>()[k], w[size_t(k)] - q, tol) << k;
    }
    ops::AdaRoundStep st;
    st.beta = 3;
    st.reg = 0.01;
    ops::adaround_adam_step(V, M, M2, t(eh), t(fl), t(s), t(z), g, st);
    const Tensor V1 = V.to(DType::F64);
    for (int k = 0; k < 4; ++k) {
      const double sg = 1 / (1 + std::exp(-v[size_t(k)])), u = sg * 1.2 - 0.1, h = std::clamp(u, 0.0, 1.0);
      const double c = fl[size_t(k)] + h;
      const double dhdv = (u <= 0 || u >= 1) ? 0.0 : sg * (1 - sg) * 1.2;
      double dh = (c >= 0 && c <= 3) ? -eh[size_t(k)] * s[size_t(k)] : 0.0;
      const double a = std::fabs(2 * h - 1);
      if (a > 0) dh -= 0.01 * 3 * std::pow(a, 2.0) * (2 * h > 1 ? 2.0 : -2.0);
      const double gr = dh * dhdv;
      // Adam's first step moves by lr * sign(g) (|g| >> eps), or not at all where g = 0.
      const double want = v[size_t(k)] - (gr == 0 ? 0.0 : 1e-3 * gr / (std::fabs(gr) + 1e-8));
      EXPECT_NEAR(V1.data<double>()[k], want, dt == DType::F64 ? 1e-15 : 1e-6) << k;
    }
    // Saturated weights (k = 0, 2) and the clamped one (k = 1, c > qmax: no reconstruction term) have
    // no reconstruction gradient; the saturated ones none at all.
    EXPECT_EQ(V1.data<double>()[0], dt == DType::F64 ? -12.0 : double(float(-12.0)));
  }
  Tensor a = Tensor::zeros({2, 2}, DType::F64), b = Tensor::zeros({2, 3}, DType::F64), e = Tensor::empty({2, 2}, DType::F64);
  EXPECT_THROW(ops::adaround_soft_error(a, b, a, a, a, g, e), Error);  // shape
  EXPECT_THROW(ops::adaround_soft_error(a, a.to(DType::F32), a, a, a, g, e), Error);  // dtype
  EXPECT_THROW(ops::adaround_soft_error(a, a, a, a, a, ops::adaround::Grid{3, 0, 1.1, -0.1}, e), Error);  // qmin > qmax
  ops::AdaRoundStep st;
  st.t = 0;
  Tensor m = a, m2 = a;
  EXPECT_THROW(ops::adaround_adam_step(a, m, m2, a, a, a, a, g, st), Error);  // step counts from 1
}
