// BitLinear b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs", arXiv 2402.17764) as a differentiable
// op on Vars, with the straight-through estimator (Bengio et al. 2013) for both quantizers:
//
//   forward   y = Qa(x) . Qw(W)^T                 Qw: ternary absmean (or median) fake quantization,
//                                                 Qa: per-token int8 absmax (ops/ternary.h)
//   backward  dx = dy . Qw(W)         dW = dy^T . Qa(x)
//
// i.e. the gradient of the surrogate y = (x + c_x) . (W + c_W)^T with the offsets
// c_x = Qa(x) - x and c_W = Qw(W) - W held constant (the reference code's
// `x + (quant(x) - x).detach()`). The latent weight W stays in full precision (f32, or f64 for
// gradient checks) and is what the optimizer updates. The normalisation that the paper puts
// before the activation quantizer is the caller's (the Llama block's RMSNorms, see
// train/bitnet.h). CPU and CUDA (the quantizers' CUDA bodies: ops/cuda/act_quant.cu).
//
// `lambda` < 1 blends towards full precision (the gradual phase-in of the 16 -> 1.58-bit
// transition, arXiv 2502.11895): x_eff = x + lambda (Qa(x) - x), W_eff = W + lambda (Qw(W) - W),
// with the same straight-through backward (dx = dy . W_eff, dW = dy^T . x_eff).
// `quantize` = false is a plain linear layer (the 16-bit phase of that transition).
#pragma once
#include "lowbit/autograd/variable.h"
#include "lowbit/ops/ternary.h"

namespace lowbit {

struct BitLinearOptions {
  bool quantize = true;             // false: y = x W^T (16-bit phase)
  bool quantize_activations = true;  // false: weights only (W1.58A16)
  ops::TernaryScale scale = ops::TernaryScale::AbsMean;
  double lambda = 1.0;              // phase-in weight in [0, 1]
};

// x [M, in], w [out, in] (latent) -> [M, out]
Var bitlinear(const Var& x, const Var& w, const BitLinearOptions& options = {});

// H-BitLinear (BitNet v2, Wang et al. 2025, arXiv 2504.18415): an online Hadamard transform of the
// input before its per-token activation quantizer, then the ternary product:
//
//   forward   y = Qa_b(x K) . Qw(W)^T        K = diag(signs) (H_p / sqrt(p) (x) small), orthogonal
//                                             (ops::hadamard_transform); Qa_b: per-token symmetric
//                                             absmax on the b-bit grid, s = max|x K| / (2^(b-1) - 1),
//                                             q = clamp(round(. / s), -2^(b-1), 2^(b-1) - 1)
//                                             (ops::fake_quant); act_bits 0: no activation quantizer;
//                                             act_scale AbsMean (4 bits only): BitNet v2's absmean
//                                             INT4 quantizer, s = mean|x K| / sqrt(7), codes in [-8, 7]
//                                             (ops::act_quant_int4_absmean)
//   backward  dx = (dy . Qw(W)) K^T           dW = dy^T . Qa_b(x K)
//
// i.e. the straight-through gradient of the surrogate y = (x K + c_x) . (W + c_W)^T with the
// offsets held constant, K's backward being its transpose. `options.quantize_activations` is
// ignored (the b-bit quantizer replaces BitLinear's int8 one); options.quantize = false is the
// plain linear layer on the rotated input. The model applies the same three steps through its
// transforms (model/rotation.h "h-bitlinear", train/bitnet.h); this function is their reference.
Var h_bitlinear(const Var& x, const Var& w, const Tensor& signs, const Tensor& small, int act_bits,
                const BitLinearOptions& options = {}, ops::ActScale act_scale = ops::ActScale::AbsMax);

// BitNet v2's absmean INT4 activation quantizer (ops/ternary.h, per row of x [M, C]) with the
// straight-through estimator: forward x~ = s clamp(round(x / s), -8, 7), s = mean|x| / sqrt(7);
// backward dx = dy, the gradient of the surrogate x + c_x with c_x = x~ - x held constant (the
// papers' x + (Q(x) - x).detach(): clipped entries pass their gradient too, and the scale's
// dependence on x is not differentiated).
Var int4_absmean_fake_quant(const Var& x);

// The weight the forward pass multiplies by (W_eff above), as a new tensor.
Tensor bitlinear_effective_weight(const Tensor& w, const BitLinearOptions& options);

}  // namespace lowbit
