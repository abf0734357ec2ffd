// LoRA finetuning of a quantized model (lowbit finetune): the packed weights stay frozen; only
// LoRA adapters (Hu et al. 2022) on every quantized linear are trained — the adapters ApiQ/SAPR
// produced, or new ones (A ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT's Kaiming init, B = 0, so the
// model starts exactly at the quantized one). The loop, schedule, checkpoints and exact resume
// are those of lowbit train (run_training).
//
// Low precision (train.low_precision, --precision; issue 18): the adapters' two products x A^T and
// (x A^T) B^T of the blocks outside --lp-keep-first / --lp-keep-last run through model/lp_linear.h's
// LpProduct (quantized operands in the three GEMMs of each, straight-through gradients, f32 A and B
// as master weights), CPU-emulated or on CUDA as lowbit train's. The frozen quantized base product
// x Ŵ^T is not re-quantized: Ŵ already is the checkpoint's low-bit weight, and rounding it again to
// E4M3 / E2M1 would finetune a different model from the one the output checkpoint holds (the packed
// Ŵ plus f32 adapters); it keeps the layer's own path (packed kernel, or the dequantized Ŵ where a
// gradient flows through x). The settings are recorded in the state (a resume with others is
// refused) and in the output checkpoint's "finetune" metadata.
#pragma once
#include <string>
#include <vector>

#include "lowbit/train/trainer.h"

namespace lowbit {

struct FinetuneOptions {
  TrainOptions train;        // schedule, batch, out_dir, device (train.config is filled in)
  int lora_rank = 16;        // rank of new adapters (layers that already have adapters keep theirs)
  uint64_t lora_seed = 0;
};

struct FinetuneResult {
  TrainResult train;
  double val_loss_before = -1, val_loss_after = -1;
  // With --precision: val_loss_after is the low-precision forward's; this is the saved model's (f32
  // adapter products), -1 otherwise.
  double val_loss_after_f32 = -1;
  std::string precision = "f32";  // low_precision_key of the run
  int adapters_created = 0, adapters_reused = 0;
};

// Reads the quantized checkpoint `model_dir`, trains, and writes the finetuned checkpoint (packed
// weights + adapters) to <out_dir>/model.
FinetuneResult finetune_quantized(const std::string& model_dir, FinetuneOptions options,
                                  const std::vector<int32_t>& train_stream, const std::vector<int32_t>& val_stream);

}  // namespace lowbit
