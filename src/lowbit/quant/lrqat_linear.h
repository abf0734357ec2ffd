// The training layer of LR-QAT (Bondarenko, Del Chiaro, Nagel 2024, "Low-Rank Quantization-Aware
// Training for LLMs", arXiv 2406.06385): low-rank adapters *inside* the quantizer, in the integer
// domain, on a frozen pretrained weight stored downcast.
//
//   Φ0 = φ(W0 / s0 + z0)                                          (once, at set-up; W0 then dropped)
//   Ŵ  = s · (clamp(round(Φ0 + (α/r) B A), qlo, qhi) − z0)        (every forward)
//   y  = x Ŵᵀ (+ bias)
//
// W0 [out, in] is the pretrained weight, s0 / z0 the initial step sizes / zero points of the format's
// groups (quant/format.h: per group of the input dimension, or per row), A [rank, in] and B [out, rank]
// the low-rank factors (the same shapes and PEFT initialisation as L4Q / QuantTrainLinear: A ~
// U(-1/sqrt(in), 1/sqrt(in)), B = 0, so Ŵ starts as the round-to-nearest quantization of W0 on
// (s0, z0)), α/r their scale, s [out, G] the learned step sizes. Trained: A, B and s. Frozen: Φ0,
// z0 (and the bias). The adapter is added to W0/s0 *before* rounding, in units of grid steps, so
// what it learns is which integer each weight rounds to; after training the integer codes
// clamp(round(Φ0 + (α/r) B A)) and s are exactly a packed tensor of the format (encode()), nothing of
// the adapter remains at inference.
//
// The integer grid [qlo, qhi]: symmetric formats (intBgGs, intBpcs, int8pc) [-(2^(B-1) - 1),
// 2^(B-1) - 1] with z0 = 0 — lowbit's symmetric grid (quant/lsq.h), one level less than the paper's
// [-2^(B-1), 2^(B-1) - 1]; asymmetric formats (intBgG, intBpc) [0, 2^B - 1] with z0 the initial
// integer zero point of each group, kept fixed (Φ0 already holds it; the paper's code quantizes
// symmetrically, the asymmetric form is lowbit's extension).
//
// φ, the downcast (the paper's Section 3, the reference code's lr_qat_fixed_point8 / bf16 / fp16 /
// fp32 methods):
//   int8 (default)  fixed point with 8 - B fractional bits: Φ0 = round(clamp(W0/s0 + z0, qlo, qhi)
//                   · 2^(8-B)) / 2^(8-B), stored as the int8 k = Φ0·2^(8-B) − c·2^(8-B) with
//                   c = 2^(B-1) for asymmetric formats (c = 0 symmetric), so every B ≤ 8 fits one
//                   signed byte: 1 byte per weight instead of 4 (f32 W0) — the paper's memory saving.
//   bf16, f16       Φ0 = W0/s0 + z0 rounded to the 16-bit type (2 bytes per weight), not clamped.
//   f32             no downcast (4 bytes per weight; for comparison).
// Φ0 is upcast to the layer's dtype (f32, or f64 for the gradient checks) inside each forward.
//
// Gradients: the straight-through estimator on round (the paper's round_ste), clamp's own gradient
// (passes where qlo <= round(Φ0 + C) <= qhi, bounds included), C = (α/r) B A:
//   dŴ/dC = s inside, 0 outside;   dL/dA = (α/r) Bᵀ dL/dC;   dL/dB = (α/r) dL/dC Aᵀ
//   dŴ/ds = g · (q − z0) with q = clamp(round(Φ0 + C)) (s multiplies the integers; it is not inside
//           the rounding: Φ0 used the fixed s0). g: a gradient scale (1, or LSQ's 1/sqrt(N Qp) as
//           the reference code's learned ranges use).
// These are the exact derivatives of the surrogate in which the rounding residual round(Z) − Z and
// the clamp mask are held at their current values (tests/train/test_lrqat.cpp checks them against
// f64 finite differences of that surrogate).
//
// forward() is one fused autograd op per layer. With checkpointing on (the paper's "(c)
// checkpointing", the default), Ŵ and the mask are recomputed in the backward from Φ0, A, B, s: the
// graph keeps nothing of size [out, in] between forward and backward (x is saved, as `linear`
// saves it). With it off, the forward keeps Ŵ (f32/f64) and the mask (1 byte) per element for the
// backward: less compute, more memory.
// Bodies: CPU, f32 and f64. No CUDA body (the method refuses --device cuda).
#pragma once
#include <cstdint>
#include <string>

#include "lowbit/autograd/variable.h"
#include "lowbit/model/linear.h"
#include "lowbit/quant/lsq.h"

