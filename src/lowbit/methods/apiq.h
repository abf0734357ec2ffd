// ApiQ (Liao, Herold, Khadivi, Monz 2024, "ApiQ: Finetuning of 2-Bit Quantized Large Language
// Model", arXiv 2402.05147) and its saliency-aware extension SAPR (Cao & Aref 2025, arXiv
// 2504.13932) as block methods of the pipeline (pipeline.h).
//
// ApiQ initialises the LoRA adapters of a quantized model by calibration: every linear becomes a
// QuantTrainLinear (quant/train_linear.h): y = x (Q(W; gamma, beta) + s B A)^T, and only the
// clipping logits (gamma, beta) and the LoRA factors (A, B) are trained, with AdamW in two parameter
// groups (ApiQ calibrate.py: lwc lr 5e-3 / wd 0.1, LoRA lr 5e-4 / wd 0.1), 20 epochs, constant lr,
// no gradient clipping. W, the norms and everything else stay frozen.
//
//   layer-wise (ApiQ-lw, paper §3):  min || X W^T - X (Q + s B A)^T ||^2  per linear layer.
//       The paper feeds X^q (the input of the layer in the partially quantized model) to the
//       quantized side and X (the full-precision model's input) to the target side. The pipeline
//       holds only the block's quantized-path inputs, so we use X^q on both sides, GPTQ-style: the
//       linears are calibrated in the block's sequential groups (q/k/v, o, gate/up, down), each on
//       the inputs produced by the already calibrated groups before it.
//   block-wise (ApiQ-bw, paper §3):  min || F(W, X_fp) - F(Q, A, B, X^q) ||^2 over the block
//       F, with F(W, X_fp) = ctx.fp_targets (the FP block on FP inputs) and X^q = ctx.inputs.
//       Optional second term (ApiQ calibrate.py --aug_loss, coefficient aug_coef):
//       aug_coef * || F(W, X^q) - F(Q, A, B, X^q) ||^2. ApiQ's scripts turn it on; the paper's
//       objective does not have it, so the default is 0.
//
// SAPR adds lambda * R (methods/saliency.h) to the loss. Training stages, as in the reference
// code (ULB-SAPR apiq/calibrate.py, apiq/utils.py get_coefficients; train order wpt, mixedt,
// opt): the first `weight_epochs` epochs minimise lambda * R only ("weight preservation", no
// forward pass), the last `output_epochs` epochs minimise the ApiQ loss only ("output
// preservation"), and the epochs in between the mixed loss ApiQ + lambda * R. AdamW runs through
// all stages (moments kept, no scheduler), as in the reference; a parameter group that gets no
// gradient in a step (the LoRA factors while R alone targets Q(W)) is not stepped and does not
// advance its bias-correction count, like PyTorch's per-parameter step. ApiqOptions' default is all
// epochs mixed; `lowbit quantize --method sapr` defaults to the paper's schedule, 15 weight- then 5
// output-preservation epochs of 20 (3/4 and 1/4 of --epochs; the reference README's saliency
// recipe), which beat all-mixed on stories260K (docs/results/ptq-stories260k.md). The full
// reference recipe (lambda_reg 0.1 for Llama-2-7B, reg_method before_lora, raw summed Fisher) is
// `lowbit quantize --sapr-recipe paper --lambda X`.
//
// llama.cpp's block types (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k ... q6_k; quant/lwc.h "ggml block
// formats"): the clipping is learned per block / k-quant sub-block with the file's f16 and
// sub-block scale codes inside the forward; training starts on the reference quantizer's grid
// (QuantTrainOptions::clip_init_rtn), and a layer (layer-wise) or the block (block-wise) keeps its
// trained parameters only if its output loss over all calibration windows ends below the start's
// (measured: the straight-through training can raise it on q4_k; docs/results/gguf-export.md).
// These types train on the CPU.
//
// Device: the training runs where the model is (ctx.inputs' device). On CUDA every training
// tensor (frozen W, gamma/beta, LoRA A/B, AdamW moments, calibration windows and targets) stays on
// the GPU; the only host read-back is the epoch's summed loss (log and finiteness check).
//
// Determinism and resume: the LoRA initialisation and the per-epoch shuffle of the calibration
// windows are seeded from (seed, layer, linear, epoch), never from a running generator, so a block
// trained after a resume is bit-identical to the same block in an uninterrupted run (on the same
// machine and thread count).
//
// Data parallel (issue 20; BlockMethod::set_communicator with several ranks): each rank's pipeline
// holds its share of the windows; the shuffle and the batches of --apiq-batch windows are the
// one-process ones over all ranks' windows, each rank computes the loss of the step's windows it
// holds (weighted by their share of the step), rank 0 adds SAPR's regularizer, and the gradients
// are summed over the ranks before AdamW (block_train.h WindowShards, all_reduce_grads): every rank
// takes the one-process step up to the rounding of the sums. The epoch losses and the keep-the-start
// comparison use all-reduced sums, so all ranks take the same branch. With --apiq-batch 1 the ranks
// take turns (one window per step): correct, but no faster than one rank.
#pragma once
#include <string>
#include <vector>

