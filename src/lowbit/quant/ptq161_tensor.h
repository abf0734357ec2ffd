// Building PTQ1.61 weights (methods/ptq161.h) in the format table's `ptq161` format
// (QuantFormatId::PTQ161, QuantKind::SalientBinary: core/format_traits.h and quant/format.h document
// the values and the storage), and reading the container of earlier lowbit versions.
//
// Per weight W[i, j], k = number of salient columns:
//   salient column j : (q - z_i) * s_i             q = 4-bit code, s_i, z_i f16 (int4pc arithmetic)
//   other column j   : r_j * (mu_i + alpha_i * b)  b = +1 / -1 from the sign bit
// QuantizedTensor fields: col_mask U8 [ceil(in/8)], codes U8 [out, ceil((in-k)/8) + ceil(k/2)]
// (sign bits, then 4-bit codes), scales F16 [out, 2] = (alpha_i, s_i), zeros F16 [out, 2] =
// (mu_i, z_i), col_scales F16 [in - k] = r_j. The layer is a QuantLinear: inference runs
// ops::quant_matmul's SalientBinary bodies on the packed codes.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "lowbit/core/tensor.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

// Packs unpacked fields (row-major): mask [in] (0/1), sign [out*in] (+-1 on non-salient columns,
// ignored elsewhere), q4 [out*in] (codes 0..15 on salient columns, ignored elsewhere), alpha, mu,
// s4, z4 [out] and col [in] (used on non-salient columns); every factor is rounded to f16.
QuantizedTensor pack_ptq161(int64_t out, int64_t in, const std::vector<uint8_t>& mask, const std::vector<int8_t>& sign,
                            const std::vector<uint8_t>& q4, const std::vector<double>& alpha,
                            const std::vector<double>& mu, const std::vector<float>& s4, const std::vector<float>& z4,
                            const std::vector<double>& col);

// The five tensors of the container that earlier lowbit versions wrote for a ptq161 layer
// (`<m>.ptq161_{mask,signs,q4,rows,cols}`: mask U8 [ceil(in/8)], signs U8 [out, ceil((in-k)/8)],
// q4 U8 [out, ceil(k/2)], rows F16 [out, 4] = (alpha, mu, s, z), cols F16 [in-k]) as the equivalent
// `ptq161` QuantizedTensor (the same bits, rearranged). Checks dtypes, shapes and padding bits;
// throws lowbit::Error naming `what` and the field.
QuantizedTensor ptq161_from_legacy(int64_t out, int64_t in, const Tensor& mask, const Tensor& signs, const Tensor& q4,
                                   const Tensor& rows, const Tensor& cols, const std::string& what);

}  // namespace lowbit
