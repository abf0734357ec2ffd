// Vectorised float kernels for the CPU bodies of the ops (softmax rows, log-sum-exp, SiLU).
// Compiled for AVX-512, AVX2+FMA and baseline x86-64 (target attributes; the first call picks the
// version by the CPU's features), portable C++ elsewhere. exp is Cephes' single-precision polynomial
// (relative error about 1 ulp over the range used; inputs below -87.3 give ~1e-38, not 0).
#pragma once
#include <cstdint>

namespace lowbit::vec {

float exp1(float x);                   // one value, same polynomial
float max(const float* x, int64_t n);  // -inf for n == 0
// x[i] = exp(x[i] - shift); returns the sum of the new x (float lanes).
float exp_shift_sum(float* x, int64_t n, float shift);
// sum_i exp(x[i] - shift) in double lanes, x unchanged.
double exp_shift_sum_f64(const float* x, int64_t n, float shift);
void scale(float* x, int64_t n, float s);                          // x *= s
void silu(const float* x, float* y, int64_t n);                    // y = x sigmoid(x)
void swiglu(const float* g, const float* u, float* y, int64_t n);  // y = silu(g) u

// 16-bit floats to f32 (exact): F16C / AVX-512 where the CPU has them, else the scalar codec.
void f16_to_f32(const uint16_t* src, float* dst, int64_t n);
// n rows of `width` f16 values, row r at src + r * ld, into dst[r * width ...] (one call for a
// strided block: the KV cache's rows of one head, widened for attention at every decode step).
void f16_rows_to_f32(const uint16_t* src, int64_t ld, float* dst, int64_t n, int64_t width);
void bf16_to_f32(const uint16_t* src, float* dst, int64_t n);
// f32 to f16 (round to nearest even); returns whether every value converted exactly.
bool f32_to_f16_exact(const float* src, uint16_t* dst, int64_t n);

}  // namespace lowbit::vec
