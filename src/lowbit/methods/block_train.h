#pragma once
// Pieces the block-wise trainers share (ApiQ/SAPR in apiq.cpp, EfficientQAT's Block-AP in
// block_ap.cpp): seed mixing, a portable shuffle of the calibration windows, and gathering a
// mini-batch of windows from a block's stacked inputs.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "lowbit/core/tensor.h"

namespace lowbit {

// SplitMix64 finaliser: decorrelates seeds derived from (seed, layer, linear, epoch).
uint64_t splitmix64(uint64_t x);

// 0..n-1 in a Fisher-Yates order drawn with our own index draw from mt19937_64(seed)
// (std::shuffle's use of the engine is implementation-defined).
std::vector<int64_t> shuffled_indices(int64_t n, uint64_t seed);

// Rows of the windows idx[b..e) of x [N*L, C] (window k = rows k*L .. k*L+L-1), concatenated, on
// x's device. One window of a contiguous x is a view, not a copy.
Tensor gather_windows(const Tensor& x, const std::vector<int64_t>& idx, size_t b, size_t e, int64_t L);

}  // namespace lowbit
