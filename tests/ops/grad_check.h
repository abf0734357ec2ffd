// Finite-difference gradient checks in f64: analytic gradients from backward() against central
// differences (f(x+h) - f(x-h)) / 2h with h = 1e-6, relative tolerance 1e-6. In f64 the
// truncation error is O(h^2) ~ 1e-12 and rounding ~ 1e-16/h = 1e-10, so 1e-6 leaves wide margin
// while catching any wrong term in a backward formula.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <vector>

#include "lowbit/autograd/functions.h"

namespace lowbit::test {

// Reduces any output to a scalar with fixed random weights, so every output element matters.
inline Var project(const Var& y, uint64_t seed = 99) {
  Var r(Tensor::randn(y.shape(), seed, 1.0, DType::F64));
  return sum(mul(y, r));
}

inline void grad_check(const std::function<Var(const std::vector<Var>&)>& f, std::vector<Tensor> inputs,
                       double tol = 1e-6, double h = 1e-6, int max_checks_per_input = 200) {
  std::vector<Var> vars;
  for (auto& t : inputs) vars.emplace_back(t.to(DType::F64).clone(), true);
  Var loss = f(vars);
  ASSERT_EQ(loss.numel(), 1);
  backward(loss);
  for (size_t k = 0; k < vars.size(); ++k) {
    Tensor x = vars[k].mutable_value();
    Tensor g = vars[k].grad();
    ASSERT_TRUE(g.defined()) << "input " << k << " got no gradient";
    const int64_t n = x.numel();
    const int64_t stride = n > max_checks_per_input ? n / max_checks_per_input + 1 : 1;
    for (int64_t i = 0; i < n; i += stride) {
      const double orig = x.item(i);
      double fp, fm;
      {
        NoGradGuard ng;
        x.set_item(i, orig + h);
        fp = f(vars).value().item();
        x.set_item(i, orig - h);
        fm = f(vars).value().item();
        x.set_item(i, orig);
      }
      const double num = (fp - fm) / (2 * h), ana = g.item(i);
      ASSERT_NEAR(ana, num, tol * std::max(1.0, std::fabs(num))) << "input " << k << " element " << i;
    }
  }
}

}  // namespace lowbit::test
