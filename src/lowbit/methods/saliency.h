// Per-weight saliency and the saliency-aware regularizer of "Enhancing Ultra-Low-Bit Quantization of
// Large Language Models Through Saliency-Aware Partial Retraining" (Cao & Aref 2025, arXiv
// 2504.13932), which adds to ApiQ's reconstruction loss a term that keeps the most important
// weights close to their full-precision values. Per decoder block, summed over its 7 linears:
//
//     R = lambda * sum_layers reduce_ij( S_ij * (W_ij - Ŵ_ij)^2 ),   reduce = mean (default) or sum
//
// with Ŵ the quantized weight (optionally plus the LoRA product). The saliency S is computed ONCE
// for the full-precision model from the gradients of the language-model loss on calibration data,
// stored, and reused (--saliency FILE):
//
//   fisher       (default) diagonal empirical Fisher from g = dL/dW of one batch (batch 1 = one
//                calibration sequence: per-sequence gradients, L = mean token cross-entropy);
//   grad-weight  first-order Taylor saliency |g * w|;
//   act-weight   activation-aware |w_ij| * rms_t(x_tj) (Wanda-style; no gradients needed).
//
// Normalisation (SaliencyNorm, --saliency-norm):
//   layer  (default) S = mean over batches of g^2 (|g w|), then each layer scaled to mean 1, so lambda
//          has the same meaning for every layer and model;
//   none   S = SUM over batches of g^2 (|g w|), raw (act-weight: raw |w| rms(x)).
//
// The reference code (github.com/TokuyuSou/ULB-SAPR) uses the raw form: its S is SqueezeLLM's
// "gradient checkpoint" (kssteven418/SqueezeLLM-gradients run.py: a hook squares each sample's
// weight gradient and .grad accumulates the SUM over 128 C4 sequences of 512 tokens, batch 1,
// bf16), read per layer by apiq/model_utils.py load_layer_gradients; apiq/utils.py
// calculate_regularization_term adds (S * (Ŵ - W)^2).sum() over all 7 linears of the block, with no
// normalisation, and calibrate.py multiplies by lambda_reg. Its target (reg_method) defaults to
// "before_lora": Ŵ = Q(W), so only the clipping parameters get the term's gradient ("after_lora":
// Ŵ = Q(W) + s B A). Our defaults differ as the issue specifies: mean squared gradient
// normalised to mean 1 per layer, mean reduction, Ŵ = Q(W) + s B A (the CLI takes the paper's
// 15/5 stage split); the reference form is --saliency-norm none --sapr-reduction sum --sapr-target quant (or
// --sapr-recipe paper, which also sets its 15/5 stage split, see apiq.h).
//
// lambda. Default 0.3 (since 2026-12-06; 3 before), chosen on held-out validation text, never the
// test text, among 0.3 / 3 / 30 with the CLI's 15/5 stage split at int2g64: stories260K (rank 1, 3
// seeds; validation ppl 21.53 / 21.84 / 22.80, docs/results/sapr-study.md) and SmolLM2-135M (rank
// 10, seed 0, linux-docs valid ppl 31.67 / 35.48 / 32.01, docs/results/smollm2.md). Both pick 0.3,
// but the margins are within the seed-to-seed spread (SmolLM2's lambda-3 validation ppl over 3
// seeds: 38.8 +- 7.4). The first tuning (all-mixed epochs, on the evaluation sequences, stories260K)
// had picked 3: ppl with lambda 0 / 1 / 3 / 10 / 30 / 100 = 26.70 / 26.70 / 25.27 / 26.22 / 30.93 /
// 35.17 (FP 3.61). The reference README uses lambda_reg 0.1 for
// Llama-2-7B w2g64 with the raw/sum form; raw Fisher sums scale with the model, the data and the
// number of samples, so that value does not transfer. Retune lambda for other models. On
// stories260K (docs/results/ptq-stories260k.md, 3 seeds) the choice that mattered was the stage
// split with Ŵ = Q(W) + s B A: 15/5 WPT/OPT beat ApiQ at int2g64 with either form, the reference's
// Q(W) target did not, and single int2g64 runs vary by +-1-2 ppl.
//
// File format (safetensors): one F32 [out, in] tensor per linear layer, named like the module
// ("model.layers.3.self_attn.q_proj"), rows in the model's own q/k layout; metadata "kind",
// "rope_style", "nsamples", "seqlen", "normalization" ("layer" or "none"; absent in older files,
// which are "layer"), "format": "lowbit-saliency", "version": "1".
#pragma once
#include <map>
#include <string>
#include <string_view>

#include "lowbit/autograd/variable.h"
#include "lowbit/comm/comm.h"
#include "lowbit/model/llama.h"

