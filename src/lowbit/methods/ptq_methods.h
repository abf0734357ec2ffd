// The post-training baselines as block methods of the pipeline (pipeline.h): RTN, GPTQ, AWQ.
#pragma once
#include <memory>
#include <optional>
#include <string>

#include "lowbit/methods/awq.h"
#include "lowbit/methods/gptq.h"
#include "lowbit/methods/pipeline.h"

namespace lowbit {

// Round to nearest; calibration inputs are used only for the error report.
// weighted: importance-weighted rounding of the ggml block layers (rtn_quantize_weighted), the
// importance of each linear being the mean x^2 of its inputs over all calibration rows of the block
// pass (llama-imatrix's statistic; needs calibration data); other layers round to nearest.
class RtnMethod : public BlockMethod {
 public:
  explicit RtnMethod(const QuantFormat& f, bool weighted = false) : f_(f), weighted_(weighted) {}
  std::string name() const override { return "rtn"; }
  // Data-free unless weighted: every rank the same. The weighted statistic (mean x^2 over this
  // rank's calibration rows) is not all-reduced, so a weighted run is refused with several ranks.
  bool supports_data_parallel() const override { return !weighted_; }
  std::string options_key() const override { return weighted_ ? "weighted_round=1" : ""; }
  void quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) override;

 private:
  const QuantFormat& f_;
  bool weighted_;
};

// QuIP's incoherence processing around GPTQ (quant/incoherence.h; `--method quip`).
struct QuipOptions {
  uint64_t seed = 0;      // run seed; each linear's transform is drawn from incoherence_seed(seed, layer, name)
  bool two_sided = true;  // false: input side only (W' = W R_in)
};

// GPTQ, "true sequential" inside a block (as in the reference llama.py with --true-sequential):
// q/k/v, then o, then gate/up, then down, each group's Hessian collected on the inputs produced
// by the already quantized earlier groups.
class GptqMethod : public BlockMethod {
 public:
  GptqMethod(const QuantFormat& f, GptqOptions o) : f_(f), o_(o) {}
  std::string name() const override { return "gptq"; }
  std::string options_key() const override;
  // The Hessian sums (and their row counts) are all-reduced before each group is solved. The
  // subclasses whose statistics are not plain sums over the windows (RSQ's token weights, GuidedQuant,
  // AdaRound/AdaQuant) say no; COMQ solves from the Hessian alone and inherits yes.
  bool supports_data_parallel() const override { return true; }
  void quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) override;

 protected:
  // Per-token weights r [N*L] of the Hessian H = 2 sum_t r_t x_t x_t^T / n (RSQ); undefined (the
  // default): every token weighs 1, plain GPTQ. Computed once per block, before it is quantized.
  virtual Tensor token_weights(BlockContext&) { return Tensor(); }
  // GuidedQuant (guided.h): per-token weights of one Hessian per group of output rows of `linear`
  // (this block's "self_attn.q_proj", ...), F32 [N*L, g]; group k holds rows row_group_bounds(out,
  // g)[k] .. [k+1] and is solved with H_k = 2/n sum_t w[t, k] x_t x_t^T. Undefined (the default):
  // one Hessian for all rows (token_weights' or plain GPTQ's).
  virtual Tensor row_group_weights(BlockContext&, const std::string& /*linear*/) { return Tensor(); }
  // The per-layer solve on W [out, in] and the layer's Hessian: GPTQ (gptq_quantize); COMQ overrides.
  virtual GptqResult solve(const Tensor& w, const Tensor& h, const QuantFormat& f) { return gptq_quantize(w, h, f, o_); }

 public:
  // Layers of a mixed-format plan in a format GPTQ cannot sweep (iq4_xs, tq1_0, tq2_0: gptq.h),
  // which this run rounded to nearest instead (0 with a single format: gptq_quantize refuses those).
  int rtn_layers() const { return rtn_layers_; }

 protected:
  // The format of `name` (ctx.format_of), then solve(); RTN for the formats above in mixed plans.
  GptqResult solve_layer(BlockContext& ctx, const std::string& name, const Tensor& w, const Tensor& h);
  // solve_layer on each group of rows with its own Hessian (row_group_weights), results stacked.
  GptqResult solve_row_groups(BlockContext& ctx, const std::string& name, const Tensor& w, const std::vector<Tensor>& h);

  const QuantFormat& f_;
  GptqOptions o_;
  int rtn_layers_ = 0;
  // Set by QuipMethod: each linear is solved on (W', H') = (R_out^T W R_in, R_in^T H R_in) and
  // installed as a QuantLinear that transforms its input and output online (CPU only).
  std::optional<QuipOptions> quip_;
};

// QuIP (Chee et al. 2023, arXiv 2307.13304): incoherence processing — a seeded randomized
// Hadamard-type orthogonal transform of each linear's weight (both sides) and Hessian (input
// side), offline and per layer, nothing fused into the model — then GPTQ on the transformed
// problem, which is QuIP's LDLQ (QuIP §3, Theorem 6: LDLQ and OPTQ/GPTQ are the same procedure).
// The quantized model applies x R_in and z R_out^T around each packed product (QuantLinear).
// Not QuIP's other pieces: no diagonal rescaling of W and H before the transform (§4's D̃), no
// greedy local search after LDLQ, no Kronecker-of-orthogonal transforms (Hadamard-type instead,
// as QuIP#); the grid is any GPTQ format (QuIP uses per-row min/max integer grids).
class QuipMethod : public GptqMethod {
 public:
  QuipMethod(const QuantFormat& f, GptqOptions o, QuipOptions q) : GptqMethod(f, o) { quip_ = q; }
  std::string name() const override { return "quip"; }
  std::string options_key() const override;
};

// AWQ: per-input-channel scales searched for each group of linears sharing an input and folded
// into the producer of that input (attn_norm for q/k/v, ffn_norm for gate/up, up_proj rows for
// down_proj, v_proj rows for o_proj when there is no grouped-query sharing), then a clipping
// search and RTN (llm-awq run_awq + apply_awq + real quantization).
class AwqMethod : public BlockMethod {
 public:
  AwqMethod(const QuantFormat& f, AwqOptions o, bool clip) : f_(f), o_(o), clip_(clip) {}
  std::string name() const override { return "awq"; }
  std::string options_key() const override;
  // The calibration rows of the searches (the first kAwqRows of all windows) are all-gathered, so
  // every rank searches on exactly the rows one process would.
  bool supports_data_parallel() const override { return true; }
  void quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) override;

 private:
  const QuantFormat& f_;
  AwqOptions o_;
  bool clip_;
};

}  // namespace lowbit
