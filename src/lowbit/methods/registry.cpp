#include "lowbit/methods/registry.h"

#include <mutex>

#include "lowbit/methods/ptq_methods.h"
#include "lowbit/methods/ptqtp.h"

namespace lowbit {

namespace {

std::vector<MethodInfo>& registry_storage() {
  static std::vector<MethodInfo> r;
  return r;
}

void add(std::vector<MethodInfo>& r, MethodInfo info) {
  if (info.name.empty()) throw_error("register_method: empty method name");
  if (!info.make) throw_error("register_method: method '", info.name, "' has no factory");
  for (const auto& m : r)
    if (m.name == info.name) throw_error("register_method: method '", info.name, "' is registered already");
  r.push_back(std::move(info));
}

void register_builtins(std::vector<MethodInfo>& r) {
  add(r, {"rtn", "round to nearest (data-free; calibration only for the error report, or the importance of "
                 "--weighted-round)", false, false,
          [](const MethodConfig& c) { return std::make_unique<RtnMethod>(*c.format, c.weighted_round); }});
  add(r, {"gptq", "GPTQ: column-wise rounding with inverse-Hessian error feedback (--percdamp, --act-order)", true,
          false, [](const MethodConfig& c) { return std::make_unique<GptqMethod>(*c.format, c.gptq); }});
  add(r, {"awq", "AWQ: activation-aware channel scales folded into the producers, clipping search (--no-clip)", true,
          false, [](const MethodConfig& c) { return std::make_unique<AwqMethod>(*c.format, c.awq, c.awq_clip); }});
  add(r, {"apiq", "ApiQ block-wise: learnable clipping + LoRA trained on the block output", true, true,
          [](const MethodConfig& c) {
            ApiqOptions o = c.apiq;
            o.mode = ApiqMode::Block;
            o.saliency = nullptr;
            return std::make_unique<ApiqMethod>(*c.format, o);
          }});
  add(r, {"apiq-layer", "ApiQ layer-wise: learnable clipping + LoRA trained per linear", true, true,
          [](const MethodConfig& c) {
            ApiqOptions o = c.apiq;
            o.mode = ApiqMode::Layer;
            o.saliency = nullptr;
            return std::make_unique<ApiqMethod>(*c.format, o);
          }});
  add(r, {"sapr", "SAPR: ApiQ + saliency-aware weight-preservation regularizer (--saliency, --lambda)", true, true,
          [](const MethodConfig& c) {
            if (!c.saliency) throw_error("--method sapr: no saliency map was given");
            ApiqOptions o = c.apiq;
            o.mode = ApiqMode::Block;
            o.saliency = c.saliency;
            return std::make_unique<ApiqMethod>(*c.format, o);
          }});
  add(r, {"norm-tweak", "Norm Tweaking: --base rtn|gptq|awq, then the block's norm weights trained to match the FP "
                        "output's channel means/variances (--nt-lr, --nt-epochs)",
          true, false, [](const MethodConfig& c) {
            if (c.base != "rtn" && c.base != "gptq" && c.base != "awq")
              throw_error("--base must be rtn, gptq or awq, got '", c.base, "'");
            return std::make_unique<NormTweakMethod>(find_method(c.base).make(c), c.norm_tweak);
          }});
  add(r, {"rsq", "RSQ: GPTQ with each token's Hessian weight from its attention concentration (--rsq-min, --rsq-max)",
          true, false, [](const MethodConfig& c) {
            if (!(c.rsq.min_weight > 0) || !(c.rsq.max_weight >= c.rsq.min_weight))
              throw_error("rsq: token weights need 0 < --rsq-min <= --rsq-max, got ", c.rsq.min_weight, " and ",
                          c.rsq.max_weight);
            return std::make_unique<RsqMethod>(*c.format, c.gptq, c.rsq);
          }});
  add(r, {"guided", "GuidedQuant: GPTQ with one Hessian per group of output rows, each token weighted by the squared "
                    "end-loss gradient of those outputs (--guided-groups)",
          true, false, [](const MethodConfig& c) {
            if (c.guided.groups > 1 && c.format->has_tensor_scale)
              throw_error("guided: format ", c.format->name, " has one scale for the whole tensor, so the rows of a "
                          "layer cannot be quantized in groups; use --guided-groups 1");
            return std::make_unique<GuidedMethod>(*c.format, c.gptq, c.guided);
          }});
  add(r, {"comq", "COMQ: backprop-free coordinate-wise minimisation of each layer's output error, with scale "
                  "updates (--comq-sweeps; integer formats)",
          true, false, [](const MethodConfig& c) {
            if (c.format->kind != QuantKind::IntAsym && c.format->kind != QuantKind::IntSym)
              throw_error("comq: format ", c.format->name, " is not an integer format (int*g*, int*pc, their symmetric forms)");
            return std::make_unique<ComqMethod>(*c.format, c.comq);
          }});
  add(r, {"adaround", "AdaRound: learned up/down rounding per weight (rectified sigmoid, annealed regularizer) on "
                      "each layer's output error (--ar-iters, --ar-lambda; integer formats)",
          true, false, [](const MethodConfig& c) {
            if (c.format->kind != QuantKind::IntAsym && c.format->kind != QuantKind::IntSym)
              throw_error("adaround: format ", c.format->name, " is not an integer format (int*g*, int*pc, their symmetric forms)");
            return std::make_unique<AdaRoundMethod>(*c.format, c.adaround);
          }});
  add(r, {"adaquant", "AdaQuant: weights and group steps trained (straight-through rounding) on each layer's output "
                      "error, inputs from the quantized layers (--aq-iters; integer formats)",
          true, false, [](const MethodConfig& c) {
            if (c.format->kind != QuantKind::IntAsym && c.format->kind != QuantKind::IntSym)
              throw_error("adaquant: format ", c.format->name, " is not an integer format (int*g*, int*pc, their symmetric forms)");
            return std::make_unique<AdaQuantMethod>(*c.format, c.adaquant);
          }});
  add(r, {"cle", "cross-layer equalization (norm->q/k/v, norm->gate/up, up->down, v->o without GQA) then RTN; "
                 "data-free; bias correction where a layer has a bias and data is given",
          false, false, [](const MethodConfig& c) { return std::make_unique<CleMethod>(*c.format, c.cle); }});
  add(r, {"ptqtp", "PTQTP: two ternary planes per weight with two f16 scales per group of 128, fitted by "
                   "alternating ridge least squares and exhaustive trit search from the RTN grid (--tp-start; "
                   "data-free; --format tp2g128)",
          false, false, [](const MethodConfig& c) {
            if (c.format->kind != QuantKind::TritPlanes)
              throw_error("ptqtp: format ", c.format->name, " is not a trit-plane format (use --format tp2g128)");
            return std::make_unique<PtqtpMethod>(*c.format, c.ptqtp);
          },
          "tp2g128"});
  add(r, {"ptq161", "PTQ1.61: salient input channels (top --ptq161-ratio by calibration max|x|) at 4 bits, the rest "
                    "binarized with row and column scales fitted to the layer's output error, optionally refined on "
                    "the block output (--ptq161-block-epochs; --format ptq161, its own packed format)",
          true, false, [](const MethodConfig& c) { return std::make_unique<Ptq161Method>(*c.format, c.ptq161); },
          "ptq161"});
  add(r, {"quip", "QuIP's incoherence processing + GPTQ (= LDLQ): each linear's weight and Hessian transformed by "
                  "seeded random-sign Hadamard-type rotations of its input and output (--quip-seed, --quip-sides), "
                  "applied online around the packed product at inference; nothing fused into the model",
          true, false, [](const MethodConfig& c) { return std::make_unique<QuipMethod>(*c.format, c.gptq, c.quip); }});
}

std::vector<MethodInfo>& registry() {
  static std::once_flag once;
  std::call_once(once, [] { register_builtins(registry_storage()); });
  return registry_storage();
}

}  // namespace

const std::vector<MethodInfo>& method_registry() { return registry(); }

void register_method(MethodInfo info) { add(registry(), std::move(info)); }

std::string method_names() {
  std::string s;
  for (const auto& m : registry()) s += (s.empty() ? "" : ", ") + m.name;
  return s;
}

std::string method_help() {
  size_t w = 0;
  for (const auto& m : registry()) w = std::max(w, m.name.size());
  std::string s;
  for (const auto& m : registry()) s += "\n  " + m.name + std::string(w + 2 - m.name.size(), ' ') + m.help;
  return s;
}

const MethodInfo& find_method(const std::string& name) {
  for (const auto& m : registry())
    if (m.name == name) return m;
  throw_error("unknown --method '", name, "' (registered: ", method_names(), ")");
}

std::unique_ptr<BlockMethod> make_method(const std::string& name, const MethodConfig& config) {
  const MethodInfo& m = find_method(name);
  if (!config.format) throw_error("make_method('", name, "'): no format given");
  // A column-masked format (ptq161): its method, or RTN's data-free form (quantize(): weight-norm
  // mask, closed-form factors); the other methods' per-group solvers have no column mask.
  if (config.format->has_column_mask() && name != "ptq161" && name != "rtn")
    throw_error("--method ", name, ": format ", config.format->name,
                " is written by --method ptq161 (or rtn, data-free) only");
  // onebit: its value vectors come from SVID (rtn's data-free form, quant/onebit.h) or from
  // `qat --method onebit`; the per-group solvers know neither.
  if (config.format->kind == QuantKind::SignValue && name != "rtn")
    throw_error("--method ", name, ": format ", config.format->name,
                " is written by --method rtn (SVID, data-free) or by `lowbit qat --method onebit` only");
  return m.make(config);
}

}  // namespace lowbit
