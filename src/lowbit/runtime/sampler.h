// Next-token sampling: greedy (temperature 0), temperature, nucleus (top-p; Holtzman et al. 2020).
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace lowbit {

struct SamplerOptions {
  double temperature = 1.0;  // 0 = greedy (argmax, first maximum on ties, like llama2.c)
  double top_p = 1.0;        // 1 = no nucleus truncation
  uint64_t seed = 42;
};

// Index of the first maximum of x[0, n), the same as std::max_element(x, x + n) - x (NaNs are
// skipped, ties go to the first, a NaN at x[0] gives 0), in two vectorised passes: greedy sampling
// of a 49152-token vocabulary for every row of a batched step was serial scalar work (perf: 4 % of
// the serving thread at 8 clients). 0 for n <= 0.
int argmax_first(const float* x, int n);

class Sampler {
 public:
  explicit Sampler(SamplerOptions o);
  int sample(const float* logits, int vocab);

 private:
  SamplerOptions o_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int>> buf_;
};

}  // namespace lowbit
