// A linear layer whose weight is stored quantized (a QuantizedTensor). For now the forward pass
// dequantizes once and multiplies in f32 (exact w.r.t. the stored codes); packed low-bit kernels
// replace that path without changing this interface.
#pragma once
#include "lowbit/model/linear.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

class QuantLinear : public Linear {
 public:
  // bias [out] or undefined (kept in full precision); the dequantized weight is placed on `device`.
  explicit QuantLinear(QuantizedTensor q, Tensor bias = Tensor(), Device device = Device::CPU);
  Var forward(const Var& x) const override;
  int64_t in_features() const override { return q_.in_features(); }
  int64_t out_features() const override { return q_.out_features(); }
  std::vector<Var> parameters() const override { return {}; }
  Tensor effective_weight() const override { return weight_.value(); }
  Tensor bias() const override { return bias_.defined() ? bias_.value() : Tensor(); }
  std::string kind() const override { return q_.fmt().name; }
  const QuantizedTensor& quantized() const { return q_; }

 private:
  QuantizedTensor q_;
  Var weight_, bias_;  // dequantized weight (frozen), bias
};

}  // namespace lowbit
