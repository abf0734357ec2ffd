#include "lowbit/train/bitnet.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include <nlohmann/json.hpp>

#include "lowbit/autograd/optim.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/model/bit_linear.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"

namespace lowbit {

TrainArch parse_train_arch(const std::string& name, const std::string& what) {
  if (name == "llama") return TrainArch::Llama;
  if (name == "bitnet-b1.58") return TrainArch::BitNetB158;
  if (name == "bitnet-v2") return TrainArch::BitNetV2;
  throw_error(what, ": '", name, "' is not an architecture (expected llama, bitnet-b1.58 or bitnet-v2)");
}

void set_train_arch(BitNetOptions& o, TrainArch arch) {
  o.enabled = arch != TrainArch::Llama;
  o.v2 = arch == TrainArch::BitNetV2;
}

const char* bitnet_arch_name(const BitNetOptions& o) {
  return !o.enabled ? "llama" : o.v2 ? "bitnet-v2" : "bitnet-b1.58";
}

bool parse_train_schedule(const std::string& name, const std::string& what) {
  if (name == "cosine") return false;
  if (name == "bitnet-two-stage") return true;
  throw_error(what, ": '", name, "' is not a schedule (expected cosine or bitnet-two-stage)");
}

int64_t bitnet_transition_step(const BitNetOptions& o, int64_t max_steps) {
  return int64_t(std::llround(o.transition_at * double(max_steps)));
}

namespace {
// bitnet-v2's activation quantizer at `bits` (0: none): absmax, or absmean at 4 bits with --act-quant absmean.
ActQuantSpec bitnet_act_spec(int bits, ops::ActScale scale) {
  if (bits == 0) return ActQuantSpec{};
  const bool absmean = bits == 4 && scale == ops::ActScale::AbsMean;
  return parse_act_quant(absmean ? "int4-absmean" : "int" + std::to_string(bits), "bitnet-v2 activations");
}
}  // namespace

void check_bitnet_options(const BitNetOptions& o, int64_t max_steps) {
  if (!o.enabled) {
    if (o.transition_at != 0 || o.phase_in_steps != 0 || o.scale != ops::TernaryScale::AbsMean)
      throw_error("--transition-at, --phase-in-steps and --ternary-scale need --arch bitnet-b1.58 or bitnet-v2");
  }
  if (!o.v2 && !o.hadamard) throw_error("--hadamard off needs --arch bitnet-v2");
  if (!o.v2 && (o.act_bits != 4 || o.act4_at != 0 || o.act_scale != ops::ActScale::AbsMax))
    throw_error("--act-bits, --act4-at and --act-quant need --arch bitnet-v2 (bitnet-b1.58's activations are int8 absmax)");
  if (!o.enabled) return;
  if (o.v2) {
    if (o.act_bits != 4 && o.act_bits != 8) throw_error("--act-bits ", o.act_bits, " (bitnet-v2: expected 4 or 8)");
    if (!(o.act4_at >= 0 && o.act4_at < 1))
      throw_error("--act4-at ", o.act4_at, " is outside [0, 1): the run must end with 4-bit activations");
    if (o.act4_at != 0 && o.act_bits != 4) throw_error("--act4-at needs --act-bits 4 (it switches 8-bit activations to 4)");
    if (o.act_scale == ops::ActScale::AbsMean && o.act_bits != 4)
      throw_error("--act-quant absmean needs --act-bits 4 (it is the papers' INT4 quantizer; 8-bit activations are absmax)");
    if (o.phase_in_steps != 0)
      throw_error("--phase-in-steps is not supported with --arch bitnet-v2 (its activation quantizer switches at once)");
  }
  if (!(o.transition_at >= 0 && o.transition_at < 1))
    throw_error("--transition-at ", o.transition_at, " is outside [0, 1): the run must end in 1.58 bit");
  if (o.phase_in_steps < 0) throw_error("--phase-in-steps ", o.phase_in_steps, " is negative");
  const int64_t t = bitnet_transition_step(o, max_steps);
  if (max_steps > 0 && t + o.phase_in_steps > max_steps)
    throw_error("--phase-in-steps ", o.phase_in_steps, " does not end by the last step (transition at step ", t, " of ",
                max_steps, "): the saved model would not be ternary");
}

BitLinearOptions bitnet_step_options(const BitNetOptions& o, int64_t step, int64_t max_steps) {
  BitLinearOptions b;
  b.scale = o.scale;
  const int64_t t = bitnet_transition_step(o, max_steps);
  b.quantize = step >= t;
  b.quantize_activations = !o.v2;  // bitnet-v2: the model's transforms quantize the activations
  if (b.quantize && o.phase_in_steps > 0)
    b.lambda = std::min(1.0, double(step - t + 1) / double(o.phase_in_steps));
  return b;
}

int64_t bitnet_act4_step(const BitNetOptions& o, int64_t max_steps) {
  return std::max(bitnet_transition_step(o, max_steps), int64_t(std::llround(o.act4_at * double(max_steps))));
}

int bitnet_step_act_bits(const BitNetOptions& o, int64_t step, int64_t max_steps) {
  if (!o.enabled || !o.v2 || step < bitnet_transition_step(o, max_steps)) return 0;
  return step < bitnet_act4_step(o, max_steps) ? 8 : o.act_bits;
}

ModelTransforms bitnet_v2_transforms(const LlamaConfig& c, uint64_t seed, int act_bits, bool hadamard,
                                     ops::ActScale act_scale) {
  ModelTransforms t;
  if (hadamard) {
    t.rotation = "h-bitlinear";
    t.rotation_seed = seed;
    t.o_in = random_hadamard(int64_t(c.n_heads) * c.resolved_head_dim(), seed + 11);
    t.ffn = random_hadamard(c.hidden_dim, seed + 12);
  }
  t.act = bitnet_act_spec(act_bits, act_scale);
  return t;
}

void set_bitnet_step(LlamaModel& model, const BitNetOptions& o, int64_t step, int64_t max_steps) {
  set_bitlinear_options(model, bitnet_step_options(o, step, max_steps));
  if (!o.v2) return;
  const int bits = bitnet_step_act_bits(o, step, max_steps);
  ActQuantSpec act = bitnet_act_spec(bits, o.act_scale);
  if (act_quant_name(model.transforms().act) == act_quant_name(act)) return;
  ModelTransforms t = model.transforms();
  t.act = std::move(act);
  model.set_transforms(std::move(t));
}

void make_bitnet(LlamaModel& model, const BitNetOptions& o, uint64_t seed) {
  const BitLinearOptions first = bitnet_step_options(o, 0, 1);
  for (int i = 0; i < model.n_layers(); ++i)
    for (auto& [name, slot] : model.block(i).linears()) {
      const auto* d = dynamic_cast<const DenseLinear*>(slot->get());
      if (!d) throw_error("bitnet: layer ", i, " ", name, " is not a dense linear layer");
      if (d->bias().defined()) throw_error("bitnet: layer ", i, " ", name, " has a bias (BitLinear has none)");
      const Var& w = d->weight_var();
      *slot = std::make_shared<BitLinear>(w.value(), first, w.requires_grad());
    }
  if (o.v2)
    model.set_transforms(
        bitnet_v2_transforms(model.config(), seed, bitnet_step_act_bits(o, 0, 1), o.hadamard, o.act_scale));
}

void set_bitlinear_options(LlamaModel& model, const BitLinearOptions& options) {
  for (int i = 0; i < model.n_layers(); ++i)
    for (auto& [name, slot] : model.block(i).linears())
      if (auto* b = dynamic_cast<BitLinear*>(slot->get())) b->set_options(options);
}

double two_stage_lr(int64_t step, int64_t warmup, int64_t total, double min_ratio) {
  const int64_t mid = total / 2;
  if (step < mid || total < 2) return warmup_cosine(step, warmup, total, min_ratio);
  const double peak2 = 0.5 * warmup_cosine(mid, warmup, total, min_ratio);
  if (peak2 <= min_ratio) return peak2;
  const double t = double(step - mid) / double(std::max<int64_t>(1, total - mid));
  return min_ratio + (peak2 - min_ratio) * 0.5 * (1 + std::cos(std::numbers::pi * std::min(t, 1.0)));
}

double two_stage_wd(int64_t step, int64_t total) { return step < total / 2 ? 1.0 : 0.0; }

void save_bitnet_checkpoint(const std::string& dir, const LlamaModel& model) {
  const QuantFormat& f = quant_format(QuantFormatId::Ternary);
  LlamaWeights w = model.weights();
  for_each_weight(w, [](const std::string&, Tensor& t) { t = t.to(Device::CPU); });
  LlamaModel frozen(model.config(), w, false);
  ops::TernaryScale scale = ops::TernaryScale::AbsMean;
  for (int i = 0; i < model.n_layers(); ++i) {
    LlamaBlock block = model.block(i);  // shares the layers
    auto src = block.linears();
    auto dst = frozen.block(i).linears();
    for (size_t k = 0; k < src.size(); ++k) {
      const auto* b = dynamic_cast<const BitLinear*>(src[k].second->get());
      if (!b || !b->options().quantize || b->options().lambda < 1.0)
        throw_error("save_bitnet_checkpoint: layer ", i, " ", src[k].first, " is not a fully quantizing BitLinear");
      scale = b->options().scale;
      const Tensor latent = b->latent_weight().value().to(Device::CPU).contiguous();
      const float gamma = float(ops::ternary_gamma(latent, scale));
      QuantizedTensor q = quantize_with_params(latent, f, fit_all_group_params(f, latent, gamma), gamma);
      *dst[k].second = std::make_shared<QuantLinear>(std::move(q));
    }
  }
  if (model.transforms().any()) {  // bitnet-v2: the online Hadamard transforms and the activation quantizer
    frozen.set_transforms(model.transforms());
    save_quantized_model(dir, frozen, "bitnet-v2", f,
                         {{"ternary_scale", ops::ternary_scale_name(scale)},
                          {"activations", act_quant_name(model.transforms().act) + " per token (symmetric " +
                                              (model.transforms().act.absmean ? "absmean, s = mean|x| / sqrt(7)"
                                                                              : "absmax") +
                                              ") after online Hadamard transforms of the o_proj and down_proj inputs, "
                                              "as in training (quantization_config.transforms)"}});
    return;
  }
  save_quantized_model(dir, frozen, "bitnet-b1.58", f,
                       {{"ternary_scale", ops::ternary_scale_name(scale)},
                        {"activations", "int8 per token (absmax) in training; the ternary format runs f32 activations"}});
}

}  // namespace lowbit
