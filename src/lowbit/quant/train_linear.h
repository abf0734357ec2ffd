// A linear layer for quantization-aware calibration (ApiQ, Liao et al. 2024, arXiv 2402.05147):
//
//   y = x (Q(W; gamma, beta) + s_lora * B A)^T (+ bias)        s_lora = lora_alpha / rank
//
// W [out, in] is frozen (the full-precision weight); Q is the learnable-clipping fake quantizer of
// lwc.h with one (gamma, beta) pair per quantization group; A [rank, in] and B [out, rank] are the
// LoRA factors (Hu et al. 2022). Trainable: gamma, beta, A, B. ApiQ's reference code wraps PEFT's
// LoRA (alpha 16, r 64, hence s_lora = 0.25) around the quantized base layer; the defaults follow it.
//
// finalize() turns the layer into what inference stores: the weight encoded with the learned
// clipping through the format's params_from_range (f16 scales, integer zero points), and the
// adapters with s_lora folded into B, rounded to f16 (the precision the adapters are stored and
// counted at; see io/quantized_checkpoint.h).
#pragma once
#include <cstdint>

#include "lowbit/model/linear.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

// LoRA initialisation. Kaiming: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PyTorch kaiming_uniform_ with
// a = sqrt(5), PEFT's default and the starting point of ApiQ's calibration), B = 0. Gaussian:
// A ~ N(0, 1/rank^2) (PEFT init_lora_weights="gaussian"), B = 0. Given: A and B passed in, e.g. the
// adapters an earlier ApiQ run produced ("ApiQ's initialisation" of LoRA for finetuning, §3).
enum class LoraInit { Kaiming, Gaussian, Given };

struct QuantTrainOptions {
  int64_t rank = 64;           // 0: learnable clipping only (OmniQuant's weight-only LWC)
  double lora_alpha = 16;      // s_lora = lora_alpha / rank
  LoraInit init = LoraInit::Kaiming;
  uint64_t seed = 0;           // for the LoRA initialisation
  double clip_init = 4.0;      // initial gamma/beta logits (sigmoid(4) = 0.982)
  // ggml block types only: the initial logits reproduce the reference quantizer's grid per sub-block
  // (lwc_ggml_init_from_rtn) instead of clip_init.
  bool clip_init_rtn = true;
  // The frozen weight is the given tensor itself (no copy) when it already is a contiguous f32/f64
  // tensor on its device; the caller must not change it while the layer lives. Block-wise ApiQ
  // shares the replaced layer's weight this way (at the Llama-2-7B shape a block's copy is 0.75 GiB).
  bool share_weight = false;
};

// The encoded layer: packed weight plus adapters (undefined when rank = 0), F32 holding f16 values.
struct FinalizedLinear {
  QuantizedTensor q;
  Tensor lora_A;  // [rank, in]
  Tensor lora_B;  // [out, rank], s_lora folded in
};

class QuantTrainLinear : public Linear {
 public:
  // weight [out, in] (copied to f32 or kept f64, on its device: CPU or CUDA, f64 on the CPU only;
  // every parameter is created on that device), bias [out] or undefined (frozen). For
  // LoraInit::Given, lora_A [rank, in] and lora_B [out, rank] are the initial factors (B in the
  // scaled convention: the layer adds s_lora * B A). gamma/beta may be given to resume training.
  QuantTrainLinear(const Tensor& weight, const Tensor& bias, const QuantFormat& f, const QuantTrainOptions& o,
                   const Tensor& lora_A = Tensor(), const Tensor& lora_B = Tensor());

  Var forward(const Var& x) const override;
  int64_t in_features() const override { return weight_.shape()[1]; }
  int64_t out_features() const override { return weight_.shape()[0]; }
  std::vector<Var> parameters() const override;  // clipping, then LoRA
  std::vector<Var> clip_parameters() const;      // gamma (, beta)
  std::vector<Var> lora_parameters() const;      // A, B (empty for rank 0)
  // Q(W) + s_lora B A evaluated without grad (the function the layer currently computes).
  Tensor effective_weight() const override;
  Tensor bias() const override { return bias_.defined() ? bias_.value() : Tensor(); }
  std::string kind() const override { return std::string("lwc-lora:") + format_.name; }

  // Q(W; gamma, beta), plus s_lora B A when with_lora: the Ŵ of the saliency regularizer. With
  // LoRA this is one fused autograd op (quantizer output + GEMM accumulate, see train_linear.cpp).
  Var quantized_weight(bool with_lora) const;
  const Tensor& frozen_weight() const { return weight_.value(); }
  const QuantFormat& format() const { return format_; }
  int64_t rank() const { return opt_.rank; }
  double lora_scale() const { return opt_.rank > 0 ? opt_.lora_alpha / double(opt_.rank) : 0.0; }

  FinalizedLinear finalize() const;

 private:
  const QuantFormat& format_;
  QuantTrainOptions opt_;
  Var weight_, bias_;  // frozen
  Var gamma_, beta_;   // [out, n_groups]; beta undefined for symmetric formats
  Var lora_A_, lora_B_;
};

}  // namespace lowbit
