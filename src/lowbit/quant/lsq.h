// LSQ and LSQ+ weight fake quantization for quantization-aware training (issue 14).
//
//   LSQ  (Esser et al. 2020, "Learned Step Size Quantization", ICLR): the step size s is a
//        parameter trained with the task loss; its gradient is scaled by g = 1 / sqrt(N * Qp), N the
//        number of weights sharing the step size, Qp the largest positive code.
//   LSQ+ (Bhalgat et al. 2020, "LSQ+: Improving low-bit quantization through learnable offsets and
//        better initialization", CVPR-W): adds a learned offset (here the zero point z) and
//        initialises (s, z) by minimising the quantization MSE instead of LSQ's 2 <|w|> / sqrt(Qp).
//
// Parameters: per quantization group of the format (quant/format.h: groups run along the input
// dimension; per-channel formats have one group per row), step [out, G] and offset [out, G].
//
// Forward, for weight w of group (r, g), s = step[r, g]:
//   symmetric int (intBgGs, intBpcs, int8pc): Qn = Qp = 2^(B-1) - 1, no offset (undefined),
//       Ŵ = round(clamp(w / s, -Qn, Qp)) * s            (the stored code is that integer + 2^(B-1))
//   asymmetric int (intBgG, intBpc): codes [0, qmax = 2^B - 1] with an integer zero point, as the
//       format stores them. The offset is a real-valued latent; the forward uses its rounded value
//       zr = clamp(round(offset), 0, qmax) (EfficientQAT's round_ste(zero_point)):
//       u = w / s + zr,   Ŵ = (round(clamp(u, 0, qmax)) - zr) * s
//       In LSQ+ terms (Ŵ = round(clamp((w - beta) / s, ...)) * s + beta) beta = -zr * s, restricted
//       to whole steps so the trained function is exactly what the packed format decodes.
//       Qp = qmax for the gradient scale.
// Backward (straight-through estimator for round(), Bengio et al. 2013), with the element "inside"
// when the clamp does not act (qlo <= u <= qmax, bounds included):
//   dŴ/dw      = 1 inside, 0 outside
//   dŴ/ds      = g * (q - zr - w / s) inside (q = round(u)), g * (q - zr) outside (q the bound)
//   dŴ/doffset = 0 inside, -g * s outside              (round(offset) passes the gradient: STE)
// g is the gradient scale passed in (lsq_grad_scale gives LSQ's 1/sqrt(N Qp); EfficientQAT's
// Block-AP uses 1). These are the exact derivatives of the surrogate in which every rounding
// residual round(u) - u, the clamp mask and round(offset) - offset are held at their current
// values; tests/quant/test_lsq.cpp checks them against finite differences of that surrogate in f64.
//
// Frozen codes (EfficientQAT's E2E-QP): Ŵ[r, j] = c[r, j] * s[r, g(j)] with c = q - zr a constant
// integer tensor; only s trains (dŴ/ds = c). group_scale_dequant is that op.
//
// Bodies: the ops lsq_quant and group_scale (ops/qat_quant.h): CPU (f32, and f64 for the gradient
// checks) and CUDA (f32). The quantizer runs on the device of w (step and offset on the same one);
// lsq_init and the encoders are host code (they take or copy CPU tensors).
#pragma once
#include <vector>

#include "lowbit/autograd/variable.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

// True for the formats LSQ supports (uniform integer, asymmetric or symmetric).
bool lsq_supports(const QuantFormat& f);
// Largest positive code Qp of the LSQ grid: 2^(B-1) - 1 (symmetric), 2^B - 1 (asymmetric).
int64_t lsq_qp(const QuantFormat& f);
// LSQ's gradient scale 1 / sqrt(N * Qp) for rows of `in` weights (N = the group size, `in` for a
// per-channel format; a short last group counts as a full one).
double lsq_grad_scale(const QuantFormat& f, int64_t in);

