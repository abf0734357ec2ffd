// Coupled Quantization (CQ) of KV-cache rows (Zhang et al. 2024, "KV Cache is 1 Bit Per Channel:
// Efficient Large Language Model Inference with Coupled Quantization", arXiv 2405.03917): the
// channels of a key / value row are split into G groups of c contiguous channels, and each group
// is replaced by the nearest of K = 2^b learned centroids of its own codebook (b bits per group,
// b / c bits per channel). The codebooks are learned on calibration activations
// (methods/kv_cq.h); this file is the codec.
//
//   codebook  f32 [G, K, c]   group g's centroid j is codebook[g, j, :]
//   x         f32 [M, G*c]    rows (one token's keys or values of every kv head, flattened)
//   codes     u8  [M, G]      code of group g of row m: argmin_j ||x[m, g*c:(g+1)*c] - codebook[g, j]||^2
//
// The squared distances are summed in f32 in channel order; ties go to the lowest index. K <= 256
// (one byte a code). Every path (the simulated attention, tests) uses these functions, so encoding
// the same row always gives the same code.
#pragma once
#include <cstdint>

#include "lowbit/core/tensor.h"

namespace lowbit::ops {

// Checks a codebook (f32 [G, K, c], contiguous, CPU, 1 <= K <= 256, c >= 1, finite values); throws
// naming `what`.
void cq_check_codebook(const Tensor& codebook, const char* what);

// x f32 [M, G*c] (CPU, contiguous) -> codes u8 [M, G] (allocated by the caller).
void cq_encode(const Tensor& x, const Tensor& codebook, Tensor& codes);
// codes u8 [M, G] -> y f32 [M, G*c] (allocated by the caller).
void cq_decode(const Tensor& codes, const Tensor& codebook, Tensor& y);
// y = decode(encode(x)), x and y f32 [M, G*c] (y may be x).
void cq_fake_quant(const Tensor& x, const Tensor& codebook, Tensor& y);

// The nearest of the K centroids ct (f32 transposed: ct[d * K + j] = centroid j's channel d) to
// x[0, c): the index of the smallest f32 squared distance, the lowest of equals; *dist gets it.
int64_t cq_nearest(const float* x, const float* ct, int64_t K, int64_t c, float* dist = nullptr);

}  // namespace lowbit::ops
