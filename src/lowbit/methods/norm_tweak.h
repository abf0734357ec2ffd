// Norm Tweaking (Li, Li, Zhang, Chu 2023, "Norm Tweaking: High-performance Low-bit Quantization of
// Large Language Models", arXiv 2309.02784) as a block method of the pipeline (pipeline.h).
//
// A base method (GPTQ by default; RTN or AWQ) quantizes the block's linears; then only the block's
// RMSNorm weights (attn_norm, ffn_norm) are trained so that the quantized block's output
// distribution matches the full-precision one, channel by channel (the paper's L_dist):
//     L = 1/C sum_c [ (mu_q^c - mu_f^c)^2 + (var_q^c - var_f^c)^2 ]
// with mu^c, var^c the mean and variance of output channel c over the tokens of a batch, q = the
// quantized block on the quantized-path inputs, f = the pipeline's FP target (the FP block on the FP
// inputs). Adam on the two norm vectors, `epochs` passes over the calibration windows in batches
// of `batch` windows, learning rate lr * (1 + lr_depth_scale * layer / n_layers) (the paper grows
// the step with depth; it grid-searches lr per model: --nt-lr). The tweak is kept only when L over
// all calibration windows went down (the paper's grid search would not pick a harmful rate).
#pragma once
#include <memory>
#include <string>

#include "lowbit/autograd/variable.h"
#include "lowbit/methods/pipeline.h"

namespace lowbit {

struct NormTweakOptions {
  int epochs = 1;               // passes over the calibration windows per block
  int64_t batch = 1;            // calibration windows per Adam step
  double lr = 1e-4;             // Adam learning rate at layer 0
  double lr_depth_scale = 0.0;  // lr grows to lr * (1 + scale) at the last layer
};

// The paper's channel-wise distribution loss between y [M, C] (with gradient) and target [M, C].
Var channel_distribution_loss(const Var& y, const Tensor& target);
// Its value, for reports and tests (no gradient).
double channel_distribution_loss_value(const Tensor& y, const Tensor& target);

class NormTweakMethod : public BlockMethod {
 public:
  NormTweakMethod(std::unique_ptr<BlockMethod> base, NormTweakOptions o) : base_(std::move(base)), o_(o) {}
  std::string name() const override { return "norm-tweak"; }
  std::string options_key() const override;
  void quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) override;

  struct BlockLog {
    int layer = 0;
    double loss_before = 0, loss_after = 0;  // L over all calibration windows
    bool kept = false;
  };
  const std::vector<BlockLog>& log() const { return log_; }

 private:
  std::unique_ptr<BlockMethod> base_;
  NormTweakOptions o_;
  std::vector<BlockLog> log_;
};

}  // namespace lowbit