namespace lowbit {

// Uniform: every weight 1 (no data, no pass): SAPR then preserves all weights alike, the ablation
// that asks whether the saliency, or the weight-preservation stage itself, does the work.
enum class SaliencyKind { Fisher, GradWeight, ActWeight, Uniform };
SaliencyKind parse_saliency_kind(std::string_view name);  // "fisher", "grad-weight", "act-weight", "uniform"
const char* saliency_kind_name(SaliencyKind k);

enum class SaliencyNorm { Layer, None };  // mean 1 per layer (mean over batches) / raw (sum over batches)
SaliencyNorm parse_saliency_norm(std::string_view name);  // "layer", "none"
const char* saliency_norm_name(SaliencyNorm n);

enum class SaprReduction { Mean, Sum };  // of S (W - Ŵ)^2 over one layer's elements
SaprReduction parse_sapr_reduction(std::string_view name);  // "mean", "sum"
const char* sapr_reduction_name(SaprReduction r);

struct SaliencyOptions {
  SaliencyKind kind = SaliencyKind::Fisher;
  SaliencyNorm norm = SaliencyNorm::Layer;
  int64_t batch = 1;      // calibration sequences per backward pass (1: per-sequence Fisher)
  bool progress = false;
};

struct SaliencyMap {
  SaliencyKind kind = SaliencyKind::Fisher;
  SaliencyNorm norm = SaliencyNorm::Layer;
  RopeStyle rope_style = RopeStyle::Interleaved;  // q/k row layout the scores were computed in
  int64_t nsamples = 0, seqlen = 0;
  // Whose gradients: "fp" (the full-precision model, the paper's) or "rtn:FORMAT" (the model with
  // its linears round-to-nearest quantized to FORMAT: the loss landscape the quantized weights sit
  // in; --saliency-model quantized). Kept in the file's metadata.
  std::string source = "fp";
  std::map<std::string, Tensor> scores;  // module name -> F32 [out, in] (norm Layer: mean 1 per layer)
  // Mean raw score of each module before the per-layer normalisation (norm Layer; kept in the
  // file's metadata): how sensitive the loss is to the layer as a whole, which normalising to mean 1
  // removes. Empty for raw (norm None) maps, whose scores keep that information themselves.
  std::map<std::string, double> layer_mean;

  // layer_mean[module] / the mean of layer_mean over all modules (SAPR's per-layer lambda scaling,
  // --sapr-layer-weight fisher). Throws when the map has no layer means.
  double layer_weight(const std::string& module) const;

  // The scores of a module; throws naming the module when absent.
  const Tensor& at(const std::string& module) const;
};

// Saliency of every linear layer of the full-precision model (config, weights) on calibration
// windows tokens i32 [N, L]: next-token cross-entropy inside each window.
SaliencyMap compute_saliency(const LlamaConfig& config, const LlamaWeights& weights, const Tensor& tokens,
                             const SaliencyOptions& options);

// Data parallel (issue 20): the same map with the batches split over the ranks of `comm` (every
// rank is given all the windows and computes a contiguous share of the batches); the gradient
// kinds' raw sums are all-reduced, so every rank gets the one-process map up to the rounding of
// the sums (each rank's partial sums are f32). act-weight (not a plain sum over batches), uniform,
// and fewer batches than ranks: every rank computes the whole map. comm null or one rank: as above.
SaliencyMap compute_saliency(const LlamaConfig& config, const LlamaWeights& weights, const Tensor& tokens,
                             const SaliencyOptions& options, comm::Communicator* comm);

// Scales every layer of a raw (norm None) map to mean 1 (norm Layer); a Layer map is returned as is.
// For Fisher and grad-weight this equals computing with norm Layer (up to float rounding).
SaliencyMap normalise_saliency_per_layer(SaliencyMap s);

void save_saliency(const std::string& path, const SaliencyMap& s);
SaliencyMap load_saliency(const std::string& path);  // throws naming the file for a malformed one

// Throws unless `s` has a score of the right shape (and q/k layout) for every linear of `model`.
void check_saliency_matches(const SaliencyMap& s, const LlamaModel& model, const std::string& source);

// mean_ij (Mean) or sum_ij (Sum) of s_ij * (w_hat_ij - w_ij)^2: the regularizer of one layer
// without lambda (Sum = numel * Mean). w_hat [out, in] (differentiable), w and s F32/F64 [out, in]
// constants (converted to w_hat's dtype).
Var saliency_regularizer(const Var& w_hat, const Tensor& w, const Tensor& s,
                         SaprReduction reduction = SaprReduction::Mean);

}  // namespace lowbit
