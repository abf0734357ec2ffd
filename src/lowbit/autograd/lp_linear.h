// Low-precision training of a linear layer (issue 18): y = x W^T with every GEMM operand quantized
// and dequantized (ops/lp_quant.h) before an f32 GEMM — the numerics of FP8 / FP4 training,
// emulated (the CPU has no FP8/FP4 arithmetic, and Hopper GPUs have no FP4 tensor cores). The three
// GEMMs of a linear layer and what each operand becomes, per precision:
//
//               fprop  y = x . W^T        dgrad  dx = dy . W         wgrad  dW = dy^T . x
//   bf16        bf16(x), bf16(W)           bf16(dy), bf16(W)          bf16(dy), bf16(x)
//   fp8         E4M3(x), E4M3(W)           E5M2(dy), E4M3(W)          E5M2(dy), E4M3(x)
//               one scale per tensor: delayed (the max of the last `amax_history` amaxes of that
//               operand, Micikevicius et al. 2022 "FP8 Formats for Deep Learning"; the first call
//               uses the current amax) or current (this tensor's amax).
//   nvfp4       Q(x) 1x16 tiles            SR Q(dy) 1x16 tiles        SR Q(H dy) 16x1 tiles
//               Q(W) 16x16 tiles           the same Q(W)              Q(H x) 16x1 tiles
//   mxfp4       the same recipe with MX tiles of 32 (32x32 for W) and power-of-two scales
//
// (NVFP4 paper, NVIDIA 2025, arXiv 2509.25149, sec. 4: 2-D weight blocks so that fprop and dgrad
// use one quantized weight — the backward is then the exact gradient of the forward's surrogate;
// the 16-point random Hadamard transform H (ops/lp_quant_math.h rht_apply, same signs on both
// operands, so H^T H = I cancels in the product) along the token dimension of the wgrad inputs;
// stochastic rounding (SR) of the gradient operands; tiles of 16 along each GEMM's reduction
// dimension. Quantize-dequantize within tiles: Q(.) below.)
//
// Gradients pass straight through the quantizers (Bengio et al. 2013): the backward treats
// Q(x) - x and Q(W) - W as constants, so dx and dW are the GEMMs above — what FP8/FP4 training
// computes — and with precision f32 the layer is exactly `linear`. The master weight W stays f32
// (or f64 in gradient checks) and is what the optimizer updates. CPU and CUDA (the op dispatch of
// ops::lp_quantize and ops::gemm; with LpRecipe::native_gemm, ops::lp_quantize_fp8 + ops::fp8_gemm
// for fp8 and bf16 GEMMs for bf16: the products that FP8/bf16 tensor cores compute).
//
// The naive recipe (for comparison; `lp_recipe naive`): 1-D tiles for W (re-quantized along the
// other axis for dgrad), no Hadamard transform, round-to-nearest gradients.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/autograd/variable.h"
#include "lowbit/ops/lp_fp8.h"
#include "lowbit/ops/lp_quant.h"

namespace lowbit {

enum class LpPrecision : uint8_t { F32, BF16, FP8, MXFP4, NVFP4 };
// "f32", "bf16", "fp8", "mxfp4", "nvfp4"; throws lowbit::Error naming `what` and listing the choices.
LpPrecision parse_lp_precision(const std::string& name, const std::string& what = "--precision");
const char* lp_precision_name(LpPrecision p);

struct LpRecipe {
  LpPrecision precision = LpPrecision::F32;
  bool delayed_scaling = true;  // fp8: amax history (true) or current scaling
  int amax_history = 16;        // fp8 delayed scaling: amaxes kept per operand
  bool weight_2d = true;        // fp4: 2-D weight tiles (16x16 / 32x32), one Q(W) for fprop and dgrad
  bool hadamard = true;         // fp4: the 16-point random Hadamard transform on the wgrad inputs
  bool stochastic_grads = true; // fp4: stochastic rounding of the gradient operands
  // bf16 / fp8: run the three GEMMs on the formats themselves — bf16 tensor-core GEMMs (CUDA only),
  // FP8 codes through ops::fp8_gemm (cuBLASLt on CUDA; the CPU reference body elsewhere; M, N, K
  // multiples of 16, else the call stays emulated) — instead of f32 GEMMs on dequantized values.
  // The same products up to the order of summation; the fp4 precisions are always emulated.
  bool native_gemm = false;
};
// Throws lowbit::Error for an amax history outside [1, 1024].
void check_lp_recipe(const LpRecipe& r);
// The elements per scale tile along the reduction dimension: 16 (nvfp4), 32 (mxfp4), 0 otherwise.
int64_t lp_block(LpPrecision p);

// The delayed-scaling state of one layer: the amax history of each operand (fp8), newest last.
struct LpLinearState {
  enum Role { X = 0, W = 1, DY = 2 };
  std::vector<float> history[3];
  // The decode scale for `role` from its history (max amax / the format's largest value); 0 when
  // the history is empty (then the current amax is used). Settles the role's pending amaxes first.
  float delayed_scale(Role role, ops::LpFormat f);
  void record(Role role, double amax, int keep);
  // An amax a kernel measured (native FP8 GEMMs: ops::lp_encode_fp8_dual), recorded when it is
  // read: by the next delayed_scale of the role or by settle(), in the order recorded — the history
  // is then the one record() would have built, without a host synchronisation per operand.
  void record_later(Role role, ops::LpAmax amax, int keep);
  void settle();  // every pending amax into the histories (before reading `history` directly)

 private:
  struct Pending {
    ops::LpAmax amax;
    int keep;
  };
  std::vector<Pending> pending_[3];
  void settle(Role role);
};

// x [M, in], w [out, in] -> [M, out]. `seed` seeds the stochastic rounding and the Hadamard signs
// of this call (the layer draws a new one per training call); `state` holds the fp8 amax histories
// (may be null: current scaling). The histories record the operands' amaxes only when the call
// records a graph (training), never in validation.
Var lp_linear(const Var& x, const Var& w, const LpRecipe& recipe, const std::shared_ptr<LpLinearState>& state,
              uint64_t seed);

// The quantizer specs of the recipe (exposed for tests): operand of a GEMM.
enum class LpOperand : uint8_t { FpropX, FpropW, DgradDy, DgradW, WgradDy, WgradX };
ops::LpQuantSpec lp_operand_spec(const LpRecipe& recipe, LpOperand operand, uint64_t seed);

}  // namespace lowbit
