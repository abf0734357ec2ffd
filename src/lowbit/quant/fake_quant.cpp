#include "lowbit/quant/fake_quant.h"

#include "lowbit/quant/quantize.h"

namespace lowbit {

Var fake_quant(const Var& w, const QuantFormat& f) {
  LB_CHECK(w.defined(), "fake_quant [", f.name, "]: undefined input");
  const Tensor& v = w.value();
  Tensor q = fake_quantize(v, f).to(v.dtype()).to(v.device());
  return make_result(q, {w}, "fake_quant", [w](const Tensor& g) { accumulate_grad(w, g); });
}

}  // namespace lowbit
