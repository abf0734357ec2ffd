// The quantizers of INT4 training (issue 18, `--precision int4`; autograd/lp_linear.h): "Training
// Transformers with 4-bit Integers", Xi, Li, Chen and Zhu 2023 (arXiv 2306.11987). Emulated like the
// other low-precision operands: quantize-dequantize, the GEMMs then run on the dequantized values in
// f32 (the CPU has no INT4 GEMM; the product of INT4 codes under per-tensor scales is what these
// values multiply to, up to the order of the f32 summation).
//
// INT4 here is the symmetric grid q in [-7, 7] (the paper's signed INT4 without -8, so that the grid
// is symmetric and a per-tensor absmax scale s = amax / 7 never clamps), rounded half to even.
//
// The ops: their tensors [rows, cols] contiguous, f32 or f64 (f64 rounded to f32 first and computed in f32, as
// ops::lp_quantize; f64 only for gradient checks, on the CPU), y of the same shape and dtype. NaN/inf
// in the input: y is all NaN (the trainer then stops with its divergence error). Two bodies: the CPU
// reference (ops/lp_int4.cpp) and the CUDA body (ops/cuda/lp_int4.cu, f32), bit for bit the same
// for the same seed — the per-element arithmetic, the row sums of squares and LSS's probabilities and
// draws are written once in ops/lp_int4_math.h and every random draw is a counter-based function of
// (seed, element or row index).
#pragma once
#include <cstdint>

#include "lowbit/core/tensor.h"

namespace lowbit::ops {

// ---- the Hadamard quantizer (HQ; paper sec. 4) --------------------------------------------------
// v = x with each row's consecutive groups of `block` columns multiplied by the randomized Hadamard
// transform H D of ops/lp_quant_math.h (lp::rht_apply with rht_seed `seed`: orthogonal, so two
// operands transformed along their shared reduction dimension with one seed keep their product:
// (x H)(w H)^T = x w^T); a last group shorter than `block` stays as it is; block 0: no transform
// (plain INT4, the naive recipe and the gradients' plain quantizer). Then one scale for the tensor,
// s = amax(v) / 7, and y = s clamp(rint(v / s), -7, 7); with `per_row`, one scale per row instead,
// s_r = amax(v row r) / 7 (per token for activations and gradients, per output channel for a weight
// [out, in]; an all-zero row gives zeros; CPU only: a CUDA tensor is refused). With `back`, y is transformed back,
// y = Q(x H) H^T: the same quantized operand in x's own basis (what the input- and weight-gradient
// GEMMs of the straight-through backward read). An all-zero tensor gives zeros.
// block: 0 or a power of two in [2, 256].
struct LpInt4Stats {
  double amax = 0;   // max |v| (after the transform)
  double scale = 0;  // s (per_row: the largest row scale, amax / 7)
};
void lp_int4_hq(const Tensor& x, int32_t block, uint64_t seed, bool back, Tensor& y, LpInt4Stats* stats = nullptr,
                bool per_row = false);

// ---- bit splitting + leverage-score sampling of the output gradient (paper sec. 5) ---------------
// The unbiased estimate of dy that a backward GEMM reads, in two ops (one split per backward, one
// sampling draw per GEMM):
//
// lp_int4_bitsplit: g [T, N] (dy of a linear layer, one row per token) -> hi, lo [T, N]:
//    s_hi = amax(g) / 7, hi = s_hi rint(g / s_hi) (INT4, round to nearest), and the residual
//    r = g - hi (|r| <= s_hi / 2) in a second INT4 tensor with the finer scale s_lo = s_hi / 14:
//    lo = s_lo SR(r / s_lo), SR the unbiased stochastic rounding (element i draws
//    lp::uniform(mix64(seed ^ 1), i)); |r / s_lo| <= 7, so it never clamps: E[lo] = r, and hi + lo is
//    g on a grid of amax / 98 (an INT8-like value as two INT4 halves). All-zero g: zeros.
//    per_row: s_hi and s_lo per row (per token), s_hi,t = amax(g row t) / 7, s_lo,t = s_hi,t / 14; an
//    all-zero row gives zeros (CPU only: a CUDA tensor is refused).
struct LpSplitStats {
  double scale_hi = 0, scale_lo = 0;  // s_hi, s_lo (per_row: the largest row's)
};
void lp_int4_bitsplit(const Tensor& g, uint64_t seed, Tensor& hi, Tensor& lo, LpSplitStats* stats = nullptr,
                      bool per_row = false);

// lp_int4_lss: leverage-score sampling over the 2T rows of the stacked [hi; lo] (the GEMM's
//    reduction dimension doubled by the split; paired with [partner; partner]): partner [T, K] (the
//    other operand of the GEMM, row t paired with row t: x_eff for the weight gradient dW = dy^T x)
//    or undefined (the input gradient dx = dy W: no partner). score_i = |row_i| |partner row_i| (L2
//    norms; |row_i| alone without a partner); keep-probabilities p_i = min(1, c score_i) with c such
//    that sum p_i = T (half the stacked rows: the GEMM costs what one INT4 GEMM of the unsplit rows
//    costs; the rows clamped at 1 are solved for exactly, "water filling"), or p_i = 1 for every
//    nonzero row when at most T are nonzero; row i is kept when lp::uniform(mix64(seed ^ 2), i) < p_i
//    and then scaled by 1 / p_i, otherwise dropped: E[kept_i / p_i] = row_i, unbiased.
//    y [T, N] = (kept hi row t) + (kept lo row t): y^T partner is the sampled GEMM over the 2T rows
//    (emulated as one GEMM of the summed rows: the same products up to summation order).
//    sample = false: y = hi + lo (every row kept).
struct LpLssStats {
  int64_t nonzero = 0;  // stacked rows with a nonzero score
  int64_t kept = 0;     // of those, kept
  int64_t certain = 0;  // of those, with p = 1
};
void lp_int4_lss(const Tensor& hi, const Tensor& lo, const Tensor& partner, bool sample, uint64_t seed, Tensor& y,
                 LpLssStats* stats = nullptr);

// The keep-probabilities of lp_int4_lss for scores s (>= 0) and a budget (expected number kept, > 0):
// p_i = min(1, c s_i) with sum p_i = min(budget, #nonzero). Exposed for tests.
void lp_lss_probabilities(const double* s, int64_t n, double budget, double* p);

}  // namespace lowbit::ops
