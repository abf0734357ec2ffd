// BitNet b1.58 pretraining (issue 15): the Llama architecture with every linear layer of the
// decoder blocks a BitLinear (model/bit_linear.h: ternary absmean weights, int8 per-token absmax
// activations, straight-through gradients, latent f32 weights); the embedding, the norms and the
// output head stay full precision, as in the paper (Ma et al. 2024, arXiv 2402.17764).
//
// Normalisation: the paper's BitLinear normalises its input before the activation quantizer. Here
// the Llama block's own RMSNorms serve: q/k/v read RMSNorm(x) and gate/up read RMSNorm(h), so
// those inputs are normalised right before quantization; o_proj and down_proj quantize their
// inputs (the attention output, the SwiGLU product) without an extra norm. BitNet b1.58 2B4T's
// SubLN (an extra RMSNorm before o_proj and down_proj) is not added: the checkpoint keeps the plain
// Llama layout that `eval`, `generate`, `bench` and GGUF export already read.
//
// The 16 -> 1.58-bit transition (Nielsen et al. 2025, arXiv 2502.11895): the first
// round(transition_at * steps) steps train the same layers unquantized (BitLinearOptions::quantize
// off), then quantization switches on; the latent weights and the AdamW moments carry over (they
// are the same tensors). With phase_in_steps > 0 the switch is gradual: lambda ramps linearly from
// 1/N to 1 over N steps (autograd/bitlinear.h).
//
// BitNet's two-stage schedule (BitNet b1.58 2B4T report, arXiv 2504.12285, sec. 2.2): stage 1 (the
// first half of the steps) follows the usual warmup + cosine schedule with weight decay on;
// at the midpoint the learning rate drops to half the value stage 1 reached and decays by a cosine
// to min_lr_ratio over stage 2, and weight decay is 0 in stage 2.
#pragma once
#include <cstdint>
#include <string>

#include "lowbit/autograd/bitlinear.h"
#include "lowbit/model/llama.h"

namespace lowbit {

struct BitNetOptions {
  bool enabled = false;                                  // --arch bitnet-b1.58
  ops::TernaryScale scale = ops::TernaryScale::AbsMean;  // --ternary-scale mean|median
  double transition_at = 0;                              // --transition-at F in [0, 1)
  int64_t phase_in_steps = 0;                            // --phase-in-steps N
  bool two_stage = false;                                // --schedule bitnet-two-stage
};

// "llama" / "bitnet-b1.58" -> whether BitNet is on; throws naming `what` otherwise.
bool parse_train_arch(const std::string& name, const std::string& what = "--arch");
// "cosine" / "bitnet-two-stage" -> whether the two-stage schedule is on.
bool parse_train_schedule(const std::string& name, const std::string& what = "--schedule");

// Throws lowbit::Error naming the flag for a transition outside [0, 1), a negative phase-in, or a
// phase-in that would not end by the last step (the saved model must be fully ternary).
void check_bitnet_options(const BitNetOptions& o, int64_t max_steps);

// The first step (0-based) trained with quantization on.
int64_t bitnet_transition_step(const BitNetOptions& o, int64_t max_steps);
// The BitLinear options for 0-based step `step`.
BitLinearOptions bitnet_step_options(const BitNetOptions& o, int64_t step, int64_t max_steps);
// Replaces every block linear of a trainable model by a BitLinear over the same weight tensor.
void make_bitnet(LlamaModel& model, const BitNetOptions& o);
// Sets the options of every BitLinear of the model.
void set_bitlinear_options(LlamaModel& model, const BitLinearOptions& options);

// Learning-rate factor and weight-decay factor (1 or 0) of the two-stage schedule at 0-based step.
double two_stage_lr(int64_t step, int64_t warmup, int64_t total, double min_ratio);
double two_stage_wd(int64_t step, int64_t total);

// Writes the model (all block linears BitLinear, quantizing) as a lowbit quantized checkpoint in
// the "ternary" format (quant/format.h: 2-bit codes, one f32 gamma per tensor; the codes and gamma
// are the ones the training forward used), method "bitnet-b1.58". Dense embedding, norms, head.
void save_bitnet_checkpoint(const std::string& dir, const LlamaModel& model);

}  // namespace lowbit
