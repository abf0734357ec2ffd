// lowbit quantize: block-wise post-training quantization of a model (RTN, GPTQ, AWQ, ApiQ, SAPR).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/cli/dist.h"
#include "lowbit/core/threads.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/io/rope_layout.h"
#include "lowbit/methods/apiq.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/kv_cq.h"
#include "lowbit/methods/kv_wkv.h"
#include "lowbit/methods/layer_budget.h"
#include "lowbit/methods/lqer.h"
#include "lowbit/methods/act_clip.h"
#include "lowbit/methods/smoothquant.h"
#include "lowbit/methods/stream.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/methods/registry.h"
#include "lowbit/quant/ggml_grid.h"
#include "lowbit/methods/saliency.h"
#include "lowbit/quant/format_map.h"
#include "lowbit/quant/lwc.h"
#include "lowbit/quant/quantize.h"
#include "lowbit/ops/device_init.h"

namespace lowbit::cli {

namespace fs = std::filesystem;

namespace {
struct QuantArgs {
  std::string format_map, preset;  // mixed formats per tensor (quant/format_map.h)
  // Layer-wise mixed precision (methods/layer_budget.h): --bits-budget, --mp-formats, --mp-score, --mp-samples.
  double bits_budget = 0;
  std::string mp_formats = "int2g64,int3g64,int4g64", mp_score = "lim";
  int64_t mp_samples = 16;
  bool mp_given = false;
  double smooth = -1;  // --smooth ALPHA (methods/smoothquant.h); < 0: off
  bool smooth_auto = false;  // --smooth auto: alpha searched per smoothing point
  std::string smooth_arg, smooth_act;  // --smooth-act: the activation quantizer --smooth auto targets
  int64_t lqer_rank = 0;               // --lqer-rank K (methods/lqer.h); 0: off
  std::string lqer_scale = "act";      // --lqer-scale act|none
  bool lqer_scale_given = false;
  std::string model, tokenizer, method = "gptq", format, calib, calib_tokens, out, state_dir, device = "cpu",
      next_input = "quantized";
  int64_t nsamples = 128, seqlen = 2048, batch = 8;
  uint64_t seed = 0;
  double percdamp = 0.01, hessian_shrink = 0, checkpoint_seconds = 60;
  bool act_order = false, no_clip = false, weighted_round = false, json = false;
  TransformArgs tr;  // --rotate, --act, --kv-quant (issue 16)
  DistArgs dist;     // --gpus N / launcher environment: data-parallel calibration (issue 20)
  // ApiQ / SAPR. Defaults: ApiQ's scripts/quantize.sh and calibrate.py (2-bit g64, rank 64,
  // alpha 16, 20 epochs, batch 1, LoRA lr 5e-4, clipping lr 5e-3, weight decay 0.1, init logit 4).
  int64_t rank = 64, apiq_batch = 1, saliency_batch = 1;
  int epochs = 20, sapr_weight_epochs = 0, sapr_output_epochs = 0;
  double lora_alpha = 16, lora_lr = 5e-4, clip_lr = 5e-3, lora_wd = 0.1, clip_wd = 0.1, weight_decay = -1,
         aug = 0.0, clip_init = 4.0, lambda = 0.3;
  std::string lora_init = "kaiming", saliency, saliency_kind = "fisher", sapr_target = "quant-lora", lora = "keep",
              merge_dtype = "f16", saliency_norm = "layer", sapr_reduction = "mean", sapr_recipe;
  bool clip_init_given = false;  // --clip-init named: ggml types start from it instead of the RTN grid
  bool apiq_verbose = false, tf32 = false, bf16 = false, saliency_only = false, sapr_anneal = false,
       sapr_layer_weight = false;
  std::string saliency_model = "fp";
  // norm-tweak
  std::string base = "gptq";
  NormTweakOptions nt;
  RsqOptions rsq;
  GuidedOptions guided;
  ComqOptions comq;
  Ptq161Options ptq161;
  AdaRoundOptions adaround;
  AdaQuantOptions adaquant;
  std::string tp_start = "grid", tp_scales = "group";  // ptqtp
  int64_t quip_seed = 0;            // quip
  std::string quip_sides = "both";  // quip: both | input
  std::string stream = "auto";  // --stream: auto, on, off (methods/stream.h)
  std::string calib_dtype = "auto";  // --calib-dtype: auto (bf16 with --bf16), f32, bf16
  int stop_after_blocks = 0;    // testing aid: stop after this many blocks of this run (state kept)
};

// Why `a` cannot stream its model block by block ("" when it can): streaming reads a Hugging Face
// safetensors directory one block at a time, so whatever needs the whole model first loads it whole.
std::string stream_obstacle(const QuantArgs& a) {
  std::error_code ec;
  try {
    if (detect_checkpoint_format(a.model) != CheckpointFormat::HfDir)
      return "the input is not a Hugging Face safetensors directory";
  } catch (const Error&) {
    return "the input is not a Hugging Face safetensors directory";
  }
  if (a.tr.rotating()) return "--rotate rotates the whole model first";
  if (a.smooth >= 0) return "--smooth folds scales measured on the whole model first";
  if (a.tr.act_clip_search) return "--act-clip search runs the whole model on the calibration data first";
  if (kv_quant_channels(a.tr.kv_quant) > 0) return "--kv-quant " + a.tr.kv_quant + " learns its codebooks on the whole quantized model";
  if (a.bits_budget > 0) return "--bits-budget scores every layer of the whole model first";
  if (a.method == "guided") return "--method guided gathers end-loss gradients of the whole model first";
  if (a.method == "quip") return "--method quip does not stream yet (its per-layer transforms are untested in the block writer)";
  if (a.lqer_rank > 0) return "--lqer-rank keeps every layer's full-precision weights for the error reconstruction";
  if (a.method == "sapr" && (a.saliency.empty() || !fs::exists(a.saliency, ec) || a.saliency_only))
    return "--method sapr computes its saliency on the whole model (give an existing --saliency FILE)";
  return "";
}

// Methods that train LoRA adapters (ApiQ family): default format int2g64, --rank, --lora merge.
bool is_apiq(const std::string& m) { return find_method(m).trains_adapters; }

// dtype of the pipeline's calibration activations (--calib-dtype; methods/pipeline.h cache_dtype):
// auto is bf16 for the ApiQ family's --bf16 runs (as ApiQ's calibrate.py caches fp16 inputs and
// targets under its autocast), else f32.
DType calib_dtype(const QuantArgs& a) {
  if (a.calib_dtype == "auto") return a.bf16 && is_apiq(a.method) ? DType::BF16 : DType::F32;
  if (a.calib_dtype == "f32") return DType::F32;
  if (a.calib_dtype != "bf16") throw_error("--calib-dtype must be auto, f32 or bf16, got '", a.calib_dtype, "'");
  if (!is_apiq(a.method))
    throw_error("--calib-dtype bf16 applies to apiq, apiq-layer, sapr and sapr-layer, not to --method ", a.method);
  return DType::BF16;
}

ApiqOptions apiq_options(const QuantArgs& a) {
  ApiqOptions o;
  o.mode = a.method == "apiq-layer" ? ApiqMode::Layer : ApiqMode::Block;
  o.layer.rank = a.rank;
  o.layer.lora_alpha = a.lora_alpha;
  if (a.lora_init == "kaiming") o.layer.init = LoraInit::Kaiming;
  else if (a.lora_init == "gaussian") o.layer.init = LoraInit::Gaussian;
  else throw_error("--lora-init must be 'kaiming' or 'gaussian', got '", a.lora_init, "'");
  o.layer.clip_init = a.clip_init;
  o.layer.clip_init_rtn = !a.clip_init_given;
  o.epochs = a.epochs;
  o.batch = a.apiq_batch;
  o.lora_lr = a.lora_lr;
  o.clip_lr = a.clip_lr;
  o.lora_wd = a.weight_decay >= 0 ? a.weight_decay : a.lora_wd;
  o.clip_wd = a.weight_decay >= 0 ? a.weight_decay : a.clip_wd;
  o.aug_coef = a.aug;
  o.seed = a.seed;
  o.verbose = a.apiq_verbose;
  o.bf16 = a.bf16;
  o.lambda = a.lambda;
  if (a.sapr_target != "quant" && a.sapr_target != "quant-lora")
    throw_error("--sapr-target must be 'quant' (Ŵ = Q(W)) or 'quant-lora' (Ŵ = Q(W) + BA), got '", a.sapr_target, "'");
  o.reg_with_lora = a.sapr_target == "quant-lora";
  if (a.sapr_reduction != "mean" && a.sapr_reduction != "sum")
    throw_error("--sapr-reduction must be 'mean' or 'sum', got '", a.sapr_reduction, "'");
  o.reduction = parse_sapr_reduction(a.sapr_reduction);
  o.weight_epochs = a.sapr_weight_epochs;
  o.anneal_lambda = a.sapr_anneal;
  o.layer_weighted = a.sapr_layer_weight;
  o.output_epochs = a.sapr_output_epochs;
  return o;
}

// The registry's options for --method a.method, from the parsed flags.
MethodConfig method_config(const QuantArgs& a, const QuantFormat& f, const SaliencyMap* saliency, bool has_data) {
  MethodConfig c;
  c.format = &f;
  c.gptq.percdamp = a.percdamp;
  c.gptq.hessian_shrink = a.hessian_shrink;
  c.gptq.act_order = a.act_order;
  c.awq_clip = !a.no_clip;
  c.weighted_round = a.weighted_round;
  c.awq.weighted_round = a.weighted_round;
  if (is_apiq(a.method)) c.apiq = apiq_options(a);
  c.saliency = saliency;
  c.base = a.base;
  c.norm_tweak = a.nt;
  c.rsq = a.rsq;
  c.guided = a.guided;
  c.comq = a.comq;
  c.ptq161 = a.ptq161;
  c.adaround = a.adaround;
  c.adaquant = a.adaquant;
  if (a.tp_start != "paper" && a.tp_start != "grid" && a.tp_start != "both")
    throw_error("--tp-start must be 'paper', 'grid' or 'both', got '", a.tp_start, "'");
  c.ptqtp.start = parse_ptqtp_start(a.tp_start);
  if (a.tp_scales != "group" && a.tp_scales != "row")
    throw_error("--tp-scales must be 'group' or 'row', got '", a.tp_scales, "'");
  c.ptqtp.row_scales = a.tp_scales == "row";
  if (a.quip_sides != "both" && a.quip_sides != "input")
    throw_error("--quip-sides must be 'both' or 'input', got '", a.quip_sides, "'");
  c.quip.seed = uint64_t(a.quip_seed);
  c.quip.two_sided = a.quip_sides == "both";
  c.cle.bias_correction = has_data;  // E[x] of the bias correction comes from the calibration data
  return c;
}

// --sapr-recipe paper: the reference code's saliency recipe (ULB-SAPR README: raw summed Fisher,
// summed regularizer on Q(W), 15 weight- then 5 output-preservation epochs, scaled to --epochs).
// Flags given explicitly take precedence; lambda must be given (its scale is the model's).
void apply_sapr_recipe(QuantArgs& a, const CLI::App& q) {
  auto unset = [&](const char* flag) { return q.count(flag) == 0; };
  // The default stage schedule is the paper's (ULB-SAPR README: 15 weight- then 5 output-
  // preservation epochs of 20), scaled to --epochs; --sapr-weight-epochs 0 --sapr-output-epochs 0
  // trains every epoch on the mixed loss.
  if (a.method == "sapr" && unset("--sapr-weight-epochs") && unset("--sapr-output-epochs")) {
    a.sapr_output_epochs = a.epochs > 0 ? std::max(1, (a.epochs + 2) / 4) : 0;
    a.sapr_weight_epochs = a.epochs - a.sapr_output_epochs;
  }
  if (a.sapr_recipe.empty()) return;
  if (a.sapr_recipe != "paper") throw_error("--sapr-recipe must be 'paper', got '", a.sapr_recipe, "'");
  if (a.method != "sapr") throw_error("--sapr-recipe applies to --method sapr, not ", a.method);
  if (q.count("--lambda") == 0)
    throw_error("--sapr-recipe paper needs --lambda: the regularizer is a sum of raw squared gradients, whose scale "
                "depends on the model and data (the reference used 0.1 for Llama-2-7B w2g64); the default ", a.lambda,
                " is for the layer-normalised mean form");
  if (unset("--saliency-norm")) a.saliency_norm = "none";
  if (unset("--sapr-reduction")) a.sapr_reduction = "sum";
  if (unset("--sapr-target")) a.sapr_target = "quant";
  // The recipe has no mixed epochs: one stage given, the other takes the remaining epochs.
  if (unset("--sapr-output-epochs") && !unset("--sapr-weight-epochs")) a.sapr_output_epochs = a.epochs - a.sapr_weight_epochs;
  if (unset("--sapr-weight-epochs") && !unset("--sapr-output-epochs")) a.sapr_weight_epochs = a.epochs - a.sapr_output_epochs;
}

// SAPR flags, checked before the model is loaded.
void check_sapr_args(const QuantArgs& a) {
  if (a.saliency_norm != "layer" && a.saliency_norm != "none")
    throw_error("--saliency-norm must be 'layer' or 'none', got '", a.saliency_norm, "'");
  if (a.sapr_reduction != "mean" && a.sapr_reduction != "sum")
    throw_error("--sapr-reduction must be 'mean' or 'sum', got '", a.sapr_reduction, "'");
  if (a.sapr_target != "quant" && a.sapr_target != "quant-lora")
    throw_error("--sapr-target must be 'quant' (Ŵ = Q(W)) or 'quant-lora' (Ŵ = Q(W) + BA), got '", a.sapr_target, "'");
  if (a.sapr_weight_epochs < 0 || a.sapr_output_epochs < 0 || a.sapr_weight_epochs + a.sapr_output_epochs > a.epochs)
    throw_error("--sapr-weight-epochs (", a.sapr_weight_epochs, ") and --sapr-output-epochs (", a.sapr_output_epochs,
                ") must be >= 0 and add up to at most --epochs (", a.epochs, ")");
  if (a.sapr_anneal && a.sapr_weight_epochs + a.sapr_output_epochs >= a.epochs)
    throw_error("--sapr-anneal decays lambda over the mixed-loss epochs, and there are none (--sapr-weight-epochs ",
                a.sapr_weight_epochs, " + --sapr-output-epochs ", a.sapr_output_epochs, " = --epochs ", a.epochs, ")");
  if (a.sapr_layer_weight && a.saliency_norm == "none")
    throw_error("--sapr-layer-weight applies to layer-normalised saliency; raw (--saliency-norm none) scores already "
                "carry each layer's scale");
}

// SAPR's saliency: loaded from --saliency FILE when it exists, else computed on the calibration
// windows with the full-precision model (and written to FILE when one was named). A raw file is
// normalised per layer when --saliency-norm layer asks for it; the converse is impossible.
// Data parallel (world has several ranks): every rank computes its share of the batches, the sums
// are all-reduced (saliency.h), and rank 0 alone writes --saliency.
SaliencyMap obtain_saliency(const QuantArgs& a, const LlamaModel& model, const Tensor& calib, const QuantFormat& f,
                            comm::Communicator& world) {
  const SaliencyNorm norm = parse_saliency_norm(a.saliency_norm);
  const std::string source = a.saliency_model == "fp" ? "fp" : std::string("rtn:") + f.name;
  if (!a.saliency.empty() && fs::exists(a.saliency)) {
    SaliencyMap s = load_saliency(a.saliency);
    check_saliency_matches(s, model, a.saliency);
    if (s.source != source)
      throw_error(a.saliency, ": holds saliency of the ", s.source, " model but --saliency-model ", a.saliency_model,
                  " asks for the ", source, " model's; name another --saliency file (it is computed and written there)");
    if (saliency_kind_name(s.kind) != a.saliency_kind)
      std::fprintf(stderr, "note: %s holds %s saliency; --saliency-kind %s is ignored\n", a.saliency.c_str(),
                   saliency_kind_name(s.kind), a.saliency_kind.c_str());
    if (s.norm == SaliencyNorm::Layer && norm == SaliencyNorm::None)
      throw_error(a.saliency, ": holds layer-normalised saliency but --saliency-norm none asks for raw scores; name "
                  "another --saliency file (it is computed and written there)");
    if (s.norm == SaliencyNorm::None && norm == SaliencyNorm::Layer) {
      if (!a.json) std::fprintf(stderr, "note: %s holds raw saliency; normalised to mean 1 per layer (--saliency-norm layer)\n",
                                a.saliency.c_str());
      s = normalise_saliency_per_layer(std::move(s));
    }
    return s;
  }
  SaliencyOptions so;
  so.kind = parse_saliency_kind(a.saliency_kind);
  so.norm = norm;
  so.batch = a.saliency_batch;
  so.progress = !a.json && world.rank() == 0;
  LlamaWeights w = model.weights();
  if (source != "fp")  // the gradients of the round-to-nearest quantized model
    for (auto& l : w.layers)
      for (Tensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down})
        *t = quantize(*t, f).dequantize().to(t->device());  // the codec runs on the host; back to the model's device
  SaliencyMap s = compute_saliency(model.config(), w, calib, so, &world);
  s.source = source;
  if (!a.saliency.empty() && world.rank() == 0) save_saliency(a.saliency, s);
  return s;
}

// ApiQ's default --rank: ApiQ's 64, lowered on small models so that the f16 adapters (rank x
// (in + out) values per linear) add at most a fifth of the format's own bits per weight over the
// model's linears: 0.5 bits at int2g64 (2.5 bits per weight), what rank 64 costs on Llama-2-7B's
// 4096-wide layers. At least 1.
int64_t default_apiq_rank(const LlamaConfig& c, const QuantFormat& f) {
  double format_bits = 0, per_rank = 0;
  for (const auto& [out, in] : block_linear_shapes(c)) {
    format_bits += f.bits_per_weight(out, in) * double(out) * double(in);
    per_rank += double(out + in);
  }
  const double budget = 0.2 * format_bits;  // bits the adapters may add over the whole model
  return std::clamp<int64_t>(int64_t(budget / (16.0 * per_rank)), 1, 64);
}

void run_quantize(const QuantArgs& a, bool rank_given) {
  int64_t rank = a.rank;
  find_method(a.method);  // an unknown name fails before anything is loaded
  if (a.method == "sapr") check_sapr_args(a);
  if (a.method != "sapr" && (a.sapr_anneal || a.sapr_layer_weight || a.saliency_model != "fp"))
    throw_error(a.sapr_anneal ? "--sapr-anneal" : a.sapr_layer_weight ? "--sapr-layer-weight" : "--saliency-model",
                " applies to --method sapr, not ", a.method);
  if (a.saliency_only && (a.method != "sapr" || a.saliency.empty()))
    throw_error("--saliency-only needs --method sapr and --saliency FILE (where the saliency is written)");
  if (!a.preset.empty() && !a.format_map.empty()) throw_error("give --preset or --format-map, not both");
  if (!a.preset.empty() && !a.format.empty())
    throw_error("--preset ", a.preset, " chooses every tensor's format; drop --format ", a.format);
  // The rule file and the preset name are checked before the model is loaded; the plan needs the model.
  std::optional<FormatMap> fmap;
  if (!a.format_map.empty()) fmap = read_format_map(a.format_map);
  if (!a.preset.empty() && !is_preset_name(a.preset))
    throw_error("--preset: unknown preset '", a.preset, "' (known: ", preset_names(), ")");
  if (a.bits_budget > 0) {
    if (!a.preset.empty() || !a.format_map.empty())
      throw_error("--bits-budget chooses each layer's format; give it without ", a.preset.empty() ? "--format-map" : "--preset");
    if (!a.format.empty())
      throw_error("--bits-budget chooses each layer's format from --mp-formats (", a.mp_formats, "); drop --format ", a.format);
    parse_layer_score(a.mp_score);
    const auto comma = a.mp_formats.find(',');
    parse_quant_format(a.mp_formats.substr(0, comma));  // an unknown first name fails before the model is loaded
  } else if (a.mp_given) {
    throw_error("--mp-formats / --mp-score / --mp-samples set up --bits-budget; give --bits-budget B too");
  }
  const std::string method_format = find_method(a.method).default_format;  // unknown --method: error here
  std::string format = !a.format.empty()         ? a.format
                       : !method_format.empty() ? method_format
                       : is_apiq(a.method)      ? "int2g64"
                                                : "int4g128";
  if (a.bits_budget > 0) format = a.mp_formats.substr(0, a.mp_formats.find(','));
  if (!a.preset.empty()) format = quant_format(preset_base(a.preset)).name;
  if (fmap && fmap->has_default && a.format.empty()) format = quant_format(fmap->default_format).name;
  const QuantFormat& f = parse_quant_format(format);
  if (a.lora != "keep" && a.lora != "merge") throw_error("--lora must be 'keep' or 'merge', got '", a.lora, "'");
  if (a.merge_dtype != "f16" && a.merge_dtype != "f32")
    throw_error("--merge-dtype must be 'f16' or 'f32', got '", a.merge_dtype, "'");
  if (a.next_input != "quantized" && a.next_input != "fp")
    throw_error("--next-input must be 'quantized' or 'fp', got '", a.next_input, "'");
  if (!a.calib.empty() && !a.calib_tokens.empty())
    throw_error("give --calib TEXT or --calib-tokens FILE, not both");
  if (is_lowbit_quantized_dir(a.model))
    throw_error(a.model, ": is already a lowbit quantized model; quantizing it again would compound the rounding "
                "error of both passes (quantize the original full-precision model instead)");
  std::error_code ec;
  // -o FILE.gguf: the quantized directory is written next to it (FILE.gguf.qdir, also the resumable
  // state), exported, then removed.
  const bool to_gguf = a.out.size() > 5 && a.out.compare(a.out.size() - 5, 5, ".gguf") == 0;
  if (to_gguf) {
    check_gguf_output(a.out);
    if (!f.is_ggml_block() || f.ggml_type < 0)
      throw_error("-o ", a.out, ": GGUF holds llama.cpp's block types only, not ", f.name, "; use --format ",
                  "q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl, iq4_xs, q2_k ... q6_k, tq1_0 or tq2_0");
    if (is_apiq(a.method) && a.lora != "merge" && rank_given && a.rank > 0)
      throw_error("-o ", a.out, ": GGUF cannot hold separate LoRA adapters (--rank ", a.rank,
                  "); give --rank 0 (learnable clipping only, the default for GGUF output: the file holds exactly the "
                  "trained weights) or --lora merge (dense merged layers)");
  }
  if (a.weighted_round) {
    const std::string& m = a.method == "norm-tweak" ? a.base : a.method;
    if (m != "rtn" && m != "awq")
      throw_error("--weighted-round applies to --method rtn and awq (their final rounding; also as norm-tweak's --base), "
                  "not to ", a.method == "norm-tweak" ? "--base " + a.base : "--method " + a.method);
    if (!f.is_ggml_block())
      throw_error("--weighted-round chooses ggml block scales (", ggml_block_grid_names(), "); format ", f.name,
                  " is not a ggml block type");
    if (a.calib.empty() && a.calib_tokens.empty())
      throw_error("--weighted-round needs calibration data (--calib TEXT or --calib-tokens FILE): the importance of "
                  "each input channel is its mean x^2 over the calibration inputs");
  }
  const bool transforms = a.tr.rotating() || !a.tr.act.empty() || !a.tr.kv_quant.empty() || !a.tr.kv_token_quant.empty();
  // The input is full precision (no recorded transforms): settings without their switch fail now.
  if (a.tr.act_clip_given && (a.tr.act.empty() || a.tr.act == "none"))
    throw_error("--act-clip: no activation quantization (give --act)");
  if ((a.tr.kv_group_given || a.tr.kv_window_given) && (a.tr.kv_quant.empty() || a.tr.kv_quant == "none"))
    throw_error(a.tr.kv_group_given ? "--kv-group" : "--kv-window", ": no KV-cache quantization (give --kv-quant)");
  if (!a.tr.kv_calib.empty())
    throw_error("--kv-calib: quantize learns the --kv-quant cq1|cq2 codebooks (wkv4|wkv2 smoothing) on its --calib data "
                "and records them");
  if (kv_quant_wkv(a.tr.kv_quant) && a.calib.empty() && a.calib_tokens.empty())
    throw_error("--kv-quant ", a.tr.kv_quant, " needs calibration data (--calib TEXT or --calib-tokens FILE): its per-channel "
                "smoothing is calibrated on the calibration windows' keys and values");
  if (kv_quant_channels(a.tr.kv_quant) > 0 && a.calib.empty() && a.calib_tokens.empty())
    throw_error("--kv-quant ", a.tr.kv_quant, " needs calibration data (--calib TEXT or --calib-tokens FILE): its codebooks "
                "are learned by k-means on the calibration windows' keys and values");
  if (a.tr.act_clip_search && a.calib.empty() && a.calib_tokens.empty())
    throw_error("--act-clip search needs calibration data (--calib TEXT or --calib-tokens FILE): the ratios are chosen "
                "on the calibration activations");
  if (a.method == "quip") {
    if (to_gguf)
      throw_error("-o ", a.out, ": GGUF cannot carry --method quip's per-layer incoherence transforms (llama.cpp would "
                  "compute another function); write a lowbit directory");
    if (a.device != "cpu") throw_error("--method quip: the incoherence transforms run on the CPU (--device cpu)");
    if (a.lqer_rank > 0) throw_error("--lqer-rank: not with --method quip (LQER's side path is fitted in the layer's own basis)");
    if (!a.tr.act.empty() && a.tr.act != "none")
      throw_error("--act ", a.tr.act, ": not with --method quip (the packed activation quantizer would see the "
                  "transformed input x R_in, the simulated one x)");
  }
  if (transforms) {
    if (to_gguf)
      throw_error("-o ", a.out, ": GGUF cannot carry --rotate / --act / --kv-quant (llama.cpp would compute another "
                  "function); write a lowbit directory");
    if (a.device != "cpu") throw_error("--rotate / --act / --kv-quant: the rotated and activation-quantized models run on the CPU (--device cpu)");
  }
  // Methods that rescale channels between a norm / up_proj and the next linear would rescale across
  // the online Hadamard before down_proj; the ones below only replace each linear's weight.
  if (a.tr.rotating() && a.method != "rtn" && a.method != "gptq" && a.method != "rsq" && a.method != "comq")
    throw_error("--rotate ", a.tr.rotate, ": supported with --method rtn, gptq, rsq or comq (", a.method,
                " moves scales across layers, which the online rotation before down_proj does not commute with)");
  const std::string out_dir = to_gguf ? a.out + ".qdir" : a.out;
  if (fs::exists(a.out) && fs::exists(a.model) && fs::equivalent(a.out, a.model, ec))
    throw_error("--out ", a.out, " is the input model; choose another directory");
  // --gpus N / a launcher's environment: this process becomes one rank of a data-parallel run (the
  // process that launches the ranks returns their exit status through ExitRequest). Every rank
  // loads the model and samples the same windows, then calibrates on its share; rank 0 writes.
  const std::unique_ptr<comm::Communicator> world = start_ranks(a.dist, a.device != "cpu");
  const bool writer = world->rank() == 0;
  Device dev = parse_device(a.device);
  if ((a.tf32 || a.bf16) && dev != Device::CUDA)
    throw_error(a.tf32 ? "--tf32" : "--bf16", " needs --device cuda (it selects GPU tensor-core precision)");
  if (a.bf16 && !is_apiq(a.method))
    throw_error("--bf16 applies to the training of apiq, apiq-layer and sapr, not to --method ", a.method);
  if (a.tf32) cuda_set_allow_tf32(true);
  (void)calib_dtype(a);  // a bad --calib-dtype fails before any work
  const std::string state_dir = a.state_dir.empty() ? (fs::path(out_dir) / ".state").string() : a.state_dir;
  std::optional<OutputDir> out, state;  // rank 0's (the other ranks of a data-parallel run write nothing)
  if (writer) {
    out.emplace(out_dir, "--out");
    state.emplace(state_dir, "--state-dir");  // created now: an unusable path fails before any work
    state->keep_if_exists(state_dir);         // a failed run keeps its resumable state once saved
    out->keep_if_exists(state_dir);
    out->refuse_input(a.model, "the input model");
  }
  // Rotating needs dense weights (a GGUF input in block types is then dequantized, as its FP baseline).
  if (!a.smooth_act.empty() && !a.smooth_auto)
    throw_error("--smooth-act sets the activation quantizer that --smooth auto's alpha search targets; give --smooth auto");
  if (!a.smooth_act.empty()) parse_act_quant(a.smooth_act, "--smooth-act");  // a bad name fails before any work
  if (a.smooth >= 0) {
    if (dev != Device::CPU)
      throw_error("--smooth: SmoothQuant's scale migration runs on the CPU (--device cpu), as the activation quantizers do");
    if (a.calib.empty() && a.calib_tokens.empty())
      throw_error("--smooth needs calibration data (--calib TEXT or --calib-tokens FILE): the scales come from the "
                  "activations' channel maxima");
  }
  if (a.lqer_scale_given && a.lqer_rank == 0)
    throw_error("--lqer-scale sets how --lqer-rank's low-rank error reconstruction is weighted; give --lqer-rank K");
  const LqerScale lqer_scale = parse_lqer_scale(a.lqer_scale);
  if (a.lqer_rank > 0) {
    if (dev != Device::CPU) throw_error("--lqer-rank: the low-rank error reconstruction runs on the CPU (--device cpu)");
    if (is_apiq(a.method))
      throw_error("--lqer-rank: --method ", a.method, " trains its own low-rank adapters; LQER adds its own to RTN, "
                  "GPTQ, AWQ and the other weight-only methods");
    if (to_gguf) throw_error("-o ", a.out, ": GGUF cannot hold LQER's low-rank side path; write a lowbit directory");
    if (lqer_scale == LqerScale::Activation && a.calib.empty() && a.calib_tokens.empty())
      throw_error("--lqer-rank with --lqer-scale act needs calibration data (--calib TEXT or --calib-tokens FILE): the "
                  "error is weighted by the activations' channel magnitude; or give --lqer-scale none");
  }
  // Block-wise streaming (methods/stream.h): the default where nothing needs the whole model.
  if (a.stream != "auto" && a.stream != "on" && a.stream != "off")
    throw_error("--stream must be 'auto', 'on' or 'off', got '", a.stream, "'");
  std::string obstacle = a.stream == "off" ? "" : stream_obstacle(a);
  // Several ranks: the streamed blocks would be written to a state directory that a data-parallel
  // run does not keep (and by every rank); such a run loads the whole model.
  if (obstacle.empty() && a.stream != "off" && world->world_size() > 1)
    obstacle = "a data-parallel run (--gpus / WORLD_SIZE > 1) keeps no state directory for the streamed blocks";
  if (a.stream == "on" && !obstacle.empty()) throw_error("--stream on: ", obstacle, " (use --stream off)");
  const bool streaming = a.stream != "off" && obstacle.empty();
  std::optional<HfBlockStream> block_stream;
  LoadedModel m;
  if (streaming) {
    std::error_code ec2;
    const std::string dir = fs::is_directory(a.model, ec2) ? a.model : fs::path(a.model).parent_path().string();
    block_stream.emplace(HfTensorSource::open(dir.empty() ? "." : dir), dev, (fs::path(state_dir) / "blocks").string(), f,
                         a.lora == "merge" ? LoraStorage::Merged : LoraStorage::Separate,
                         a.merge_dtype == "f32" ? DType::F32 : DType::F16);
    m.model = block_stream->make_model();
  } else {
    m = load_model(a.model, dev,
                   /*dequantize=*/a.tr.rotating() || a.smooth >= 0 || a.tr.act_clip_search || a.method == "quip");
  }
  std::optional<FormatPlan> plan;
  if (fmap) plan = plan_from_map(*fmap, m.model->config(), f);
  // A preset calibrated with data (an importance, as llama-quantize's --imatrix) takes llama-quantize's
  // imatrix-only type rules, so that both files hold the same types.
  const bool calibrated =
      (!a.calib.empty() || !a.calib_tokens.empty()) && (find_method(a.method).needs_calibration || a.weighted_round);
  if (!a.preset.empty()) plan = plan_from_preset(a.preset, m.model->config(), calibrated);
  auto print_plan = [&] {
    if (a.json) return;
    std::fprintf(stderr, "format plan (%s): %s\n", plan->origin.c_str(), plan->summary().c_str());
    // "blk.0.attn_q: q4_k -> q5_0 (576 columns)" notes, counted by transition.
    std::map<std::string, int> fallbacks;
    for (const auto& n : plan->notes) {
      const auto c = n.find(": "), p = n.rfind(" (");
      fallbacks[c != std::string::npos && p != std::string::npos && p > c ? n.substr(c + 2, p - c - 2) : n]++;
    }
    for (const auto& [t, k] : fallbacks)
      std::fprintf(stderr, "  fallback as llama.cpp (rows not whole blocks): %s x %d\n", t.c_str(), k);
  };
  // --bits-budget: the levels and the score are checked now; the plan is made after calibration (lim reads it).
  std::vector<QuantFormatId> budget_levels;
  if (a.bits_budget > 0) {
    budget_levels = parse_budget_levels(a.mp_formats, m.model->config());
    check_bits_budget(m.model->config(), budget_levels, a.bits_budget);  // before any work
    if (parse_layer_score(a.mp_score) == LayerScore::Lim && a.calib.empty() && a.calib_tokens.empty())
      throw_error("--mp-score lim needs calibration data (--calib TEXT or --calib-tokens FILE); --mp-score zd is data-free");
    if (to_gguf)
      for (QuantFormatId id : budget_levels)
        if (!quant_format(id).is_ggml_block())
          throw_error("-o ", a.out, ": --mp-formats lists ", quant_format(id).name, ", which GGUF cannot hold (llama.cpp's "
                      "block types only)");
  }
  if (plan) {
    if (to_gguf)
      for (const auto& [module, id] : plan->formats)
        if (!quant_format(id).is_ggml_block())
          throw_error("-o ", a.out, ": ", plan->origin, " puts ", module, " in ", quant_format(id).name,
                      ", which GGUF cannot hold (llama.cpp's block types only)");
    print_plan();
  }
  apply_rotation(m, a.tr);  // before calibration: GPTQ sees the rotated weights and activations
  if (a.method == "quip" && m.model->config().rope_style == RopeStyle::Interleaved) {
    // The output transforms of q/k mix their rows, which a checkpoint stores in the Hugging Face
    // (rotate-half) order: the model is put in that order first (the same function).
    LlamaConfig c = m.model->config();
    LlamaWeights w = weights_to(m.model->weights(), Device::CPU);
    for_each_weight(w, [](const std::string&, Tensor& t) { t = t.to(DType::F32); });
    w = weights_with_rope_style(c, w, RopeStyle::Half);
    c.rope_style = RopeStyle::Half;
    ModelTransforms tr = m.model->transforms();
    replace_weights(m, c, std::move(w), std::move(tr));
  }
  // Calibration tokens.
  std::vector<int32_t> stream;
  if (!a.calib_tokens.empty()) {
    stream = read_token_file(a.calib_tokens);
  } else if (!a.calib.empty()) {
    auto tok = open_tokenizer(a.tokenizer, a.model);
    std::ifstream in(a.calib, std::ios::binary);
    if (!in) throw_error(a.calib, ": cannot open calibration text");
    std::stringstream ss;
    ss << in.rdbuf();
    for (int id : tok->encode(ss.str(), false)) stream.push_back(id);
  } else if (find_method(a.method).needs_calibration) {
    throw_error("--method ", a.method, " needs calibration data: --calib TEXT (with a tokenizer) or --calib-tokens FILE");
  }
  if (stream.empty() && (!a.calib.empty() || !a.calib_tokens.empty()))
    throw_error(a.calib.empty() ? a.calib_tokens : a.calib, ": calibration data holds no tokens");
  for (size_t i = 0; i < stream.size(); ++i)
    if (stream[i] < 0 || stream[i] >= m.model->config().vocab_size)
      throw_error("calibration token ", stream[i], " at position ", i, " is outside the model's vocabulary");
  const int64_t seqlen = std::min<int64_t>(a.seqlen, m.model->config().max_seq_len);
  Tensor calib = stream.empty() ? Tensor::full({1, 2}, 1.0, DType::I32)  // RTN without data: error report on a stub
                                : sample_calibration(stream, a.nsamples, seqlen, a.seed);
  // --smooth: SmoothQuant's scales from the first windows, folded into the norms and linears; the
  // model is rebuilt from the smoothed weights (the same function in full precision).
  nlohmann::json smooth_json;
  if (a.smooth >= 0) {
    const auto ts = std::chrono::steady_clock::now();
    const int64_t ns = std::min<int64_t>(calib.size(0), 32);
    // --smooth auto: kSearchRows sampled rows per point, the run's format and activation quantizer.
    constexpr int64_t kSearchRows = 512;
    const SmoothStats st =
        collect_smooth_stats(*m.model, calib.slice(0, 0, ns).contiguous(), 1, a.smooth_auto ? kSearchRows : 0);
    LlamaWeights w = weights_to(m.model->weights(), Device::CPU);
    SmoothOptions so;
    so.alpha = a.smooth;
    so.down = m.model->transforms().rotation.empty();  // the online Hadamard before down_proj
    so.search = a.smooth_auto;
    so.format = &f;
    if (m.model->transforms().act.enabled()) so.act = m.model->transforms().act;
    if (!a.smooth_act.empty()) so.act = parse_act_quant(a.smooth_act, "--smooth-act");
    const SmoothReport sr = smooth_weights(w, st, so);
    replace_weights(m, m.model->config(), std::move(w), m.model->transforms());
    smooth_json = {{"alpha", a.smooth_auto ? nlohmann::json("auto") : nlohmann::json(a.smooth)},
                   {"points", sr.points}, {"down", so.down}, {"samples", ns},
                   {"min_scale", sr.min_scale}, {"max_scale", sr.max_scale},
                   {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count()}};
    if (a.smooth_auto) {
      smooth_json["alphas"] = sr.alphas;
      smooth_json["search"] = {{"format", f.name}, {"act", act_quant_name(so.act)}, {"rows", kSearchRows}};
    }
    if (!a.json) {
      const double mean = mean_of(sr.alphas);
      if (a.smooth_auto)
        std::fprintf(stderr, "smoothquant alpha searched per point (for %s weights, %s activations): mean %.2f; ",
                     f.name, act_quant_name(so.act).c_str(), mean);
      else
        std::fprintf(stderr, "smoothquant alpha %.3g: ", a.smooth);
      std::fprintf(stderr, "%d points folded (scales %.3g .. %.3g)%s\n", sr.points, sr.min_scale, sr.max_scale,
                   so.down ? "" : "; down_proj not smoothed (rotated model)");
    }
  }
  // --act-clip search: a clip ratio per block and activation point, on the model the method then
  // quantizes (rotated / smoothed; activations unquantized while it runs), from the first 8 windows.
  nlohmann::json act_clip_json;
  std::vector<double> act_clips;
  if (a.tr.act_clip_search) {
    const auto ts = std::chrono::steady_clock::now();
    const int64_t ns = std::min<int64_t>(calib.size(0), 8);
    const ActQuantSpec target = parse_act_quant(a.tr.act);
    const ActClipReport cr = search_act_clips(*m.model, calib.slice(0, 0, ns).contiguous(), target);
    act_clips = cr.clips;
    const double mean = mean_of(act_clips);
    double lo = 1;
    for (double c : act_clips) lo = std::min(lo, c);
    act_clip_json = {{"clips", act_clips}, {"mean", mean}, {"min", lo}, {"rows", cr.rows}, {"samples", ns},
                     {"error_clip1", cr.error_clip1}, {"error_searched", cr.error_searched},
                     {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count()}};
    if (!a.json)
      std::fprintf(stderr, "act clip search (%s, %lld rows per point): mean ratio %.3f, min %.3f; output error %.4g -> %.4g\n",
                   act_quant_name(target).c_str(), (long long)cr.rows, mean, lo, cr.error_clip1, cr.error_searched);
  }
  // --bits-budget: per-layer formats from the layers' importance (after calibration: lim reads it).
  nlohmann::json budget_json;
  if (a.bits_budget > 0) {
    const LlamaConfig& mc = m.model->config();
    const std::vector<QuantFormatId>& levels = budget_levels;
    const LayerScore score = parse_layer_score(a.mp_score);
    const auto ts = std::chrono::steady_clock::now();
    const std::vector<double> importance =
        score == LayerScore::Lim
            ? layer_importance_lim(*m.model, calib.slice(0, 0, std::min<int64_t>(calib.size(0), a.mp_samples)).contiguous())
            : layer_importance_zd(m.model->weights());
    BudgetPlan bp = plan_for_bits_budget(mc, importance, levels, a.bits_budget, score);
    const double score_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count();
    nlohmann::json layers = nlohmann::json::array();
    for (int i = 0; i < mc.n_layers; ++i)
      layers.push_back({{"layer", i}, {"importance", bp.importance[size_t(i)]},
                        {"format", quant_format(levels[size_t(bp.level[size_t(i)])]).name}});
    budget_json = {{"budget", a.bits_budget}, {"score", a.mp_score}, {"levels", a.mp_formats},
                   {"bits_per_weight", bp.bits}, {"reachable", {bp.min_bits, bp.max_bits}},
                   {"score_samples", score == LayerScore::Lim ? std::min<int64_t>(calib.size(0), a.mp_samples) : 0},
                   {"score_seconds", score_seconds}, {"layers", layers}};
    if (!a.json) {
      std::fprintf(stderr, "bits budget %.4g (%s): %.4f bits per weight over the decoder linears (reachable %.4f .. %.4f):",
                   a.bits_budget, a.mp_score.c_str(), bp.bits, bp.min_bits, bp.max_bits);
      for (int i = 0; i < mc.n_layers; ++i)
        std::fprintf(stderr, " %d:%s", i, quant_format(levels[size_t(bp.level[size_t(i)])]).name);
      std::fprintf(stderr, "\n");
    }
    plan = std::move(bp.plan);
  }
  std::optional<SaliencyMap> saliency;
  double saliency_seconds = 0;
  if (a.method == "sapr") {
    const auto ts = std::chrono::steady_clock::now();
    saliency = obtain_saliency(a, *m.model, calib, f, *world);
    saliency_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count();
  }
  if (a.saliency_only) {  // the saliency file is written (or was there); nothing else is
    nlohmann::json j = {{"saliency", a.saliency}, {"seconds", saliency_seconds}, {"nsamples", calib.size(0)},
                        {"seqlen", calib.size(1)}, {"seed", a.seed}, {"norm", saliency_norm_name(saliency->norm)},
                        {"peak_rss_bytes", peak_rss_bytes()}};
    if (a.json) print_json(j);
    else std::printf("saliency: %s (%.1f s)\n", a.saliency.c_str(), saliency_seconds);
    return;
  }
  if (is_apiq(a.method) && !rank_given && to_gguf && a.lora != "merge") {
    rank = 0;  // GGUF holds the block types alone: learnable clipping only, no adapters
    if (!a.json)
      std::fprintf(stderr, "note: --rank 0 (learnable clipping only): %s holds llama.cpp's block types, not LoRA "
                   "adapters\n", a.out.c_str());
  } else if (is_apiq(a.method) && !rank_given) {
    rank = default_apiq_rank(m.model->config(), f);
    if (!a.json && rank != a.rank)
      std::fprintf(stderr, "note: --rank %lld (default on this model): rank %lld adapters would add more than a fifth of "
                   "%s's bits per weight; give --rank to override\n", (long long)rank, (long long)a.rank, f.name);
  }
  QuantArgs ar = a;
  ar.rank = rank;
  auto method = make_method(a.method, method_config(ar, f, saliency ? &*saliency : nullptr, !stream.empty()));
  // --format with a ggml block type whose blocks do not fit some rows: llama.cpp's fallback type for
  // those (after the method has checked the format itself).
  if (!plan && a.bits_budget <= 0 && (plan = plan_from_format(f, m.model->config()))) print_plan();
  if (world->world_size() > 1 && !method->supports_data_parallel())
    throw_error("--gpus / WORLD_SIZE ", world->world_size(), ": --method ", a.method,
                " has no data-parallel calibration (supported: rtn, gptq, comq, awq, apiq, apiq-layer, sapr); run it "
                "with one rank");
  if (world->world_size() > 1 && is_apiq(a.method) && a.apiq_batch < world->world_size() && writer && !a.json)
    std::fprintf(stderr, "note: --apiq-batch %lld: each training step takes %lld calibration window(s), so at most that "
                 "many of the %d ranks work at a time (the result is the one-process one; give --apiq-batch >= %d to use "
                 "every rank)\n", (long long)a.apiq_batch, (long long)a.apiq_batch, world->world_size(), world->world_size());
  method->set_communicator(world.get());
  PipelineOptions o;
  o.next_from_fp = a.next_input == "fp";
  o.batch = a.batch;
  o.state_dir = state_dir;
  o.checkpoint_seconds = a.checkpoint_seconds;
  o.stop_after_blocks = a.stop_after_blocks;
  o.cache_dtype = calib_dtype(a);
  if (plan) o.formats = &plan->formats;
  // --lqer-rank: the full-precision weights and the activations' channel magnitudes, before quantizing.
  std::map<std::string, Tensor> lqer_fp;
  std::map<std::string, std::vector<double>> lqer_scales;
  double lqer_stats_seconds = 0;
  if (a.lqer_rank > 0) {
    const auto ts = std::chrono::steady_clock::now();
    lqer_fp = snapshot_linear_weights(*m.model);
    if (lqer_scale == LqerScale::Activation)
      lqer_scales = collect_lqer_scales(*m.model, calib.slice(0, 0, std::min<int64_t>(calib.size(0), 32)).contiguous());
    lqer_stats_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count();
  }
  // Data-parallel calibration: rank r takes a contiguous share of the windows (RTN without data
  // keeps the stub everywhere). The resumable state is per process, so several ranks run without it.
  Tensor rank_calib = calib;
  if (world->world_size() > 1) {
    if (!stream.empty()) {
      const auto [b, e] = comm::shard_range(calib.size(0), world->rank(), world->world_size(), "--nsamples");
      rank_calib = calib.slice(0, b, e).contiguous();
    }
    o.state_dir.clear();
    if (writer && !a.json)
      std::fprintf(stderr, "data-parallel calibration: %d ranks (%s backend), %lld windows each or one more; no "
                   "resumable state\n", world->world_size(), world->backend().c_str(),
                   (long long)(calib.size(0) / world->world_size()));
  }
  if (block_stream) o.stream = &*block_stream;
  PipelineReport r = run_blockwise(*m.model, rank_calib, *method, f, o);
  if (!writer) return;  // rank 0 reports and writes the (identical) model
  if (!r.complete) {  // --stop-after-blocks: the state is kept; the same command resumes
    out->keep();
    state->keep();
    if (!a.json)
      std::fprintf(stderr, "stopped after block %d of %d; the state is in %s (run the same command to resume)\n",
                   r.resumed_from_block + r.blocks_run, m.model->n_layers(), state_dir.c_str());
    return;
  }
  nlohmann::json lqer_json;
  if (a.lqer_rank > 0) {
    LqerOptions lo;
    lo.rank = a.lqer_rank;
    lo.scale = lqer_scale;
    lo.seed = a.seed;
    const LqerReport lr = apply_lqer(*m.model, lqer_fp, lqer_scales, lo);
    lqer_fp.clear();
    lqer_json = {{"rank", a.lqer_rank}, {"scale", lqer_scale_name(lqer_scale)}, {"layers", lr.layers},
                 {"max_rank", lr.max_rank}, {"params", lr.params}, {"dtype", "f16"},
                 {"scale_samples", lqer_scale == LqerScale::Activation ? std::min<int64_t>(calib.size(0), 32) : 0},
                 {"mean_rel_error", lr.mean_rel_error}, {"mean_rel_residual", lr.mean_rel_residual},
                 {"power_iters", lo.power_iters}, {"seconds", lr.seconds + lqer_stats_seconds}};
    if (!a.json)
      std::fprintf(stderr, "lqer rank %lld (%s): %d layers, weight error ||E S||/||W S|| %.4g -> %.4g after the "
                   "low-rank path (%.3g M f16 parameters, %.1f s)\n", (long long)a.lqer_rank,
                   lqer_scale_name(lqer_scale), lr.layers, lr.mean_rel_error, lr.mean_rel_residual, lr.params / 1e6,
                   lr.seconds + lqer_stats_seconds);
  }
  nlohmann::json layers = nlohmann::json::array();
  for (const auto& l : r.linears)
    layers.push_back({{"name", l.name}, {"rel_error", l.rel_error}, {"bits_per_weight", l.bits_per_weight}, {"params", l.params}});
  nlohmann::json report = {{"model", a.model},
                           {"method", a.method},
                           {"format", f.name},
                           {"bits_per_weight", r.bits_per_weight},
                           {"seconds", r.seconds},
                           {"peak_rss_bytes", r.peak_rss_bytes},
                           {"nsamples", calib.size(0)},
                           {"seqlen", calib.size(1)},
                           {"seed", a.seed},
                           {"next_input", a.next_input},
                           {"resumed_from_block", r.resumed_from_block},
                           {"layers", layers},
                           {"fp_forward_seconds", r.fp_forward_seconds},
                           {"blocks_run", r.blocks_run},
                           {"saliency_seconds", saliency_seconds},
                           {"checkpoints_saved", r.checkpoints_saved},
                           {"checkpoint_seconds", r.checkpoint_seconds},
                           {"threads", threads_summary()},
                           {"ranks", world->world_size()},
                           {"comm_backend", world->backend()},
                           {"stream", streaming},
                           {"block_seconds", r.block_seconds}};
  if (streaming) {
    report["stream_load_seconds"] = r.stream_load_seconds;
    report["stream_write_seconds"] = r.stream_write_seconds;
  } else if (a.stream != "off") {
    report["stream_obstacle"] = obstacle;
  }
  // --kv-quant wkv4|wkv2: the smoothing, calibrated on the quantized model (methods/kv_wkv.h).
  if (kv_quant_wkv(a.tr.kv_quant)) {
    WkvCalibOptions wo;
    wo.bits = parse_kv_quant_bits(a.tr.kv_quant);
    wo.group = a.tr.kv_group;
    const WkvCalibReport wr = learn_wkv_smoothing(*m.model, calib, wo);
    ModelTransforms t = m.model->transforms();
    t.kv.bits = wo.bits;
    t.kv.wkv = true;
    t.kv.wkv_shift = wr.shift;
    t.kv.wkv_scale = wr.scale;
    m.model->set_transforms(std::move(t));
    report["kv_smoothing"] = {{"group", wo.group}, {"lookahead", wo.lookahead}, {"alphas", wo.alphas},
                              {"windows", calib.size(0)}, {"seqlen", calib.size(1)},
                              {"alpha_keys", wr.alpha_keys}, {"alpha_values", wr.alpha_values},
                              {"loss_plain", wr.loss_plain}, {"loss_chosen", wr.loss_chosen},
                              {"local_plain", wr.local_plain}, {"local_chosen", wr.local_chosen},
                              {"seconds", wr.seconds}};
    if (!a.json) {
      double lp = 0, lc = 0;
      for (size_t i = 0; i < wr.loss_plain.size(); ++i) lp += wr.loss_plain[i], lc += wr.loss_chosen[i];
      std::fprintf(stderr, "kv smoothing %s: next-block relative error %.5f without smoothing, %.5f with (mean over %zu "
                   "layers; %.1f s)\n", a.tr.kv_quant.c_str(), lp / double(wr.loss_plain.size()),
                   lc / double(wr.loss_chosen.size()), wr.loss_plain.size(), wr.seconds);
    }
  }
  // --kv-quant cq1|cq2: the codebooks, learned on the quantized model's keys and values (methods/kv_cq.h).
  if (const int cq_channels = kv_quant_channels(a.tr.kv_quant); cq_channels > 0) {
    KVCodebookOptions ko;
    ko.channels = cq_channels;
    ko.code_bits = parse_kv_quant_bits(a.tr.kv_quant) * cq_channels;
    ko.kmeans.seed = a.seed;
    ko.f16 = a.tr.kv_codebook == "f16";
    const KVCodebookReport kr = learn_kv_codebooks(*m.model, calib, ko);
    ModelTransforms t = m.model->transforms();
    t.kv.bits = parse_kv_quant_bits(a.tr.kv_quant);
    t.kv.cq_channels = cq_channels;
    t.kv.cq_keys = kr.keys;
    t.kv.cq_values = kr.values;
    m.model->set_transforms(std::move(t));
    report["kv_codebooks"] = {{"channels", cq_channels}, {"centroids", int64_t(1) << ko.code_bits},
                              {"points_per_group", kr.points}, {"windows", calib.size(0)}, {"seqlen", calib.size(1)},
                              {"kmeans_max_iters", ko.kmeans.max_iters}, {"fisher_weighted", false},
                              {"codebook_dtype", ko.f16 ? "f16" : "f32"},
                              {"key_rel_error", kr.key_rel_error}, {"value_rel_error", kr.value_rel_error},
                              {"seconds", kr.seconds}};
    if (!a.json) {
      double ek = 0, ev = 0;
      for (double e : kr.key_rel_error) ek += e;
      for (double e : kr.value_rel_error) ev += e;
      std::fprintf(stderr, "kv codebooks %s: %lld layers x %lld groups of %d channels, %lld centroids, %lld points a group; "
                   "mean relative error keys %.4f, values %.4f (%.1f s)\n", a.tr.kv_quant.c_str(),
                   (long long)m.model->n_layers(), (long long)kr.keys.size(1), cq_channels, (long long)(1 << ko.code_bits),
                   (long long)kr.points, ek / double(kr.key_rel_error.size()), ev / double(kr.value_rel_error.size()),
                   kr.seconds);
    }
  }
  {
    TransformArgs tr = a.tr;  // recorded in the checkpoint (calibration ran without them)
    if (tr.act_clip_search) tr.act_clip_given = tr.act_clip_search = false;
    apply_quant_transforms(*m.model, tr);
  }
  if (!act_clips.empty()) {
    ModelTransforms t = m.model->transforms();
    t.act.clips = act_clips;
    m.model->set_transforms(std::move(t));
    report["act_clip_search"] = act_clip_json;
  }
  {
    const ModelTransforms& t = m.model->transforms();
    report["rotation"] = t.rotation.empty() ? "none" : t.rotation;
    if (!smooth_json.is_null()) report["smooth"] = smooth_json;
    report["act"] = act_quant_name(t.act);
    report["kv_quant"] = kv_quant_name(t.kv);
  }
  nlohmann::json extra = {{"source_model", a.model}};
  if (!lqer_json.is_null()) {
    extra["lqer"] = {{"rank", a.lqer_rank}, {"scale", lqer_json["scale"]}, {"dtype", "f16"}};
    report["lqer"] = lqer_json;
  }
  if (plan) {
    nlohmann::json vf = nlohmann::json::object();
    for (const auto& [module, id] : plan->vocab_formats()) vf[module] = quant_format(id).name;
    nlohmann::json fp = {{"origin", plan->origin}, {"llama_ftype", plan->llama_ftype}, {"vocab_formats", vf},
                         {"summary", plan->summary()}, {"fallbacks", plan->notes}};
    if (fmap) fp["text"] = fmap->text;
    if (!budget_json.is_null()) fp["bits_budget"] = budget_json;
    extra["format_plan"] = fp;
    report["format_plan"] = fp;
    if (const auto* gm = dynamic_cast<const GptqMethod*>(method.get()); gm && gm->rtn_layers() > 0) {
      report["gptq_rtn_layers"] = gm->rtn_layers();
      extra["format_plan"]["gptq_rtn_layers"] = gm->rtn_layers();
      if (!a.json)
        std::fprintf(stderr, "note: %d layers in iq4_xs / tq1_0 / tq2_0 were rounded to nearest (GPTQ's sweep "
                     "has no per-value grid for them)\n", gm->rtn_layers());
    }
  }
  if (!stream.empty()) {  // RTN without data runs on a stub: no calibration to record
    extra["calibration"] = {{"nsamples", calib.size(0)}, {"seqlen", calib.size(1)}, {"seed", a.seed}};
    extra["calibration"]["data"] = !a.calib.empty() ? a.calib : a.calib_tokens;
  }
  if (a.method == "quip") {
    extra["quip"] = {{"seed", a.quip_seed}, {"sides", a.quip_sides}};
    report["quip"] = extra["quip"];
  }
  if (a.method == "gptq" || a.method == "rsq" || a.method == "guided" || a.method == "quip") {
    extra["gptq"] = {{"percdamp", a.percdamp}, {"act_order", a.act_order}};
    if (a.hessian_shrink > 0) extra["gptq"]["hessian_shrink"] = a.hessian_shrink;
  }
  if (a.method == "cle") {
    const auto* cm = dynamic_cast<const CleMethod*>(method.get());
    extra["cle"] = {{"bias_correction", !stream.empty()}, {"bias_corrected_layers", cm ? cm->bias_corrected() : 0}};
    report["cle"] = extra["cle"];
  }
  if (a.method == "comq") {
    extra["comq"] = {{"sweeps", a.comq.sweeps}, {"update_scales", a.comq.update_scales}};
    report["comq"] = extra["comq"];
  }
  if (a.method == "adaround") {
    const AdaRoundOptions& o = a.adaround;
    extra["adaround"] = {{"iters", o.iters}, {"lr", o.lr}, {"lambda", o.lambda}, {"beta_start", o.beta_start},
                         {"beta_end", o.beta_end}, {"warmup", o.warmup}, {"zeta", o.zeta}, {"gamma", o.gamma}};
    report["adaround"] = extra["adaround"];
  }
  if (a.method == "adaquant") {
    const AdaQuantOptions& o = a.adaquant;
    extra["adaquant"] = {{"iters", o.iters}, {"lr_w", o.lr_w}, {"lr_range", o.lr_range},
                         {"learn_scales", o.learn_scales}};
    report["adaquant"] = extra["adaquant"];
  }
  if (a.method == "rsq") {
    extra["rsq"] = {{"min_weight", a.rsq.min_weight}, {"max_weight", a.rsq.max_weight}, {"importance", "attn-con"}};
    report["rsq"] = extra["rsq"];
  }
  if (a.method == "guided") {
    const auto* gm = dynamic_cast<const GuidedMethod*>(method.get());
    extra["guided"] = {{"groups", a.guided.groups}, {"gradients", "fp"}, {"loss", "next-token cross-entropy (sum)"}};
    report["guided"] = extra["guided"];
    report["guided"]["gradient_seconds"] = gm ? gm->gradient_seconds() : 0.0;
  }
  if (a.method == "awq") extra["awq"] = {{"clip", !a.no_clip}};
  if (a.method == "awq" && a.weighted_round) extra["awq"]["weighted_round"] = true;
  if (a.method == "rtn" && a.weighted_round) extra["rtn"] = {{"weighted_round", true}};
  if (a.method == "ptqtp") {
    extra["ptqtp"] = {{"start", a.tp_start}, {"scales", a.tp_scales}};
    report["ptqtp"] = extra["ptqtp"];
  }
  if (a.method == "norm-tweak") {
    nlohmann::json h = {{"base", a.base}, {"epochs", a.nt.epochs}, {"batch", a.nt.batch}, {"lr", a.nt.lr},
                        {"lr_depth_scale", a.nt.lr_depth_scale}};
    if (a.base == "gptq") h["gptq"] = {{"percdamp", a.percdamp}, {"act_order", a.act_order}};
    if (a.base == "awq") h["awq"] = {{"clip", !a.no_clip}};
    if (a.base == "awq" && a.weighted_round) h["awq"]["weighted_round"] = true;
    if (a.base == "rtn" && a.weighted_round) h["rtn"] = {{"weighted_round", true}};
    extra["norm_tweak"] = h;
    report["norm_tweak"] = h;
  }
  if (is_apiq(a.method)) {
    const ApiqOptions o = apiq_options(ar);
    nlohmann::json h = {{"mode", o.mode == ApiqMode::Layer ? "layer" : "block"},
                        {"rank", o.layer.rank}, {"lora_alpha", o.layer.lora_alpha}, {"lora_init", a.lora_init},
                        {"epochs", o.epochs}, {"batch", o.batch}, {"lora_lr", o.lora_lr}, {"clip_lr", o.clip_lr},
                        {"lora_wd", o.lora_wd}, {"clip_wd", o.clip_wd}, {"aug_coef", o.aug_coef},
                        {"clip_init", o.layer.clip_init}, {"clip_init_rtn", o.layer.clip_init_rtn && lwc_is_ggml(f)}, {"bf16", o.bf16}, {"tf32", a.tf32},
                        {"calib_dtype", dtype_name(calib_dtype(ar))}};
    if (saliency)
      h["sapr"] = {{"lambda", o.lambda}, {"saliency_kind", saliency_kind_name(saliency->kind)},
                   {"saliency_norm", saliency_norm_name(saliency->norm)}, {"reduction", sapr_reduction_name(o.reduction)},
                   {"target", a.sapr_target}, {"weight_epochs", o.weight_epochs}, {"output_epochs", o.output_epochs},
                   {"recipe", a.sapr_recipe.empty() ? "none" : a.sapr_recipe}};
    extra["apiq"] = h;
    report["apiq"] = h;
    // The mean training loss of the first and last epoch of each training run (block, or linear):
    // what a data-parallel run is compared on (all-reduced, so equal on every rank).
    if (const auto* am = dynamic_cast<const ApiqMethod*>(method.get())) {
      nlohmann::json runs = nlohmann::json::array();
      for (const auto& l : am->log()) {
        if (l.epoch == 0) runs.push_back({{"layer", l.layer}, {"scope", l.scope}, {"first", l.loss}, {"last", l.loss}});
        else if (!runs.empty()) runs.back()["last"] = l.loss;
      }
      report["apiq"]["epoch_loss"] = runs;
    }
  }
  const auto t_save = std::chrono::steady_clock::now();
  if (block_stream)
    block_stream->assemble(out_dir, a.method, extra, m.model->transforms());
  else
    save_quantized_model(out_dir, *m.model, a.method, f, extra,
                         a.lora == "merge" ? LoraStorage::Merged : LoraStorage::Separate,
                         a.merge_dtype == "f32" ? DType::F32 : DType::F16);
  report["save_seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_save).count();
  // The process's peak, the output's write included (the pipeline's own figure stops before it).
  const int64_t peak_rss = peak_rss_bytes();
  report["peak_rss_bytes"] = peak_rss;
  if (dev == Device::CUDA) report["peak_gpu_bytes"] = cuda_peak_bytes();  // live GPU tensors, allocator buckets
  {
    const std::string path = to_gguf ? a.out + ".report.json" : (fs::path(out_dir) / "quantize_report.json").string();
    std::ofstream rep(path);
    rep << report.dump(2) << "\n";
    rep.close();
    if (!rep) throw_error(path, ": write failed");
  }
  if (!to_gguf) copy_tokenizer_files(a.tokenizer, a.model, out_dir);  // a GGUF output embeds it instead
  out->keep();
  fs::remove_all(state_dir, ec);
  if (to_gguf) {
    export_quantized_dir_to_gguf(out_dir, a.out, a.tokenizer, a.json);
    fs::remove_all(out_dir, ec);
  }
  if (a.json) {
    print_json(report);
    return;
  }
  print_stdout("%-44s %12s %8s\n", "layer", "rel. error", "bpw");
  for (const auto& l : r.linears) print_stdout("%-44s %12.3e %8.3f\n", l.name.c_str(), l.rel_error, l.bits_per_weight);
  const std::string fmt_label = plan ? plan->origin + " (" + plan->summary() + ")" : std::string(f.name);
  print_stdout("\n%s %s: %.3f bits per weight (quantized layers, metadata included), %.1fs, peak memory %.0f MiB\n",
              a.method.c_str(), fmt_label.c_str(), r.bits_per_weight, r.seconds, double(peak_rss) / (1 << 20));
  if (r.blocks_run > 0)
    print_stdout("calibration forward (full precision, %lld x %lld tokens): %.3fs per block, %.1fs in all (%s)\n",
                (long long)calib.size(0), (long long)calib.size(1), r.fp_forward_seconds / r.blocks_run,
                r.fp_forward_seconds, threads_summary().c_str());
  print_stdout("wrote %s\n", a.out.c_str());
}
}  // namespace

void register_quantize(CLI::App& app) {
  auto* q = app.add_subcommand("quantize", "Quantize a model block by block (" + method_names() + "); resumable");
  auto a = std::make_shared<QuantArgs>();
  q->add_option("-m,--model", a->model, "input model (llama2.c .bin, .gguf, HF directory)")->required();
  q->add_option("--method", a->method, "quantization method, one of:" + method_help())
      ->capture_default_str();
  q->add_option("--format", a->format,
                "number format (default int4g128; int2g64 for apiq/sapr): " + quant_format_names())
      ->check(non_empty());
  q->add_option("--format-map", a->format_map,
                "rule file giving formats per tensor kind and layer (attn_v layers=0-3 q6_k; default q4_k; token_embd "
                "q8_0; first match wins; see README)");
  q->add_option("--preset", a->preset,
                "llama.cpp's per-tensor type mixture (llama-quantize's choice, fallbacks included): " + preset_names());
  q->add_option("--bits-budget", a->bits_budget,
                "layer-wise mixed precision: average bits per weight over the decoder linears (metadata included: "
                "int2g64 is 2.5); the most important layers (--mp-score) get the higher formats of --mp-formats")
      ->check(above(0));
  q->add_option("--mp-formats", a->mp_formats, "the levels --bits-budget chooses from, in increasing bits")
      ->capture_default_str()->each([a](const std::string&) { a->mp_given = true; });
  q->add_option("--mp-score", a->mp_score,
                "layer importance for --bits-budget: lim (how much a layer changes its input, on calibration "
                "windows) or zd (share of weights within one std of the mean, data-free)")
      ->capture_default_str()->each([a](const std::string&) { a->mp_given = true; });
  q->add_option("--mp-samples", a->mp_samples, "calibration windows the lim score reads")
      ->capture_default_str()->check(at_least(1))->each([a](const std::string&) { a->mp_given = true; });
  q->add_option("--smooth", a->smooth_arg,
                "SmoothQuant scale migration before quantizing (CPU, needs calibration): channel scales "
                "max|X|^ALPHA / max|W|^(1-ALPHA) folded into the norms, q/k/v, gate/up and up->down; ALPHA in "
                "[0, 1], or 'auto': per smoothing point the alpha of 0, 0.1, ..., 1 with the least output error "
                "of the quantized readers (round-to-nearest in --format, activations as --act, int8 when none) "
                "on 512 sampled calibration rows")
      ->each([a](const std::string& v) {
        if (v == "auto") {
          a->smooth_auto = true;
          a->smooth = 0.5;
          return;
        }
        char* end = nullptr;
        const double x = std::strtod(v.c_str(), &end);
        if (v.empty() || end == nullptr || *end != '\0' || !(x >= 0 && x <= 1))
          throw CLI::ValidationError("--smooth", "expected a number in [0, 1] or 'auto', got '" + v + "'");
        a->smooth = x;
      });
  q->add_option("--smooth-act", a->smooth_act,
                "--smooth auto: the activation quantizer the alpha search targets (int8, int4, int8-asym, int4-asym, fp8, fp4-mx, fp4-nv "
                "or none; default: --act when given, else int8)");
  q->add_option("--lqer-rank", a->lqer_rank,
                "LQER: after quantizing, reconstruct each block linear's weight error W - Q(W) by a rank-K product "
                "B A (top-K SVD, kept in f16 beside the packed weight and added to its output); not with ApiQ/SAPR")
      ->check(at_least(1));
  q->add_option("--lqer-scale", a->lqer_scale,
                "LQER: 'act' (L2QER: the SVD of the error scaled by the calibration activations' mean |x| per input "
                "channel, needs --calib) or 'none' (plain SVD)")
      ->each([a](const std::string&) { a->lqer_scale_given = true; });
  q->add_option("--calib", a->calib, "calibration text file (tokenized with the model's tokenizer)");
  q->add_option("--tokenizer", a->tokenizer, "tokenizer for --calib (default: the model directory's)");
  q->add_option("--calib-tokens", a->calib_tokens, "calibration data as raw int32 token ids");
  q->add_option("--nsamples", a->nsamples, "calibration windows")->capture_default_str()->check(at_least(1));
  q->add_option("--seqlen", a->seqlen, "tokens per window (capped at the model's max)")->capture_default_str()->check(at_least(2));
  q->add_option("--seed", a->seed, "seed for drawing the windows")->capture_default_str()->check(at_least(0));
  q->add_option("--next-input", a->next_input, "next block's inputs: outputs of the 'quantized' or the 'fp' block")
      ->capture_default_str();
  q->add_option("--percdamp", a->percdamp, "GPTQ dampening (fraction of mean diag H)")->capture_default_str()->check(above(0));
  q->add_option("--hessian-shrink", a->hessian_shrink,
                "GPTQ: scale H's off-diagonal by (1 - A), 0..1 (1: importance-weighted round to nearest)")
      ->capture_default_str()->check(between(0, 1));
  q->add_flag("--act-order", a->act_order, "GPTQ: columns by decreasing Hessian diagonal (static groups)");
  q->add_flag("--no-clip", a->no_clip, "AWQ: skip the clipping search");
  q->add_flag("--weighted-round", a->weighted_round,
              "rtn/awq on ggml block types: choose each block's scales by the rounding error weighted by the "
              "calibration inputs' mean x^2 per channel (llama.cpp's importance-matrix rule; AWQ: instead of its "
              "clipping search); needs --calib");
  // norm-tweak
  q->add_option("--base", a->base, "norm-tweak: the method that quantizes each block before its norms are tweaked")
      ->capture_default_str()
      ->check(CLI::IsMember({"rtn", "gptq", "awq"}));
  q->add_option("--nt-lr", a->nt.lr, "norm-tweak: Adam learning rate of the norm weights")
      ->capture_default_str()
      ->check(above(0));
  q->add_option("--nt-epochs", a->nt.epochs, "norm-tweak: passes over the calibration windows per block")
      ->capture_default_str()
      ->check(at_least(0));
  q->add_option("--nt-batch", a->nt.batch, "norm-tweak: calibration windows per Adam step")
      ->capture_default_str()
      ->check(at_least(1));
  q->add_option("--rsq-min", a->rsq.min_weight, "rsq: weight of the least attended token of a window")
      ->capture_default_str()
      ->check(above(0));
  q->add_option("--rsq-max", a->rsq.max_weight, "rsq: weight of the most attended token of a window")
      ->capture_default_str()
      ->check(above(0));
  q->add_option("--guided-groups", a->guided.groups,
                "guided: groups of output rows per linear, each quantized with its own gradient-weighted Hessian")
      ->capture_default_str()
      ->check(at_least(1));
  q->add_option("--comq-sweeps", a->comq.sweeps, "comq: passes over all coordinates (each followed by the scale update)")
      ->capture_default_str()
      ->check(at_least(1));
  q->add_option("--ptq161-ratio", a->ptq161.salient_ratio,
                "ptq161: share of input channels kept at 4 bits (by calibration max|x|; reference code: 0.2)")
      ->capture_default_str()
      ->check(between(0, 1));
  q->add_option("--ptq161-iters", a->ptq161.opt_iters,
                "ptq161: alternating least-squares sweeps of the row/column scales (0: closed form only)")
      ->capture_default_str()
      ->check(at_least(0));
  q->add_option("--ptq161-block-epochs", a->ptq161.block_epochs,
                "ptq161: passes of AdamW on the scales against each block's FP output after the layer-wise fit (0: off)")
      ->capture_default_str()
      ->check(at_least(0));
  q->add_option("--ar-iters", a->adaround.iters, "adaround: Adam iterations per layer (paper: 10000)")
      ->capture_default_str()
      ->check(at_least(1));
  q->add_option("--ar-lambda", a->adaround.lambda, "adaround: weight of the rounding regularizer (paper: 0.01)")
      ->capture_default_str()
      ->check(at_least(0));
  q->add_option("--aq-iters", a->adaquant.iters, "adaquant: Adam iterations per layer (reference code: 100)")
      ->capture_default_str()
      ->check(at_least(1));
  q->add_option("--aq-lr", a->adaquant.lr_w,
                "adaquant: Adam learning rate of the weights (reference code: 1e-5; the group ranges' is 1e-3)")
      ->capture_default_str()
      ->check(above(0));
  q->add_option("--tp-start", a->tp_start,
                "ptqtp: where the alternation starts: paper (sign planes), grid (the format's RTN) or both (better fit kept)")
      ->capture_default_str();
  q->add_option("--quip-seed", a->quip_seed, "quip: seed of the per-layer random Hadamard-type transforms")
      ->capture_default_str()
      ->check(at_least(0));
  q->add_option("--quip-sides", a->quip_sides,
                "quip: both (W' = R_out^T W R_in, the input and output transformed online) or input (W' = W R_in)")
      ->capture_default_str();
  q->add_option("--tp-scales", a->tp_scales,
                "ptqtp: group (one scale pair per 128 weights) or row (one per row, stored repeated in every group)")
      ->capture_default_str();
  q->add_option("--nt-lr-depth", a->nt.lr_depth_scale,
                "norm-tweak: the learning rate grows linearly to lr * (1 + this) at the last block")
      ->capture_default_str()
      ->check(at_least(0));
  q->add_option("--batch", a->batch, "calibration windows per forward pass")->capture_default_str()->check(at_least(1));
  // ApiQ / SAPR
  q->add_option("--rank", a->rank, "ApiQ: LoRA rank (0: learnable clipping only, the default with -o FILE.gguf; default 64, lowered on small models so that the f16 adapters add at most a fifth of the format's bits per weight)")->capture_default_str()->check(at_least(0));
  q->add_option("--lora-alpha", a->lora_alpha, "ApiQ: LoRA alpha (the adapters add alpha/rank * B A)")
      ->capture_default_str()
      ->check(above(0));
  q->add_option("--lora-init", a->lora_init, "ApiQ: LoRA init, kaiming (PEFT default) or gaussian")->capture_default_str();
  q->add_option("--epochs", a->epochs, "ApiQ: calibration epochs per block (or layer)")->capture_default_str()->check(at_least(0));
  q->add_option("--lora-lr", a->lora_lr, "ApiQ: AdamW learning rate of the LoRA factors")->capture_default_str()->check(at_least(0));
  q->add_option("--clip-lr", a->clip_lr, "ApiQ: AdamW learning rate of the clipping logits")->capture_default_str()->check(at_least(0));
  q->add_option("--weight-decay", a->weight_decay, "ApiQ: weight decay of both groups (overrides --lora-wd/--clip-wd)")->check(at_least(0));
  q->add_option("--lora-wd", a->lora_wd, "ApiQ: weight decay of the LoRA factors")->capture_default_str()->check(at_least(0));
  q->add_option("--clip-wd", a->clip_wd, "ApiQ: weight decay of the clipping logits")->capture_default_str()->check(at_least(0));
  q->add_option("--apiq-batch", a->apiq_batch, "ApiQ: calibration windows per optimizer step (several ranks: a step's windows are spread over them, so give at least --gpus)")->capture_default_str()->check(at_least(1));
  q->add_option("--apiq-aug", a->aug,
                "ApiQ block-wise: coefficient of the second loss term ||F(W, Xq) - F(Q, Xq)||^2 (ApiQ's --aug_loss)")
      ->capture_default_str()
      ->check(at_least(0));
  q->add_option("--clip-init", a->clip_init, "ApiQ: initial clipping logits (sigmoid(4) = 0.982); ggml types start from the RTN grid unless it is given")->capture_default_str()->check(finite());
  q->add_flag("--apiq-verbose", a->apiq_verbose, "ApiQ: print the loss of every epoch and each block's stage times");
  q->add_flag("--tf32", a->tf32, "GPU: let f32 matmuls and attention use TF32 tensor cores (faster, ~1e-3 relative error)");
  q->add_flag("--bf16", a->bf16,
              "ApiQ/SAPR on the GPU: training steps' matmuls and attention in bf16 with fp32 accumulation "
              "(autocast, as ApiQ's reference runs fp16); parameters, loss and optimizer stay fp32");
  q->add_option("--calib-dtype", a->calib_dtype,
                "ApiQ/SAPR: dtype of the calibration activations the pipeline keeps (block inputs and FP targets): "
                "auto (bf16 with --bf16, else f32), f32, or bf16 (half the memory; every step still computes in f32)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "f32", "bf16"}));
  q->add_option("--lambda", a->lambda,
                "SAPR: weight of the saliency regularizer (default chosen among 0.3 / 3 / 30 on held-out validation "
                "text of stories260K and SmolLM2-135M for --saliency-norm layer --sapr-reduction mean, "
                "docs/results/smollm2.md; on SmolLM2 int2g64 0.3 also won on test over 3 seeds: 135.9 vs 143.1 for 3; "
                "the raw/sum form needs a model-specific value)")
      ->capture_default_str()
      ->check(at_least(0));
  q->add_option("--saliency", a->saliency, "SAPR: saliency file (read when it exists, else computed and written)");
  q->add_option("--saliency-model", a->saliency_model,
                "SAPR: whose gradients the saliency comes from: 'fp' (the full-precision model, the paper's) or "
                "'quantized' (the model with its linears round-to-nearest quantized to --format; best on stories260K's "
                "validation split, a tie on SmolLM2-135M's and worse on its test text: 142.2 vs 135.9, so not the default)")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp", "quantized"}));
  q->add_flag("--sapr-anneal", a->sapr_anneal,
              "SAPR: lambda decays linearly over the mixed-loss epochs (needs mixed epochs: e.g. "
              "--sapr-weight-epochs 0 --sapr-output-epochs 0)");
  q->add_flag("--sapr-layer-weight", a->sapr_layer_weight,
              "SAPR: scale each layer's lambda by its mean Fisher over the mean of all layers' (layer-normalised "
              "saliency drops how much a layer matters; this puts it back)");
  q->add_flag("--saliency-only", a->saliency_only,
              "SAPR: compute the --saliency file (on the calibration windows) and stop; -o is not written");
  q->add_option("--saliency-kind", a->saliency_kind, "SAPR: fisher, grad-weight, act-weight or uniform (all weights alike: the ablation without saliency)")->capture_default_str();
  q->add_option("--saliency-batch", a->saliency_batch, "SAPR: calibration windows per saliency backward pass")
      ->capture_default_str()
      ->check(at_least(1));
  q->add_option("--saliency-norm", a->saliency_norm,
                "SAPR: 'layer' = mean over batches of g^2, scaled to mean 1 per layer; 'none' = raw sum over "
                "batches of g^2 (the reference code's SqueezeLLM-style Fisher). Stored in the --saliency file; a raw "
                "file is normalised on load for 'layer', a layer file cannot serve 'none'")
      ->capture_default_str();
  q->add_option("--sapr-reduction", a->sapr_reduction,
                "SAPR: regularizer per layer: 'mean' of S (W - Ŵ)^2 over its elements, or 'sum' (the reference; "
                "= numel x mean, so lambda must be smaller)")
      ->capture_default_str();
  q->add_option("--sapr-target", a->sapr_target,
                "SAPR: regularize Q(W) ('quant', the reference's before_lora: only the clipping gets its gradient) "
                "or Q(W) + BA ('quant-lora')")
      ->capture_default_str();
  q->add_option("--sapr-recipe", a->sapr_recipe,
                "SAPR: 'paper' = the reference code's saliency recipe: --saliency-norm none --sapr-reduction sum "
                "--sapr-target quant, 3/4 of --epochs weight preservation then 1/4 output preservation (15/5 of "
                "20); flags given explicitly take precedence. --lambda must be given (reference: 0.1 for "
                "Llama-2-7B; its scale depends on the model)");
  q->add_option("--sapr-weight-epochs", a->sapr_weight_epochs,
                "SAPR: leading epochs with the regularizer only (default with --sapr-output-epochs unset: the "
                "paper's 3/4 of --epochs, 15 of 20; 0 and 0 = every epoch on the mixed loss)");
  q->add_option("--sapr-output-epochs", a->sapr_output_epochs,
                "SAPR: trailing epochs with the ApiQ loss only (default: 1/4 of --epochs, 5 of 20)");
  q->add_option("--lora", a->lora, "ApiQ: write adapters separately ('keep') or merged into dense layers ('merge')")
      ->capture_default_str();
  q->add_option("--merge-dtype", a->merge_dtype, "ApiQ with --lora merge: dtype of the merged dense layers (f16, f32)")
      ->capture_default_str();
  q->add_option("--state-dir", a->state_dir, "resumable state (default: OUT/.state; removed on success)");
  q->add_option("--stream", a->stream,
                "block-wise streaming: 'auto' (default) reads a Hugging Face safetensors model (one file or shards) "
                "one decoder block at a time and writes each quantized block out as soon as it is done, so memory "
                "holds one block plus the calibration activations whatever the depth (the output is the same, byte "
                "for byte); other inputs, and --rotate, --smooth, --bits-budget, guided and sapr without a saliency "
                "file, load the whole model. 'on': stream or fail; 'off': always load the whole model")
      ->capture_default_str();
  q->add_option("--stop-after-blocks", a->stop_after_blocks,
                "testing aid: stop after this many blocks of this run, keeping the resumable state (0: off)")
      ->check(at_least(0));
  q->add_option("--checkpoint-seconds", a->checkpoint_seconds,
                "save the resumable state after a block when this many seconds passed since the last save (0: after "
                "every block; a save writes the calibration activations twice, 1.2 GB for a 576-wide model at 128 x 2048)")
      ->capture_default_str()
      ->check(at_least(0.0));
  q->add_option("-o,--out", a->out, "output directory (config.json + model.safetensors), or FILE.gguf for llama.cpp (ggml block --format only; report in FILE.gguf.report.json)")->required();
  q->add_option("--device", a->device, "cpu or cuda")->capture_default_str();
  q->add_flag("--json", a->json, "print the report as JSON");
  add_transform_options(q, &a->tr);
  add_dist_options(q, &a->dist);
  add_threads_option(q);
  q->callback([a, q] {
    // Method-specific flags given to another method are refused rather than silently ignored.
    const std::pair<const char*, const char*> owned[] = {{"--base", "norm-tweak"}, {"--nt-lr", "norm-tweak"},
                                                         {"--nt-epochs", "norm-tweak"}, {"--nt-batch", "norm-tweak"},
                                                         {"--nt-lr-depth", "norm-tweak"},
                                                         {"--rsq-min", "rsq"}, {"--rsq-max", "rsq"},
                                                         {"--guided-groups", "guided"}, {"--comq-sweeps", "comq"},
                                                         {"--ar-iters", "adaround"}, {"--ar-lambda", "adaround"},
                                                         {"--aq-iters", "adaquant"}, {"--aq-lr", "adaquant"},
                                                         {"--ptq161-ratio", "ptq161"}, {"--ptq161-iters", "ptq161"},
                                                         {"--ptq161-block-epochs", "ptq161"},
                                                         {"--tp-start", "ptqtp"}, {"--tp-scales", "ptqtp"},
                                                         {"--quip-seed", "quip"}, {"--quip-sides", "quip"}};
    for (const auto& [flag, method] : owned)
      if (q->count(flag) > 0 && a->method != method)
        throw_error(flag, " applies to --method ", method, ", not ", a->method);
    apply_sapr_recipe(*a, *q);
    a->clip_init_given = q->count("--clip-init") > 0;
    run_quantize(*a, q->count("--rank") > 0);
  });
}

}  // namespace lowbit::cli
