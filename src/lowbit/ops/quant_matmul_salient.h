// quant_matmul's SalientBinary (ptq161) bodies; internal to ops (quant_matmul.cpp dispatches to
// them). The layout and the arithmetic: quant_matmul.h.
#pragma once
#include <cstdint>

#include "lowbit/ops/quant_matmul.h"

namespace lowbit::ops::salient {

// Throws naming `op` when the view's SalientBinary fields are inconsistent (mask count, row bytes).
void check(const PackedWeight& w, const char* op);
// Row r decoded exactly as QuantizedTensor::dequantize_row (bit-identical).
void decode_row(const PackedWeight& w, int64_t r, float* dst);
// f32 activations, per-call lookup tables (any M; quant_matmul uses it for M <= 8).
void exact_body(const float* x, int64_t M, const PackedWeight& w, float* y);
// int8 activations per block of 32 (binary part: r_j x_j over the binary columns; salient part: x_j).
void int8_body(const float* x, int64_t M, const PackedWeight& w, float* y);

}  // namespace lowbit::ops::salient
