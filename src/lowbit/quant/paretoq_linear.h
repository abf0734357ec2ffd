// The training layer of ParetoQ's low-bit QAT (lowbit qat --method paretoq, 1, 1.58 and 2 bits):
// y = x Q(W)^T (+ bias) with the sign / SEQ quantizer of paretoq.h on a full-precision latent
// weight W (straight-through estimator) and a learned α per quantization group. (3 and 4 bits
// train with LSQ's layer, lsq_linear.h.)
//
// encode() gives the packed tensor the layer computes at the f16-stored α (paretoq_storage_alpha);
// after snap_alpha() the layer's own function is exactly that packed tensor's.
#pragma once
#include "lowbit/model/linear.h"
#include "lowbit/quant/paretoq.h"

namespace lowbit {

class LpProduct;  // model/lp_linear.h

class SeqTrainLinear : public Linear {
 public:
  // weight [out, in] F32 (copied; the layer lives on its device, the CPU or the GPU), bias [out] or undefined (frozen), alpha [out, G]
  // (paretoq_init_alpha), grad_scale the α gradient scale (paretoq_grad_scale).
  SeqTrainLinear(const Tensor& weight, const Tensor& bias, const QuantFormat& f, ParetoQBits b, const Tensor& alpha,
                 double grad_scale);

  Var forward(const Var& x) const override;
  int64_t in_features() const override { return shape_[1]; }
  int64_t out_features() const override { return shape_[0]; }
  std::vector<Var> parameters() const override { return {weight_, alpha_}; }
  std::vector<Var> weight_parameters() const { return {weight_}; }
  std::vector<Var> quant_parameters() const { return {alpha_}; }
  std::vector<Var> state() const { return {weight_, alpha_}; }  // what a resumable state must hold
  Tensor effective_weight() const override;                     // Q(W) without grad
  Tensor bias() const override { return bias_.defined() ? bias_.value() : Tensor(); }
  std::string kind() const override;
  Var quantized_weight() const;
  const QuantFormat& format() const { return format_; }
  ParetoQBits bits() const { return bits_; }

  void snap_alpha();  // α := paretoq_storage_alpha(α)
  QuantizedTensor encode() const;

  // Low-precision training of the layer's product (lowbit qat --precision; model/lp_linear.h): the
  // forward's x Q(W)^T and its two backward GEMMs on quantized operands (straight-through to Q(W),
  // whose own backward then runs as before). Null (the default): the f32 product.
  void set_lp_product(std::shared_ptr<const LpProduct> p);

 private:
  const QuantFormat& format_;
  ParetoQBits bits_;
  Shape shape_;
  double grad_scale_;
  std::shared_ptr<const LpProduct> lp_;
  Var weight_, alpha_, bias_;
};

}  // namespace lowbit
