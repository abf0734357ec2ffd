// Weight number formats, described once as data (STYLE.md: "One traits table per number format").
// The plain data (ids, traits rows, scalar codecs, packing, ggml block structs) lives in
// core/format_traits.h, which CUDA kernels include too; this header adds the registry and the
// per-kind codec functions.
// Every quantizer, kernel, exporter and checkpoint writer reads the table below; nothing else
// switches on a format's name.
//
// ---- What is quantized ------------------------------------------------------------------------
// A linear weight W [out, in] (y = x W^T). Groups run along the input dimension: group g of row r
// covers W[r, g*G : min((g+1)*G, in)) (the last group may be short when G does not divide `in`).
// Per-channel formats (group_size 0) have one group per row; the per-tensor format (ternary) has one
// logical group per row whose parameters all come from the single tensor scale.
//
// ---- Meaning of a code q (GroupParams {s, z} are the decoded group parameters) -----------------
//   int asym  (intBgG, intBpc)  : w = (q - z) * s, q in [0, 2^B-1], z an integer in [0, 2^B-1].
//                                 Range [min(w,0), max(w,0)] as in GPTQ's Quantizer (zero is exact).
//                                 z may also be a half-integer (exact in f16): ParetoQ's 2-bit SEQ
//                                 grid {-1.5, -0.5, 0.5, 1.5} * s is z = 1.5 (quant/paretoq.h). The
//                                 decode and every kernel take z as a float; only the GPTQ/AWQ
//                                 export layouts (integer zero points) refuse such a tensor.
//   int sym   (intBgGs, intBpcs, int8pc): w = (q - 2^(B-1)) * s, s = absmax / (2^(B-1)-1),
//                                 q in [1, 2^B-1]; code 0 is never produced (symmetric grid).
//   ternary                      : w = (q - 1) * gamma, q in {0,1,2}, gamma = mean|W| over the whole
//                                 tensor (BitNet b1.58, Ma et al. 2024, eq. 1-3: absmean, PER TENSOR,
//                                 floored at 1e-5 as in the reference code).
//   mxfp4  (OCP MX v1.0 §5, §6.3): 32-element blocks, q = sign<<3 | E2M1 magnitude index with
//                                 magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}; w = e2m1(q) * 2^(e-127),
//                                 e the block's E8M0 byte = floor(log2(amax)) - 2 + 127 (emax(E2M1)=2);
//                                 elements beyond 6 after scaling saturate to +-6 (spec behaviour).
//   tp2g128 (PTQTP, Xiao et al. 2025, arXiv 2509.16989): two ternary "trit planes" per weight,
//                                 w = t1 * a1 + t2 * a2, (t1, t2) in {-1,0,1}^2, code q = 3(t2+1) +
//                                 (t1+1) in [0, 8], stored as two 2-bit planes (below; a plane code
//                                 3 is rejected at load),
//                                 a1 = GroupParams.scale (f16 `scales`), a2 = GroupParams.zero (f16
//                                 `zeros`), groups of 128. params_from_range gives the balanced-ternary
//                                 grid a1 = 3 a2, a2 = amax/4; methods/ptqtp.h fits a1, a2 per group.
//   ptq161 (PTQ1.61, Zhao et al. 2025, arXiv 2502.13179; QuantKind::SalientBinary): a column mask
//                                 picks k salient input columns; per row two groups: g = 0 the binary
//                                 columns, w = r_j * (mu + alpha * (2q - 1)), q the sign bit,
//                                 GroupParams {alpha, mu}, r_j the column's f16 factor; g = 1 the
//                                 salient columns, w = (q - z) * s, q 4-bit, GroupParams {s, z}. The
//                                 codec is the binary columns' (params_from_range: mu = the range's
//                                 centre, alpha = half its width); methods/ptq161.h fits everything,
//                                 quantize() has a data-free form (quant/quantize.cpp).
//   onebit (OneBit, Xu et al. 2024, arXiv 2402.11295; QuantKind::SignValue): w_ij = h_i (2q - 1) g_j,
//                                 q the sign bit, h_i the row's f16 value (GroupParams.scale, one group
//                                 per row), g_j the column's f16 value (col_scales). The codec is the
//                                 rows' (g = 1): params_from_range h = max|w|; quant/onebit.h fits h and
//                                 g by SVID (quantize()'s data-free form) and `qat --method onebit`
//                                 trains them.
//   nvfp4  (NVIDIA Blackwell NVFP4): 16-element blocks, same E2M1 codes; w = e2m1(q) * e4m3(b) * t,
//                                 b the block's E4M3 (fn) byte, t the fp32 tensor scale
//                                 t = amax(W) / (6 * 448), e4m3(b) ~ amax(block) / 6 / t.
//
// ---- Storage of a QuantizedTensor (quantized_tensor.h) ---------------------------------------
//   codes        U8 [out, row_bytes(in)]  each row packed on its own, starting on a byte boundary
//   scales       [out, n_groups(in)]      F16 (int), U8 E8M0 (mxfp4), U8 E4M3 (nvfp4); absent (ternary)
//   zeros        F16 [out, n_groups(in)]  integer-valued zero points (asymmetric int only)
//   tensor_scale F32 [1]                  ternary gamma, nvfp4 t; absent otherwise
//   ptq161: col_mask U8 [ceil(in/8)] (bit j % 8 of byte j / 8: column j salient), col_scales F16
//           [in - k] (r_j of the binary columns in column order), scales / zeros F16 [out, 2] =
//           (alpha, s) / (mu, z), codes U8 [out, masked_row_bytes(in, k)]: the sign bits of the
//           binary columns (1 bit each, above's bit order), then the 4-bit codes of the salient
//           columns in column order, each part starting on a byte boundary; padding bits are 0
//           (QuantizedTensor::check_codes). row_bytes(in) is nominal (k = in / 5).
//   onebit: codes U8 [out, ceil(in/8)] (bit j % 8 of byte j / 8: the sign of column j, 1 = +1;
//           padding bits 0), scales F16 [out, 1] = h, col_scales F16 [in] = g; no zeros, no mask.
// Packing of the codes of one row, value i, little-endian bit order; padding bits are zero:
//   8 bits: one per byte.
//   4 bits: two per byte, value 2k in the low nibble of byte k, value 2k+1 in the high nibble.
//   3 bits: 8 values in 3 bytes: the 24-bit word b[3k] | b[3k+1]<<8 | b[3k+2]<<16 holds value 8k+j
//           at bits [3j, 3j+3); a row uses ceil(in/8)*3 bytes.
//   2 bits: four per byte, value 4k+j at bits [2j, 2j+2) of byte k (ternary uses this too).
//   tp2g128: two 2-bit rows: t1 + 1 of every value packed as 2 bits (above) in the first ceil(in/4)
//           bytes, t2 + 1 in the next ceil(in/4); row_bytes = 2 * ceil(in/4). Each plane is then
//           an int2 group row with implicit zero 1 (ops::PackedLayout::TritPlanes runs the 2-bit
//           kernels on each).
//
// ---- ggml block formats (QuantKind::GgmlBlock: q4_0 ... q6_k, tq1_0, tq2_0, iq4_nl, iq4_xs) ----
//   codes        U8 [out, row_bytes(in)]  the raw ggml blocks of each row (core/ggml_blocks.h),
//                                         row_bytes = in / block_size * block_bytes; `in` must be a
//                                         multiple of the block size. No scales/zeros/tensor_scale:
//                                         the block scales live inside the blocks.
//   Values: QuantFormat::dequantize_row (bit-exact with gguf-py's gguf.quants.dequantize);
//   QuantFormat::quantize_row is llama.cpp's reference rounding (quantize_row_*_ref), null for the
//   types lowbit cannot quantize yet.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "lowbit/core/dtype.h"
#include "lowbit/core/format_traits.h"

