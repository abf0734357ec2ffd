#include "lowbit/quant/lsq_linear.h"

#include "lowbit/autograd/functions.h"
#include "lowbit/model/lp_linear.h"
#include "lowbit/ops/ops.h"
#include "lowbit/ops/qat_quant.h"

namespace lowbit {

namespace {
// Under AutocastBf16Guard, the frozen-codes layer as one op: W = codes · step per group written in
// bf16 directly (group_scale_forward's bf16 output), y = x Wᵀ (+ bias) with bf16 operands and f32
// accumulation; backward dW = dYᵀ x (f32, from the bf16 operands) goes straight to the per-group
// step gradient, dx = dY W. No f32 W per step (0.75 GiB per Llama-2-7B block in the graph) and no
// cast pass over it; the same values as group_scale_dequant followed by `linear` under the guard.
Var group_scale_linear_bf16(const Var& x, const Tensor& codes, const Var& step, const Var& bias, const QuantFormat& f) {
  const Tensor xv = x.value().contiguous(), sv = step.value().contiguous();
  LB_CHECK(xv.dim() == 2 && xv.size(1) == codes.size(1), "qat: input ", xv.describe(), " does not match the codes ",
           codes.describe(), " (weight is [out, in])");
  Tensor wo = Tensor::empty(codes.shape(), DType::BF16, codes.device());
  ops::group_scale_forward(codes, sv, f, wo);
  const Tensor xo = autocast_bf16_input(x);
  Tensor y = Tensor::empty({xv.size(0), codes.size(0)}, DType::F32, xv.device());
  ops::gemm(xo, false, wo, true, y);
  if (bias.defined()) ops::add(y, bias.value(), y);
  std::vector<Var> inputs{x, step};
  if (bias.defined()) inputs.push_back(bias);
  return make_result(y, inputs, "group_scale_linear_bf16", [x, step, bias, codes, xo, wo, xv, &f](const Tensor& g) {
    const Tensor gc = g.contiguous();
    const Tensor go = to_bf16(gc);
    if (step.requires_grad()) {
      Tensor dw = Tensor::empty(wo.shape(), DType::F32, wo.device());
      ops::gemm(go, true, xo, false, dw);
      Tensor ds;
      ops::group_scale_backward(codes, dw, f, ds);
      accumulate_grad(step, ds);
    }
    if (x.requires_grad()) {
      Tensor dx = Tensor::empty(xv.shape(), xv.dtype(), xv.device());
      ops::gemm(go, false, wo, false, dx);
      accumulate_grad(x, dx);
    }
    if (bias.defined() && bias.requires_grad()) {
      Tensor db = Tensor::empty(bias.value().shape(), bias.value().dtype(), bias.value().device());
      ops::sum_rows(gc, db);
      accumulate_grad(bias, db);
    }
  });
}
}  // namespace

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
  return lsq_fake_quant(weight_, step_, offset_, format_, opt_.grad_scale, slice_);
}

void LsqTrainLinear::set_slice(int r) {
  LB_CHECK(r >= 0 && r <= format_.bits, "qat: Matryoshka slice of ", r, " bits of a ", format_.name, " layer");
  const int s = r == format_.bits ? 0 : r;
  LB_CHECK(s == 0 || (!frozen_ && format_.kind == QuantKind::IntAsym), "qat: a Matryoshka slice needs a latent layer in an ",
           "asymmetric integer format, not ", kind());
  slice_ = s;
}

Var LsqTrainLinear::forward(const Var& x) const {
  if (frozen_ && autocast_bf16_applies(x.value()) && step_.value().dtype() == DType::F32 && autocast_fused_weights())
    return group_scale_linear_bf16(x, device_codes_, step_, bias_, format_);
  if (lp_) {
    const Var y = (*lp_)(x, quantized_weight());
    return bias_.defined() ? add(y, bias_) : y;
  }
  return linear(x, quantized_weight(), bias_);
}

void LsqTrainLinear::set_lp_product(std::shared_ptr<const LpProduct> p) {
  LB_CHECK(!p || !frozen_, "qat --precision: a frozen-codes layer (E2E-QP) has no latent product to train in low precision");
  lp_ = std::move(p);
}

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
