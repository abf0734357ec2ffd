// The FP8 / FP4 activation quantizers as ModelTransforms specs (issue 16): names round trip, the
// spec runs ops::fp_fake_quant, gradients pass straight through.
#include <gtest/gtest.h>

#include "lowbit/autograd/functions.h"
#include "lowbit/core/error.h"
#include "lowbit/model/rotation.h"
#include "lowbit/ops/fp_act_quant.h"

using namespace lowbit;

TEST(ActFloat, NamesRoundTripAndRunTheOp) {
  for (const char* n : {"none", "int8", "int4-asym", "fp8", "fp4-mx", "fp4-nv"})
    EXPECT_EQ(act_quant_name(parse_act_quant(n)), n);
  EXPECT_EQ(parse_act_quant("fp4-mx").bits, 4);
  EXPECT_EQ(parse_act_quant("fp8").bits, 8);
  EXPECT_THROW(parse_act_quant("fp6"), Error);
  const Tensor x = Tensor::randn({3, 40}, 5);
  for (auto [name, f] : {std::pair{"fp8", ops::FpActFormat::Fp8E4M3}, {"fp4-mx", ops::FpActFormat::Fp4Mx},
                         {"fp4-nv", ops::FpActFormat::Fp4Nv}}) {
    Tensor ref = Tensor::empty({3, 40});
    ops::fp_fake_quant(x, f, 1.0, ref);
    const Var y = act_fake_quant(Var(x, false), parse_act_quant(name));
    EXPECT_EQ(max_abs_diff(y.value(), ref), 0.0) << name;
    // With a gradient: the value to rounding, dx = dy.
    Var xv(x, true);
    const Var yg = act_fake_quant(xv, parse_act_quant(name));
    EXPECT_LT(max_abs_diff(yg.value(), ref), 1e-6) << name;
    backward(sum(yg));
    for (int64_t i = 0; i < x.numel(); ++i) EXPECT_EQ(xv.grad().item(i), 1.0);
  }
}