namespace lowbit {

enum class LrQatDowncast { Int8, BF16, F16, F32 };
const char* lrqat_downcast_name(LrQatDowncast d);             // "int8", "bf16", "f16", "f32"
LrQatDowncast parse_lrqat_downcast(const std::string& name);  // throws for other names

// The integer grid of the format: [qlo, qhi] and the int8 fixed point's centre c and 2^(8-B).
struct LrQatGrid {
  double qlo = 0, qhi = 0, centre = 0, frac = 1;
};
LrQatGrid lrqat_grid(const QuantFormat& f);  // throws for formats LSQ does not support

// φ(W0/s0 + z0) as stored: I8 [out, in] (int8), BF16 / F16 (16-bit) or F32. w0 [out, in] F32/F64 on
// the CPU, step0 / zero0 [out, G] in w0's dtype (zero0 undefined for symmetric formats; rounded to
// an integer in [qlo, qhi] otherwise).
Tensor lrqat_downcast(const Tensor& w0, const Tensor& step0, const Tensor& zero0, const QuantFormat& f, LrQatDowncast d);
// Φ0 back in dtype `dt` (F32 or F64): the values the quantizer adds C to.
Tensor lrqat_upcast(const Tensor& stored, const QuantFormat& f, LrQatDowncast d, DType dt);

// The quantizer's tensor bodies (CPU, f32/f64; phi0, c [out, in] and step, zero [out, G] of one dtype;
// zero = the fixed zero points, zeros for symmetric formats):
//   value:  Ŵ = s (clamp(round(Φ0 + C), qlo, qhi) − z)
//   grads:  for the upstream gradient gy [out, in]: dc (when non-null) and ds (always), as above.
Tensor lrqat_quant_value(const Tensor& phi0, const Tensor& c, const Tensor& step, const Tensor& zero,
                         const QuantFormat& f);
void lrqat_quant_grads(const Tensor& phi0, const Tensor& c, const Tensor& step, const Tensor& zero, const QuantFormat& f,
                       double grad_scale, const Tensor& gy, Tensor* dc, Tensor* ds);
// The autograd form Ŵ(C, s) (gradients to C and s), for tests and the unfused layer.
Var lrqat_fake_quant(const Tensor& phi0, const Var& c, const Var& step, const Tensor& zero, const QuantFormat& f,
                     double grad_scale);

struct LrQatOptions {
  int64_t rank = 8;
  double lora_alpha = 16;  // the adapter's scale α / rank
  uint64_t seed = 0;       // A's initialisation
  double grad_scale = 1;   // step-size gradient scale (the method uses LSQ's lsq_grad_scale(f, in))
  LrQatDowncast downcast = LrQatDowncast::Int8;
  bool checkpoint = true;  // recompute Ŵ in the backward instead of keeping it
};

class LrQatTrainLinear : public Linear {
 public:
  // weight [out, in] F32 or F64 on the CPU (read once: only φ(W0/s0 + z0) is kept), bias [out] or
  // undefined (frozen), init: the initial steps s0 (and zero points z0) of W0, e.g. lsq_init.
  LrQatTrainLinear(const Tensor& weight, const Tensor& bias, const QuantFormat& f, const LsqParams& init,
                   const LrQatOptions& o);

  Var forward(const Var& x) const override;
  int64_t in_features() const override { return in_; }
  int64_t out_features() const override { return out_; }
  std::vector<Var> parameters() const override;  // lora_parameters() then quant_parameters()
  std::vector<Var> lora_parameters() const;      // A, B
  std::vector<Var> quant_parameters() const;     // step
  // Everything that changes in training (A, B, step): what a resumable state must hold.
  std::vector<Var> state() const { return parameters(); }
  Tensor effective_weight() const override;  // Ŵ without grad
  Tensor bias() const override { return bias_.defined() ? bias_.value() : Tensor(); }
  std::string kind() const override { return std::string("lr-qat:") + format_.name; }
  const QuantFormat& format() const { return format_; }
  double lora_scale() const { return opt_.lora_alpha / double(opt_.rank); }
  const Tensor& stored_phi0() const { return phi_; }  // φ(W0/s0 + z0) as stored (I8 / BF16 / F16 / F32)
  Tensor phi0() const;                                // upcast to the layer's dtype
  const Tensor& zero() const { return zero_; }        // the fixed zero points [out, G] (0 symmetric)
  DType dtype() const { return dtype_; }

  Var adapter() const;            // C = (α/r) B A, with grad to A and B
  Var quantized_weight() const;   // Ŵ, the unfused autograd form
  // The packed tensor: codes clamp(round(Φ0 + C)), the step rounded to its f16 storage; its
  // dequantize() equals Ŵ computed with that rounded step, exactly.
  QuantizedTensor encode() const;

 private:
  const QuantFormat& format_;
  LrQatOptions opt_;
  int64_t out_ = 0, in_ = 0;
  DType dtype_ = DType::F32;
  Tensor phi_, zero_;  // frozen
  Var bias_;           // frozen
  Var lora_A_, lora_B_, step_;
};

}  // namespace lowbit
