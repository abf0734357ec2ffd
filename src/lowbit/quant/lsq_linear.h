// The training layer of quantization-aware training (lowbit qat): y = x Q(W)^T (+ bias) with the
// LSQ / LSQ+ quantizer of lsq.h, in one of two modes.
//
//   Latent (LSQ QAT, EfficientQAT's Block-AP): a full-precision latent weight W, the step sizes s
//     and the zero-point offsets z (asymmetric formats) are parameters; Q(W) = lsq_fake_quant.
//     Which of them train is chosen per layer (QatLinearOptions); the straight-through estimator
//     carries the gradient to W.
//   FrozenCodes (EfficientQAT's E2E-QP): the integer codes c = q - z of a packed tensor are fixed;
//     only the step sizes train: Q = c * s (group_scale_dequant).
//
// encode() gives the packed tensor the layer computes (steps rounded to f16 storage, lsq.h), which
// QuantLinear then runs: what `lowbit qat` writes.
#pragma once
#include "lowbit/model/linear.h"
#include "lowbit/quant/lsq.h"

namespace lowbit {

class LpProduct;  // model/lp_linear.h

struct QatLinearOptions {
  bool train_weight = true;
  bool train_step = true;
  bool train_offset = true;  // asymmetric formats only (LSQ+); false: the zero point stays as initialised
  double grad_scale = 1.0;   // the step/offset gradient scale (LSQ: lsq_grad_scale(f, in))
};

class LsqTrainLinear : public Linear {
 public:
  // Latent mode. weight [out, in] F32 (copied; the layer lives on its device: the CPU or the GPU),
  // bias [out] or undefined (frozen), init from lsq_init (any device: copied to the weight's).
  LsqTrainLinear(const Tensor& weight, const Tensor& bias, const QuantFormat& f, const LsqParams& init,
                 const QatLinearOptions& o);
  // FrozenCodes mode, from a packed tensor (the step trains, nothing else), on `device`.
  LsqTrainLinear(const QuantizedTensor& q, const Tensor& bias, Device device = Device::CPU);

  Var forward(const Var& x) const override;
  int64_t in_features() const override { return shape_[1]; }
  int64_t out_features() const override { return shape_[0]; }
  std::vector<Var> parameters() const override;      // weight_parameters() then quant_parameters()
  std::vector<Var> weight_parameters() const;         // the latent weight when it trains
  std::vector<Var> quant_parameters() const;          // step (and offset) when they train
  // Every tensor that defines the layer's current function (latent weight, step, offset), trained
  // or not: what a resumable state must hold.
  std::vector<Var> state() const;
  Tensor effective_weight() const override;           // Q(W) without grad
  Tensor bias() const override { return bias_.defined() ? bias_.value() : Tensor(); }
  std::string kind() const override { return std::string(frozen_ ? "lsq-frozen:" : "lsq:") + format_.name; }
  Var quantized_weight() const;
  const QuantFormat& format() const { return format_; }
  bool frozen_codes() const { return frozen_; }

  QuantizedTensor encode() const;

  // MatQuant (quant/matryoshka.h): forwards from now on compute the r-bit Matryoshka slice of the
  // latent layer's codes (0 or the format's bits: the codes themselves). Latent mode, asymmetric
  // formats, CPU (lsq_fake_quant's slice).
  void set_slice(int r);
  int slice() const { return slice_; }

  // Low-precision training of the layer's product (lowbit qat --precision; model/lp_linear.h): the
  // forward's x Q(W)^T and its two backward GEMMs on quantized operands (straight-through to Q(W),
  // whose own backward then runs as before). Null (the default): the f32 product.
  void set_lp_product(std::shared_ptr<const LpProduct> p);

 private:
  const QuantFormat& format_;
  Shape shape_;
  bool frozen_ = false;
  QatLinearOptions opt_;
  std::shared_ptr<const LpProduct> lp_;
  Var weight_, step_, offset_, bias_;
  FrozenCodes codes_;  // FrozenCodes mode (on the CPU, for encode())
  Tensor device_codes_;  // FrozenCodes mode: codes_.codes on the layer's device (I8 when integral)
  int slice_ = 0;        // MatQuant: the width of the forward's Matryoshka slice (0: none)
};

}  // namespace lowbit
