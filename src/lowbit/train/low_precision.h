// `lowbit train --precision bf16|fp8|mxfp4|nvfp4|fp4-dge|int4` (issue 18): the linear layers of the decoder blocks
// become LowPrecisionLinear (model/lp_linear.h: quantize-dequantize of every GEMM operand, f32
// GEMMs, straight-through gradients, f32 master weights; the recipes are in autograd/lp_linear.h).
// Emulated on the CPU: the numbers are what a kernel with FP8/FP4 inputs and f32 accumulation
// computes. On CUDA, bf16 and fp8 run native GEMMs by default (LpRecipe::native_gemm: bf16 tensor
// cores, cuBLASLt FP8); FP4 and int4 stay emulated (Hopper has no FP4 tensor cores; int4's quantizers
// have CUDA bodies, bit for bit the CPU's, into f32 GEMMs); fp4-dge is CPU-only (its outlier quantile
// and DGE derivative have no CUDA body: refused on CUDA).
//
// What stays in high precision: the token embedding, the norms, attention's own products (QK^T and
// PV), the output head (lm_head) — as in the FP8 and NVFP4 recipes — and, by default for the FP4
// precisions, the linear layers of the last blocks: the NVFP4 paper keeps about 15 % of the linear
// layers in BF16, mostly the final blocks, and reports the last blocks as the sensitive ones
// (keep_last = -1: round(0.15 * n_layers), at least 1, for mxfp4/nvfp4; 0 for bf16/fp8).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lowbit/model/llama.h"
#include "lowbit/model/lp_linear.h"

namespace lowbit {

struct LowPrecisionOptions {
  LpRecipe recipe;     // precision F32: off
  int keep_first = 0;  // the first blocks' linears stay f32
  int keep_last = -1;  // the last blocks' linears stay f32; -1: the precision's default (above)
  bool enabled() const { return recipe.precision != LpPrecision::F32; }
};

// "full" (the papers' recipe) / "naive" (mxfp4/nvfp4: 1-D weight tiles, no Hadamard transform,
// round-to-nearest gradients, no block kept in high precision; fp4-dge: no DGE (the straight-through
// estimator) and no outlier clamping — direct E2M1 casting).
void apply_lp_recipe_name(LowPrecisionOptions& o, const std::string& name, const std::string& what = "--lp-recipe");
// keep_last resolved for a model of n_layers blocks.
int lp_keep_last(const LowPrecisionOptions& o, int n_layers);
// Throws lowbit::Error naming the flag: history outside [1, 1024], negative keeps, keeps that cover
// every block, fp8-only / fp4-only settings with another precision.
void check_low_precision_options(const LowPrecisionOptions& o, int n_layers);
// A one-line description stored in the training state ("nvfp4 keep 0/1 full", "fp8 delayed h16 ..."):
// a resume with other settings is refused.
std::string low_precision_key(const LowPrecisionOptions& o, int n_layers);

// Whether block `block` of n_layers keeps its linears in high precision (--lp-keep-first / -last).
bool lp_block_kept(const LowPrecisionOptions& o, int block, int n_layers);

// The low-precision part of a run (train/trainer.h run_training for finetune, train/qat.h's
// end-to-end stage): the context the products read the step from, the products whose fp8 amax
// histories the state keeps (distinct layer ids), and the settings' key (low_precision_key) the
// state records; a resume with another key is refused.
struct LpTraining {
  std::shared_ptr<LpContext> context;
  std::vector<const LpProduct*> products;
  std::string key = "f32";
};

// Replaces the dense linears of the blocks outside the kept ones by LowPrecisionLinear over the same
// weight Vars (the optimizer's parameters stay the same). Returns the shared context.
std::shared_ptr<LpContext> make_low_precision(LlamaModel& model, const LowPrecisionOptions& o, uint64_t seed);

// The low-precision products of the model's LowPrecisionLinear layers (lowbit train).
std::vector<const LpProduct*> lp_products(const LlamaModel& model);

// The fp8 amax histories of low-precision products as named f32 tensors (for a training state:
// "lp.<layer id>.<x|w|dy>"; the ids must be distinct), and back (missing names: empty histories).
// lowbit train's products are its LowPrecisionLinear layers'; qat's and finetune's those of the
// layers they train (train/qat.cpp, train/finetune.cpp).
std::vector<std::pair<std::string, Tensor>> lp_state_tensors(const std::vector<const LpProduct*>& products);
void restore_lp_state(const std::vector<const LpProduct*>& products,
                      const std::function<Tensor(const std::string&)>& load_or_undefined);

}  // namespace lowbit
