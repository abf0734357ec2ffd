// fake_quant: forward equals the RTN reference, backward is the straight-through estimator.
#include <gtest/gtest.h>

#include <cmath>

#include "lowbit/autograd/functions.h"
#include "lowbit/quant/fake_quant.h"
#include "lowbit/quant/quantize.h"

using namespace lowbit;

TEST(FakeQuant, ForwardIsRtnBackwardIsStraightThrough) {
  for (const char* name : {"int4g32", "int2g64", "ternary", "nvfp4"}) {
    const QuantFormat& f = parse_quant_format(name);
    Var w(Tensor::randn({6, 64}, 1, 0.05), true);
    Tensor c = Tensor::randn({6, 64}, 2);
    Var y = fake_quant(w, f);
    EXPECT_EQ(max_abs_diff(y.value(), fake_quantize(w.value(), f)), 0.0) << name;
    backward(sum(mul(y, Var(c))));  // d/dw sum(c * fq(w)) = c under the STE
    ASSERT_TRUE(w.grad().defined());
    EXPECT_EQ(max_abs_diff(w.grad(), c), 0.0) << name;
  }
  Var bad(Tensor::full({2, 4}, std::nan("")), true);
  EXPECT_THROW(fake_quant(bad, parse_quant_format("int4g32")), Error);
}