namespace lowbit {

// Decoded parameters of one group: w = decode(q) with scale s and zero point z (z unused for fp4).
struct GroupParams {
  float scale = 1.0f;
  float zero = 0.0f;
};

struct QuantFormat;

// The per-kind arithmetic. All functions are pure; params passed in must come from params_from_range
// (i.e. be exactly representable in the format's storage). Null for ggml block formats, whose
// arithmetic is per block (dequantize_row / quantize_row below).
struct QuantCodec {
  // Tensor-level scale computed once from all of W (ternary gamma, nvfp4 t); 1 when unused.
  float (*tensor_scale)(const QuantFormat& f, const float* w, int64_t n);
  // Parameters of a group whose values lie in [lo, hi] (the group's min/max, or a clipped range as
  // in AWQ's clipping search). Rounded to what the storage can hold.
  GroupParams (*params_from_range)(const QuantFormat& f, float lo, float hi, float tensor_scale);
  uint8_t (*encode)(const QuantFormat& f, float x, const GroupParams& p);  // quantize given params
  float (*decode)(const QuantFormat& f, uint8_t q, const GroupParams& p);  // dequantize one code
  // encode / decode applied to n consecutive values of one group (q[i] = encode(x[i]), y[i] =
  // decode(q[i])), bit-identical to the per-element calls, without an indirect call per element.
  void (*encode_n)(const QuantFormat& f, const float* x, int64_t n, const GroupParams& p, uint8_t* q);
  void (*decode_n)(const QuantFormat& f, const uint8_t* q, int64_t n, const GroupParams& p, float* y);
};

using PackFn = void (*)(const uint8_t* codes, int64_t n, uint8_t* packed);    // n codes -> row bytes
using UnpackFn = void (*)(const uint8_t* packed, int64_t n, uint8_t* codes);  // row bytes -> n codes
// ggml block formats: one row of `in` values (a multiple of the block size) <-> row_bytes(in) bytes.
using BlockDequantRowFn = void (*)(const uint8_t* row, int64_t in, float* y);
using BlockQuantRowFn = void (*)(const float* x, int64_t in, uint8_t* row);

// A row of the traits table (FormatTraits: the data shared with CUDA) plus the host functions.
struct QuantFormat : FormatTraits {
  const QuantCodec* codec;            // null for ggml block formats
  PackFn pack;                        // null for ggml block formats
  UnpackFn unpack;                    // null for ggml block formats
  BlockDequantRowFn dequantize_row;   // ggml block formats only
  BlockQuantRowFn quantize_row;       // ggml block formats whose reference quantizer exists

