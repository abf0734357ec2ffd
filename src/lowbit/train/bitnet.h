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
// BitNet v2 (Wang et al. 2025, arXiv 2504.18415; --arch bitnet-v2): the same ternary weights, but
// o_proj and down_proj are H-BitLinear layers (autograd/bitlinear.h h_bitlinear): an online
// randomized Hadamard transform of their input (the attention output, n = heads * head_dim; the
// SwiGLU product, n = SwiGLU width) before the activation quantizer. These two inputs are the ones
// with outlier channels (the paper's Fig. 1); q/k/v and gate/up read the RMSNorm output, which the
// paper leaves untransformed. Activations: act_bits (4 or 8) per token, symmetric absmax, at the
// input of every block linear (q/k/v, o, gate/up, down; not the embedding or the head), as the
// paper's W1.58A4 model quantizes all linears but the embeddings to INT4. The model applies this
// through its transforms (model/rotation.h rotation "h-bitlinear": o_in and ffn rotations, act),
// and every BitLinear runs with quantize_activations = false (the transforms' quantizer replaces
// its int8 one). The paper trains A8 from scratch and continues with A4 for a short phase:
// act4_at = F trains with 8-bit activations for the first round(F * steps) steps, then 4-bit (the
// latent weights and AdamW moments carry over). The 4-bit quantizer is absmax by default (s =
// max|x| / 7, as the A8 one); act_scale AbsMean (--act-quant absmean) is the papers' INT4 quantizer
// (BitNet a4.8 / v2: s = mean|x| / sqrt(7), codes in [-8, 7], ops/ternary.h); the A8 phase stays
// absmax, as in the papers. With transition_at, the 16-bit phase before it
// runs with no quantizer at all (the Hadamard transforms stay: the weights learn in that basis).
// The rotations are drawn from the training seed (random_hadamard(n, seed + 11 / + 12)); when n is
// not a power of two, n = p * m and the transform is H_p / sqrt(p) (x) S, S a random orthogonal
// m x m matrix (ops::hadamard_transform), where the paper assumes powers of two.
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
#include "lowbit/model/rotation.h"

namespace lowbit {

struct BitNetOptions {
  bool enabled = false;                                  // --arch bitnet-b1.58 or bitnet-v2
  bool v2 = false;                                       // --arch bitnet-v2 (H-BitLinear o/down)
  int act_bits = 4;                                      // bitnet-v2: --act-bits 4|8 (final width)
  double act4_at = 0;                                    // bitnet-v2: --act4-at F (A8 before, A4 after)
  bool hadamard = true;                                  // bitnet-v2: --hadamard off = ablation (no H)
  ops::ActScale act_scale = ops::ActScale::AbsMax;       // bitnet-v2: --act-quant absmax|absmean (A4 only)
  ops::TernaryScale scale = ops::TernaryScale::AbsMean;  // --ternary-scale mean|median
  double transition_at = 0;                              // --transition-at F in [0, 1)
  int64_t phase_in_steps = 0;                            // --phase-in-steps N
  bool two_stage = false;                                // --schedule bitnet-two-stage
};

enum class TrainArch { Llama, BitNetB158, BitNetV2 };
// "llama" / "bitnet-b1.58" / "bitnet-v2"; throws naming `what` otherwise.
TrainArch parse_train_arch(const std::string& name, const std::string& what = "--arch");
// Sets o.enabled and o.v2 for an architecture.
void set_train_arch(BitNetOptions& o, TrainArch arch);
// "llama", "bitnet-b1.58" or "bitnet-v2".
const char* bitnet_arch_name(const BitNetOptions& o);
// "cosine" / "bitnet-two-stage" -> whether the two-stage schedule is on.
bool parse_train_schedule(const std::string& name, const std::string& what = "--schedule");

// Throws lowbit::Error naming the flag for a transition outside [0, 1), a negative phase-in, or a
// phase-in that would not end by the last step (the saved model must be fully ternary).
void check_bitnet_options(const BitNetOptions& o, int64_t max_steps);

// The first step (0-based) trained with quantization on.
int64_t bitnet_transition_step(const BitNetOptions& o, int64_t max_steps);
// The BitLinear options for 0-based step `step`.
BitLinearOptions bitnet_step_options(const BitNetOptions& o, int64_t step, int64_t max_steps);
// bitnet-v2: the first step (0-based) with act_bits-bit activations (act4_at; the transition
// when that comes later). Steps from the transition up to it use 8 bits.
int64_t bitnet_act4_step(const BitNetOptions& o, int64_t max_steps);
// bitnet-v2: the activation bits of step `step` (0 in the 16-bit phase, else 8 or act_bits); 0 for b1.58.
int bitnet_step_act_bits(const BitNetOptions& o, int64_t step, int64_t max_steps);
// bitnet-v2: the model transforms (rotation "h-bitlinear", o_in and ffn rotations from `seed`,
// per-token symmetric act_bits activations; act_bits 0: none). hadamard = false (the ablation
// `--hadamard off`): no rotation, only the activation quantizer — plain BitLinears at A8/A4.
// act_scale AbsMean: 4-bit activations are "int4-absmean" (8-bit ones stay absmax).
ModelTransforms bitnet_v2_transforms(const LlamaConfig& c, uint64_t seed, int act_bits, bool hadamard = true,
                                     ops::ActScale act_scale = ops::ActScale::AbsMax);
// Replaces every block linear of a trainable model by a BitLinear over the same weight tensor;
// bitnet-v2 also sets the model's transforms (seed: the rotations').
void make_bitnet(LlamaModel& model, const BitNetOptions& o, uint64_t seed = 0);
// Sets the BitLinear options and (bitnet-v2) the activation width of 0-based step `step`.
void set_bitnet_step(LlamaModel& model, const BitNetOptions& o, int64_t step, int64_t max_steps);
// Sets the options of every BitLinear of the model.
void set_bitlinear_options(LlamaModel& model, const BitLinearOptions& options);

// Learning-rate factor and weight-decay factor (1 or 0) of the two-stage schedule at 0-based step.
double two_stage_lr(int64_t step, int64_t warmup, int64_t total, double min_ratio);
double two_stage_wd(int64_t step, int64_t total);

// Writes the model (all block linears BitLinear, quantizing) as a lowbit quantized checkpoint in
// the "ternary" format (quant/format.h: 2-bit codes, one f32 gamma per tensor; the codes and gamma
// are the ones the training forward used), method "bitnet-b1.58" or "bitnet-v2". Dense embedding,
// norms, head. bitnet-v2: the model's transforms go with it (the o_in / ffn rotations and the
// per-token activation quantizer of the last step), so inference runs the training numerics.
void save_bitnet_checkpoint(const std::string& dir, const LlamaModel& model);

}  // namespace lowbit
