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
