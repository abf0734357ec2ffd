#include "lowbit/model/linear.h"

#include "lowbit/autograd/functions.h"

namespace lowbit {

DenseLinear::DenseLinear(Tensor weight, Tensor bias, bool trainable)
    : weight_(std::move(weight), trainable), bias_(bias.defined() ? Var(std::move(bias), trainable) : Var()) {
  if (weight_.value().dim() != 2) throw_error("DenseLinear: weight must be [out, in], got ", weight_.value().describe());
}

Var DenseLinear::forward(const Var& x) const { return linear(x, weight_, bias_); }

std::vector<Var> DenseLinear::parameters() const {
  std::vector<Var> p;
  if (weight_.requires_grad()) p.push_back(weight_);
  if (bias_.defined() && bias_.requires_grad()) p.push_back(bias_);
  return p;
}

}  // namespace lowbit
