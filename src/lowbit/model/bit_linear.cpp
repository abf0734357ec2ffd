#include "lowbit/model/bit_linear.h"

namespace lowbit {

BitLinear::BitLinear(Tensor weight, const BitLinearOptions& options, bool trainable)
    : weight_(std::move(weight), trainable), options_(options) {
  if (weight_.value().dim() != 2) throw_error("BitLinear: weight must be [out, in], got ", weight_.value().describe());
}

std::vector<Var> BitLinear::parameters() const {
  if (weight_.requires_grad()) return {weight_};
  return {};
}

}  // namespace lowbit
