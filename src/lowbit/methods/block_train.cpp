#include "lowbit/methods/block_train.h"

#include "lowbit/autograd/functions.h"

#include <random>
#include <utility>

namespace lowbit {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::vector<int64_t> shuffled_indices(int64_t n, uint64_t seed) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[size_t(i)] = i;
  std::mt19937_64 rng(seed);
  for (int64_t i = n - 1; i > 0; --i) std::swap(p[size_t(i)], p[size_t(rng() % uint64_t(i + 1))]);
  return p;
}

namespace {
// A 16-bit activation cache's windows in f32; f32 (or f64) windows as they are.
Tensor widened(const Tensor& t) {
  return t.dtype() == DType::BF16 || t.dtype() == DType::F16 ? cast_to(t, DType::F32) : t;
}
}  // namespace

Tensor gather_windows(const Tensor& x, const std::vector<int64_t>& idx, size_t b, size_t e, int64_t L) {
  if (e - b == 1 && x.is_contiguous()) return widened(x.slice(0, idx[b] * L, (idx[b] + 1) * L));
  Tensor out = Tensor::empty({int64_t(e - b) * L, x.size(1)}, x.dtype(), x.device());
  for (size_t i = b; i < e; ++i) {
    const int64_t k = idx[i], r = int64_t(i - b);
    out.slice(0, r * L, (r + 1) * L).copy_(x.slice(0, k * L, (k + 1) * L));
  }
  return widened(out);
}

WindowShards::WindowShards(comm::Communicator* comm, int64_t local_windows)
    : comm_(comm), local_(local_windows), total_(local_windows) {
  if (!distributed()) return;
  const int world = comm_->world_size();
  Tensor mine = Tensor::empty({1}, DType::I64);
  mine.data<int64_t>()[0] = local_windows;
  Tensor all = Tensor::empty({world}, DType::I64);
  comm_->all_gather(mine, all);
  const int64_t* n = all.data<int64_t>();
  total_ = 0;
  for (int r = 0; r < world; ++r) {
    if (r == comm_->rank()) offset_ = total_;
    total_ += n[r];
  }
}

std::vector<int64_t> WindowShards::local(const std::vector<int64_t>& idx, size_t b, size_t e) const {
  std::vector<int64_t> out;
  for (size_t i = b; i < e; ++i)
    if (idx[i] >= offset_ && idx[i] < offset_ + local_) out.push_back(idx[i] - offset_);
  return out;
}

Var WindowShards::step_loss(const std::vector<int64_t>& idx, size_t b, size_t e,
                            const std::function<Var(const std::vector<int64_t>&, size_t, size_t)>& loss) const {
  if (!distributed()) return loss(idx, b, e);
  const std::vector<int64_t> mine = local(idx, b, e);
  if (mine.empty()) return Var();
  Var l = loss(mine, 0, mine.size());
  return mine.size() == e - b ? l : scale(l, double(mine.size()) / double(e - b));
}

void all_reduce_grads(const std::vector<Var>& params, comm::Communicator& c) {
  if (params.empty()) return;
  int64_t n = 0;
  for (const auto& p : params) n += p.value().numel();
  const int64_t np = int64_t(params.size());
  const Device dev = params.front().value().device();
  // The gradients, then one flag per parameter: how many ranks had a gradient for it.
  Tensor flat = Tensor::zeros({n + np}, DType::F32, dev);
  Tensor flags = Tensor::zeros({np}, DType::F32);
  int64_t off = 0;
  for (int64_t i = 0; i < np; ++i) {
    const Var& p = params[size_t(i)];
    const int64_t k = p.value().numel();
    if (p.grad().defined()) {
      flat.slice(0, off, off + k).copy_(p.grad().reshape({k}));
      flags.data<float>()[i] = 1.0f;
    }
    off += k;
  }
  flat.slice(0, n, n + np).copy_(flags.to(dev));
  c.all_reduce_sum(flat);
  const Tensor had = flat.slice(0, n, n + np).to(Device::CPU).contiguous();
  off = 0;
  for (int64_t i = 0; i < np; ++i) {
    Var p = params[size_t(i)];
    const int64_t k = p.value().numel();
    if (had.data<float>()[i] > 0) {
      Tensor g = flat.slice(0, off, off + k).view(p.value().shape());
      p.grad() = p.value().dtype() == DType::F32 ? g : g.to(p.value().dtype());
    } else {
      p.grad() = Tensor();
    }
    off += k;
  }
}

}  // namespace lowbit
