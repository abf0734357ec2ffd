// RSQ (Sung, Yadav, Li, Yoon, Bansal 2025, "RSQ: Learning from Important Tokens Leads to Better
// Quantized LLMs"): GPTQ whose layer Hessian weights each calibration token by its importance,
//     H = 2/n sum_t r_t x_t x_t^T,
// with r_t the token's attention concentration (AttnCon): the attention probability it receives in
// this block's self-attention, summed over heads and query positions (computed with the block as it
// is before quantization, on the quantized-path inputs), min-max scaled per window to
// [min_weight, max_weight] (the reference's OriginalAttentionWeighting with normalize "default";
// its defaults are 1 and 3). RSQ's rotation step (QuaRot) is not part of this method: lowbit has
// no rotated-model path; this is the "S" and "Q" of RSQ on the unrotated model.
//
// The attention probabilities are computed on the host (one window at a time: a T x T score matrix
// per head), whatever device the model lives on.
#pragma once
#include "lowbit/methods/ptq_methods.h"

namespace lowbit {

struct RsqOptions {
  double min_weight = 1.0, max_weight = 3.0;
};

// Attention concentration of block `layer` of `model` on x [B*T, D] (B windows of T tokens): for
// each token j, sum over heads h and queries i >= j of softmax_j(q_i . k_j / sqrt(hd)). F32 [B*T] on the host.
Tensor attention_concentration(const LlamaModel& model, int layer, const Tensor& x, int64_t B, int64_t T);

// a [B*T] scaled per window of T tokens to [lo, hi] by min-max (a window whose values are all equal
// gets lo everywhere). F32 [B*T].
Tensor minmax_token_weights(const Tensor& a, int64_t T, double lo, double hi);

class RsqMethod : public GptqMethod {
 public:
  RsqMethod(const QuantFormat& f, GptqOptions g, RsqOptions o) : GptqMethod(f, g), r_(o) {}
  std::string name() const override { return "rsq"; }
  bool supports_data_parallel() const override { return false; }  // not plain sums over windows
  std::string options_key() const override;

 protected:
  Tensor token_weights(BlockContext& ctx) override;

 private:
  RsqOptions r_;
};

}  // namespace lowbit