// How the step sizes (and zero points) start.
//   Lsq:    s = 2 <|w|> / sqrt(Qp) over the group (LSQ paper); asymmetric formats: offset = the
//           middle code round(qmax / 2) (a centred grid, as a symmetric one).
//   MinMax: the round-to-nearest parameters of the format (params_from_range on the group's
//           0-inclusive range), i.e. QAT starts at RTN.
//   Mse:    LSQ+'s MSE-optimal start: the (lo, hi) clipping range on a 20 x 20 grid of shrink
//           factors of the group's range [min, max] (0.5 .. 1 each side; one factor for symmetric
//           formats) that minimises the group's squared quantization error.
//   Lp4:    the same grid minimising the L4 norm of the error instead (the LP_p4 range estimator
//           LR-QAT's reference code uses for its weights: outliers weigh more, the range clips less).
enum class LsqInit { Lsq, MinMax, Mse, Lp4 };
const char* lsq_init_name(LsqInit i);
LsqInit parse_lsq_init(const std::string& name);  // "lsq", "minmax", "mse", "lp4"; throws otherwise

struct LsqParams {
  Tensor step;    // [out, G], w's dtype (F32 or F64), CPU
  Tensor offset;  // [out, G] (asymmetric formats), undefined for symmetric ones
};
// w [out, in] F32 or F64 on the CPU.
LsqParams lsq_init(const Tensor& w, const QuantFormat& f, LsqInit init);

// Ŵ = Q(w; step, offset) with the backward above. offset must be undefined for symmetric formats
// and defined for asymmetric ones (its gradient is computed only when it requires grad).
// slice r (0: none; 0 < r < f.bits on an asymmetric format, CPU): MatQuant's r-bit model of the same
// codes (quant/matryoshka.h), Ŵ_r = (S(q, r) 2^(c-r) - zr) s, q the code above, S the Matryoshka
// slice of core/format_traits.h; backward as above with the clamp at the sliced grid's top
// 2^c - 2^(c-r) and q replaced by S(q, r) 2^(c-r) (ops/qat_quant_math.h lsq_grad).
Var lsq_fake_quant(const Var& w, const Var& step, const Var& offset, const QuantFormat& f, double grad_scale,
                   int slice = 0);

// The tensor bodies of lsq_fake_quant, for fused layers that recompute the quantizer in their own
// backward instead of keeping its input (quant/l4q_linear.h): the forward value, and the gradients
// for an upstream gradient gy [out, in] — dw when dw is non-null, ds always, dz when dz is non-null
// (asymmetric formats). Same arguments and checks as lsq_fake_quant; outputs are allocated here.
Tensor lsq_fake_quant_value(const Tensor& w, const Tensor& step, const Tensor& offset, const QuantFormat& f,
                            int slice = 0);
void lsq_fake_quant_grads(const Tensor& w, const Tensor& step, const Tensor& offset, const QuantFormat& f,
                          double grad_scale, const Tensor& gy, Tensor* dw, Tensor* ds, Tensor* dz);

// Ŵ[r, j] = codes[r, j] * step[r, g(j)]; codes [out, in] constant (no gradient) of the step's dtype
// or I8 (integer codes), step [out, G]; Ŵ has the step's dtype.
Var group_scale_dequant(const Tensor& codes, const Var& step, const QuantFormat& f);
// Codes (F32 [out, in], on the CPU) as I8 when every value is an integer in [-128, 127] (E2E-QP's
// frozen codes: one byte a weight on the device instead of four), else undefined.
Tensor int8_codes(const Tensor& codes);

// The packed tensor of the trained quantizer: the step rounded to the nearest f16 value (the
// storage), zr = clamp(round(offset), 0, qmax), codes computed with the rounded step. Its
// dequantize() equals lsq_fake_quant's forward with that rounded step exactly (in f32).
QuantizedTensor lsq_encode(const Tensor& w, const Tensor& step, const Tensor& offset, const QuantFormat& f);
// The same step rounding for a step tensor (F32/F64 -> same dtype, values exactly f16).
Tensor lsq_storage_step(const Tensor& step);

// The frozen integer codes c = q - zr [out, in] (F32) and the step (F32 [out, G]) and zero point
// (F32 [out, G], 0 for symmetric formats: c is then the signed code) of a packed tensor in an
// integer format: E2E-QP's starting point.
struct FrozenCodes {
  Tensor codes, step, zero;
};
FrozenCodes frozen_codes(const QuantizedTensor& q);
// The packed tensor with codes c + zero and the step rounded to f16 (the inverse of frozen_codes).
QuantizedTensor encode_frozen(const FrozenCodes& fc, const Tensor& step, const QuantFormat& f);

}  // namespace lowbit
