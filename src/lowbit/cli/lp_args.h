// The low-precision training flags (--precision and its settings; issue 18), one definition shared
// by `lowbit train`, `lowbit qat` and `lowbit finetune` (train/low_precision.h holds the options
// they resolve to).
#pragma once
#include <CLI/CLI.hpp>
#include <string>

#include "lowbit/train/low_precision.h"

namespace lowbit::cli {

struct LowPrecisionArgs {
  std::string precision = "f32", fp8_scaling = "delayed", lp_recipe = "full", lp_gemm = "auto";
  std::string int4_grad = "bs-lss", int4_scale = "tensor";
  LowPrecisionOptions o;  // the numeric flags land here directly
};

// Registers --precision, --dge-k, --dge-clip, --occ-quantile, --fp8-scaling, --amax-history,
// --lp-recipe, --lp-gemm, --lp-int4-grad, --lp-int4-scale, --lp-keep-first, --lp-keep-last. `what`: the products the precision
// applies to, for --precision's help ("the block linears' GEMMs", ...).
void add_low_precision_options(CLI::App* app, LowPrecisionArgs* a, const std::string& what);

// The options of the flags as given, checked (throws lowbit::Error naming the flag): the precision,
// the scaling rule, the recipe name, the GEMM mode (auto: native on CUDA, emulated on the CPU), and
// the int4 ablation flags (refused with another precision, --lp-int4-grad other than bs-lss with the naive
// recipe, --lp-int4-scale row on CUDA), fp4-dge refused on a device other than the CPU (`command` names the command in the message).
LowPrecisionOptions resolve_low_precision(const LowPrecisionArgs& a, const std::string& device, const std::string& command);

}  // namespace lowbit::cli
