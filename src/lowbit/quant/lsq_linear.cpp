#include "lowbit/quant/lsq_linear.h"

#include "lowbit/autograd/functions.h"

namespace lowbit {

LsqTrainLinear::LsqTrainLinear(const Tensor& weight, const Tensor& bias, const QuantFormat& f, const LsqParams& init,
                               const QatLinearOptions& o)
    : format_(f), opt_(o) {
  LB_CHECK(lsq_supports(f), "qat: format ", f.name, " is not a uniform integer format (LSQ needs intB{gG,pc}[s])");
  LB_CHECK(weight.defined() && weight.dim() == 2, "qat: weight must be [out, in], got ",
           weight.defined() ? weight.describe() : std::string("undefined"));
  // Everything lives on the weight's device (the quantizer and the GEMMs have CUDA bodies).
  const Device dev = weight.device();
  shape_ = weight.shape();
  weight_ = Var(weight.to(DType::F32).contiguous().clone(), o.train_weight);
  step_ = Var(init.step.to(DType::F32).to(dev).contiguous().clone(), o.train_step);
  if (f.kind == QuantKind::IntAsym) {
    LB_CHECK(init.offset.defined(), "qat: format ", f.name, " needs an initial zero point");
    offset_ = Var(init.offset.to(DType::F32).to(dev).contiguous().clone(), o.train_offset);
  }
  if (bias.defined()) bias_ = Var(bias.to(dev).to(DType::F32).contiguous().clone(), false);
}

LsqTrainLinear::LsqTrainLinear(const QuantizedTensor& q, const Tensor& bias, Device device)
    : format_(q.fmt()), frozen_(true) {
  codes_ = lowbit::frozen_codes(q);
  // Integer codes (always, from an integer format's packed tensor with integer zero points) travel
  // as I8: one byte a weight on the device; group_scale reads either.
  const Tensor i8 = int8_codes(codes_.codes);
  const Tensor& c = i8.defined() ? i8 : codes_.codes;
  device_codes_ = device == Device::CPU ? c : c.to(device);
  shape_ = q.shape;
  opt_.train_weight = false;
  opt_.train_offset = false;
  step_ = Var(codes_.step.to(device).clone(), true);
  if (bias.defined()) bias_ = Var(bias.to(device).to(DType::F32).contiguous().clone(), false);
}

Var LsqTrainLinear::quantized_weight() const {
  if (frozen_) return group_scale_dequant(device_codes_, step_, format_);
  return lsq_fake_quant(weight_, step_, offset_, format_, opt_.grad_scale);
}

Var LsqTrainLinear::forward(const Var& x) const { return linear(x, quantized_weight(), bias_); }

std::vector<Var> LsqTrainLinear::weight_parameters() const {
  if (!frozen_ && opt_.train_weight) return {weight_};
  return {};
}

std::vector<Var> LsqTrainLinear::quant_parameters() const {
  std::vector<Var> p;
  if (opt_.train_step) p.push_back(step_);
  if (offset_.defined() && opt_.train_offset) p.push_back(offset_);
  return p;
}

std::vector<Var> LsqTrainLinear::parameters() const {
  std::vector<Var> p = weight_parameters();
  for (auto& q : quant_parameters()) p.push_back(q);
  return p;
}

std::vector<Var> LsqTrainLinear::state() const {
  std::vector<Var> s;
  if (!frozen_) s.push_back(weight_);
  s.push_back(step_);
  if (offset_.defined()) s.push_back(offset_);
  return s;
}

Tensor LsqTrainLinear::effective_weight() const {
  NoGradGuard ng;
  return quantized_weight().value();
}

QuantizedTensor LsqTrainLinear::encode() const {
  if (frozen_) return encode_frozen(codes_, step_.value(), format_);
  return lsq_encode(weight_.value(), step_.value(), offset_.defined() ? offset_.value() : Tensor(), format_);
}

}  // namespace lowbit
