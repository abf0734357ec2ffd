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
// MatQuant (BlockApOptions::widths): the same training with the loss summed over Matryoshka widths,
// MatQuant's multi-scale objective (arXiv 2502.06786 §3.2: Σ_r λ_r L(slice_r), on OmniQuant's
// block-wise reconstruction there, on Block-AP's here); the block is encoded as int8 codes.
#pragma once
#include <map>
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
  // MatQuant (quant/matryoshka.h; qat --method matquant): non-empty = the Matryoshka widths r of the
  // loss, which is then Σ_r width_weights[r] · MSE of the block whose linears are the r-bit slices
  // of the same quantizers (the format must be an int8 group format). Each width's block runs on
  // its own quantized path (the r-bit model's inputs to the block, BlockApMethod::paths_). CPU or
  // GPU (the sliced quantizer is lsq_quant's, both bodies).
  std::vector<int> widths;
  std::vector<double> width_weights;  // one per width
  // (the steps' and zero points' learning rates are rescaled: BlockApMethod::quant_lr_scale)
};

struct BlockApLog {
  int layer = 0, epoch = 0;
  double loss = 0;  // mean step loss of the epoch (MatQuant: the weighted sum over the widths)
  std::vector<double> width_loss;  // MatQuant: the epoch's mean MSE of each width (unweighted)
};

class BlockApMethod : public BlockMethod {
 public:
  BlockApMethod(const QuantFormat& f, BlockApOptions o);
  std::string name() const override { return o_.widths.empty() ? "block-ap" : "matquant"; }
  std::string options_key() const override;
  void quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) override;
  bool supports_data_parallel() const override { return true; }
  // MatQuant: keeps the calibration tokens, to rebuild the narrow widths' input paths after a resume.
  void prepare(LlamaModel& model, const Tensor& tokens, const std::string& state_dir, bool progress) override;
  const std::vector<BlockApLog>& log() const { return log_; }
  // MatQuant: 2^(c - r_min), r_min the narrowest width (1 without widths). The int8 step s is
  // 1/2^(c-r_min) of the narrowest slice's step and the zero point 2^(c-r_min) times its zero, so
  // with Adam (whose step size ignores the gradient's scale) the steps train at quant_lr / scale and
  // the zero points at quant_lr * scale: each moves per step, in the narrowest width's units, as far
  // as Block-AP's at that width. With quant_lr itself the int8 steps (~range/255) jump by more than
  // their own size per step (stories260K: int2 slice perplexity 112 with --widths 2 vs 8.8 for
  // Block-AP at int2g64).
  double quant_lr_scale() const;
  // The quantizer's start: lsq_init at `init`; MatQuant: that of the narrowest width's format,
  // rescaled to the c-bit codes (its slice then starts at the narrowest width's own RTN grid, not at
  // the slice of the int8 RTN grid, whose top quarter is clipped at int2).
  LsqParams initial_params(const Tensor& w, const QuantFormat& f) const;

 private:
  std::string widths_key() const;
  // MatQuant: each width r below the parent's trains on its own quantized path, the inputs that the
  // r-bit model (blocks 0..l-1 sliced to r) gives block l, as Block-AP at r bits would (the pipeline's
  // ctx.inputs are the int8 model's). paths_[r] holds them for block paths_layer_; after a resume
  // they are rebuilt from the tokens through the restored blocks, the same computation.
  void sync_paths(BlockContext& ctx);
  Tensor sliced_block_forward(LlamaModel& model, int layer, const Tensor& x, int r, int64_t n, int64_t L) const;
  const QuantFormat& f_;
  BlockApOptions o_;
  std::vector<BlockApLog> log_;
  Tensor tokens_;
  std::map<int, Tensor> paths_;
  int paths_layer_ = -1;
};

}  // namespace lowbit
