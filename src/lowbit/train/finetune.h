// LoRA finetuning of a quantized model (lowbit finetune): the packed weights stay frozen; only
// LoRA adapters (Hu et al. 2022) on every quantized linear are trained — the adapters ApiQ/SAPR
// produced, or new ones (A ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT's Kaiming init, B = 0, so the
// model starts exactly at the quantized one). The loop, schedule, checkpoints and exact resume
// are those of lowbit train (run_training).
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
  int adapters_created = 0, adapters_reused = 0;
};

// Reads the quantized checkpoint `model_dir`, trains, and writes the finetuned checkpoint (packed
// weights + adapters) to <out_dir>/model.
FinetuneResult finetune_quantized(const std::string& model_dir, FinetuneOptions options,
                                  const std::vector<int32_t>& train_stream, const std::vector<int32_t>& val_stream);

}  // namespace lowbit
