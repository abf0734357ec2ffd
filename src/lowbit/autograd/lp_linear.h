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
//   fp4-dge     Q(clamp(x)) + r, Q(W)          E5M2(dy), the same Q(W)    E5M2(dy), Q(clamp(x)) + r
//               Q: E2M1 with one f32 scale per row (amax / 6): per token for x, per output channel
//               for W; dW is scaled by the DGE derivative (below)
//   int4        HQ(x), HQ(W)                   BS+LSS(dy), HQ(W)          BS+LSS(dy; x), HQ(x)
//               HQ: INT4 [-7, 7] of the block-Hadamard-transformed operand, one absmax scale per
//               tensor; BS+LSS: bit splitting + leverage-score sampling of dy (below)
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
//
// fp4-dge (Wang et al. 2025, "Optimizing Large Language Model Training Using FP4 Quantization",
// arXiv 2501.17116): the E2M1 codec of the format table with the paper's vector-wise absmax scaling
// (ops::LpFormat::E2M1, tiles of one row) for the forward operands and the input of dgrad/wgrad, the
// output gradient in FP8 E5M2 (one current scale per tensor, the FP8-LM gradients the paper keeps),
// and two changes to plain FP4 casting:
//   DGE (differentiable gradient estimator, sec. 3.1): the weight quantizer's backward is the
//       derivative of the power-function smoothing of the E2M1 step (ops/lp_quant_math.h
//       lp::dge_derivative, parameter dge_k, clipped at dge_clip) instead of the STE's 1:
//       dW = (E5M2(dy)^T . x_eff) * f'(W / S_row), S_row held constant;
//   OCC (outlier clamping and compensation, sec. 3.2): x is clamped to its (1 - alpha, alpha)
//       quantiles (ops::lp_occ_split, alpha = occ_quantile) before quantizing, and the residual
//       r = x - clamp(x) (sparse: about 2 (1 - alpha) of the values) is added back in high precision:
//       x_eff = Q(clamp(x)) + r, so x_eff . Q(W)^T is Q(clamp(x)) . Q(W)^T plus the sparse f32 GEMM
//       r . Q(W)^T (emulated as one f32 GEMM on the sum: the same product up to summation order).
// The activation side keeps the straight-through estimator (dx = E5M2(dy) . Q(W); the clamp and the
// residual together pass the gradient as 1). dge_k = 1 is the STE; occ_quantile = 1 clamps nothing:
// the naive recipe (`lp_recipe naive`) sets both — direct E2M1 casting with the STE, the paper's
// baseline. CPU only: the quantile and the derivative have no CUDA body (lp_linear refuses a CUDA
// tensor naming the precision).
//
// int4 (Xi, Li, Chen and Zhu 2023, "Training Transformers with 4-bit Integers", arXiv 2306.11987;
// the quantizers are ops/lp_int4.h's):
//   forward, HQ (the Hadamard quantizer, sec. 4): x and W are multiplied along their shared
//       reduction dimension (in) by one block-diagonal randomized Hadamard transform H of blocks of
//       kInt4HadamardBlock (32) — orthogonal, so Q(x H) Q(W H)^T approximates x W^T with the outliers
//       of x spread over their block — and quantized to INT4 with one absmax scale per tensor
//       (s = amax / 7). The backward reads the same quantized operands in their own basis,
//       x_eff = Q(x H) H^T and W_eff = Q(W H) H^T (straight-through: y = x_eff W_eff^T).
//   backward, BS + LSS (sec. 5): dy is split into two INT4 tensors (bit splitting: the coarse
//       round-to-nearest one and the residual on a 14x finer grid, stochastically rounded), and
//       leverage-score sampling keeps T of the 2T stacked rows with probabilities proportional to
//       |dy row| |x_eff row| (wgrad: dW = dy_est^T x_eff) or |dy row| (dgrad: dx = dy_est W_eff,
//       as the authors' code does for the input gradient), each kept row scaled by 1 / p: the
//       estimate is unbiased, E[dy_est] = dy, so E[dW] and E[dx] are the straight-through gradients.
// Deviation from the paper: the step sizes are the current absmax per tensor, not LSQ's learned
// ones. Ablations (LpRecipe::int4_grad, int4_row_scales): no sampling / sampling of dgrad only, and
// per-row scales (per token for x and dy, per output channel for W; CPU only). `lp_recipe naive` (hadamard = false, stochastic_grads = false): plain INT4 per-tensor
// round-to-nearest of x, W and dy — no transform, no splitting, no sampling. On the CPU or CUDA (the
// ops' CUDA bodies are bit for bit the CPU's; the f32 GEMMs differ by summation order). No block is
// kept in high precision by default.
// Seeds of a call with `seed`: the transform's signs lp::mix64(seed ^ 4) (x and W share them), dy's bit
// splitting mix64(seed ^ 5) (once, for both GEMMs), dgrad's sampling mix64(seed ^ 6), wgrad's
// mix64(seed ^ 7) (tests compose the layer from the ops with them).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/autograd/variable.h"
#include "lowbit/ops/lp_fp8.h"
#include "lowbit/ops/lp_quant.h"

