#include "lowbit/methods/block_train.h"

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

Tensor gather_windows(const Tensor& x, const std::vector<int64_t>& idx, size_t b, size_t e, int64_t L) {
  if (e - b == 1 && x.is_contiguous()) return x.slice(0, idx[b] * L, (idx[b] + 1) * L);
  Tensor out = Tensor::empty({int64_t(e - b) * L, x.size(1)}, x.dtype(), x.device());
  for (size_t i = b; i < e; ++i) {
    const int64_t k = idx[i], r = int64_t(i - b);
    out.slice(0, r * L, (r + 1) * L).copy_(x.slice(0, k * L, (k + 1) * L));
  }
  return out;
}

}  // namespace lowbit