#include "lowbit/methods/pipeline.h"
#include "lowbit/methods/saliency.h"
#include "lowbit/quant/train_linear.h"

namespace lowbit {

enum class ApiqMode { Layer, Block };

struct ApiqOptions {
  ApiqMode mode = ApiqMode::Block;
  QuantTrainOptions layer;        // rank (64), lora_alpha (16), LoRA init, clip_init (4); seed unused
  int epochs = 20;
  int64_t batch = 1;              // calibration windows per step (ApiQ: batch size 1)
  double lora_lr = 5e-4, clip_lr = 5e-3;
  double lora_wd = 0.1, clip_wd = 0.1;
  double aug_coef = 0.0;          // block-wise only: weight of || F(W, X^q) - F(Q, X^q) ||^2
  uint64_t seed = 0;
  bool verbose = false;           // print the mean loss of every epoch and each block's stage times to stderr
  // GPU only: the training steps' matrix products (the quantized layers' x Q^T and its two
  // gradients, attention) on bf16 tensor cores with fp32 accumulation, as ApiQ's calibrate.py runs
  // its steps under torch.cuda.amp.autocast (fp16 there; bf16 here needs no loss scaling). Weights,
  // clipping, LoRA, norms, the loss and AdamW stay fp32 (autograd/functions.h AutocastBf16Guard).
  bool bf16 = false;

  // ---- SAPR (active when saliency is set) ----
  const SaliencyMap* saliency = nullptr;
  double lambda = 0.3;            // regularizer weight (chosen on validation text of two models, see saliency.h)
  SaprReduction reduction = SaprReduction::Mean;  // per layer: mean (ours) or sum (reference) of S (W - Ŵ)^2
  bool reg_with_lora = true;      // Ŵ = Q(W) + s B A (true, ours) or Q(W) alone (reference before_lora)
  int weight_epochs = 0;          // leading epochs with lambda * R only
  int output_epochs = 0;          // trailing epochs with the ApiQ loss only
  // Variants (issue 22), each off by default:
  //   anneal_lambda   lambda decays linearly over the mixed-loss epochs, from lambda in the first to
  //                   lambda / n_mixed in the last (the regularizer steers early, the output loss
  //                   decides late). Weight-preservation epochs keep lambda (there, with the
  //                   regularizer alone, Adam makes its scale nearly irrelevant anyway).
  //   layer_weighted  each layer's lambda times SaliencyMap::layer_weight (its mean raw Fisher over
  //                   the mean of all layers'): layer-normalised saliency keeps which weights of a
  //                   layer matter but drops how much the layer matters; this puts it back.
  bool anneal_lambda = false;
  bool layer_weighted = false;
};

// Mean training loss of one epoch (for logs and tests).
struct ApiqEpochLog {
  int layer = 0;
  std::string scope;  // "block" or the linear's name
  int epoch = 0;
  double loss = 0;        // total loss
  double reg = 0;         // lambda * R part (SAPR)
  double seconds = 0;     // wall time of the epoch (its device work finished: the loss read-back waits for it)
};

// Wall time (seconds) of the stages of one block (GPU work finished at each stage's end).
//   train     the calibration epochs (layer-wise: of all the block's linears)
//   finalize  encoding the trained layers (QuantTrainLinear::finalize: clipped parameters, codes)
//   install   building the QuantLinears (dequantize, upload to the model's device)
//   report    the output-error report (block-wise: including the pass that captures its inputs)
//   capture   layer-wise only: capturing each group's inputs and computing the training targets
struct ApiqBlockTimes {
  int layer = -1;
  double train = 0, finalize = 0, install = 0, report = 0, capture = 0;
  double total() const { return train + finalize + install + report + capture; }
};

class ApiqMethod : public BlockMethod {
 public:
  ApiqMethod(const QuantFormat& f, ApiqOptions o);
  // "apiq" (block-wise), "apiq-layer", "sapr", "sapr-layer".
  std::string name() const override;
  std::string options_key() const override;
  void quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) override;
  bool supports_data_parallel() const override { return true; }
  // The calibration activations may be bf16 (PipelineOptions::cache_dtype): every read converts
  // windows to f32 (gather_windows, run_block); layer-wise also keeps its captured inputs and
  // targets in bf16.
  bool accepts_bf16_cache() const override { return true; }
  const std::vector<ApiqEpochLog>& log() const { return log_; }
  // Stage times of the last block quantize_block finished (layer -1 before the first).
  const ApiqBlockTimes& last_block_times() const { return times_; }

 private:
  void quantize_block_layerwise(BlockContext& ctx, std::vector<LinearReport>& reports);
  void quantize_block_blockwise(BlockContext& ctx, std::vector<LinearReport>& reports);
  void finish_block(const ApiqBlockTimes& t);  // keeps the times, prints them when verbose

  // The format of `name` in this block (ctx.format_of), checked for learnable clipping.
  const QuantFormat& layer_format(const BlockContext& ctx, const std::string& name) const;
  const QuantFormat& f_;
  ApiqOptions o_;
  std::vector<ApiqEpochLog> log_;
  ApiqBlockTimes times_;
};

}  // namespace lowbit
