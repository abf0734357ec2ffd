// The quantization grid of one ggml block, for methods that round one weight at a time (GPTQ's
// column sweep) instead of a whole row at once (quantize_row).
//
// Formats with one scale (and, for q4_1/q5_1, one min) per 32-value block: q4_0, q4_1, q5_0, q5_1,
// q8_0 and iq4_nl. A block's parameters are fitted exactly as llama.cpp's reference quantizer does
// (f.quantize_row on the block's 32 current values: q4_0/q5_0 d = signed extreme / -8 (-16), q8_0
// d = absmax / 127, q4_1/q5_1 d = (max - min) / 15 (31) and m = min, iq4_nl ggml's scale search over
// the non-uniform levels), stored as f16 in the block; then each value is rounded on its own to the
// grid of the STORED (f16) parameters:
//   q4_0 q = clamp(trunc(x/d + 8.5), 0, 15)     w = d (q - 8)
//   q5_0 q = clamp(trunc(x/d + 16.5), 0, 31)    w = d (q - 16)
//   q4_1 q = clamp(trunc((x-m)/d + 0.5), 0, 15) w = d q + m      (q5_1: 31)
//   q8_0 q = clamp(round(x/d), -127, 127)       w = d q
//   iq4_nl q = the nearest of the 16 levels v_k to x/d,          w = d v_q
// and its code is written into the block, so the block dequantizes (dequantize_row) to exactly the
// values returned. The k-quants (two-level scales over 256 values), iq4_xs and the ternary tq1_0 /
// tq2_0 have no such per-value grid here: methods use their reference quantize_row (RTN).
#pragma once
#include <cstdint>

#include "lowbit/quant/format.h"

namespace lowbit {

// True for q4_0, q4_1, q5_0, q5_1, q8_0 and iq4_nl.
bool ggml_block_grid_supported(const QuantFormat& f);
// The formats above, for messages: "q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl".
const char* ggml_block_grid_names();

// Fits the parameters of one block (f.group_size values of x) into `block` (f.block_bytes bytes);
// the codes are the reference rounding of x (ggml's quantize_row_*_ref).
void ggml_grid_fit_block(const QuantFormat& f, const float* x, uint8_t* block);

// Rounds x to the grid of `block` at position j (0 <= j < f.group_size), stores the code in the
// block and returns the value it dequantizes to (bit-identical with f.dequantize_row).
float ggml_grid_round(const QuantFormat& f, uint8_t* block, int j, float x);

}  // namespace lowbit
