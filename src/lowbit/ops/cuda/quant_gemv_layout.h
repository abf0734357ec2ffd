// The device layout of packed weights for the CUDA quant_matmul kernels, as plain C++17 shared by
// host and device (LB_HD): where a code sits inside a 32-value block, and the 8 words of codes that
// pair with the 8 words of int8 activations in the dp4a dot product. quant_gemv.cuh documents the
// layout; tests/quant/test_quant_matmul.cpp runs these functions on the host against the CPU
// bodies (the arithmetic of the GEMV, without a GPU).
#pragma once
#include <cstdint>

#include "lowbit/core/format_traits.h"

namespace lowbit::qgemv {

// Position p of a block holds value block_source(order, p) of the block (the activation order of
// ops/quant_matmul_kernels.h's block_source_index: order 8 natural, 4 / 2 lowbit's bit order).
LB_HD_INLINE int block_source(int order, int p) {
  if (order == 4) return p < 16 ? 2 * p : 2 * (p - 16) + 1;
  if (order == 2) return 4 * (p % 8) + p / 8;
  return p;
}

// The code at kernel position p of a block starting at bp (8-bit codes are signed).
LB_HD_INLINE int code_at_pos(int bits, const uint8_t* bp, int p) {
  if (bits == 4) return p < 16 ? (bp[p] & 0x0f) : (bp[p - 16] >> 4);
  if (bits == 2) return (bp[p % 8] >> (2 * (p / 8))) & 0x03;
  return int(int8_t(bp[p]));
}

// u: the block's 32 * Bits / 8 bytes as little-endian words (2, 4 or 8 of them). a[i]: the codes
// of positions 4i .. 4i+3, one per byte (dp4a operand).
template <int Bits>
LB_HD_INLINE void unpack_words(const uint32_t* u, int32_t (&a)[8]) {
  if constexpr (Bits == 4) {
    for (int i = 0; i < 4; ++i) {
      a[i] = int32_t(u[i] & 0x0f0f0f0fu);
      a[4 + i] = int32_t((u[i] >> 4) & 0x0f0f0f0fu);
    }
  } else if constexpr (Bits == 2) {
    for (int s = 0; s < 4; ++s)
      for (int w = 0; w < 2; ++w) a[2 * s + w] = int32_t((u[w] >> (2 * s)) & 0x03030303u);
  } else {
    for (int i = 0; i < 8; ++i) a[i] = int32_t(u[i]);
  }
}

// One block's contribution to an output: s * (d * dot) + o * (d * sum q), with o = -s z (zero
// point) or m (offset form); ds = (d, d * sum q) of the activation block.
LB_HD_INLINE float block_term(float s, float o, float d, float d_sum, int32_t dot) {
  return s * (d * float(dot)) + o * d_sum;
}

}  // namespace lowbit::qgemv
