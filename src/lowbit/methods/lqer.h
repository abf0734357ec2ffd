// LQER / L²QER (Zhang, Cheng, Constantinides, Zhao 2024, arXiv 2402.02446): low-rank
// reconstruction of each linear's weight quantization error (issue 16).
//
// After a method (RTN, GPTQ, AWQ, ...) has quantized W [out, in] to Ŵ = dequantize(Q(W)), the error
// E = W − Ŵ is approximated by a rank-k product kept beside the packed weight:
//
//   y = x Ŵ^T + (x A^T) B^T,   B A ≈ E,   A [k, in], B [out, k]
//
// L²QER ("act" scale): E's input columns are first scaled by the calibration activations'
// per-channel magnitude s_j = mean |x_j| (normalised to mean 1; channels without activation get the
// smallest positive s), the top-k SVD of E S is taken (S = diag(s)), and S is undone:
// E ≈ U_k Σ_k V_kᵀ S⁻¹, so the channels the activations use most are reconstructed best. "none":
// the plain top-k SVD of E (LQER without the scale). The factors are balanced (B = U_k Σ_k^½,
// A = Σ_k^½ V_kᵀ S⁻¹) and rounded to f16, as the checkpoint stores them (`<m>.lora_A` / `<m>.lora_B`,
// QuantLinear's low-rank side path: the packed weight stays packed and runs the packed kernels).
//
// The SVD: randomized subspace iteration (Halko, Martinsson, Tropp 2011) with p = min(k + 16,
// min(out, in)) vectors and `power_iters` rounds, then the exact SVD of the p-dimensional
// projection (Jacobi eigenvalues of its p × p Gram matrix). With k = min(out, in) the subspace is
// the whole range of the matrix, so the factors reproduce it exactly (to rounding).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "lowbit/core/tensor.h"
#include "lowbit/model/llama.h"

namespace lowbit {

// Top-k SVD of m [rows, cols] (f32 or f64, CPU): m ≈ u · sv with u f64 [rows, k] orthonormal
// columns and sv = Σ Vᵀ f64 [k, cols]; s the k singular values, descending. k is clamped to
// min(rows, cols); k >= 1.
struct TruncatedSvd {
  Tensor u, sv;
  std::vector<double> s;
};
TruncatedSvd truncated_svd(const Tensor& m, int64_t k, uint64_t seed = 0, int power_iters = 4);

// The factors of one layer: B A ≈ E (f32; before any f16 rounding). `scale`: per input channel
// (size in, all > 0), or empty for the unscaled SVD. rank is clamped to min(out, in).
struct LqerFactors {
  Tensor A;  // f32 [k, in]
  Tensor B;  // f32 [out, k]
};
LqerFactors lqer_factors(const Tensor& error, const std::vector<double>& scale, int64_t rank, uint64_t seed = 0);

enum class LqerScale { Activation, None };
LqerScale parse_lqer_scale(const std::string& name, const std::string& what = "--lqer-scale");
const char* lqer_scale_name(LqerScale s);

// Per block linear ("model.layers.<i>.<name>"): mean |x_j| of its input channels over the
// calibration windows (i32 [N, T]), from a no-gradient forward of `model` (its full-precision state).
std::map<std::string, std::vector<double>> collect_lqer_scales(LlamaModel& model, const Tensor& tokens);

// Per block linear: its weight (f32 [out, in], host copy); taken before the method quantizes.
std::map<std::string, Tensor> snapshot_linear_weights(LlamaModel& model);

struct LqerOptions {
  int64_t rank = 0;
  LqerScale scale = LqerScale::Activation;
  int power_iters = 4;
  uint64_t seed = 0;
};

struct LqerReport {
  int layers = 0;
  int64_t max_rank = 0;
  double params = 0;            // A and B elements added
  double mean_rel_error = 0;    // mean over layers of ||E S||_F / ||W S||_F before ...
  double mean_rel_residual = 0; // ... and ||(E − B A) S||_F / ||W S||_F after (S = 1 for "none")
  double seconds = 0;
};

// Replaces every QuantLinear of the model's blocks by the same packed weight with the LQER side
// path (A, B rounded to f16). fp: snapshot_linear_weights() before quantization; scales:
// collect_lqer_scales() (needed for LqerScale::Activation). Throws when a layer already has adapters,
// is not a QuantLinear on the CPU, or a weight / scale is missing or has the wrong size.
LqerReport apply_lqer(LlamaModel& model, const std::map<std::string, Tensor>& fp,
                      const std::map<std::string, std::vector<double>>& scales, const LqerOptions& o);

}  // namespace lowbit
