// A linear layer whose weight is stored quantized (a QuantizedTensor), optionally with a LoRA pair
// (Hu et al. 2022) kept beside it in higher precision, as ApiQ (arXiv 2402.05147) produces:
//
//   y = x Ŵ^T + (x A^T) B^T (+ bias)       Ŵ = dequantize(q), A [rank, in], B [out, rank]
//
// Inference (f32 input that needs no gradient, on the CPU or on CUDA) runs ops::quant_matmul on the
// packed codes: no f32 copy of Ŵ is ever made; on CUDA the packed codes are uploaded once, on first
// use (QuantizedTensor::upload_to_device). The dequantized Ŵ (a Var) is built lazily, and kept,
// only where a path needs it: a gradient through x (training, LoRA finetuning), a format without a
// GPU form on CUDA (ops::quant_matmul_has_cuda_layout), or a caller of dequantized_weight(). The
// adapters are frozen unless set_lora_trainable(true) (LoRA finetuning of a quantized model).
//
// QuIP's incoherence processing (quant/incoherence.h, `quantize --method quip`): the packed weight is
// W' = R_out^T W R_in and the layer computes y = ((x R_in) Q(W')^T) R_out^T (+ bias) — the input and
// the output transformed online around the packed product (CPU). The dequantized weight it keeps for
// the other paths, and effective_weight(), are R_out Q(W') R_in^T, the weight in x's basis.
#pragma once
#include <mutex>

#include "lowbit/model/linear.h"
#include "lowbit/quant/incoherence.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

class LpProduct;  // model/lp_linear.h

class QuantLinear : public Linear {
 public:
  // bias [out] or undefined (kept in full precision); the layer runs on `device` (on CUDA the packed
  // codes are copied to the GPU on first use, or the dequantized weight when a path needs it).
  // lora_A [rank, in] and lora_B [out, rank] (float) are both given or both undefined.
  // `dequantized`: dequantize(q) when the caller already has it (e.g. GPU GPTQ produces it on the
  // device), which skips decoding the codes again on the CPU.
  explicit QuantLinear(QuantizedTensor q, Tensor bias = Tensor(), Device device = Device::CPU,
                       Tensor lora_A = Tensor(), Tensor lora_B = Tensor(), Tensor dequantized = Tensor());
  Var forward(const Var& x) const override;
  bool packed_product(const Var& x, ops::PackedWeight& w, ops::QuantMatmulOptions& opt) const override;
  int64_t in_features() const override { return q_.in_features(); }
  int64_t out_features() const override { return q_.out_features(); }
  std::vector<Var> parameters() const override;  // the adapters when trainable, else none
  // Ŵ + B A: the function the layer computes (a new tensor when there are adapters, or when Ŵ has
  // not been materialized: then it is decoded for the caller and not kept).
  Tensor effective_weight() const override;
  Tensor bias() const override { return bias_.defined() ? bias_.value() : Tensor(); }
  std::string kind() const override { return q_.fmt().name; }
  // Tensor parallelism: the packed codes of the piece (QuantizedTensor::slice_rows / slice_cols; the
  // adapters' matching piece: B's rows or A's columns), a frozen layer running on `device` (on
  // CUDA the piece's codes are uploaded on first use).
  std::shared_ptr<Linear> shard(ShardAxis axis, int64_t begin, int64_t end, Device device) const override;
  int64_t column_shard_unit() const override { return q_.column_shard_unit(); }
  // The weight in the storage layout (a converted copy when the codes are in the CPU panel layout:
  // QuantizedTensor::to_panel_layout), what checkpoint writers and methods read; packed() is the
  // tensor as the layer holds it.
  QuantizedTensor quantized() const { return q_.row_layout(); }
  const QuantizedTensor& packed() const { return q_; }
  Device device() const { return device_; }
  // Ŵ on the layer's device, built on first use and kept (training paths only).
  const Tensor& dequantized_weight() const { return weight_var().value(); }
  bool has_dequantized_weight() const { return weight_.defined(); }
  // QuIP's incoherence transform of the packed weight (see above); throws when its sizes do not match
  // the layer or the layer has adapters.
  void set_incoherence(Incoherence t);
  const Incoherence& incoherence() const { return inc_; }
  // Options of the packed path (tests force a body or an instruction set).
  void set_matmul_options(const ops::QuantMatmulOptions& o) { mm_opt_ = o; }

  bool has_lora() const { return lora_A_.defined(); }
  int64_t lora_rank() const { return has_lora() ? lora_A_.shape()[0] : 0; }
  Tensor lora_A() const { return has_lora() ? lora_A_.value() : Tensor(); }
  Tensor lora_B() const { return has_lora() ? lora_B_.value() : Tensor(); }
  void set_lora_trainable(bool trainable);
  // LoRA finetuning in low precision (lowbit finetune --precision, train/finetune.h): the adapters'
  // two products x A^T and (x A^T) B^T run through these (model/lp_linear.h: quantized operands,
  // straight-through gradients); the frozen base product x Ŵ^T keeps the layer's own path. Null
  // (the default): plain f32 products.
  void set_lora_products(std::shared_ptr<const LpProduct> a, std::shared_ptr<const LpProduct> b);

 private:
  const Var& weight_var() const;  // builds weight_ on first use

  QuantizedTensor q_;
  Device device_ = Device::CPU;
  bool gpu_packed_ = false;  // on CUDA with a format that has a GPU form: quant_matmul on the device
  ops::QuantMatmulOptions mm_opt_;
  mutable std::mutex weight_mutex_;
  mutable Var weight_;    // dequantized weight (frozen), undefined until a path needs it
  Var bias_;
  Var lora_A_, lora_B_;   // undefined without adapters
  std::shared_ptr<const LpProduct> lora_product_a_, lora_product_b_;  // set_lora_products
  Incoherence inc_;  // undefined: none
};

}  // namespace lowbit
