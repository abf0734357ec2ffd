#include "lowbit/runtime/sampler.h"

#include <algorithm>
#include <cmath>

#include "lowbit/core/error.h"
#include "lowbit/core/vecmath.h"

namespace lowbit {

int argmax_first(const float* x, int n) {
  if (n <= 0 || std::isnan(x[0])) return 0;  // max_element keeps a NaN first element
  const float m = vec::max(x, n);            // the largest value that is not NaN (vectorised)
  // Its first position: chunks of 64 are tested without branches, the chunk that holds it is scanned.
  constexpr int kChunk = 64;
  int i = 0;
  for (; i + kChunk <= n; i += kChunk) {
    int hit = 0;
    for (int j = 0; j < kChunk; ++j) hit |= int(x[i + j] == m);
    if (hit) break;
  }
  for (; i < n; ++i)
    if (x[i] == m) return i;
  return 0;
}

Sampler::Sampler(SamplerOptions o) : o_(o), rng_(o.seed) {
  if (o_.temperature < 0) throw_error("sampler: temperature must be >= 0, got ", o_.temperature);
  if (!(o_.top_p > 0 && o_.top_p <= 1)) throw_error("sampler: top_p must be in (0, 1], got ", o_.top_p);
}

int Sampler::sample(const float* logits, int V) {
  if (o_.temperature == 0) return argmax_first(logits, V);
  // Softmax at temperature T (max-subtracted for stability).
  const float mx = *std::max_element(logits, logits + V);
  buf_.resize(size_t(V));
  double z = 0;
  for (int i = 0; i < V; ++i) {
    const double p = std::exp((double(logits[i]) - mx) / o_.temperature);
    buf_[size_t(i)] = {float(p), i};
    z += p;
  }
  size_t n = size_t(V);
  double mass = z;
  if (o_.top_p < 1) {
    // Smallest set of most likely tokens whose probability reaches top_p.
    std::sort(buf_.begin(), buf_.end(), [](auto& a, auto& b) { return a.first > b.first; });
    double cum = 0;
    for (n = 0; n < buf_.size();) {
      cum += buf_[n++].first;
      if (cum >= o_.top_p * z) break;
    }
    mass = cum;
  }
  std::uniform_real_distribution<double> u(0.0, mass);
  double r = u(rng_), acc = 0;
  for (size_t i = 0; i < n; ++i) {
    acc += buf_[i].first;
    if (r < acc) return buf_[i].second;
  }
  return buf_[n - 1].second;
}

}  // namespace lowbit
