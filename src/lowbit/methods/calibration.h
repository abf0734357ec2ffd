// Calibration data for post-training quantization: N random windows of L tokens drawn from a
// token stream with a seeded generator, as GPTQ's get_wikitext2/get_c4 do.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "lowbit/core/tensor.h"

namespace lowbit {

// tokens: i32 [N, L]. Throws when the stream is shorter than one window.
Tensor sample_calibration(const std::vector<int32_t>& stream, int64_t nsamples, int64_t seqlen, uint64_t seed);

}  // namespace lowbit
