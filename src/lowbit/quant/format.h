// Weight number formats, described once as data (STYLE.md: "One traits table per number format").
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
//   int sym   (intBgGs, intBpcs, int8pc): w = (q - 2^(B-1)) * s, s = absmax / (2^(B-1)-1),
//                                 q in [1, 2^B-1]; code 0 is never produced (symmetric grid).
//   ternary                      : w = (q - 1) * gamma, q in {0,1,2}, gamma = mean|W| over the whole
//                                 tensor (BitNet b1.58, Ma et al. 2024, eq. 1-3: absmean, PER TENSOR,
//                                 floored at 1e-5 as in the reference code).
//   mxfp4  (OCP MX v1.0 §5, §6.3): 32-element blocks, q = sign<<3 | E2M1 magnitude index with
//                                 magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}; w = e2m1(q) * 2^(e-127),
//                                 e the block's E8M0 byte = floor(log2(amax)) - 2 + 127 (emax(E2M1)=2);
//                                 elements beyond 6 after scaling saturate to +-6 (spec behaviour).
//   nvfp4  (NVIDIA Blackwell NVFP4): 16-element blocks, same E2M1 codes; w = e2m1(q) * e4m3(b) * t,
//                                 b the block's E4M3 (fn) byte, t the fp32 tensor scale
//                                 t = amax(W) / (6 * 448), e4m3(b) ~ amax(block) / 6 / t.
//
// ---- Storage of a QuantizedTensor (quantized_tensor.h) ---------------------------------------
//   codes        U8 [out, row_bytes(in)]  each row packed on its own, starting on a byte boundary
//   scales       [out, n_groups(in)]      F16 (int), U8 E8M0 (mxfp4), U8 E4M3 (nvfp4); absent (ternary)
//   zeros        F16 [out, n_groups(in)]  integer-valued zero points (asymmetric int only)
//   tensor_scale F32 [1]                  ternary gamma, nvfp4 t; absent otherwise
// Packing of the codes of one row, value i, little-endian bit order; padding bits are zero:
//   8 bits: one per byte.
//   4 bits: two per byte, value 2k in the low nibble of byte k, value 2k+1 in the high nibble.
//   3 bits: 8 values in 3 bytes: the 24-bit word b[3k] | b[3k+1]<<8 | b[3k+2]<<16 holds value 8k+j
//           at bits [3j, 3j+3); a row uses ceil(in/8)*3 bytes.
//   2 bits: four per byte, value 4k+j at bits [2j, 2j+2) of byte k (ternary uses this too).
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "lowbit/core/dtype.h"

namespace lowbit {

// Stable identifiers (they are written to checkpoints): never reuse or renumber a value.
enum class QuantFormatId : uint16_t {
  // asymmetric uniform integer, f16 scale + f16 zero per group
  Int2G32 = 1, Int2G64 = 2, Int2G128 = 3, Int2PC = 4,
  Int3G32 = 5, Int3G64 = 6, Int3G128 = 7, Int3PC = 8,
  Int4G32 = 9, Int4G64 = 10, Int4G128 = 11, Int4PC = 12,
  // symmetric uniform integer, f16 scale per group
  Int2G32S = 13, Int2G64S = 14, Int2G128S = 15, Int2PCS = 16,
  Int3G32S = 17, Int3G64S = 18, Int3G128S = 19, Int3PCS = 20,
  Int4G32S = 21, Int4G64S = 22, Int4G128S = 23, Int4PCS = 24,
  Int8PC = 25,  // symmetric int8, one f16 scale per output channel
  Ternary = 26,
  MXFP4 = 27,
  NVFP4 = 28,
};

enum class QuantKind : uint8_t { IntAsym, IntSym, Ternary, FP4_MX, FP4_NV };
enum class ScaleGranularity : uint8_t { PerTensor, PerChannel, PerGroup };
// How the per-group scale is stored. None: no per-group scale (ternary).
enum class ScaleType : uint8_t { None, F16, E8M0, E4M3 };

// Decoded parameters of one group: w = decode(q) with scale s and zero point z (z unused for fp4).
struct GroupParams {
  float scale = 1.0f;
  float zero = 0.0f;
};

struct QuantFormat;

// The per-kind arithmetic. All functions are pure; params passed in must come from params_from_range
// (i.e. be exactly representable in the format's storage).
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

struct QuantFormat {
  QuantFormatId id;
  const char* name;  // "int4g128", "int4g128s", "int8pc", "ternary", "mxfp4", "nvfp4"
  QuantKind kind;
  int bits;                      // bits per stored code
  ScaleGranularity granularity;
  int64_t group_size;            // along `in`; 0 = one group per output channel (or per tensor)
  ScaleType scale_type;          // per-group scale storage
  bool has_zero;                 // per-group f16 zero point
  bool has_tensor_scale;         // one f32 scale for the whole tensor
  const QuantCodec* codec;
  PackFn pack;
  UnpackFn unpack;

  // Largest code value produced (2^bits-1, or 2 for ternary).
  int qmax() const;
  // Number of groups in a row of `in` values and the [begin, end) columns of group g.
  int64_t n_groups(int64_t in) const;
  int64_t group_begin(int64_t g) const;
  int64_t group_end(int64_t g, int64_t in) const;
  int64_t group_of_column(int64_t col) const;
  int64_t row_bytes(int64_t in) const;  // packed bytes per row of `in` codes
  // Bits of metadata per group (scale + zero), excluding the per-tensor scale.
  int metadata_bits_per_group() const;
  // Exact storage (codes, scales, zeros, tensor scale) of an [out, in] weight.
  int64_t storage_bytes(int64_t out, int64_t in) const;
  // storage_bytes * 8 / (out * in): bits per weight including all metadata.
  double bits_per_weight(int64_t out, int64_t in) const;
};

// The traits table, one row per format, in QuantFormatId order.
std::span<const QuantFormat> all_quant_formats();
const QuantFormat& quant_format(QuantFormatId id);  // throws for an unknown id
// "int4g128" etc. (case-insensitive). Throws lowbit::Error listing the known names.
const QuantFormat& parse_quant_format(std::string_view name);
std::string quant_format_names();  // "int2g32, int2g64, ..." for messages and --help
DType scale_dtype(ScaleType t);  // storage dtype of a per-group scale (F16 or U8)

// ---- Element encodings shared with kernels ---------------------------------------------------
// E2M1: 4-bit code (sign bit 3) <-> float; encode rounds to nearest, ties to the even code, and
// saturates at +-6.
float e2m1_to_float(uint8_t code);
uint8_t float_to_e2m1(float x);
// E4M3 "fn" (no infinities, max 448, 0x7f/0xff NaN): decode, and encode with round to nearest
// even and saturation to +-448. Only used for non-negative scales here.
float e4m3_to_float(uint8_t code);
uint8_t float_to_e4m3(float x);
// E8M0: unsigned biased exponent (bias 127), 2^(e-127); 0xff is NaN.
float e8m0_to_float(uint8_t e);

// Pack/unpack helpers by code width (2, 3, 4 or 8 bits); the table points at these.
int64_t packed_bytes(int bits, int64_t n);
void pack_codes(int bits, const uint8_t* codes, int64_t n, uint8_t* packed);
void unpack_codes(int bits, const uint8_t* packed, int64_t n, uint8_t* codes);

}  // namespace lowbit
