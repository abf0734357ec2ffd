// The training layer of L4Q (Jeon et al. 2024, "L4Q: Parameter Efficient Quantization-Aware
// Fine-Tuning on Large Language Models", arXiv 2402.04902): LoRA-wise LSQ.
//
//   y = x Q(W0 + s_lora B A)^T (+ bias)        s_lora = lora_alpha / rank
//
// W0 [out, in] is the frozen full-precision weight, A [rank, in] and B [out, rank] the LoRA factors
// (shapes as QuantTrainLinear's, train_linear.h), Q the LSQ / LSQ+ quantizer of lsq.h with one step
// (and, on asymmetric formats, one zero point) per quantization group. Unlike ApiQ / QLoRA-style
// layers (Q(W) + s B A) the quantizer acts on the *merged* weight, so the trained layer is one
// quantized weight: encode() packs Q(W0 + s B A) into the format, no adapter is kept for inference.
// Trainable: A, B, the steps and zero points (jointly); W0 never changes and has no gradient or
// optimizer state. forward() is one fused autograd op (L4Q's memory-optimised layer): the merged
// weight and its quantized copy exist only inside the forward and are recomputed in the backward,
// so between them a layer keeps nothing of size [out, in] but W0 — a step's memory is LoRA
// finetuning's plus one layer's temporaries. (merged_weight() / quantized_weight() are the
// unfused autograd form, for tests and effective_weight().)
//
// Gradients (the straight-through estimator of lsq.h on the merged weight M = W0 + s B A):
//   dL/dM = dL/dQ inside the clamp, 0 outside;  dL/dA = s B^T dL/dM;  dL/dB = s dL/dM A^T;
//   the steps and zero points as lsq_fake_quant, with LSQ's gradient scale 1/sqrt(N Qp).
// Initialisation: B = 0 (so M = W0 at the start) and A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's
// kaiming_uniform_(a = sqrt(5)), as QuantTrainLinear); steps / zero points from lsq_init on W0.
#pragma once
#include <cstdint>

#include "lowbit/model/linear.h"
#include "lowbit/quant/lsq.h"

namespace lowbit {

struct L4qOptions {
  int64_t rank = 8;
  double lora_alpha = 16;  // s_lora = lora_alpha / rank
  uint64_t seed = 0;       // the LoRA A initialisation
  double grad_scale = 1;   // step / zero-point gradient scale (L4Q uses LSQ's: lsq_grad_scale(f, in))
};

class L4qTrainLinear : public Linear {
 public:
  // weight [out, in] F32 (CPU or GPU: the layer lives on its device) or F64 (CPU) (copied, frozen), bias [out] or undefined (frozen),
  // init: lsq_init of the weight (steps / zero points of W0).
  L4qTrainLinear(const Tensor& weight, const Tensor& bias, const QuantFormat& f, const LsqParams& init,
                 const L4qOptions& o);

  Var forward(const Var& x) const override;
  int64_t in_features() const override { return w0_.value().size(1); }
  int64_t out_features() const override { return w0_.value().size(0); }
  std::vector<Var> parameters() const override;  // lora_parameters() then quant_parameters()
  std::vector<Var> lora_parameters() const;      // A, B
  std::vector<Var> quant_parameters() const;     // step (, offset)
  // Everything that changes in training (A, B, step, offset): what a resumable state must hold.
  std::vector<Var> state() const { return parameters(); }
  Tensor effective_weight() const override;      // Q(W0 + s B A) without grad
  Tensor bias() const override { return bias_.defined() ? bias_.value() : Tensor(); }
  std::string kind() const override { return std::string("l4q:") + format_.name; }
  const QuantFormat& format() const { return format_; }
  double lora_scale() const { return opt_.lora_alpha / double(opt_.rank); }

  Var merged_weight() const;     // W0 + s B A (with grad to A and B)
  Var quantized_weight() const;  // Q(merged_weight())
  // The packed tensor of Q(W0 + s B A) with the steps rounded to their f16 storage (lsq_encode):
  // its dequantize() equals the fake-quantized merged weight computed with those steps, exactly.
  QuantizedTensor encode() const;

 private:
  const QuantFormat& format_;
  L4qOptions opt_;
  Var w0_, bias_;  // frozen
  Var lora_A_, lora_B_, step_, offset_;
};

}  // namespace lowbit
