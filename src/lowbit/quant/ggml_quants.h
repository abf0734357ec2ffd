// Reference quantizers of ggml block formats (llama.cpp's quantize_row_*_ref rounding; bit-exact
// with gguf-py's gguf.quants.quantize for the types both have). One row of `in` values, `in` a
// multiple of the block size (the caller checks), into in / QK blocks. The table of format.cpp
// points at these; the k-quants and iq4 quantizers (whose references search scales iteratively)
// are not written yet, so those rows have no quantize_row.
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

}  // namespace lowbit::ggml
