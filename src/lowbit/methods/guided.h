// GuidedQuant's end-loss-guided Hessians for GPTQ (Kim, El Halabi, Park, Schaefer, Lee, Park, Lee,
// Song 2025, "GuidedQuant: Large Language Model Quantization via Exploiting End Loss Guidance",
// arXiv 2505.07004; reference code github.com/snu-mllab/GuidedQuant).
//
// GPTQ minimises each layer's output error ||X (W - Q)^T||^2, treating every output channel and
// every token alike. GuidedQuant weighs the error of output channel j at token t by how much the
// end loss reacts to that output, (dL/dz_tj)^2 (a block-diagonal Fisher approximation of the loss
// change), and to keep this affordable averages those weights over groups of output channels: the
// output rows of a linear are cut into g groups, and group k is quantized by GPTQ with its own
//     H_k = 2/n sum_t w_tk x_t x_t^T,      w_tk = mean over the rows j of group k of (dL/dz_tj)^2,
// x_t the layer's input at calibration token t and z_t = W x_t its output.
//
// Following the paper / the reference code (any_precision/quantization/gradients.py for the
// weights, spin_quant/eval_utils/gptq_guided_utils.py GPTQGuided for the GPTQ side):
//   * the gradients are those of the FULL-PRECISION model (computed once, before any block is
//     quantized), of the next-token cross-entropy on the calibration windows themselves, one window
//     per backward pass, and taken with respect to each linear's output (q/k/v/o/gate/up/down);
//   * groups are contiguous, equal slices of the output rows (row k*out/g .. (k+1)*out/g);
//   * w_tk is the mean over the group of the squared gradient, with no other normalisation (the
//     reference multiplies gradients by 1e3 first: a constant, which GPTQ ignores);
//   * GPTQ runs on each group's rows with H_k exactly as it runs on a whole layer (dead columns per
//     H_k, damping percdamp * mean diag(H_k), the same group/act-order options); the Hessians use the
//     quantized-path inputs of the block-wise pipeline (true sequential q/k/v, o, gate/up, down), as
//     the reference's gptq_fwrd does.
// Our choices:
//   * the number of groups defaults to 4 (--guided-groups): the reference README's example and its
//     LNQ script default (layerwise_nuq.py --num_groups 4); the reference's GPTQ (SpinQuant) scripts
//     use g = 1. The paper's own per-experiment values could not be read here.
//   * gradients are of the SUM of the windows' token losses (the reference takes the mean loss of a
//     window of fixed length: the same weights up to one constant factor), in f32 (the reference
//     runs the model in bf16);
//   * the per-linear weights are scaled to mean 1 before use (GPTQ is invariant to a constant factor
//     of H; with every weight equal and g = 1 this makes the Hessian, and the result, exactly GPTQ's);
//     a linear whose weights are all 0 falls back to weight 1 (plain GPTQ);
//   * out need not be a multiple of g (the reference asserts it): group sizes then differ by one;
//   * formats with one scale for the whole tensor (ternary, nvfp4) are refused with g > 1.
//
// Memory: the statistics are N*L x g floats per linear (never per weight); the gradient pass keeps
// one window's activations for its backward pass and leaves the weights without gradients.
// Resume: the statistics are written to STATE_DIR/guided-stats.safetensors before the first block
// and read back by a resumed run (their key: groups, calibration tokens, model shape); without a
// state file they are recomputed from the full-precision model, which prepare() still sees.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "lowbit/methods/ptq_methods.h"

namespace lowbit {

struct GuidedOptions {
  int64_t groups = 4;  // g: output-row groups per linear, each with its own Hessian
};

// Per-token, per-group weights of every block linear ("model.layers.3.mlp.down_proj"), F32 [N*L, g].
struct GuidedStats {
  int64_t groups = 0, nsamples = 0, seqlen = 0;
  std::map<std::string, Tensor> weights;
};

// Boundaries of g contiguous groups of `out` rows: b[0] = 0, b[g] = out, b[k] = k*out/g.
std::vector<int64_t> row_group_bounds(int64_t out, int64_t groups);

// grad [rows, out] -> F32 [rows, g]: row t, group k = mean over the columns j of group k of grad[t, j]^2
// (0 for an empty group).
Tensor group_mean_squares(const Tensor& grad, int64_t groups);

// h[k] += sum_t w[t, k] x_t x_t^T for each group k: x [rows, in] (any float dtype, CPU or CUDA), w F32
// [rows, g] on the host. h is resized to g zero F32 [in, in] tensors on x's device when empty.
void accumulate_row_group_hessians(const Tensor& x, const Tensor& w, std::vector<Tensor>& h);

// GPTQ results of consecutive row slices of one layer stacked into the result for the whole layer
// (codes, scales and zeros row by row; loss summed; dead columns the most of any part).
GptqResult stack_row_groups(const std::vector<GptqResult>& parts);

// The weights on calibration windows tokens i32 [N, L] (next-token targets inside each window),
// from `model` as it is (call it on the full-precision model). One window per backward pass.
GuidedStats compute_guided_stats(LlamaModel& model, const Tensor& tokens, int64_t groups, bool progress = false);

void save_guided_stats(const std::string& path, const GuidedStats& s, const std::string& key);
// The stats of `path` when its key is `key`; nullopt-like empty stats (groups 0) otherwise. Throws
// naming the file for a malformed one.
GuidedStats load_guided_stats(const std::string& path, const std::string& key);

class GuidedMethod : public GptqMethod {
 public:
  GuidedMethod(const QuantFormat& f, GptqOptions g, GuidedOptions o);
  std::string name() const override { return "guided"; }
  bool supports_data_parallel() const override { return false; }  // not plain sums over windows
  std::string options_key() const override;
  // Gathers the statistics (or reads them from state_dir) unless set_stats gave them.
  void prepare(LlamaModel& model, const Tensor& tokens, const std::string& state_dir, bool progress) override;
  bool needs_whole_model() const override { return true; }  // the end-loss gradients of the full model
  // Uses these weights instead of computing them (tests, experiments).
  void set_stats(GuidedStats s);
  const GuidedStats& stats() const { return stats_; }
  // Seconds the gradient pass took in prepare (0 when read from the state or given).
  double gradient_seconds() const { return gradient_seconds_; }

 protected:
  Tensor row_group_weights(BlockContext& ctx, const std::string& linear) override;

 private:
  GuidedOptions g_;
  GuidedStats stats_;
  bool given_ = false;
  double gradient_seconds_ = 0;
};

}  // namespace lowbit
