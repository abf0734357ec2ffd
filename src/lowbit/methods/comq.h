// COMQ (Zhang, Saab et al. 2024, "COMQ: A Backpropagation-Free Algorithm for Post-Training
// Quantization", arXiv 2403.07134): coordinate-wise minimisation of the layer reconstruction error
//     f(Q) = || X W^T - X Q^T ||^2 = sum_rows (w - q) H (w - q)^T,   H = X^T X,
// over the quantized weights, one coordinate at a time, without back-propagation:
//   * start from round-to-nearest (each group's scale and zero from its min/max);
//   * a sweep visits the input coordinates j in greedy order (decreasing H_jj * ||W[:, j]||^2, the
//     column's share of the output energy) and, for every row at once, moves q_j to the grid point
//     nearest to its exact minimiser q_j + (E H)_j / H_jj with E = W - Q (the other coordinates fixed);
//   * then each group's scale s gets its closed-form update s += v^T (E H)_g / (v^T H_gg v) (v: the
//     group's codes minus its zero point, so q_g = s v), rounded to the f16 the format stores
//     (the zero point stays);
//   * `sweeps` such passes (the paper's K; its default 1 for 4 bits, more at lower bit widths).
// Integer formats (asymmetric and symmetric, grouped or per channel); others are refused. Runs on
// the host in double (W and H are brought to the CPU).
#pragma once
#include "lowbit/methods/ptq_methods.h"

namespace lowbit {

struct ComqOptions {
  int sweeps = 3;           // passes over all coordinates (each followed by the scale update)
  bool update_scales = true;
};

struct ComqResult {
  QuantizedTensor q;
  double loss_rtn = 0, loss = 0;  // sum_rows (w - q) H (w - q)^T before (RTN) and after
};

// w: [out, in]; h: [in, in] (X^T X up to a constant factor).
ComqResult comq_quantize(const Tensor& w, const Tensor& h, const QuantFormat& f, const ComqOptions& o = {});

// COMQ in the block pipeline: GPTQ's sequential groups and Hessians, COMQ's per-layer solve.
class ComqMethod : public GptqMethod {
 public:
  ComqMethod(const QuantFormat& f, ComqOptions o) : GptqMethod(f, GptqOptions{}), c_(o) {}
  std::string name() const override { return "comq"; }
  std::string options_key() const override;

 protected:
  GptqResult solve(const Tensor& w, const Tensor& h, const QuantFormat& f) override;

 private:
  ComqOptions c_;
};

}  // namespace lowbit
