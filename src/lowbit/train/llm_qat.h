// LLM-QAT (Liu et al. 2023, arXiv 2305.17888, "LLM-QAT: Data-Free Quantization Aware Training for
// Large Language Models"): data-free distillation of a quantized student from its full-precision
// teacher. Two parts:
//
// 1. Self-generated training data (self_generate): N sequences sampled from the FP model, the
//    paper's "next token data generation" (Section 2.1) with its hybrid sampling rule: the first
//    token drawn at random from the vocabulary, the next few tokens greedy (top-1; the paper: "the
//    first 3~5 tokens"; the reference generate_data.py runs greedy generation to a total length
//    of 3, 4 and 5 tokens in turn, here sequence i uses 3 + i % 3), the rest sampled from the
//    model's distribution (top-k 50, temperature 1: Hugging Face generate's defaults, which the
//    reference's do_sample=True uses). lowbit's choices: each sequence starts with the model's BOS
//    (the reference feeds the first token alone), EOS does not end a sequence (every sequence has
//    the same length, so training windows are whole sequences), and sequence i draws from its own
//    RNG seeded by (seed, i), so the file is the same however the work is split or resumed.
//    The file is raw int32 token ids (N x length), written atomically, with a sidecar
//    FILE.json naming the settings; progress is kept in FILE.partial (whole sequences, atomic
//    rewrites), so a stopped run resumes where it stopped and a finished file is reused.
//
// 2. The method (train/qat.cpp, registered as "llm-qat"): every block linear becomes a
//    MinMaxQatLinear: a latent f32 weight W (trained) and the paper's symmetric MinMax quantizer
//    (eq. 1: X_Q = alpha round(X / alpha), alpha = max|X| / (2^(N-1) - 1)) per output channel or per
//    group of the format, recomputed from W at every forward (no learned step), straight-through
//    estimator (dQ(W)/dW = identity). It is exactly lowbit's RTN in a symmetric integer format
//    (quant/quantize.h fake_quantize: the scale rounded up to its f16 storage, so max|X| never clips), so the packed export
//    is exactly the trained student. Activations: the input of every block linear is quantized per
//    token (symmetric MinMax, act_bits 4 or 8, STE: model/rotation.h ActQuantSpec, which the
//    checkpoint records, so `eval ppl` runs the model with it). KV cache: the outputs of k_proj
//    and v_proj are quantized per (token, head) (symmetric MinMax, kv_bits, STE) before RoPE, where
//    the reference code quantizes them (per token over all heads there; per head here):
//    ModelTransforms::kv_token_bits, also recorded in the checkpoint (`--kv-token-quant`). The loss is the paper's
//    KL(teacher || student) over the full vocabulary at every position (cross-entropy with the
//    teacher's soft labels, up to the teacher's entropy).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/model/linear.h"
#include "lowbit/model/llama.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/quantized_tensor.h"
#include "lowbit/train/qat.h"

namespace lowbit {

struct SelfGenOptions {
  int64_t sequences = 0;   // N >= 1
  int64_t length = 257;    // tokens per sequence, BOS included (>= 3)
  int64_t top_k = 50;      // sampling after the greedy tokens (0: the whole vocabulary)
  double temperature = 1;  // > 0
  uint64_t seed = 0;
  std::string model_id;    // identifies the teacher in the sidecar key (e.g. its path)
  int64_t batch = 16;      // sequences decoded together (does not change the numbers)
  double checkpoint_seconds = 30;
  int64_t stop_after = 0;  // testing aid: stop after this many sequences of this run (progress kept)
  bool progress = true;
};

// The greedy (top-1) tokens after the first random one in sequence i: 2 + i % 3 (total length of
// the deterministic prefix, the random token included, 3 + i % 3).
int64_t self_gen_greedy_tokens(int64_t i);

// The sidecar key of a generation (settings and model identity).
std::string self_gen_key(const LlamaModel& fp, const SelfGenOptions& o);

// Generates (or reuses, or resumes) the file `path` as described above and returns its tokens
// (sequences x length). Throws naming the file when it exists with other settings. complete is set
// false when stop_after stopped the run (the returned tokens are then the finished sequences).
std::vector<int32_t> self_generate(const LlamaModel& fp, const SelfGenOptions& o, const std::string& path,
                                   bool* complete = nullptr);

// The paper's symmetric MinMax fake quantizer of a weight w [out, in] in a symmetric integer
// format (per channel or per group): alpha = max|w_group| / (2^(B-1) - 1) (rounded up to its f16
// storage), q = clamp(round(w / alpha), -(2^(B-1) - 1), 2^(B-1) - 1), returns q alpha. Straight
// through: the gradient passes to w unchanged.
Var minmax_fake_quant(const Var& w, const QuantFormat& f);

// The training layer of llm-qat (see above).
class MinMaxQatLinear : public Linear {
 public:
  // weight [out, in] f32 (copied, trained), bias [out] or undefined (frozen). f: a symmetric
  // integer format.
  MinMaxQatLinear(const Tensor& weight, const Tensor& bias, const QuantFormat& f);
  Var forward(const Var& x) const override;
  int64_t in_features() const override { return in_; }
  int64_t out_features() const override { return out_; }
  std::vector<Var> parameters() const override { return {weight_}; }
  Tensor effective_weight() const override;  // Q(W)
  Tensor bias() const override { return bias_.defined() ? bias_.value() : Tensor(); }
  std::string kind() const override { return std::string("llm-qat:") + format_.name; }
  const Var& latent_weight() const { return weight_; }
  QuantizedTensor encode() const;  // RTN of W in the format: exactly Q(W)

 private:
  const QuantFormat& format_;
  int64_t out_ = 0, in_ = 0;
  Var weight_, bias_;
};

// True for the formats llm-qat takes (uniform symmetric integer: intBgGs, intBpcs).
bool llm_qat_supports(const QuantFormat& f);

}  // namespace lowbit
