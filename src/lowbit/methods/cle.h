// Cross-layer equalization + bias correction (Nagel, van Baalen, Blankevoort, Welling 2019,
// "Data-Free Quantization Through Weight Equalization and Bias Correction"), then RTN.
//
// Equalization: for a producer whose output channel i feeds a consumer's input channel i through a
// positively homogeneous map (f(s x) = s f(x), s > 0), dividing the producer's channel i by s_i and
// multiplying the consumer's column i by s_i leaves the function unchanged; s_i = sqrt(r1_i / r2_i)
// (r1: the producer's range of channel i, r2: the consumer's range of column i, max |.|) makes
// both ranges sqrt(r1_i r2_i) (Nagel et al. eq. 10). In a Llama block the pairs are:
//   attn_norm (its RMSNorm weight gamma, |gamma_i|)  -> q, k, v   (their columns, jointly)
//   ffn_norm                                         -> gate, up
//   up_proj rows (SwiGLU: silu(gate) * up is linear in up)  -> down_proj columns
//   v_proj rows -> o_proj columns, only without grouped-query sharing (n_heads == n_kv_heads: o's
//   column i then reads v's row i alone, through the attention average, which is linear)
// The norms are not quantized, so their pairs move range from the linears' outlier columns into
// gamma. A linear that is both a consumer and a producer (v, up) couples the pairs: they are applied
// in turn until every scale is within `tolerance` of 1 (at most max_iterations rounds; Nagel's
// iterative procedure). Data-free: no calibration data is needed.
//
// Bias correction (Nagel §4.2): the quantized layer's expected output shifts by (Q - W) E[x]; it is
// subtracted from the layer's bias. Only layers with a bias can take it: Llama's linears have none
// (nothing to correct; reported as such), Qwen2's q/k/v do. E[x] comes from the calibration inputs
// (the paper derives it from BatchNorm statistics, which transformers do not have), so the
// correction runs only when calibration data was given (CleOptions::bias_correction).
#pragma once
#include <vector>

#include "lowbit/methods/pipeline.h"

namespace lowbit {

struct CleOptions {
  int max_iterations = 20;
  double tolerance = 1e-3;       // stop when every |s_i - 1| is below this
  bool bias_correction = false;  // set when calibration data is given
};

// s_i = sqrt(r1_i / r2_i); 1 where either range is 0.
std::vector<double> cle_scales(const std::vector<double>& r1, const std::vector<double>& r2);

// Equalizes the full-precision block `layer` in place (new norm and dense linear tensors; the
// function is unchanged up to float rounding). Returns the number of rounds run.
int cle_equalize_block(LlamaModel& model, int layer, const CleOptions& o = {});

class CleMethod : public BlockMethod {
 public:
  CleMethod(const QuantFormat& f, CleOptions o) : f_(f), o_(o) {}
  std::string name() const override { return "cle"; }
  std::string options_key() const override;
  void quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) override;
  int bias_corrected() const { return bias_corrected_; }  // layers whose bias was corrected so far

 private:
  const QuantFormat& f_;
  CleOptions o_;
  int bias_corrected_ = 0;
};

}  // namespace lowbit