namespace lowbit {

enum class LpPrecision : uint8_t { F32, BF16, FP8, MXFP4, NVFP4, FP4_DGE, INT4 };
// "f32", "bf16", "fp8", "mxfp4", "nvfp4", "fp4-dge", "int4"; throws lowbit::Error naming `what` and listing
// the choices.
LpPrecision parse_lp_precision(const std::string& name, const std::string& what = "--precision");
const char* lp_precision_name(LpPrecision p);

struct LpRecipe {
  LpPrecision precision = LpPrecision::F32;
  bool delayed_scaling = true;  // fp8: amax history (true) or current scaling
  int amax_history = 16;        // fp8 delayed scaling: amaxes kept per operand
  bool weight_2d = true;        // fp4: 2-D weight tiles (16x16 / 32x32), one Q(W) for fprop and dgrad
  bool hadamard = true;         // fp4: the 16-point random Hadamard transform on the wgrad inputs;
                                // int4: the Hadamard quantizer (HQ) of the forward operands
  bool stochastic_grads = true; // fp4: stochastic rounding of the gradient operands;
                                // int4: bit splitting + leverage-score sampling of dy
  // bf16 / fp8: run the three GEMMs on the formats themselves — bf16 tensor-core GEMMs (CUDA only),
  // FP8 codes through ops::fp8_gemm (cuBLASLt on CUDA; the CPU reference body elsewhere; M, N, K
  // multiples of 16, else the call stays emulated) — instead of f32 GEMMs on dequantized values.
  // The same products up to the order of summation; the fp4 precisions are always emulated.
  bool native_gemm = false;
  // fp4-dge: the DGE's power k (>= 1; 1 = STE) and the clip of its derivative (the paper: k = 5,
  // clip 3.0), and the OCC quantile alpha (in (0.5, 1]; 1 = no clamping; the paper: 0.99-0.999).
  float dge_k = 5.0f, dge_clip = 3.0f;
  double occ_quantile = 0.999;
  // int4 ablations (`--lp-int4-grad`, `--lp-int4-scale`; the paper's recipe: BsLss, per-tensor):
  //   int4_grad: which backward GEMMs sample the bit-split dy — BsLss both (dgrad and wgrad), BsLssDgrad
  //   the input gradient only (the authors' released code; wgrad reads all 2T split rows), Bs neither
  //   (bit splitting alone: dy_est = hi + lo in both GEMMs, unbiased through SR of the fine half).
  //   Ignored when stochastic_grads is off (the naive recipe).
  //   int4_row_scales: one absmax scale per row instead of per tensor — per token for x and dy, per
  //   output channel for W (ops::lp_int4_hq / lp_int4_bitsplit per_row; CPU only).
  enum class Int4Grad : uint8_t { BsLss, BsLssDgrad, Bs };
  Int4Grad int4_grad = Int4Grad::BsLss;
  bool int4_row_scales = false;
};
// Throws lowbit::Error naming the flag for an amax history outside [1, 1024], --dge-k outside
// [1, 100], --dge-clip outside (0, 1000], --occ-quantile outside (0.5, 1].
void check_lp_recipe(const LpRecipe& r);
// int4: the block size of the Hadamard quantizer's transform (along the reduction dimension).
inline constexpr int32_t kInt4HadamardBlock = 32;
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
