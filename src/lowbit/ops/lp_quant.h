// The operand quantizer of low-precision training (issue 18; autograd/lp_linear.h): quantize and
// dequantize a 2-D GEMM operand x [rows, cols] into y (same shape and dtype), the emulated numerics
// of FP8 and FP4 training — the GEMMs themselves then run on the dequantized values in f32.
//
//   1. with spec.rht_axis >= 0: the randomized Hadamard transform of ops/lp_quant_math.h on groups
//      of rht_size values along that axis (y = H D x per group);
//   2. amax = max |y| over the tensor;
//   3. per-tensor formats (E4M3, E5M2): s = spec.tensor_scale, or amax / max when it is 0;
//      y = s q(y / s) (round to nearest even, saturating);
//      BF16: y = bf16(y); None: y as it is;
//   4. tile formats: the tensor is cut into tile_rows x tile_cols tiles; each tile's amax gives its
//      decode scale S (lp::tile_scale: MXFP4 a power of two, NVFP4 an E4M3 value times the tensor
//      scale g = amax / (448 * 6)); y = S e2m1(y / S), rounded to nearest even or stochastically
//      (element k = r * cols + c draws lp::uniform(spec.seed, k)).
//
// stats (optional) receives the amax of step 2 and the tensor-level scale used (s, g, or 0): the
// delayed-scaling history of FP8 training records the amax. A tensor holding NaN or inf gives NaN
// values (training then stops with its divergence error).
//
// Bodies: CPU (f32, f64 — computed in f32, as the CUDA body, via lp_quant_math.h; f64 only for
// gradient checks of the high-precision path) and CUDA (f32, ops/cuda/lp_quant.cu: one thread per
// Hadamard group and per tile, one pass for the amax; the same arithmetic bit for bit). No backward:
// autograd/lp_linear.h passes gradients straight through.
#pragma once
#include "lowbit/core/tensor.h"
#include "lowbit/ops/lp_quant_math.h"

namespace lowbit::ops {

struct LpQuantStats {
  double amax = 0;          // max |x| (after the Hadamard transform)
  double tensor_scale = 0;  // s (E4M3/E5M2) or g (NVFP4) used; 0 for the other formats
};

void lp_quantize(const Tensor& x, const LpQuantSpec& spec, Tensor& y, LpQuantStats* stats = nullptr);

// Native FP8 GEMMs (issue 18: the FP8 tensor cores of Hopper GPUs) take the operands as codes:
//
// lp_quantize_fp8: x [rows, cols] (f32) -> codes (u8) [rows, cols], or [cols, rows] with
// `transpose`, of spec.format E4M3 or E5M2 under one per-tensor scale s (spec.tensor_scale, or the
// current amax / the format's max when it is 0): code = fp8(x / s) with the codecs of lp_quantize, so
// s * decode(code) is lp_quantize(x, spec) element for element. stats as lp_quantize's; with a given
// scale and no stats the amax pass is skipped (a re-encoding, e.g. the transposed copy the backward
// needs). NaN/inf in x: every code is NaN (0x7f) and stats.amax is NaN. No tiles, no Hadamard.
// Bodies: CPU (f32) and CUDA (a 32 x 32 tile per block, coalesced for either layout).
void lp_quantize_fp8(const Tensor& x, const LpQuantSpec& spec, Tensor& codes, LpQuantStats* stats = nullptr,
                     bool transpose = false);

// y [M, N] (f32) = alpha * decode(a) . decode(b)^T for FP8 codes a [M, K] of format fa and b [N, K]
// of format fb (u8; E4M3 or E5M2, not both E5M2: the combinations Hopper's FP8 tensor cores take).
// With alpha = s_a * s_b this is the product of the dequantized operands. Bodies: CPU (the codes
// decoded to f32, then ops::gemm: the reference) and CUDA (cuBLASLt's FP8 GEMM, f32 accumulation with
// fast accumulation off, f32 output), for shapes fp8_gemm_shape_ok accepts.
void fp8_gemm(const Tensor& a, LpFormat fa, const Tensor& b, LpFormat fb, float alpha, Tensor& y);
// cuBLASLt's FP8 alignment rules, kept conservative: M, N and K multiples of 16.
inline bool fp8_gemm_shape_ok(int64_t M, int64_t N, int64_t K) {
  return M > 0 && N > 0 && K > 0 && M % 16 == 0 && N % 16 == 0 && K % 16 == 0;
}

// "none", "bf16", "e4m3", "e5m2", "mxfp4", "nvfp4", "e2m1"
const char* lp_format_name(LpFormat f);

// ---- FP4 training with DGE and OCC (Wang et al. 2025, arXiv 2501.17116; autograd/lp_linear.h) -----
//
// lp_dge_scale: g *= min(f'(w / S), clip) element by element (lp::dge_derivative), S the decode
// scale lp_quantize(w, spec) uses for w's tile — the backward of the differentiable gradient
// estimator of the weight quantizer, with S held constant. w and g [rows, cols] of one dtype (f32;
// f64 for gradient checks, computed in f32 as lp_quantize); spec an E2M1 format (e2m1, mxfp4, nvfp4)
// with round-to-nearest and no Hadamard transform; k >= 1, clip > 0. CPU only (no CUDA body: a CUDA
// tensor is refused naming the op).
void lp_dge_scale(const Tensor& w, const LpQuantSpec& spec, float k, float clip, Tensor& g);

// lp_occ_split: outlier clamping and compensation of an activation x [rows, cols]: with the
// thresholds lo = Quantile(x, 1 - alpha) and hi = Quantile(x, alpha) over all of x's values
// (linear interpolation between order statistics: position q (n - 1) of the sorted values, numpy's
// and torch.quantile's default), clamped = min(max(x, lo), hi) and residual = x - clamped (zero but
// for the outliers: the sparse matrix of the high-precision compensation GEMM). clamped + residual
// is x (the subtraction is exact for an outlier at most twice its threshold, Sterbenz; beyond, the
// f32 sum rounds back to x). alpha in (0.5, 1]; 1 clamps nothing. NaN/inf in x: the thresholds are
// NaN, clamped = x and residual = 0 (the quantizer then reports the NaN). CPU only (f32, f64).
struct LpOccStats {
  double lo = 0, hi = 0;  // the thresholds
  int64_t outliers = 0;   // nonzero residuals
};
void lp_occ_split(const Tensor& x, double alpha, Tensor& clamped, Tensor& residual, LpOccStats* stats = nullptr);
// The alpha-quantile of n values (sorted in place partially: the order changes), as lp_occ_split.
double lp_quantile(float* v, int64_t n, double alpha);

}  // namespace lowbit::ops
