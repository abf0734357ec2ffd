// A linear layer whose weight is stored quantized (a QuantizedTensor), optionally with a LoRA pair
// (Hu et al. 2022) kept beside it in higher precision, as ApiQ (arXiv 2402.05147) produces:
//
//   y = x Ŵ^T + (x A^T) B^T (+ bias)       Ŵ = dequantize(q), A [rank, in], B [out, rank]
//
// For now the forward pass dequantizes once and multiplies in f32 (exact w.r.t. the stored codes);
// packed low-bit kernels replace that path without changing this interface. The adapters are
// frozen unless set_lora_trainable(true) (LoRA finetuning of a quantized model).
#pragma once
#include "lowbit/model/linear.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

class QuantLinear : public Linear {
 public:
  // bias [out] or undefined (kept in full precision); the dequantized weight is placed on `device`.
  // lora_A [rank, in] and lora_B [out, rank] (float) are both given or both undefined.
  // `dequantized`: dequantize(q) when the caller already has it (e.g. GPU GPTQ produces it on the
  // device), which skips decoding the codes again on the CPU.
  explicit QuantLinear(QuantizedTensor q, Tensor bias = Tensor(), Device device = Device::CPU,
                       Tensor lora_A = Tensor(), Tensor lora_B = Tensor(), Tensor dequantized = Tensor());
  Var forward(const Var& x) const override;
  int64_t in_features() const override { return q_.in_features(); }
  int64_t out_features() const override { return q_.out_features(); }
  std::vector<Var> parameters() const override;  // the adapters when trainable, else none
  // Ŵ + B A: the function the layer computes (a new tensor when there are adapters).
  Tensor effective_weight() const override;
  Tensor bias() const override { return bias_.defined() ? bias_.value() : Tensor(); }
  std::string kind() const override { return q_.fmt().name; }
  const QuantizedTensor& quantized() const { return q_; }
  const Tensor& dequantized_weight() const { return weight_.value(); }

  bool has_lora() const { return lora_A_.defined(); }
  int64_t lora_rank() const { return has_lora() ? lora_A_.shape()[0] : 0; }
  Tensor lora_A() const { return has_lora() ? lora_A_.value() : Tensor(); }
  Tensor lora_B() const { return has_lora() ? lora_B_.value() : Tensor(); }
  void set_lora_trainable(bool trainable);

 private:
  QuantizedTensor q_;
  Var weight_, bias_;     // dequantized weight (frozen), bias
  Var lora_A_, lora_B_;   // undefined without adapters
};

}  // namespace lowbit
