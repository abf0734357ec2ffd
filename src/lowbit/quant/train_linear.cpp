#include "lowbit/quant/train_linear.h"

#include <cmath>

#include "lowbit/autograd/functions.h"
#include "lowbit/quant/lwc.h"
#include "lowbit/quant/quantize.h"

namespace lowbit {

namespace {
// Rounds every value to the nearest f16 (the adapters' storage precision), kept as f32.
Tensor round_to_f16(const Tensor& t) { return t.to(Device::CPU).to(DType::F16).to(DType::F32).contiguous(); }
}  // namespace

QuantTrainLinear::QuantTrainLinear(const Tensor& weight, const Tensor& bias, const QuantFormat& f,
                                   const QuantTrainOptions& o, const Tensor& lora_A, const Tensor& lora_B)
    : format_(f), opt_(o) {
  LB_CHECK(weight.defined() && weight.dim() == 2 && weight.numel() > 0,
           "QuantTrainLinear: weight must be a non-empty [out, in], got ",
           weight.defined() ? weight.describe() : std::string("undefined"));
  LB_CHECK(lwc_supports(f), "QuantTrainLinear: format ", f.name,
           " has no learnable clipping (use a uniform integer format: int2g64, int3g128, int4g128s, ...)");
  LB_CHECK(o.rank >= 0, "QuantTrainLinear: LoRA rank must be >= 0, got ", o.rank);
  LB_CHECK(o.rank == 0 || o.lora_alpha > 0, "QuantTrainLinear: lora_alpha must be > 0, got ", o.lora_alpha);
  const DType dt = weight.dtype() == DType::F64 ? DType::F64 : DType::F32;
  const int64_t out = weight.size(0), in = weight.size(1), G = f.n_groups(in);
  weight_ = Var(weight.to(Device::CPU).to(dt).contiguous().clone(), false);
  if (bias.defined()) {
    LB_CHECK(bias.numel() == out, "QuantTrainLinear: bias ", bias.describe(), " does not match ", out, " outputs");
    bias_ = Var(bias.to(Device::CPU).to(dt).contiguous().view({out}).clone(), false);
  }
  gamma_ = Var(Tensor::full({out, G}, o.clip_init, dt), true);
  if (f.kind == QuantKind::IntAsym) beta_ = Var(Tensor::full({out, G}, o.clip_init, dt), true);
  gamma_.set_name("lwc.gamma");
  beta_.set_name("lwc.beta");
  if (o.rank == 0) return;
  const int64_t r = o.rank;
  Tensor a, b;
  switch (o.init) {
    case LoraInit::Kaiming: {
      const double bound = 1.0 / std::sqrt(double(in));  // kaiming_uniform_(a = sqrt(5)): gain sqrt(1/3) * sqrt(3/in)
      a = Tensor::uniform({r, in}, o.seed, -bound, bound, dt);
      b = Tensor::zeros({out, r}, dt);
      break;
    }
    case LoraInit::Gaussian:
      a = Tensor::randn({r, in}, o.seed, 1.0 / double(r), dt);
      b = Tensor::zeros({out, r}, dt);
      break;
    case LoraInit::Given:
      LB_CHECK(lora_A.defined() && lora_A.shape() == Shape({r, in}), "QuantTrainLinear: given lora_A must be [", r,
               ", ", in, "], got ", lora_A.defined() ? lora_A.describe() : std::string("undefined"));
      LB_CHECK(lora_B.defined() && lora_B.shape() == Shape({out, r}), "QuantTrainLinear: given lora_B must be [", out,
               ", ", r, "], got ", lora_B.defined() ? lora_B.describe() : std::string("undefined"));
      a = lora_A.to(Device::CPU).to(dt).contiguous().clone();
      b = lora_B.to(Device::CPU).to(dt).contiguous().clone();
      break;
  }
  lora_A_ = Var(a, true);
  lora_B_ = Var(b, true);
  lora_A_.set_name("lora.A");
  lora_B_.set_name("lora.B");
}

Var QuantTrainLinear::quantized_weight(bool with_lora) const {
  Var q = lwc_fake_quant(weight_, gamma_, beta_, format_);
  if (with_lora && opt_.rank > 0) q = add(q, scale(matmul(lora_B_, lora_A_), lora_scale()));
  return q;
}

Var QuantTrainLinear::forward(const Var& x) const { return linear(x, quantized_weight(true), bias_); }

std::vector<Var> QuantTrainLinear::clip_parameters() const {
  std::vector<Var> p{gamma_};
  if (beta_.defined()) p.push_back(beta_);
  return p;
}

std::vector<Var> QuantTrainLinear::lora_parameters() const {
  if (opt_.rank == 0) return {};
  return {lora_A_, lora_B_};
}

std::vector<Var> QuantTrainLinear::parameters() const {
  std::vector<Var> p = clip_parameters();
  for (auto& v : lora_parameters()) p.push_back(v);
  return p;
}

Tensor QuantTrainLinear::effective_weight() const {
  NoGradGuard ng;
  return quantized_weight(true).value();
}

FinalizedLinear QuantTrainLinear::finalize() const {
  FinalizedLinear r;
  const Tensor w = weight_.value().to(DType::F32).contiguous();
  r.q = quantize_with_params(w, format_, lwc_clipped_params(w, gamma_.value(), beta_.defined() ? beta_.value() : Tensor(), format_),
                             1.0f);
  if (opt_.rank > 0) {
    r.lora_A = round_to_f16(lora_A_.value());
    Tensor b = lora_B_.value().to(DType::F32).contiguous().clone();
    float* p = b.data<float>();
    const float s = float(lora_scale());
    for (int64_t i = 0; i < b.numel(); ++i) p[i] *= s;
    r.lora_B = round_to_f16(b);
  }
  return r;
}

}  // namespace lowbit
