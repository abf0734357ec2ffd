// A linear layer whose weight is the decoded result of a quantization scheme that lowbit's format
// table (quant/format.h) has no packed form for yet: Ŵ is kept dense (f32) and the layer computes
// x Ŵ^T (+ bias) like a DenseLinear, while it carries the scheme's name and the exact bits per weight
// its own storage layout would take (computed by the method that made it).
//
// Used by ptq161 (methods/ptq161.h): binarized non-salient input channels plus 4-bit salient ones,
// selected by a per-tensor column mask — a layout whose code width depends on the column, which the
// per-group codecs of the format table cannot express. The quantized checkpoint
// (io/quantized_checkpoint.h) writes such a layer as a dense `.weight` (the dequantized fallback)
// and names it under "simulated_layers"; the resumable pipeline state keeps Ŵ the same way.
#pragma once
#include <string>

#include "lowbit/model/linear.h"

namespace lowbit {

class SimulatedQuantLinear : public DenseLinear {
 public:
  // w_hat [out, in] the decoded weight, bias [out] or undefined; scheme e.g. "ptq161";
  // bits_per_weight: the scheme's exact storage (codes and all metadata) over out * in.
  SimulatedQuantLinear(Tensor w_hat, Tensor bias, std::string scheme, double bits_per_weight)
      : DenseLinear(std::move(w_hat), std::move(bias), false), scheme_(std::move(scheme)), bits_(bits_per_weight) {}
  std::string kind() const override { return scheme_; }
  const std::string& scheme() const { return scheme_; }
  double bits_per_weight() const { return bits_; }

 private:
  std::string scheme_;
  double bits_;
};

}  // namespace lowbit
