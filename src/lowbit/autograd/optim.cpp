#include "lowbit/autograd/optim.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "lowbit/ops/blockwise8.h"
#include "lowbit/ops/ops.h"

namespace lowbit {

AdamW::AdamW(std::vector<ParamGroup> groups, AdamWStateOptions state) : groups_(std::move(groups)), bits_(state.bits) {
  if (bits_ != 32 && bits_ != 8) throw_error("AdamW: optimizer state bits must be 32 or 8, got ", bits_);
  auto kept = [&](const Var& p) {
    for (const Var& k : state.keep_32bit)
      if (k.node() == p.node()) return true;
    return false;
  };
  for (auto& g : groups_) {
    std::vector<Tensor> m, v, ma, va;
    for (auto& p : g.params) {
      if (!p.requires_grad()) throw_error("AdamW: parameter '", p.name(), "' does not require grad");
      const Tensor& x = p.value();
      // Any parameter off the CPU (even one that would keep f32 state) refuses 8-bit state: no
      // silent f32 run for a GPU model.
      if (bits_ == 8 && x.device() != Device::CPU)
        throw_error("AdamW: --optimizer-bits 8 runs on the CPU only for now (parameter ", x.describe(), ")");
      if (bits_ == 8 && x.numel() >= state.min_8bit_numel && !kept(p)) {
        if (x.dtype() != DType::F32) throw_error("AdamW: 8-bit state needs f32 parameters, got ", x.describe());
        const int64_t nb = ops::blockwise8_blocks(x.numel());
        Tensor mc = Tensor::empty(x.shape(), DType::U8), vc = Tensor::empty(x.shape(), DType::U8);
        std::fill_n(mc.data<uint8_t>(), mc.numel(), ops::dynamic_zero_code(true));
        std::fill_n(vc.data<uint8_t>(), vc.numel(), ops::dynamic_zero_code(false));
        m.push_back(mc);
        v.push_back(vc);
        ma.push_back(Tensor::zeros({nb}, DType::F32));
        va.push_back(Tensor::zeros({nb}, DType::F32));
      } else {
        m.push_back(Tensor::zeros(p.shape(), x.dtype(), x.device()));
        v.push_back(Tensor::zeros(p.shape(), x.dtype(), x.device()));
        ma.emplace_back();
        va.emplace_back();
      }
    }
    m_.push_back(std::move(m));
    v_.push_back(std::move(v));
    m_absmax_.push_back(std::move(ma));
    v_absmax_.push_back(std::move(va));
  }
}

void AdamW::prepare_step(double lr_scale, std::vector<ops::AdamwGroupStep>& out) {
  ++step_;
  // f32 state: every group's tensors into one ops::adamw_step_groups call (on the GPU one fused
  // launch per kAdamwMultiMax tensors, whatever their group); ops::adamw8_step per tensor with
  // 8-bit state.
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    auto& g = groups_[gi];
    const AdamWOptions& o = g.options;
    ops::AdamwGroupStep gs;
    gs.hyper = ops::AdamwHyper{o.lr * lr_scale, o.beta1, o.beta2, o.eps, o.weight_decay, step_};
    gs.params.reserve(g.params.size());
    for (size_t i = 0; i < g.params.size(); ++i) {
      Var& p = g.params[i];
      if (!p.grad().defined()) continue;
      if (is_8bit(gi, i))
        ops::adamw8_step(p.mutable_value(), p.grad(), m_[gi][i], m_absmax_[gi][i], v_[gi][i], v_absmax_[gi][i],
                         o.lr * lr_scale, o.beta1, o.beta2, o.eps, o.weight_decay, step_);
      else
        gs.params.push_back({&p.mutable_value(), &p.grad(), &m_[gi][i], &v_[gi][i]});
    }
    if (!gs.params.empty()) out.push_back(std::move(gs));
  }
}

void AdamW::step(double lr_scale) {
  std::vector<ops::AdamwGroupStep> gs;
  prepare_step(lr_scale, gs);
  if (!gs.empty()) ops::adamw_step_groups(gs);
}

void AdamW::step_all(const std::vector<AdamW*>& opts, double lr_scale) {
  std::vector<ops::AdamwGroupStep> gs;
  for (AdamW* o : opts) o->prepare_step(lr_scale, gs);
  if (!gs.empty()) ops::adamw_step_groups(gs);
}

int64_t AdamW::state_bytes() const {
  int64_t bytes = 0;
  for (size_t gi = 0; gi < m_.size(); ++gi)
    for (size_t i = 0; i < m_[gi].size(); ++i) {
      bytes += int64_t(m_[gi][i].nbytes() + v_[gi][i].nbytes());
      if (is_8bit(gi, i)) bytes += int64_t(m_absmax_[gi][i].nbytes() + v_absmax_[gi][i].nbytes());
    }
  return bytes;
}

int64_t AdamW::params_8bit() const {
  int64_t n = 0;
  for (size_t gi = 0; gi < m_.size(); ++gi)
    for (size_t i = 0; i < m_[gi].size(); ++i) n += is_8bit(gi, i) ? 1 : 0;
  return n;
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
      if (is_8bit(gi, i)) out.push_back(&m_absmax_[gi][i]);
      out.push_back(&v_[gi][i]);
      if (is_8bit(gi, i)) out.push_back(&v_absmax_[gi][i]);
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
