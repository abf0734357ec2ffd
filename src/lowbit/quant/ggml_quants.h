// Reference quantizers of ggml block formats (llama.cpp's quantize_row_*_ref rounding; bit-exact
// with gguf-py's gguf.quants.quantize for the types both have). One row of `in` values, `in` a
// multiple of the block size (the caller checks), into in / QK blocks. The table of format.cpp
// points at these. The k-quant and iq4 ones follow the reference without an importance matrix.
#pragma once
#include <cstdint>

namespace lowbit::ggml {

void quantize_row_q4_0(const float* x, int64_t in, uint8_t* row);
void quantize_row_q4_1(const float* x, int64_t in, uint8_t* row);
void quantize_row_q5_0(const float* x, int64_t in, uint8_t* row);
void quantize_row_q5_1(const float* x, int64_t in, uint8_t* row);
void quantize_row_q8_0(const float* x, int64_t in, uint8_t* row);
void quantize_row_tq1_0(const float* x, int64_t in, uint8_t* row);
void quantize_row_tq2_0(const float* x, int64_t in, uint8_t* row);
void quantize_row_q2_k(const float* x, int64_t in, uint8_t* row);
void quantize_row_q3_k(const float* x, int64_t in, uint8_t* row);
void quantize_row_q4_k(const float* x, int64_t in, uint8_t* row);
void quantize_row_q5_k(const float* x, int64_t in, uint8_t* row);
void quantize_row_q6_k(const float* x, int64_t in, uint8_t* row);
void quantize_row_iq4_nl(const float* x, int64_t in, uint8_t* row);
void quantize_row_iq4_xs(const float* x, int64_t in, uint8_t* row);

}  // namespace lowbit::ggml
