#include "lowbit/methods/calibration.h"

#include <random>

namespace lowbit {

Tensor sample_calibration(const std::vector<int32_t>& stream, int64_t n, int64_t L, uint64_t seed) {
  if (n < 1 || L < 2) throw_error("calibration: need --nsamples >= 1 and --seqlen >= 2 (got ", n, ", ", L, ")");
  if (int64_t(stream.size()) < L)
    throw_error("calibration: the data has ", stream.size(), " tokens, fewer than one window of --seqlen ", L);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> u(0, int64_t(stream.size()) - L);
  Tensor t = Tensor::empty({n, L}, DType::I32);
  int32_t* p = t.data<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = u(rng);
    for (int64_t j = 0; j < L; ++j) p[i * L + j] = stream[size_t(s + j)];
  }
  return t;
}

}  // namespace lowbit
