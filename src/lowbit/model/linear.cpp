#include "lowbit/model/linear.h"

#include "lowbit/autograd/functions.h"

namespace lowbit {

DenseLinear::DenseLinear(Tensor weight, Tensor bias, bool trainable)
    : weight_(std::move(weight), trainable), bias_(bias.defined() ? Var(std::move(bias), trainable) : Var()) {
  if (weight_.value().dim() != 2) throw_error("DenseLinear: weight must be [out, in], got ", weight_.value().describe());
}

Var DenseLinear::forward(const Var& x) const { return linear(x, weight_, bias_); }

namespace {
void check_shard(const Linear& l, ShardAxis axis, int64_t begin, int64_t end) {
  const int64_t n = axis == ShardAxis::Rows ? l.out_features() : l.in_features();
  if (begin < 0 || begin >= end || end > n)
    throw_error("tensor parallelism: ", axis == ShardAxis::Rows ? "output rows [" : "input columns [", begin, ", ", end,
                ") of a ", l.kind(), " layer with ", n);
}
// A copy that owns its storage (a slice would keep the whole weight alive).
Tensor owned(const Tensor& t) { return t.is_contiguous() ? t.clone() : t.contiguous(); }
}  // namespace

std::shared_ptr<Linear> Linear::shard(ShardAxis, int64_t, int64_t, Device) const {
  throw_error("tensor parallelism: a ", kind(), " layer cannot be split across ranks");
}

std::shared_ptr<Linear> DenseLinear::shard(ShardAxis axis, int64_t begin, int64_t end, Device device) const {
  check_shard(*this, axis, begin, end);
  const Tensor& w = weight_.value();
  const Tensor b = bias_.defined() ? bias_.value() : Tensor();
  auto on = [&](const Tensor& t) { return t.device() == device ? owned(t) : t.contiguous().to(device); };
  if (axis == ShardAxis::Rows)
    return std::make_shared<DenseLinear>(on(w.slice(0, begin, end)), b.defined() ? on(b.slice(0, begin, end)) : b, false);
  return std::make_shared<DenseLinear>(on(w.slice(1, begin, end)), begin == 0 && b.defined() ? on(b) : Tensor(), false);
}

std::vector<Var> DenseLinear::parameters() const {
  std::vector<Var> p;
  if (weight_.requires_grad()) p.push_back(weight_);
  if (bias_.defined() && bias_.requires_grad()) p.push_back(bias_);
  return p;
}

}  // namespace lowbit
