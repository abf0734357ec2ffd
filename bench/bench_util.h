// Small pieces shared by the benchmark programs under bench/.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "lowbit/core/tensor.h"
#include "lowbit/model/weights.h"
#include "lowbit/ops/device_init.h"

namespace lowbit::bench {

// Uniform random f32 values with standard deviation std_dev, filled in parallel from a hash of the
// index: Tensor::randn (a sequential Mersenne twister) would take minutes for 7B-sized weights.
inline Tensor fast_random(const Shape& shape, uint64_t seed, double std_dev) {
  Tensor t = Tensor::empty(shape);
  float* p = t.data<float>();
  const int64_t n = t.numel();
  const float a = float(std_dev * std::sqrt(3.0));
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    uint64_t z = (uint64_t(i) + seed * 0x9E3779B97F4A7C15ull) * 0xBF58476D1CE4E5B9ull;  // SplitMix64 finaliser
    z ^= z >> 31;
    z *= 0x94D049BB133111EBull;
    z ^= z >> 29;
    p[i] = a * (float(double(z >> 11) * 0x1.0p-53) * 2.0f - 1.0f);
  }
  return t;
}

// One Llama block's weights for the 7B-shaped benches (multi-head: wk and wv are dim x dim): unit
// norms and fast_random linears (std 0.02) seeded seed, seed + 1, ... in the order wq wk wv wo
// w_gate w_up w_down (seed is left past them), on dev.
inline LayerWeights random_mha_layer(int64_t dim, int64_t hidden, uint64_t& seed, Device dev) {
  auto rnd = [&](Shape s) { return fast_random(s, seed++, 0.02).to(dev); };
  LayerWeights l;
  l.attn_norm = Tensor::full({dim}, 1.0).to(dev);
  l.ffn_norm = Tensor::full({dim}, 1.0).to(dev);
  l.wq = rnd({dim, dim});
  l.wk = rnd({dim, dim});
  l.wv = rnd({dim, dim});
  l.wo = rnd({dim, dim});
  l.w_gate = rnd({hidden, dim});
  l.w_up = rnd({hidden, dim});
  l.w_down = rnd({dim, hidden});
  return l;
}

// The value after option argv[i] (advancing i); exits with a message when it is missing.
inline std::string option_value(int& i, int argc, char** argv) {
  if (i + 1 >= argc) {
    std::fprintf(stderr, "missing value after %s\n", argv[i]);
    std::exit(2);
  }
  return argv[++i];
}

// Runs `step` once with per-op CUDA event timing on and prints each op's share of the GPU time.
template <class Step>
void print_gpu_profile(Step&& step) {
  cuda_profile_enable(true);
  step();
  cuda_profile_enable(false);
  const auto rep = cuda_profile_report();
  double total = 0;
  for (const auto& t : rep) total += t.ms;
  std::printf("  GPU time per op (one step, CUDA events; sum %.2f ms):\n", total);
  for (const auto& t : rep)
    std::printf("    %-24s %5lld calls %9.3f ms %5.1f%%\n", t.op.c_str(), (long long)t.calls, t.ms, 100.0 * t.ms / total);
}

}  // namespace lowbit::bench