  // storage_bytes * 8 / (out * in): bits per weight including all metadata.
  double bits_per_weight(int64_t out, int64_t in) const;
  // Throws lowbit::Error naming `what` when a row of `in` values cannot be stored (ggml blocks:
  // `in` not a multiple of the block size).
  void check_row_length(int64_t in, const std::string& what) const;
};

// The traits table, one row per format, in QuantFormatId order.
std::span<const QuantFormat> all_quant_formats();
const QuantFormat& quant_format(QuantFormatId id);  // throws for an unknown id
// "int4g128", "q4_k" etc. (case-insensitive). Throws lowbit::Error listing the known names.
const QuantFormat& parse_quant_format(std::string_view name);
std::string quant_format_names();  // "int2g32, int2g64, ..." for messages and --help
DType scale_dtype(ScaleType t);  // storage dtype of a per-group scale (F16 or U8)
// The ggml block format of a ggml_type id (GGUF tensor type), or null when lowbit has none.
const QuantFormat* quant_format_for_ggml_type(uint32_t ggml_type);

// Pack/unpack helpers by code width (2, 3, 4 or 8 bits); the table points at these.
int64_t packed_bytes(int bits, int64_t n);
void pack_codes(int bits, const uint8_t* codes, int64_t n, uint8_t* packed);
void unpack_codes(int bits, const uint8_t* packed, int64_t n, uint8_t* codes);

}  // namespace lowbit
