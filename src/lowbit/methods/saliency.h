// Per-weight saliency and the saliency-aware regularizer of "Enhancing Ultra-Low-Bit Quantization of
// Large Language Models Through Saliency-Aware Partial Retraining" (Cao & Aref 2025, arXiv
// 2504.13932), which adds to ApiQ's reconstruction loss a term that keeps the most important
// weights close to their full-precision values:
//
//     R = lambda * sum_layers mean_ij( S_ij * (W_ij - Ŵ_ij)^2 )
//
// with Ŵ the quantized weight (optionally plus the LoRA product). The saliency S is computed ONCE
// for the full-precision model from the gradients of the language-model loss on calibration data,
// stored, and reused (--saliency FILE):
//
//   fisher       (default) diagonal empirical Fisher: S = mean over batches of g^2, g = dL/dW of
//                one batch (batch 1 = one calibration sequence: per-sequence gradients);
//   grad-weight  first-order Taylor saliency |g * w| (mean over batches);
//   act-weight   activation-aware |w_ij| * rms_t(x_tj) (Wanda-style; no gradients needed).
//
// Each layer's S is normalised to mean 1, so lambda has the same meaning for every layer and model
// (our choice: the paper's normalisation constant could not be retrieved). We take the mean over a
// layer's elements rather than the sum for the same reason; lambda * sum would be lambda * numel
// times larger.
//
// lambda. The paper's value could not be retrieved (only its abstract was available to us); the
// default 3 was tuned on stories260K at int2g64 (rank 1, 20 epochs, Fisher): ppl with lambda
// 0 / 1 / 3 / 10 / 30 / 100 = 26.70 / 26.70 / 25.27 / 26.22 / 30.93 / 35.17 (FP 3.61). The useful
// range depends on the model's weight and activation scales; retune it for other models.
//
// File format (safetensors): one F32 [out, in] tensor per linear layer, named like the module
// ("model.layers.3.self_attn.q_proj"), rows in the model's own q/k layout; metadata "kind",
// "rope_style", "nsamples", "seqlen", "format": "lowbit-saliency", "version": "1".
#pragma once
#include <map>
#include <string>
#include <string_view>

#include "lowbit/autograd/variable.h"
#include "lowbit/model/llama.h"

namespace lowbit {

enum class SaliencyKind { Fisher, GradWeight, ActWeight };
SaliencyKind parse_saliency_kind(std::string_view name);  // "fisher", "grad-weight", "act-weight"
const char* saliency_kind_name(SaliencyKind k);

struct SaliencyOptions {
  SaliencyKind kind = SaliencyKind::Fisher;
  int64_t batch = 1;      // calibration sequences per backward pass (1: per-sequence Fisher)
  bool progress = false;
};

struct SaliencyMap {
  SaliencyKind kind = SaliencyKind::Fisher;
  RopeStyle rope_style = RopeStyle::Interleaved;  // q/k row layout the scores were computed in
  int64_t nsamples = 0, seqlen = 0;
  std::map<std::string, Tensor> scores;  // module name -> F32 [out, in], mean 1 per layer

  // The scores of a module; throws naming the module when absent.
  const Tensor& at(const std::string& module) const;
};

// Saliency of every linear layer of the full-precision model (config, weights) on calibration
// windows tokens i32 [N, L]: next-token cross-entropy inside each window.
SaliencyMap compute_saliency(const LlamaConfig& config, const LlamaWeights& weights, const Tensor& tokens,
                             const SaliencyOptions& options);

void save_saliency(const std::string& path, const SaliencyMap& s);
SaliencyMap load_saliency(const std::string& path);  // throws naming the file for a malformed one

// Throws unless `s` has a score of the right shape (and q/k layout) for every linear of `model`.
void check_saliency_matches(const SaliencyMap& s, const LlamaModel& model, const std::string& source);

// mean_ij( s_ij * (w_hat_ij - w_ij)^2 ): the regularizer of one layer without lambda.
// w_hat [out, in] (differentiable), w and s F32/F64 [out, in] constants (converted to w_hat's dtype).
Var saliency_regularizer(const Var& w_hat, const Tensor& w, const Tensor& s);

}  // namespace lowbit
