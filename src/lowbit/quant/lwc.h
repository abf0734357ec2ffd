// Learnable weight clipping (LWC) fake quantization, the quantizer of OmniQuant (Shao et al. 2024,
// "OmniQuant: Omnidirectionally Calibrated Quantization for LLMs", §3.2 eq. 2) that ApiQ (Liao et al.
// 2024, arXiv 2402.05147) trains together with its LoRA adapters.
//
// For group g of row r of W [out, in] (groups as in quant/format.h) with learnable logits
// gamma[r, g] (upper) and beta[r, g] (lower):
//
//   asymmetric int (intBgG, intBpc):
//     hi = max(max_j W_j, 0),  lo = min(min_j W_j, 0)        (0-inclusive, as format.h's int_asym)
//     hi' = sigmoid(gamma) * hi,  lo' = sigmoid(beta) * lo     (OmniQuant eq. 2)
//     s = max((hi' - lo') / qmax, 1e-5),  z = clamp(round(-lo' / s), 0, qmax)
//     Q(W_j) = (clamp(round(W_j / s) + z, 0, qmax) - z) * s
//   symmetric int (intBgGs, intBpcs, int8pc): one factor on the absolute maximum,
//     a' = sigmoid(gamma) * max_j |W_j|,  s = a' / (2^(B-1) - 1),  z = 2^(B-1),  codes in [1, qmax].
//     beta must be undefined.
//
// Training vs storage. s is NOT rounded to f16 here (format.h's params_from_range rounds it up to
// the next f16 value for storage): rounding inside training would make s piecewise constant in
// gamma/beta and stop their gradient. lwc_clipped_params() gives the exactly representable
// parameters used when the trained layer is encoded (QuantTrainLinear::finalize); the two differ
// by at most one f16 ulp of s (a relative 2^-11).
//
// Backward (as in OmniQuant's quantizer.py / ApiQ's quant_linear.py, which use round_ste for the
// codes and a plain round, hence no gradient, for the zero point):
//   * round(W/s) uses the straight-through estimator: d round(u)/du := 1 (Bengio et al. 2013);
//   * clamp passes the gradient only inside [qmin, qmax] (bounds included, as torch.clamp);
//   * z carries no gradient; s does, so gamma/beta learn through the scale:
//       inside the grid:  dQ/dW_j = 1,  dQ/ds = round(W_j/s) - W_j/s
//       clamped:          dQ/dW_j = 0,  dQ/ds = q_clamped - z
//     and ds/dgamma = hi * sigmoid'(gamma) / qmax, ds/dbeta = -lo * sigmoid'(beta) / qmax; W also
//     receives the gradient through the group's max/min (the arg-max/arg-min element).
// This backward is the exact derivative of the forward with every discrete decision (the rounding
// residual round(u) - u, z, the clamp mask, the arg-max) held at its current value; the gradient
// checks in tests/methods/test_apiq.cpp use exactly that surrogate.
//
// Bodies: CPU (f32, f64 for gradient checks; the reference) and CUDA (f32, ops/cuda/lwc.cu; parity
// tested against the CPU body in tests/quant/test_lwc_cuda.cpp). The op runs on the device of w.
#pragma once
#include <vector>

#include "lowbit/autograd/variable.h"
#include "lowbit/quant/format.h"

namespace lowbit {

// OmniQuant/ApiQ initialise the clipping logits to 4 (sigmoid(4) = 0.982, i.e. nearly no clipping).
inline constexpr double kLwcInitLogit = 4.0;
// Lower bound on the scale during training (OmniQuant's CLIPMIN).
inline constexpr double kLwcMinScale = 1e-5;

// True for the formats lwc_fake_quant supports (uniform integer, asymmetric or symmetric).
bool lwc_supports(const QuantFormat& f);

// w [out, in]; gamma, beta [out, n_groups(in)] of w's dtype (beta undefined for symmetric formats).
// Returns Q(w; gamma, beta) [out, in] with the backward above.
Var lwc_fake_quant(const Var& w, const Var& gamma, const Var& beta, const QuantFormat& f);

// The same forward and backward as plain kernels over tensors (no autograd), for ops that fuse the
// quantizer with more work (QuantTrainLinear's Q(W) + s B A). All tensors on w's device and of its
// dtype, contiguous. y [out, in] is written. dw (may be undefined: not wanted) [out, in], dgamma and
// dbeta (undefined for symmetric formats) [out, n_groups] are written, not accumulated.
void lwc_forward_into(const Tensor& w, const Tensor& gamma, const Tensor& beta, const QuantFormat& f, Tensor& y);
void lwc_backward_into(const Tensor& w, const Tensor& gamma, const Tensor& beta, const Tensor& dy,
                       const QuantFormat& f, Tensor& dw, Tensor& dgamma, Tensor& dbeta);

// The per-group parameters that store the learned clipping exactly: params_from_range of the format
// on the clipped range [sigmoid(beta) * lo, sigmoid(gamma) * hi] (symmetric: +-sigmoid(gamma) * absmax).
// w F32 [out, in]; gamma, beta any float dtype. Row-major [out * n_groups].
std::vector<GroupParams> lwc_clipped_params(const Tensor& w, const Tensor& gamma, const Tensor& beta,
                                            const QuantFormat& f);

}  // namespace lowbit
