#include "lowbit/quant/l4q_linear.h"

#include <cmath>

#include "lowbit/autograd/functions.h"

namespace lowbit {

L4qTrainLinear::L4qTrainLinear(const Tensor& weight, const Tensor& bias, const QuantFormat& f, const LsqParams& init,
                               const L4qOptions& o)
    : format_(f), opt_(o) {
  LB_CHECK(lsq_supports(f), "l4q: format ", f.name, " is not a uniform integer format (LSQ needs intB{gG,pc}[s])");
  LB_CHECK(weight.defined() && weight.dim() == 2 && weight.numel() > 0, "l4q: weight must be a non-empty [out, in], got ",
           weight.defined() ? weight.describe() : std::string("undefined"));
  LB_CHECK(weight.device() == Device::CPU, "l4q: the training layer runs on the CPU (the LSQ quantizer has no CUDA body); got ",
           weight.describe());
  LB_CHECK(o.rank >= 1, "l4q: LoRA rank must be >= 1, got ", o.rank);
  LB_CHECK(o.lora_alpha > 0 && std::isfinite(o.lora_alpha), "l4q: lora_alpha must be > 0, got ", o.lora_alpha);
  const DType dt = weight.dtype() == DType::F64 ? DType::F64 : DType::F32;
  const int64_t out = weight.size(0), in = weight.size(1), G = f.n_groups(in);
  w0_ = Var(weight.to(dt).contiguous().clone(), false);
  if (bias.defined()) {
    LB_CHECK(bias.numel() == out, "l4q: bias ", bias.describe(), " does not match ", out, " outputs");
    bias_ = Var(bias.to(dt).contiguous().view({out}).clone(), false);
  }
  LB_CHECK(init.step.defined() && init.step.shape() == Shape({out, G}), "l4q: initial step must be [", out, ", ", G,
           "], got ", init.step.defined() ? init.step.describe() : std::string("undefined"));
  step_ = Var(init.step.to(dt).contiguous().clone(), true);
  step_.set_name("l4q.step");
  if (f.kind == QuantKind::IntAsym) {
    LB_CHECK(init.offset.defined() && init.offset.shape() == Shape({out, G}), "l4q: format ", f.name,
             " needs an initial zero point [", out, ", ", G, "]");
    offset_ = Var(init.offset.to(dt).contiguous().clone(), true);
    offset_.set_name("l4q.offset");
  }
  const double bound = 1.0 / std::sqrt(double(in));  // PEFT's kaiming_uniform_(a = sqrt(5))
  lora_A_ = Var(Tensor::uniform({o.rank, in}, o.seed, -bound, bound, dt), true);
  lora_B_ = Var(Tensor::zeros({out, o.rank}, dt), true);
  lora_A_.set_name("lora.A");
  lora_B_.set_name("lora.B");
}

Var L4qTrainLinear::merged_weight() const {
  return add(w0_, scale(matmul(lora_B_, lora_A_), lora_scale()));
}

Var L4qTrainLinear::quantized_weight() const {
  return lsq_fake_quant(merged_weight(), step_, offset_, format_, opt_.grad_scale);
}

Var L4qTrainLinear::forward(const Var& x) const { return linear(x, quantized_weight(), bias_); }

std::vector<Var> L4qTrainLinear::lora_parameters() const { return {lora_A_, lora_B_}; }

std::vector<Var> L4qTrainLinear::quant_parameters() const {
  std::vector<Var> p{step_};
  if (offset_.defined()) p.push_back(offset_);
  return p;
}

std::vector<Var> L4qTrainLinear::parameters() const {
  std::vector<Var> p = lora_parameters();
  for (auto& q : quant_parameters()) p.push_back(q);
  return p;
}

Tensor L4qTrainLinear::effective_weight() const {
  NoGradGuard ng;
  return quantized_weight().value();
}

QuantizedTensor L4qTrainLinear::encode() const {
  NoGradGuard ng;
  const Tensor m = merged_weight().value();
  return lsq_encode(m, step_.value(), offset_.defined() ? offset_.value() : Tensor(), format_);
}

}  // namespace lowbit
