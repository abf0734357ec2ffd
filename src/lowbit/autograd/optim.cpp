#include "lowbit/autograd/optim.h"

#include <cmath>
#include <numbers>

#include "lowbit/ops/ops.h"

namespace lowbit {

AdamW::AdamW(std::vector<ParamGroup> groups) : groups_(std::move(groups)) {
  for (auto& g : groups_) {
    std::vector<Tensor> m, v;
    for (auto& p : g.params) {
      if (!p.requires_grad()) throw_error("AdamW: parameter '", p.name(), "' does not require grad");
      m.push_back(Tensor::zeros(p.shape(), p.value().dtype(), p.value().device()));
      v.push_back(Tensor::zeros(p.shape(), p.value().dtype(), p.value().device()));
    }
    m_.push_back(std::move(m));
    v_.push_back(std::move(v));
  }
}

void AdamW::step(double lr_scale) {
  ++step_;
  // One fused update per group (ops::adamw_step_multi: one GPU launch for up to 24 tensors).
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    auto& g = groups_[gi];
    std::vector<ops::AdamwParam> ps;
    ps.reserve(g.params.size());
    for (size_t i = 0; i < g.params.size(); ++i) {
      Var& p = g.params[i];
      if (!p.grad().defined()) continue;
      ps.push_back({&p.mutable_value(), &p.grad(), &m_[gi][i], &v_[gi][i]});
    }
    if (!ps.empty())
      ops::adamw_step_multi(ps, g.options.lr * lr_scale, g.options.beta1, g.options.beta2, g.options.eps,
                            g.options.weight_decay, step_);
  }
}

void AdamW::zero_grad() {
  for (auto& g : groups_)
    for (auto& p : g.params) p.zero_grad();
}

std::vector<Tensor*> AdamW::state_tensors() {
  std::vector<Tensor*> out;
  for (size_t gi = 0; gi < groups_.size(); ++gi)
    for (size_t i = 0; i < m_[gi].size(); ++i) {
      out.push_back(&m_[gi][i]);
      out.push_back(&v_[gi][i]);
    }
  return out;
}

double clip_grad_norm(const std::vector<Var>& params, double max_norm) {
  double ss = 0;
  for (const auto& p : params)
    if (p.grad().defined()) ss += ops::sum_squares(p.grad());
  const double norm = std::sqrt(ss);
  if (max_norm > 0 && norm > max_norm) {
    const double s = max_norm / (norm + 1e-6);
    for (const auto& p : params)
      if (p.grad().defined()) {  // out of place: gradient tensors may be shared (see accumulate_grad)
        Tensor scaled = Tensor::empty(p.grad().shape(), p.grad().dtype(), p.grad().device());
        ops::scale(p.grad(), s, scaled);
        p.grad() = scaled;
      }
  }
  return norm;
}

double warmup_cosine(int64_t step, int64_t warmup, int64_t total, double min_ratio) {
  if (warmup > 0 && step < warmup) return double(step + 1) / double(warmup);
  if (total <= warmup) return 1.0;
  double t = double(step - warmup) / double(total - warmup);
  if (t > 1) t = 1;
  return min_ratio + (1 - min_ratio) * 0.5 * (1 + std::cos(std::numbers::pi * t));
}

}  // namespace lowbit
