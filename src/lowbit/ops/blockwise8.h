// Block-wise dynamic 8-bit quantization (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
// Quantization", arXiv 2110.02861): the codec of `lowbit train --optimizer-bits 8`'s AdamW state.
//
// The dynamic (tree) data type. A code's bits, after an optional sign bit, read: e zero bits (the
// decimal exponent, value scale 10^-e), a one bit (the indicator), then F fraction bits that split
// the linear range [0.1, 1] into 2^F bins; the value is the bin's upper end:
//     |x| = 10^-e * (0.1 + 0.9 * (f + 1) / 2^F),   f in [0, 2^F).
// All-zero bits are 0. So the largest exponent class has the most fraction bits: 1.0 and the values
// just below it are resolved finely, small magnitudes coarsely but down to 1e-6 (signed) / 1e-7.
//   signed (the first moment): sign + 7 bits, e = 0..6, F = 6 - e: 127 magnitudes from 1e-6 to 1,
//     both signs, and 0 -- 255 values; the tree's "negative zero" code takes the next exponent
//     class's single value, +1e-7 (the unsigned type's smallest), so the 256 values are distinct.
//   unsigned (the second moment, never negative): the sign bit becomes one more fraction bit: 8 bits,
//     e = 0..7, F = 7 - e: 255 magnitudes from 1e-7 to 1, and 0.
// Codes are stored as the value's rank in the ascending table (dynamic_map(...)[code]), not as the
// bit pattern, so encoding is one binary search over the 255 midpoints (round to nearest, a value on
// a midpoint goes up).
//
// Block-wise quantization: a tensor is cut into blocks of kBlockwise8Block elements (the last one
// shorter); each block stores its absmax in f32 and its elements' codes of x / absmax. Decoding is
// table[code] * absmax, so a block's largest element comes back exactly (as +-1 * absmax) and an
// element's error is at most absmax times half the gap between the two table values around x / absmax.
#pragma once
#include <array>
#include <cstdint>

namespace lowbit::ops {

inline constexpr int64_t kBlockwise8Block = 2048;

// The 256 values of the signed (first moment) or unsigned (second moment) dynamic type, ascending.
const std::array<float, 256>& dynamic_map(bool is_signed);
// The code of the table value nearest to x (x normalized: in [-1, 1], or [0, 1] unsigned).
uint8_t dynamic_encode(float x, bool is_signed);
// How many midpoints one encoding bucket holds at most (the compares after the bucket lookup; 2).
int dynamic_bucket_steps(bool is_signed);
// The code of 0 in the table (signed: 127, unsigned: 0): the code of a fresh, all-zero state.
uint8_t dynamic_zero_code(bool is_signed);

inline int64_t blockwise8_blocks(int64_t n) { return (n + kBlockwise8Block - 1) / kBlockwise8Block; }

// One block of n <= kBlockwise8Block elements: returns its absmax, writes n codes (a block of zeros
// gets absmax 0 and the zero code).
float blockwise8_encode_block(const float* x, int64_t n, bool is_signed, uint8_t* codes);
void blockwise8_decode_block(const uint8_t* codes, float absmax, int64_t n, bool is_signed, float* out);

// A whole array: n codes and blockwise8_blocks(n) absmax values (blocks run in parallel).
void blockwise8_encode(const float* x, int64_t n, bool is_signed, uint8_t* codes, float* absmax);
void blockwise8_decode(const uint8_t* codes, const float* absmax, int64_t n, bool is_signed, float* out);

}  // namespace lowbit::ops
