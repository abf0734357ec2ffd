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

// The k-quants' sub-block search (ggml's make_qkx2_quants): asymmetric levels L in [0, nmax] for
// n <= 32 values x with weights w, x ~ scale * L - the_min. Starts from the min/max grid and tries
// nstep+1 widened grids (iscale = (nmax + rmin + rdelta * is) / (max - min)), keeping the one of
// least weighted error (|diff| when use_mad, else diff^2) with its weighted least-squares scale and
// min. Returns the scale; *the_min >= 0. Also used by quant/ggml_grid.cpp (GPTQ's k-quant grids).
float fit_levels_with_min(int n, int nmax, const float* x, const float* w, uint8_t* L, float* the_min, float rmin,
                          float rdelta, int nstep, bool use_mad);

}  // namespace lowbit::ggml
