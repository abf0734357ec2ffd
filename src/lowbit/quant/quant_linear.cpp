#include "lowbit/quant/quant_linear.h"

#include "lowbit/autograd/functions.h"

namespace lowbit {

QuantLinear::QuantLinear(QuantizedTensor q, Tensor bias, Device device) : q_(std::move(q)) {
  q_.validate();
  weight_ = Var(q_.dequantize().to(device), false);
  if (bias.defined()) bias_ = Var(bias.to(device), false);
}

Var QuantLinear::forward(const Var& x) const { return linear(x, weight_, bias_); }

}  // namespace lowbit
