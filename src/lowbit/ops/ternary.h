// The quantizers of BitNet b1.58's BitLinear (Ma et al. 2024, arXiv 2402.17764) and BitNet v2's 4-bit
// absmean activation quantizer, as
// fake-quantization kernels (quantize, then dequantize into the input's dtype):
//
//   weights      gamma = mean |W| over the whole tensor (eq. 3), clamped to >= 1e-5;
//                W~ = gamma * RoundClip(W / gamma, -1, 1)                (codes {-1, 0, +1})
//                Reloaded (Nielsen & Schneider-Kamp 2024, arXiv 2407.09527) offers the median of
//                |W| instead of the mean (TernaryScale::AbsMedian).
//   activations  per row (token) of x [M, C]: s = 127 / max(max_c |x|, 1e-5);
//                x~ = clamp(round(x * s), -128, 127) / s                 (int8 absmax, eq. 4)
//   int4 absmean (BitNet a4.8, arXiv 2411.04965, and BitNet v2, arXiv 2504.18415: their INT4
//                activation quantizer): per row, beta = mean_c |x| (clamped to >= 1e-5, the papers'
//                epsilon), s = beta / sqrt(7);
//                x~ = s * clamp(round(x / s), -8, 7)
//                For a Gaussian row beta ~ 0.8 sigma, so 7 s = sqrt(7) beta ~ 2.1 sigma: the tails
//                beyond are clipped and the bulk gets finer steps than absmax's max|x| / 7. Computed
//                in double (as ops::fake_quant), then rounded to the tensor's dtype.
//
// Rounding is to nearest, ties to even (rint, as torch.round), in the tensor's own precision. For
// f32 weights the codes and gamma are exactly those of quant/format.h's "ternary" format (its RTN
// quantizer computes gamma the same way), so a model trained with BitLinear and saved in that
// format computes the same weights. No backward: the straight-through estimator is written in
// autograd/bitlinear.cpp. CPU bodies (f32, f64) and CUDA bodies (ops/cuda/act_quant.cu, f32 and f64;
// the median scale reads |W| back to the host for its selection).
#pragma once
#include <cstdint>
#include <string>

#include "lowbit/core/tensor.h"

namespace lowbit::ops {

enum class TernaryScale : uint8_t { AbsMean, AbsMedian };
// "mean" / "median" -> the scale; throws lowbit::Error naming `what` otherwise.
TernaryScale parse_ternary_scale(const std::string& name, const std::string& what = "--ternary-scale");
const char* ternary_scale_name(TernaryScale s);

// gamma of w (any shape, f32/f64, CPU or CUDA) for the given statistic; >= 1e-5.
double ternary_gamma(const Tensor& w, TernaryScale scale);
// out = gamma * RoundClip(w / gamma, -1, 1) (same shape/dtype as w, contiguous); returns gamma.
double ternary_fake_quant(const Tensor& w, TernaryScale scale, Tensor& out);
// x [M, C] (f32/f64): out = per-row int8 absmax fake quantization of x (same shape/dtype).
void act_quant_int8(const Tensor& x, Tensor& out);
// x [M, C] (f32/f64): out = per-row int4 absmean fake quantization of x (same shape/dtype).
void act_quant_int4_absmean(const Tensor& x, Tensor& out);

// The scale statistic of BitNet v2's 4-bit activation quantizer: absmax (s = max|x| / 7, codes in
// [-7, 7]: ops::fake_quant's symmetric grid) or absmean (act_quant_int4_absmean).
enum class ActScale : uint8_t { AbsMax, AbsMean };
// "absmax" / "absmean" -> the scale; throws lowbit::Error naming `what` otherwise.
ActScale parse_act_scale(const std::string& name, const std::string& what = "--act-quant");
const char* act_scale_name(ActScale s);

}  // namespace lowbit::ops
