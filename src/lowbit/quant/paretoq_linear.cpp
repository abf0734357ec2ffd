#include "lowbit/quant/paretoq_linear.h"

#include "lowbit/autograd/functions.h"
#include "lowbit/model/lp_linear.h"

namespace lowbit {

SeqTrainLinear::SeqTrainLinear(const Tensor& weight, const Tensor& bias, const QuantFormat& f, ParetoQBits b,
                               const Tensor& alpha, double grad_scale)
    : format_(f), bits_(b), grad_scale_(grad_scale) {
  LB_CHECK(paretoq_is_seq(b), "qat: ", paretoq_bits_name(b), "-bit ParetoQ trains with LSQ's layer, not SEQ's");
  paretoq_check_format(b, f);
  LB_CHECK(weight.defined() && weight.dim() == 2, "qat: weight must be [out, in], got ",
           weight.defined() ? weight.describe() : std::string("undefined"));
  shape_ = weight.shape();
  const Shape gs{shape_[0], f.n_groups(shape_[1])};
  LB_CHECK(alpha.defined() && alpha.shape() == gs, "qat: ParetoQ alpha must be ", shape_str(gs), ", got ",
           alpha.defined() ? alpha.describe() : std::string("undefined"));
  // Everything lives on the weight's device (the quantizer and the GEMMs have CUDA bodies).
  const Device dev = weight.device();
  weight_ = Var(weight.to(DType::F32).contiguous().clone(), true);
  alpha_ = Var(alpha.to(DType::F32).to(dev).contiguous().clone(), true);
  if (bias.defined()) bias_ = Var(bias.to(dev).to(DType::F32).contiguous().clone(), false);
}

std::string SeqTrainLinear::kind() const {
  return std::string("paretoq-") + paretoq_bits_name(bits_) + ":" + format_.name;
}

Var SeqTrainLinear::quantized_weight() const {
  return paretoq_fake_quant(weight_, alpha_, bits_, format_, grad_scale_);
}

Var SeqTrainLinear::forward(const Var& x) const {
  if (lp_) {
    const Var y = (*lp_)(x, quantized_weight());
    return bias_.defined() ? add(y, bias_) : y;
  }
  return linear(x, quantized_weight(), bias_);
}

void SeqTrainLinear::set_lp_product(std::shared_ptr<const LpProduct> p) { lp_ = std::move(p); }

Tensor SeqTrainLinear::effective_weight() const {
  NoGradGuard ng;
  return quantized_weight().value();
}

void SeqTrainLinear::snap_alpha() {
  Var a = alpha_;
  a.mutable_value().copy_(paretoq_storage_alpha(alpha_.value().to(Device::CPU), bits_).to(alpha_.value().device()));
}

QuantizedTensor SeqTrainLinear::encode() const {
  return paretoq_encode(weight_.value(), alpha_.value(), bits_, format_);
}

}  // namespace lowbit
