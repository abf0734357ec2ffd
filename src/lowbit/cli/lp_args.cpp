#include "lowbit/cli/lp_args.h"

#include "lowbit/cli/common.h"

namespace lowbit::cli {

void add_low_precision_options(CLI::App* t, LowPrecisionArgs* a, const std::string& what) {
  LowPrecisionOptions& o = a->o;
  t->add_option("--precision", a->precision,
                "GEMM precision of " + what + ", emulated (operands quantized and dequantized, f32 GEMMs, f32 "
                "master weights; CPU and CUDA): f32, bf16, fp8 (E4M3 forward, E5M2 gradients, per-tensor scales), "
                "mxfp4 (E2M1, 32-blocks, power-of-two scales), nvfp4 (E2M1, 16-blocks, E4M3 scales + f32 tensor "
                "scale; 16x16 weight blocks, Hadamard on the weight-gradient inputs, stochastic rounding of gradients), "
                "fp4-dge (E2M1 with per-token / per-channel absmax scales, E5M2 gradients, the differentiable gradient "
                "estimator on the weights and outlier clamping + compensation on the activations: Wang et al. 2025; "
                "CPU only), int4 (INT4 with per-tensor scales: the Hadamard quantizer on activations and weights, bit "
                "splitting + leverage-score sampling of the gradients: Xi et al. 2023; emulated on CPU and CUDA)")
      ->capture_default_str();
  t->add_option("--dge-k", o.recipe.dge_k, "fp4-dge: power k of the DGE's smooth step, in [1, 100] (1 = straight-through estimator)")
      ->capture_default_str();
  t->add_option("--dge-clip", o.recipe.dge_clip, "fp4-dge: the DGE derivative's upper clip, in (0, 1000]")
      ->capture_default_str();
  t->add_option("--occ-quantile", o.recipe.occ_quantile,
                "fp4-dge: activations clamped to their (1-a, a) quantiles, the residual added back in f32; a in "
                "(0.5, 1] (1 = no clamping)")
      ->capture_default_str();
  t->add_option("--fp8-scaling", a->fp8_scaling,
                "fp8: delayed (the max of the last --amax-history amaxes of each operand) or current (each tensor's own "
                "amax)")
      ->capture_default_str();
  t->add_option("--amax-history", o.recipe.amax_history, "fp8 delayed scaling: amaxes kept per operand")
      ->capture_default_str()->check(CLI::Range(1, 1024));
  t->add_option("--lp-recipe", a->lp_recipe,
                "mxfp4/nvfp4: full (the NVFP4 paper's recipe) or naive (1-D weight blocks, no Hadamard transform, "
                "round-to-nearest gradients, no block kept in f32); fp4-dge: full (DGE + OCC) or naive (direct E2M1 "
                "casting with the straight-through estimator); int4: full (Hadamard quantizer, bit splitting + "
                "leverage-score sampling) or naive (plain per-tensor INT4, round to nearest)")
      ->capture_default_str();
  t->add_option("--lp-gemm", a->lp_gemm,
                "bf16/fp8: native (GEMMs on the formats themselves: cuBLASLt FP8 and bf16 tensor-core GEMMs on CUDA, "
                "the FP8 reference body on the CPU; FP8 shapes need multiples of 16, others stay emulated), emulated "
                "(f32 GEMMs on dequantized operands) or auto (native on CUDA, emulated on the CPU); fp4 is always "
                "emulated")
      ->capture_default_str();
  t->add_option("--lp-int4-grad", a->int4_grad,
                "int4 ablation: which backward GEMMs sample the bit-split output gradient with leverage scores: "
                "bs-lss (both, the paper's recipe), bs-lss-dgrad (the input gradient only, as the authors' released "
                "code; the weight gradient reads all split rows) or bs (bit splitting alone, no sampling)")
      ->capture_default_str();
  t->add_option("--lp-int4-scale", a->int4_scale,
                "int4 ablation: tensor (one absmax scale per tensor, the default) or row (one per row: per token for "
                "activations and gradients, per output channel for weights; CPU only)")
      ->capture_default_str();
  t->add_option("--lp-keep-first", o.keep_first, "blocks at the start whose linears stay f32")
      ->capture_default_str()->check(at_least(0));
  t->add_option("--lp-keep-last", o.keep_last,
                "blocks at the end whose linears stay f32 (-1: 15 % of the blocks, at least 1, for mxfp4/nvfp4 as the "
                "NVFP4 paper; 0 for bf16/fp8)")
      ->capture_default_str()->check(at_least(-1));
}

LowPrecisionOptions resolve_low_precision(const LowPrecisionArgs& a, const std::string& device, const std::string& command) {
  LowPrecisionOptions o = a.o;
  o.recipe.precision = parse_lp_precision(a.precision);
  if (a.fp8_scaling != "delayed" && a.fp8_scaling != "current")
    throw_error("--fp8-scaling: '", a.fp8_scaling, "' is not a scaling rule (choices: delayed, current)");
  o.recipe.delayed_scaling = a.fp8_scaling == "delayed";
  check_lp_recipe(o.recipe);  // the flags as given (naive then overrides some)
  apply_lp_recipe_name(o, a.lp_recipe);
  const bool int4 = o.recipe.precision == LpPrecision::INT4;
  using G = LpRecipe::Int4Grad;
  if (a.int4_grad == "bs-lss") o.recipe.int4_grad = G::BsLss;
  else if (a.int4_grad == "bs-lss-dgrad") o.recipe.int4_grad = G::BsLssDgrad;
  else if (a.int4_grad == "bs") o.recipe.int4_grad = G::Bs;
  else throw_error("--lp-int4-grad: '", a.int4_grad, "' is not a gradient estimator (choices: bs-lss, bs-lss-dgrad, bs)");
  if (a.int4_scale != "tensor" && a.int4_scale != "row")
    throw_error("--lp-int4-scale: '", a.int4_scale, "' is not a scaling granularity (choices: tensor, row)");
  o.recipe.int4_row_scales = a.int4_scale == "row";
  if (!int4 && (a.int4_grad != "bs-lss" || a.int4_scale != "tensor"))
    throw_error(a.int4_grad != "bs-lss" ? "--lp-int4-grad" : "--lp-int4-scale", " applies to --precision int4 only, not ",
                a.precision);
  if (int4 && !o.recipe.stochastic_grads && a.int4_grad != "bs-lss")
    throw_error("--lp-int4-grad ", a.int4_grad, ": the naive recipe (--lp-recipe naive) has no bit splitting to sample "
                "or not (plain INT4 gradients)");
  if (int4 && o.recipe.int4_row_scales && device != "cpu")
    throw_error(command, ": --lp-int4-scale row has no CUDA body yet (the per-row INT4 quantizers run on the CPU only): "
                "use --device cpu");
  if (o.recipe.precision == LpPrecision::FP4_DGE && device != "cpu")
    throw_error(command, ": --precision fp4-dge has no CUDA body yet (the outlier quantile of OCC and the DGE derivative "
                "run on the CPU only): use --device cpu");
  if (a.lp_gemm != "auto" && a.lp_gemm != "native" && a.lp_gemm != "emulated")
    throw_error("--lp-gemm: '", a.lp_gemm, "' is not a GEMM mode (choices: auto, native, emulated)");
  // auto: native on CUDA (FP8 tensor cores through cuBLASLt, bf16 tensor cores), emulated on the CPU.
  // Resolved to what runs, so the reports' `lp_gemm` says it: only fp8 (ops::fp8_gemm, also on the
  // CPU) and bf16 on CUDA have native GEMMs; the fp4 precisions and int4 always emulate.
  const bool asked = a.lp_gemm == "native" || (a.lp_gemm == "auto" && device != "cpu");
  const LpPrecision p = o.recipe.precision;
  o.recipe.native_gemm = asked && (p == LpPrecision::FP8 || (p == LpPrecision::BF16 && device != "cpu"));
  return o;
}

}  // namespace lowbit::cli
