// Block-AP, the first stage of EfficientQAT (Chen et al. 2024, "EfficientQAT: Efficient
// Quantization-Aware Training for Large Language Models", arXiv 2407.11062, §3.2), as a block
// method of the pipeline (pipeline.h): ApiQ's block-wise template with other trainables.
//
// Every linear of the block becomes an LsqTrainLinear (quant/lsq_linear.h) in latent mode: the
// full-precision weight W, the step sizes s and the zero points z all train ("all parameters"), the
// quantizer being Ŵ = (clamp(round(W/s) + round(z), 0, qmax) - round(z)) * s with the
// straight-through estimator for both roundings (EfficientQAT's quantizer; no LSQ gradient scale).
// s and z start at the round-to-nearest (min-max) parameters, as EfficientQAT's. The loss is the
// block's reconstruction MSE || F(W, X_fp) - F(Ŵ, X^q) ||^2 against the FP block outputs
// (ctx.fp_targets), on the quantized-path inputs (ctx.inputs). AdamW with two groups (weights,
// quantization parameters), no weight decay, constant learning rate, `epochs` passes over the
// calibration windows in a seeded shuffled order. Norms and everything else stay frozen. The block is
// then encoded (lsq_encode: steps rounded to f16, integer zero points) and installed as QuantLinear.
//
// Determinism: the shuffle of epoch e of block l is seeded from (seed, l, e) only, so a block trained
// after a pipeline resume is bit-identical to the same block in an uninterrupted run.
// Data parallel (issue 20): as ApiQ's (apiq.h): the one-process shuffle and batches over all ranks'
// windows, each rank's share of a step's loss, the gradients summed over the ranks before AdamW,
// the epoch loss all-reduced.
// Devices: trains on the device of the block's inputs (the model's), CPU or GPU.
#pragma once
#include <vector>

#include "lowbit/methods/pipeline.h"
#include "lowbit/quant/lsq.h"

namespace lowbit {

struct BlockApOptions {
  // EfficientQAT's values for Llama-2-7B (4096 windows, i.e. 4096 steps per block). lowbit qat's
  // defaults differ (train/qat.cpp): with 128 windows per block these learning rates barely move
  // the parameters (stories260K int2g64: test perplexity 116 with them, 8.8 after Block-AP with 1e-3).
  int epochs = 2;              // EfficientQAT: 2 epochs
  int64_t batch = 2;           // calibration windows per step (EfficientQAT: 2)
  double weight_lr = 2e-5;     // EfficientQAT 2-bit: 2e-5 for W (1e-5 at 3/4 bits)
  double quant_lr = 1e-4;      // EfficientQAT: 1e-4 for s and z
  LsqInit init = LsqInit::MinMax;
  uint64_t seed = 0;
  bool verbose = false;        // per-epoch mean loss on stderr
};

struct BlockApLog {
  int layer = 0, epoch = 0;
  double loss = 0;  // mean step loss of the epoch
};

class BlockApMethod : public BlockMethod {
 public:
  BlockApMethod(const QuantFormat& f, BlockApOptions o);
  std::string name() const override { return "block-ap"; }
  std::string options_key() const override;
  void quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) override;
  bool supports_data_parallel() const override { return true; }
  const std::vector<BlockApLog>& log() const { return log_; }

 private:
  const QuantFormat& f_;
  BlockApOptions o_;
  std::vector<BlockApLog> log_;
};

}  // namespace lowbit
