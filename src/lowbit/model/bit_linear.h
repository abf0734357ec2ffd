// BitLinear b1.58 as a model layer: a trainable latent weight [out, in] whose forward pass is
// autograd/bitlinear.h's (ternary weights, int8 per-token activations, straight-through
// gradients). The options can change between steps (the 16 -> 1.58-bit transition switches
// `quantize` on, keeping the same latent weight Var and so the optimizer's state for it).
#pragma once
#include "lowbit/autograd/bitlinear.h"
#include "lowbit/model/linear.h"

namespace lowbit {

class BitLinear : public Linear {
 public:
  BitLinear(Tensor weight, const BitLinearOptions& options, bool trainable = true);
  Var forward(const Var& x) const override { return bitlinear(x, weight_, options_); }
  int64_t in_features() const override { return weight_.value().shape()[1]; }
  int64_t out_features() const override { return weight_.value().shape()[0]; }
  std::vector<Var> parameters() const override;
  // The weight the forward pass uses (ternary values gamma * {-1, 0, 1} once quantizing).
  Tensor effective_weight() const override { return bitlinear_effective_weight(weight_.value(), options_); }
  std::string kind() const override { return options_.quantize ? "bitlinear-b1.58" : "bitlinear-16bit"; }
  const Var& latent_weight() const { return weight_; }
  const BitLinearOptions& options() const { return options_; }
  void set_options(const BitLinearOptions& o) { options_ = o; }

 private:
  Var weight_;
  BitLinearOptions options_;
};

}  // namespace lowbit
