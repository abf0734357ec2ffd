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
//
// ---- ggml block formats (llama.cpp's grids; quant/lwc_ggml.cpp) ---------------------------------
// q4_0, q4_1, q5_0, q5_1, q8_0 and the k-quants q2_k, q3_k, q4_k, q5_k, q6_k. One clipping group per
// sub-block: the 32-value block itself for the 32-value types; 16 values (q2_k, q3_k, q6_k) or 32
// (q4_k, q5_k) of a 256-value super-block for the k-quants. gamma (and, for the affine types q4_1,
// q5_1, q2_k, q4_k, q5_k, beta) are [out, in / sub-block]. Per sub-block s with values x
// (sg = K sigmoid(gamma_s), sb = K sigmoid(beta_s), K = kLwcGgmlRange = 1.5: unlike OmniQuant's
// factor in (0, 1), the grid may also reach beyond the sub-block's range, as the reference
// quantizer's fitted k-quant grids (make_qkx2, the least-squares q3_k/q6_k scales) often do, so
// that training can start exactly on llama-quantize's grid; lwc_ggml_init_from_rtn), the
// continuous scale and min:
//   q4_0 / q5_0, q3_k / q6_k (signed, value = step (q - off)): scale = sg * e / -off, e the value of
//       largest |x| (off = 8, 16, 4, 32: ggml's reference maps the signed extreme to level -off)
//   q8_0: scale = sg * max|x| / 127
//   q4_1 / q5_1 (value = d q + m): clipped around the block's midpoint c = (max + min) / 2,
//       hi = c + sg (max - c), lo = c + sb (min - c), scale = (hi - lo) / qmax, min = lo
//       (sg = sb = 1 is the reference's d = (max - min) / qmax, m = min)
//   q2_k / q4_k / q5_k (value = step q - shift): as OmniQuant on the 0-inclusive range,
//       hi = max(max x, 0), lo = min(min x, 0), scale = (sg hi - sb lo) / qmax, min = -sb lo >= 0
// Then, INSIDE the forward, exactly what the file stores (ggml_grid_set_params, ggml_grid.h):
//   32-value types: d = f16(scale), m = f16(min): step = d, shift = -m.
//   k-quants: the super-block's d = f16(max scale / 63) (q2_k: 15; q3_k: the scale of largest
//   |scale| / -32, q6_k: / -128) and dmin = f16(max min / 63) (15); each sub-block's 6-bit (q2_k:
//   4-bit; q6_k: 8-bit) scale sc_s = clamp(nearbyint(scale_s / d)) and min m_s likewise;
//   step_s = d sc_s, shift_s = dmin m_s (the f32 products dequantize_row forms).
// and each value is rounded with ggml_grid_round's rule on that stored grid. The f32 forward runs
// the encoder's own code (ggml_grid_set_params + ggml_grid_round_block), so lwc_encode_ggml of the
// same (w, gamma, beta) dequantizes to the training forward bit for bit.
// Backward (straight-through, W frozen: no dW): every discrete decision is held, i.e.
//   * the value's rounding: inside the code range value = x + step (level - u) with (level - u) held,
//     u the unrounded level: d/dstep = level - u, d/dshift = 0; clamped: d/dstep = level, d/dshift = -1;
//   * f16 rounding of d, dmin (and of the 32-value types' d, m): identity;
//   * the sub-scale code: sc_s = scale_s / d + r_s with r_s held (clamped: sc_s held), so
//     d step_s / d scale_s = 1 and d step_s / d d = r_s (clamped: sc_s); the same for the mins;
//   * d = scale_t / 63 (etc.) through the sub-block t that sets it (arg-max held).
// Gradient checks: tests/quant/test_lwc_ggml.cpp (f64, against this surrogate written out).
// CPU only (the CUDA body covers the integer formats).
#pragma once
#include <vector>

#include "lowbit/autograd/variable.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

// OmniQuant/ApiQ initialise the clipping logits to 4 (sigmoid(4) = 0.982, i.e. nearly no clipping).
inline constexpr double kLwcInitLogit = 4.0;
// ggml block types: the clipping factor is kLwcGgmlRange * sigmoid(logit), in (0, 1.5).
inline constexpr double kLwcGgmlRange = 1.5;
// Lower bound on the scale during training (OmniQuant's CLIPMIN).
inline constexpr double kLwcMinScale = 1e-5;

// True for the formats lwc_fake_quant supports (uniform integer, asymmetric or symmetric, and the
// ggml block types above).
bool lwc_supports(const QuantFormat& f);
// Clipping groups per row of `in` values (the format's groups; ggml types: the sub-blocks).
int64_t lwc_n_groups(const QuantFormat& f, int64_t in);
// True when the format has a lower clipping factor beta (asymmetric int, affine ggml types).
bool lwc_has_beta(const QuantFormat& f);

// ggml block types with learnable clipping (lwc_ggml.cpp).
bool lwc_is_ggml(const QuantFormat& f);
const char* lwc_ggml_names();  // "q4_0, q4_1, ..." for messages
int lwc_ggml_sub_block(const QuantFormat& f);
bool lwc_ggml_has_beta(const QuantFormat& f);
// CPU f32 / f64 bodies (shapes checked; lwc_forward_into / lwc_backward_into route here).
void lwc_ggml_forward_into(const Tensor& w, const Tensor& gamma, const Tensor& beta, const QuantFormat& f, Tensor& y);
void lwc_ggml_backward_into(const Tensor& w, const Tensor& gamma, const Tensor& beta, const Tensor& dy,
                            const QuantFormat& f, Tensor& dgamma, Tensor& dbeta);
// Clipping logits whose grid is (close to) the reference quantizer's (lowbit's RTN = llama-quantize
// without an importance matrix) for w: per sub-block, K sigmoid(gamma) (and K sigmoid(beta)) = the
// ratio of the reference's fitted range to the sub-block's (k-quants: make_qkx2's scale and min,
// so training starts from llama-quantize's grid instead of a fixed clip), sigmoid bounded to
// [0.01, 0.995]. gamma is written in its dtype (F32 when undefined); beta is undefined
// for the symmetric types.
void lwc_ggml_init_from_rtn(const Tensor& w, const QuantFormat& f, Tensor& gamma, Tensor& beta);
// The trained layer as ggml blocks: what the f32 forward computed, encoded (the same code path).
QuantizedTensor lwc_encode_ggml(const Tensor& w, const Tensor& gamma, const Tensor& beta, const QuantFormat& f);
// The encoding of a trained layer for any supported format: lwc_encode_ggml for the ggml types,
// quantize_with_params(lwc_clipped_params) for the integer formats.
QuantizedTensor lwc_encode(const Tensor& w, const Tensor& gamma, const Tensor& beta, const QuantFormat& f);

// w [out, in]; gamma, beta [out, n_groups(in)] of w's dtype (beta undefined for symmetric formats).
// Returns Q(w; gamma, beta) [out, in] with the backward above.
Var lwc_fake_quant(const Var& w, const Var& gamma, const Var& beta, const QuantFormat& f);

// The same forward and backward as plain kernels over tensors (no autograd), for ops that fuse the
// quantizer with more work (QuantTrainLinear's Q(W) + s B A). All tensors on w's device and of its
// dtype, contiguous, except that y may be bf16 for f32 weights of an integer format (Q rounded to
// nearest even as it is written: the CUDA kernels store bf16 directly, the operand of a bf16 GEMM
// without a separate cast pass). y [out, in] is written. dw (may be undefined: not wanted) [out, in], dgamma and
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
