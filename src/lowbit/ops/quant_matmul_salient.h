// quant_matmul's SalientBinary (ptq161) bodies; internal to ops (quant_matmul.cpp dispatches to
// them). The layout and the arithmetic: quant_matmul.h.
#pragma once
#include <cstdint>
#include <vector>

#include "lowbit/ops/quant_matmul.h"
#include "lowbit/ops/quant_matmul_kernels.h"

namespace lowbit::ops::salient {

// Throws naming `op` when the view's SalientBinary fields are inconsistent (mask count, row bytes).
void check(const PackedWeight& w, const char* op);
// Row r decoded exactly as QuantizedTensor::dequantize_row (bit-identical); the Exact body decodes
// rows with it (f32 tables of the sign bytes would sum in another order than its prefill form).
void decode_row(const PackedWeight& w, int64_t r, float* dst);
// The Int8 body, the whole product (y written, [M, out]): x_b = r_j x_j of the binary columns
// quantized to int8 per block of 32 (as the other layouts), x_s of the salient ones to int16 per
// block of 32 (qmm::SalientActs); binary part through int16 tables of the sign bytes' partial sums,
// salient part by integer products, one parallel region over the weight rows (tables of 8
// activation rows at a time). The portable body;
// int8_simd: the same operand through an x86 row kernel (qmm::avx2_salient_kernel or
// avx2vnni_salient_kernel), equal up to f32 summation order.
void int8_portable(const float* x, int64_t M, const PackedWeight& w, float* y);
#if defined(__x86_64__) || defined(__i386__)
void int8_simd(const float* x, int64_t M, const PackedWeight& w, float* y, qmm::SalientKernel kernel);
// The same operand in the panel kernel's order through qmm::SalientPanel (every row of the weight;
// quant_matmul's int8_panels): the same codes and scales, equal up to f32 summation order.
void int8_panel(const float* x, int64_t M, const PackedWeight& w, float* y, qmm::SalientPanel panel);
// Several weights of one input (quant_matmul_many: q / k / v, gate / up): each operand prepared,
// then the panels of all the products in one parallel region; each product's numbers are int8_panel's.
void int8_panel_many(const float* x, int64_t M, const std::vector<const PackedWeight*>& ws, const std::vector<float*>& ys,
                     qmm::SalientPanel panel);
#endif

// Diagnostic (LOWBIT_PTQ161_ACT_SIM, read once; quant_matmul.h): whether it is set, and x [M, in]
// with the gathered binary (r_j x_j) and salient activations rounded as it says, into out [M, in].
bool act_sim_enabled();
void act_sim(const float* x, int64_t M, const PackedWeight& w, float* out);

}  // namespace lowbit::ops::salient
