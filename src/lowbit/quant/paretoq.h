// ParetoQ's weight quantizers for quantization-aware training (issue 14): Liu et al. 2025,
// "ParetoQ: Scaling Laws in Extremely Low-bit LLM Quantization", arXiv 2502.02631, as its reference
// code (facebookresearch/ParetoQ, models/utils_quant.py and train.py) defines them. The paper picks
// the quantizer by bit width:
//   1 bit     sign:  Ŵ = α · sign(w)                                    (sign(0) = 0)
//   1.58 bit  SEQ:   Ŵ = α · round(clamp(w/α, -c, c) · 1.5) / 1.5      levels {-2/3, 0, 2/3} · α
//   2 bit     SEQ:   Ŵ = α · (round(clamp(w/α, -c, c) · 2 - 0.5) + 0.5) / 2
//                                                                      levels {-3/4, -1/4, 1/4, 3/4} · α
//   3, 4 bit  LSQ:   Ŵ = α · clamp(round(w/α), -2^(b-1), 2^(b-1) - 1)   (the signed integer grid)
// SEQ (the "stretched elastic quantizer") with c = 1 - 1e-2 (the clip keeps clamp·1.5 from rounding
// to 2 and clamp·2 - 0.5 from rounding to 2). In general SEQ is Ŵ = α (round(clamp(w/α, -c, c) n - t)
// + t) / n with n levels per side (n = 1.5 ternary, 2 for 2 bits) and shift t (0 ternary, 0.5).
// α is a learned parameter per quantization group of the storage format (format.h; per-channel
// formats: one per output row, the reference code's granularity), floored at 1e-5 in the forward
// (the reference's eps; the gradient reaches α unchanged). The 3-4 bit form is LSQ (quant/lsq.h) on
// lowbit's asymmetric format with the zero point fixed at 2^(b-1) (paretoq_lsq_params).
//
// Initialisation (train.py): α = mean|w| (1 bit), max|w| (1.58 and 2 bits), max|w| / (2^(b-1) - 1)
// (3 and 4 bits), over the group; floored at 1e-5.
//
// Backward: the straight-through estimator, with the reference code's gradients. With v = w/α,
// q = Ŵ/α, g the gradient scale (the reference: 1 / sqrt(numel(W) · Qp), Qp = 1 for 1, 1.58 and 2
// bits, 2^(b-1) - 1 for 3 and 4; paretoq_grad_scale):
//   SEQ, inside (-c <= v <= c):  dŴ/dw = 1,  dŴ/dα = g (q - v)
//   SEQ, outside:                dŴ/dw = 0,  dŴ/dα = g Q±
//        2 bits: Q± = ±3/4, the clamped level (the derivative of the forward);
//        1.58 bits: Q± = ±1, as the reference code (its Qp = 1) although the clamped level is ±2/3 —
//        kept so the trained function is the paper's.
//   sign:   dŴ/dw = 1 for |v| <= 1, 0 outside;  dŴ/dα = g sign(w)
// These are the exact derivatives of the surrogate in which, per element, the rounding residual
// q - v (inside), the outside level, sign(w) and the masks are held at their current values
// (outside: Ŵ = α0 q_edge + (α - α0) Q±); tests/quant/test_paretoq.cpp checks them against finite
// differences of that surrogate in f64.
//
// Storage: lowbit's 2-bit integer formats hold these grids exactly, with the grid step h = α / n
// as the f16 group scale (n = 1 for sign):
//   2-bit SEQ:   an asymmetric int2 format (int2gG, int2pc): code q = k + 2 (k = round(...) in
//                {-2..1}), zero point 1.5 (half-integer zero points: format.h), w = (q - 1.5) h;
//   1.58 and 1:  int2 symmetric (int2gGs, int2pcs: w = (q - 2) h, q in {1, 2, 3}) or asymmetric
//                with zero point 1.
// paretoq_storage_alpha rounds α so that h is an f16 value; the packed tensor (paretoq_encode)
// then decodes to paretoq_fake_quant's forward at that α bit for bit (f32).
//
// Bodies: the op seq_quant (ops/qat_quant.h): CPU (f32, and f64 for the gradient checks) and CUDA
// (f32); it runs on the device of w. The initialisation and the encoder are host code.
#pragma once
#include <string>

#include "lowbit/autograd/variable.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/lsq.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

enum class ParetoQBits { One, Ternary, Two, Three, Four };
const char* paretoq_bits_name(ParetoQBits b);            // "1", "1.58", "2", "3", "4"
ParetoQBits parse_paretoq_bits(const std::string& name);  // those names (and "ternary"); throws otherwise
// True for the bit widths whose quantizer lives here (1, 1.58, 2); 3 and 4 bits train with LSQ.
bool paretoq_is_seq(ParetoQBits b);
// The bit width a storage format implies: int2 asymmetric -> 2, int2 symmetric -> 1.58, int3 -> 3,
// int4 -> 4; throws for other formats.
ParetoQBits paretoq_default_bits(const QuantFormat& f);
// Throws (naming the format and what would hold it) when f cannot store bit width b exactly.
void paretoq_check_format(ParetoQBits b, const QuantFormat& f);

// The reference's gradient scale 1 / sqrt(numel · Qp) for a weight of `numel` elements.
double paretoq_grad_scale(ParetoQBits b, int64_t numel);

// The initial α [out, G] (w's dtype) for w [out, in] (F32/F64, CPU): see above. For 3 and 4 bits
// it is the LSQ step.
Tensor paretoq_init_alpha(const Tensor& w, ParetoQBits b, const QuantFormat& f);

// The LSQ parameters of ParetoQ's 3 and 4 bits (lsq_fake_quant with them is the reference's
// LsqBinaryTernaryExtension): step = paretoq_init_alpha; on an asymmetric format the offset fixed
// at 2^(b-1) (trained with train_offset = false), so the grid is the paper's [-2^(b-1), 2^(b-1) - 1];
// on a symmetric format lowbit's [-(2^(b-1) - 1), 2^(b-1) - 1] (one level fewer than the paper's).
LsqParams paretoq_lsq_params(const Tensor& w, ParetoQBits b, const QuantFormat& f);

// Ŵ = Q(w; α) for b in {1, 1.58, 2}, with the backward above. alpha [out, G].
Var paretoq_fake_quant(const Var& w, const Var& alpha, ParetoQBits b, const QuantFormat& f, double grad_scale);

// α rounded so that its grid step α_e / n (α_e = max(α, 1e-5)) is an f16 value (the format's
// scale storage): α' = f16(α_e / n) · n, exact in f32 and f64; the same dtype as alpha.
Tensor paretoq_storage_alpha(const Tensor& alpha, ParetoQBits b);
// The packed tensor of the trained quantizer (b in {1, 1.58, 2}), computed at the storage α:
// its dequantize() equals paretoq_fake_quant(w, paretoq_storage_alpha(alpha)) exactly (f32).
QuantizedTensor paretoq_encode(const Tensor& w, const Tensor& alpha, ParetoQBits b, const QuantFormat& f);

}  // namespace lowbit
