// GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
// Generative Pre-trained Transformers", Algorithm 1) at the level of one linear layer.
//
// Given W [out, in] and the layer-input Hessian H = 2 X^T X / n [in, in], GPTQ quantizes the columns
// of W one at a time and spreads each column's rounding error over the columns not yet quantized,
// weighted by the inverse Hessian (OBS update, eq. 2-3, with the Cholesky reformulation of §3 step 3):
//     e_j = (w_j - q_j) / U_jj,    W[:, k] -= e_j * U_jk  for k > j,     U = chol(H^-1) upper.
// Columns are processed in blocks of B = 128 whose trailing update is applied lazily with one GEMM
// (§3 step 2). Options as in the reference implementation (IST-DASLab/gptq, gptq.py fasterquant):
//   * dampening: H += percdamp * mean(diag H) * I;
//   * shrinkage toward the diagonal (lowbit's, not in the paper): with hessian_shrink = a, every
//     off-diagonal entry of H is scaled by (1 - a) before the dampening. a = 0 is GPTQ; a = 1 leaves
//     diag(H), for which the sweep feeds no error forward, so GPTQ becomes importance-weighted round
//     to nearest (on ggml block types byte for byte rtn_quantize_weighted with importance diag(H)).
//     The per-channel energies diag(H) carry over from the calibration text to other text; the
//     channel correlations that GPTQ's error feedback exploits much less (measured on SmolLM2 with
//     16 x 512 linux-docs calibration tokens: docs/results/gguf-export.md, "GPTQ vs weighted RTN");
//   * dead columns (diag H = 0, the input channel is always 0): H_jj = 1 and W[:, j] = 0;
//   * act-order: process columns in order of decreasing diag H. With a grouped format the group
//     parameters are then computed up front on the original column order ("static groups") so that
//     the result is an ordinary QuantizedTensor without a g_idx permutation; act_order therefore
//     implies static_groups for grouped formats;
//   * without static groups, a group's parameters are fitted (min/max, format.h) when its first
//     column is reached, on the weights as updated so far;
//   * per-channel and per-tensor formats fit their parameters once on W before the sweep.
//
// llama.cpp's block types (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl; quant/ggml_grid.h): a "group" is
// one 32-value block and its parameters are the block's own, fitted by llama.cpp's reference rule
// (q4_0: d = signed extreme / -8, codes 0..15 offset 8; q4_1: d = (max-min)/15 and m = min, both
// f16; q8_0: d = absmax / 127; iq4_nl: ggml's scale search over the 16 non-uniform levels) or, for
// every one of these types, a scale search weighted by diag(H) when it has a lower weighted error on the
// stored grid (ggml_grid.h), on the block's weights as updated by the sweep when its first column
// is reached (on the original W with act-order / static groups). Each column is then rounded to that block's grid (the stored f16
// d, m) and its error fed back as above, so the result is an ordinary GGUF tensor.
// The k-quants (q2_k, q3_k, q4_k, q5_k, q6_k: two-level scales over 256-value super-blocks) the
// same way, with the two levels frozen as the file stores them before any column they cover is
// rounded (ggml_grid.h): when the sweep enters a super-block, its f16 d (and dmin) and every
// sub-block's 4/6/8-bit scale (and min) are fitted on the current weights, the search weighted by
// diag(H); when it enters each later sub-block (16 or 32 columns), that sub-block's quantized
// scale (and min) is refitted under the stored d / dmin on the weights as updated so far. Each
// column is rounded to the nearest point of its sub-block's stored grid and its error fed back.
// With act-order / static groups every super-block is fitted once on the original W.
// iq4_xs and tq1_0/tq2_0 are refused: quantize them with RTN.
//
// Device: when the weight or the Hessian lives on cuda and the format is an integer format (and
// block_size <= 128), the whole computation runs on the GPU (gptq_cuda.h, ops/cuda/gptq.cu) with
// the same results up to float rounding; otherwise it runs here on the CPU (H and U in double).
#pragma once
#include <cstdint>
#include <vector>

#include "lowbit/core/tensor.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

// H = 2/n sum_i x_i x_i^T over all calibration rows x_i (the inputs of one linear layer), accumulated
// in double. Equivalent to the running average in gptq.py add_batch.
class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t in_features);
  // Adds the rows of x [..., in] (any leading shape, any float dtype). Throws for a width mismatch
  // or a non-finite value.
  void add(const Tensor& x);
  int64_t in_features() const { return in_; }
  int64_t n_samples() const { return n_; }
  Tensor hessian() const;  // F32 [in, in]; throws when no sample was added

 private:
  int64_t in_;
  int64_t n_ = 0;
  std::vector<double> xtx_;  // sum of x x^T, upper triangle valid
};

struct GptqOptions {
  double percdamp = 0.01;     // dampening as a fraction of mean(diag H)
  double hessian_shrink = 0;  // 0..1: off-diagonal of H scaled by (1 - hessian_shrink) (see above)
  int64_t block_size = 128;   // columns per lazy-update block (B in the paper)
  bool act_order = false;     // descending diag(H) order (implies static_groups when grouped)
  bool static_groups = false; // group parameters from the original W before the sweep
  // GPU path only: Cholesky and triangular inverse in f64 (as the CPU path) or f32 (as gptq.py).
  bool cuda_fp64_factorization = true;
};

struct GptqResult {
  QuantizedTensor q;
  // GPTQ's own loss estimate, sum over weights of (w - q)^2 / (2 U_jj^2) (gptq.py "error").
  double loss = 0;
  int64_t dead_columns = 0;  // input channels with diag H = 0
  // GPU path only: dequantize(q) as f32 [out, in] on cuda (saves a host dequantization for error
  // reports); undefined on the CPU path.
  Tensor dequantized;
};

// Runs on the GPU when w or hessian is on cuda and gptq_cuda_supports(f, opt) (gptq_cuda.h).
GptqResult gptq_quantize(const Tensor& w, const Tensor& hessian, const QuantFormat& f, const GptqOptions& opt = {});

// Wall-clock seconds GptqMethod (ptq_methods.h) spent per phase since start-up, summed over
// blocks, for benchmarks: capture = forward passes + Hessians, quantize = gptq_quantize (incl. the
// download of the QuantizedTensor), report = output-error reports, install = building the
// QuantLinear (its host dequantization and upload). Not thread-safe; reset by assigning {}.
struct GptqPhaseSeconds {
  double capture = 0, quantize = 0, report = 0, install = 0;
};
GptqPhaseSeconds& gptq_phase_seconds();

// H with its off-diagonal entries scaled by (1 - a), 0 <= a <= 1, on H's device (F32).
Tensor shrink_hessian_to_diagonal(const Tensor& h, double a);

// ---- linear algebra used by GPTQ (row-major, double), exposed for tests ------------------------
// In place: A = L L^T, the lower triangle of `a` becomes L, the strict upper triangle is zeroed.
// Throws lowbit::Error when A is not positive definite.
void cholesky_lower_inplace(double* a, int64_t n);
// U upper-triangular with U^T U = H^{-1} (torch: cholesky(cholesky_inverse(cholesky(H)), upper=True)).
std::vector<double> inverse_hessian_cholesky_upper(std::vector<double> h, int64_t n);

}  // namespace lowbit
