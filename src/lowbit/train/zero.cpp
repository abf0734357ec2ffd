#include "lowbit/train/zero.h"

#include <algorithm>
#include <cmath>

#include "lowbit/ops/ops.h"

namespace lowbit {

ZeroLayout zero_layout(const std::vector<Var>& ps, int world) {
  ZeroLayout z;
  int64_t total = 0;
  for (const auto& p : ps) total += p.value().numel();
  std::vector<int64_t> used(size_t(world), 0);
  int64_t before = 0;
  for (const auto& p : ps) {
    const int64_t n = p.value().numel();
    // the rank whose share of [0, total) holds the parameter's middle
    const int r = int(std::min<int64_t>(world - 1, (2 * before + n) * world / std::max<int64_t>(1, 2 * total)));
    z.owner.push_back(r);
    z.offset.push_back(used[size_t(r)]);
    used[size_t(r)] += n;
    before += n;
  }
  for (int64_t u : used) z.chunk = std::max(z.chunk, u);
  z.chunk = std::max<int64_t>(z.chunk, 1);
  return z;
}

Tensor zero_gather(const std::vector<Var>& ps, const ZeroLayout& z, comm::Communicator& c,
                   const std::function<Tensor(size_t)>& get) {
  const Device dev = ps.front().value().device();
  Tensor mine = Tensor::zeros({z.chunk}, DType::F32, dev), all = Tensor::empty({z.chunk * c.world_size()}, DType::F32, dev);
  for (size_t i = 0; i < ps.size(); ++i)
    if (z.owns(i, c.rank())) {
      const int64_t k = ps[i].value().numel();
      mine.slice(0, z.offset[i], z.offset[i] + k).copy_(get(i).reshape({k}));
    }
  c.all_gather(mine, all);
  return all;
}

Tensor zero_slot(const Tensor& all, const ZeroLayout& z, size_t i, const Tensor& like) {
  const int64_t k = like.numel(), b = z.owner[i] * z.chunk + z.offset[i];
  return all.slice(0, b, b + k).view(like.shape());
}

double zero_reduce_grads(const std::vector<Var>& ps, const ZeroLayout& z, comm::Communicator& c, double max_norm) {
  const Device dev = ps.front().value().device();
  Tensor flat = Tensor::zeros({z.chunk * c.world_size()}, DType::F32, dev), mine = Tensor::empty({z.chunk}, DType::F32, dev);
  for (size_t i = 0; i < ps.size(); ++i) {
    if (!ps[i].grad().defined()) continue;
    const int64_t k = ps[i].value().numel(), b = z.owner[i] * z.chunk + z.offset[i];
    flat.slice(0, b, b + k).copy_(ps[i].grad().reshape({k}));
  }
  c.reduce_scatter_sum(flat, mine);
  double ss = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    Var p = ps[i];
    if (!z.owns(i, c.rank())) {
      p.grad() = Tensor();
      continue;
    }
    p.grad() = mine.slice(0, z.offset[i], z.offset[i] + p.value().numel()).view(p.value().shape());
    ss += ops::sum_squares(p.grad());
  }
  const double norm = std::sqrt(c.all_reduce_sum(ss));
  if (max_norm > 0 && norm > max_norm) {
    const double sc = max_norm / (norm + 1e-6);
    for (size_t i = 0; i < ps.size(); ++i)
      if (z.owns(i, c.rank())) {
        Var p = ps[i];
        Tensor scaled = Tensor::empty(p.grad().shape(), p.grad().dtype(), p.grad().device());
        ops::scale(p.grad(), sc, scaled);
        p.grad() = scaled;
      }
  }
  return norm;
}

std::vector<ParamGroup> zero_own_groups(const std::vector<ParamGroup>& groups, const ZeroLayout& z, int rank) {
  std::vector<ParamGroup> out;
  size_t i = 0;
  for (const auto& g : groups) {
    ParamGroup own{{}, g.options};
    for (const auto& p : g.params)
      if (z.owns(i++, rank)) own.params.push_back(p);
    out.push_back(own);
  }
  return out;
}

void zero_gather_params(const std::vector<Var>& ps, const ZeroLayout& z, comm::Communicator& c) {
  const Tensor all = zero_gather(ps, z, c, [&](size_t i) { return ps[i].value(); });
  for (size_t i = 0; i < ps.size(); ++i)
    if (!z.owns(i, c.rank())) {
      Var p = ps[i];
      p.mutable_value().copy_(zero_slot(all, z, i, p.value()));
    }
}

}  // namespace lowbit
