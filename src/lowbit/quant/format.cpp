#include "lowbit/quant/format.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>

#include "lowbit/core/error.h"
#include "lowbit/quant/ggml_quants.h"

namespace lowbit {

// ---- packing (the shared functions of core/format_traits.h, with checked widths) ---------------

static bool valid_code_width(int bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

int64_t packed_bytes(int bits, int64_t n) {
  if (!valid_code_width(bits))
    throw_error("packed_bytes: unsupported code width ", bits, " bits (expected 2, 3, 4 or 8)");
  return packed_code_bytes(bits, n);
}

template <int B>
static void pack_w(const uint8_t* c, int64_t n, uint8_t* p) {
  pack_code_row(B, c, n, p);
}
template <int B>
static void unpack_w(const uint8_t* p, int64_t n, uint8_t* c) {
  if constexpr (B == 8) {
    std::copy(p, p + n, c);
  } else {
    unpack_code_row(B, p, n, c);
  }
}

void pack_codes(int bits, const uint8_t* codes, int64_t n, uint8_t* packed) {
  if (!valid_code_width(bits)) throw_error("pack_codes: unsupported code width ", bits, " bits");
  pack_code_row(bits, codes, n, packed);
}

void unpack_codes(int bits, const uint8_t* packed, int64_t n, uint8_t* codes) {
  if (!valid_code_width(bits)) throw_error("unpack_codes: unsupported code width ", bits, " bits");
  unpack_code_row(bits, packed, n, codes);
}

// ---- codecs ------------------------------------------------------------------------------------

// Rounds a positive scale UP to the next f16 value, so that the quantization grid always covers the
// group's range (every in-range weight is then within half a step of the grid). A scale too small for
// f16 becomes the smallest subnormal.
static void check_scale_fits(const QuantFormat& f, float s) {
  if (!std::isfinite(s))
    throw_error("[", f.name, "] group scale does not fit in f16 (weights too large: max ~",
                65504.0f * float(f.qmax()), ")");
}

static float unit_tensor_scale(const QuantFormat&, const float*, int64_t) { return 1.0f; }

// Uniform integer (Frantar et al. 2022 / Lin et al. 2023 convention): the range is widened to
// contain 0 so that 0 is exactly representable, as in GPTQ's Quantizer.find_params. The arithmetic
// is core/format_traits.h's int_params_from_range, shared with the CUDA kernels.
static GroupParams int_params(const QuantFormat& f, float lo, float hi, float) {
  const IntParams p = int_params_from_range(f, lo, hi);
  check_scale_fits(f, p.scale);
  return {p.scale, p.zero};
}

static uint8_t int_encode(const QuantFormat& f, float x, const GroupParams& p) {
  return int_code(x, p.scale, p.zero, int_code_min(f), float(f.qmax()));
}

static float int_decode(const QuantFormat&, uint8_t q, const GroupParams& p) { return int_value(q, p.scale, p.zero); }

// Group-wise forms of the two above (the same arithmetic; the bounds and parameters loaded once).
static void int_encode_n(const QuantFormat& f, const float* x, int64_t n, const GroupParams& p, uint8_t* q) {
  const float lo = int_code_min(f), hi = float(f.qmax()), s = p.scale, z = p.zero;
  for (int64_t i = 0; i < n; ++i) q[i] = int_code(x[i], s, z, lo, hi);
}

static void int_decode_n(const QuantFormat&, const uint8_t* q, int64_t n, const GroupParams& p, float* y) {
  const float s = p.scale, z = p.zero;
  for (int64_t i = 0; i < n; ++i) y[i] = int_value(q[i], s, z);
}

// BitNet b1.58: gamma = mean |W| over the tensor (eq. 3), clamped to >= 1e-5 like the reference code.
static float ternary_tensor_scale(const QuantFormat&, const float* w, int64_t n) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::fabs(double(w[i]));
  return std::max(float(n ? sum / double(n) : 0.0), 1e-5f);
}

static GroupParams ternary_params(const QuantFormat&, float, float, float tensor_scale) {
  return {tensor_scale, 1.0f};  // RoundClip(W / gamma, -1, 1) + 1
}

// OCP MX v1.0 §6.3: shared exponent X = floor(log2(amax)) - emax_elem, emax_elem = 2 for E2M1.
static GroupParams mxfp4_params(const QuantFormat&, float lo, float hi, float) {
  float amax = std::max(std::fabs(lo), std::fabs(hi));
  int e = -127;
  if (amax > 0) e = std::clamp(std::ilogb(amax) - 2, -127, 127);
  return {std::ldexp(1.0f, e), 0.0f};
}

// NVFP4: fp32 tensor scale so that the largest block scale maps to the top of E4M3 (448).
static float nvfp4_tensor_scale(const QuantFormat&, const float* w, int64_t n) {
  float amax = 0;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(w[i]));
  return amax > 0 ? amax / (6.0f * 448.0f) : 1.0f;
}

static GroupParams nvfp4_params(const QuantFormat&, float lo, float hi, float t) {
  float amax = std::max(std::fabs(lo), std::fabs(hi));
  float block = e4m3_to_float(float_to_e4m3(amax / 6.0f / t));
  return {block * t, 0.0f};
}

static uint8_t fp4_encode(const QuantFormat&, float x, const GroupParams& p) {
  return p.scale > 0 ? float_to_e2m1(x / p.scale) : uint8_t(0);
}

static float fp4_decode(const QuantFormat&, uint8_t q, const GroupParams& p) { return e2m1_to_float(q) * p.scale; }

// The group-wise forms of the fp4 codecs: the same element functions, called directly in the loop.
static void fp4_encode_n(const QuantFormat& f, const float* x, int64_t n, const GroupParams& p, uint8_t* q) {
  const GroupParams pl = p;
  for (int64_t i = 0; i < n; ++i) q[i] = fp4_encode(f, x[i], pl);
}
static void fp4_decode_n(const QuantFormat& f, const uint8_t* q, int64_t n, const GroupParams& p, float* y) {
  const GroupParams pl = p;
  for (int64_t i = 0; i < n; ++i) y[i] = fp4_decode(f, q[i], pl);
}

// Trit planes (PTQTP): w = t1 * a1 + t2 * a2, (t1, t2) in {-1, 0, 1}^2 named by the code
// q = 3 * (t2 + 1) + (t1 + 1). From a range alone (RTN, the GPTQ/AWQ grids) the two scales are
// a1 = 3 * a2, a2 = amax / 4: the nine values are then the uniform grid {-4 .. 4} * a2 (balanced
// ternary), which covers [-amax, amax]. PTQTP (methods/ptqtp.h) fits a1, a2 per group instead.
static GroupParams tp_params(const QuantFormat& f, float lo, float hi, float) {
  float a = std::max(std::fabs(lo), std::fabs(hi));
  if (a == 0.0f) a = 1.0f;
  const float a2 = f16_scale_up(a / 4.0f);
  const float a1 = f16_scale_up(3.0f * a2);
  check_scale_fits(f, a1);
  return {a1, a2};
}

// The nearest of the nine values (ties: the lower code). Exact minimiser of |x - t1 a1 - t2 a2|
// for any a1, a2 (the trit step of PTQTP).
static uint8_t tp_encode(const QuantFormat&, float x, const GroupParams& p) {
  uint8_t best = 4;
  float best_err = std::fabs(x);
  for (uint8_t q = 0; q < 9; ++q) {
    const float e = std::fabs(x - trit_pair_value(q, p.scale, p.zero));
    if (e < best_err) best_err = e, best = q;
  }
  return best;
}

static float tp_decode(const QuantFormat&, uint8_t q, const GroupParams& p) { return trit_pair_value(q, p.scale, p.zero); }

static void tp_encode_n(const QuantFormat& f, const float* x, int64_t n, const GroupParams& p, uint8_t* q) {
  for (int64_t i = 0; i < n; ++i) q[i] = tp_encode(f, x[i], p);
}
static void tp_decode_n(const QuantFormat&, const uint8_t* q, int64_t n, const GroupParams& p, float* y) {
  const float a1 = p.scale, a2 = p.zero;
  for (int64_t i = 0; i < n; ++i) y[i] = trit_pair_value(q[i], a1, a2);
}

// Trit-plane rows (format.h): the pair codes of a row as two 2-bit planes, t1 + 1 for the whole row
// in the first ceil(n/4) bytes, t2 + 1 in the next ceil(n/4).
static void tp_pack(const uint8_t* codes, int64_t n, uint8_t* packed) {
  const int64_t half = (n + 3) / 4;
  std::fill(packed, packed + 2 * half, uint8_t(0));
  for (int64_t i = 0; i < n; ++i) {
    const int sh = int(2 * (i % 4));
    packed[i / 4] = uint8_t(packed[i / 4] | (codes[i] % 3) << sh);
    packed[half + i / 4] = uint8_t(packed[half + i / 4] | (codes[i] / 3 & 3) << sh);
  }
}
// Codes 3 in a plane (never written) come out as pair codes above 8 (QuantizedTensor::check_codes
// rejects them at load; decoding one reads nothing outside the row).
static void tp_unpack(const uint8_t* packed, int64_t n, uint8_t* codes) {
  const int64_t half = (n + 3) / 4;
  for (int64_t i = 0; i < n; ++i) {
    const int sh = int(2 * (i % 4));
    codes[i] = uint8_t(3 * (packed[half + i / 4] >> sh & 3) + (packed[i / 4] >> sh & 3));
  }
}

// PTQ1.61 (SalientBinary), the binary columns' codec: code 1 = +1, 0 = -1 around the row mean mu,
// w = mu + alpha * (2q - 1) (times the column factor r_j, which the tensor applies: 1 here). From a
// range alone: mu = the range's centre, alpha = half its width (both rounded to f16). The salient
// columns use the int4 asymmetric arithmetic (int_params / int_value with qmax 15); methods/ptq161.h
// fits every factor from calibration data.
static GroupParams sb_params(const QuantFormat& f, float lo, float hi, float) {
  const float alpha = f16_to_f32(f32_to_f16(0.5f * (hi - lo))), mu = f16_to_f32(f32_to_f16(0.5f * (hi + lo)));
  check_scale_fits(f, alpha);
  return {alpha, mu};
}
static uint8_t sb_encode(const QuantFormat&, float x, const GroupParams& p) { return x >= p.zero ? 1 : 0; }
static float sb_decode(const QuantFormat&, uint8_t q, const GroupParams& p) {
  return salient_binary_value(q != 0, 1.0f, p.scale, p.zero);
}
static void sb_encode_n(const QuantFormat& f, const float* x, int64_t n, const GroupParams& p, uint8_t* q) {
  for (int64_t i = 0; i < n; ++i) q[i] = sb_encode(f, x[i], p);
}
static void sb_decode_n(const QuantFormat& f, const uint8_t* q, int64_t n, const GroupParams& p, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = sb_decode(f, q[i], p);
}
// One bit per code (bit i % 8 of byte i / 8): the sign bits of a SalientBinary row's binary columns.
static void pack_bits(const uint8_t* codes, int64_t n, uint8_t* packed) {
  std::fill(packed, packed + (n + 7) / 8, uint8_t(0));
  for (int64_t i = 0; i < n; ++i)
    if (codes[i]) packed[i / 8] = uint8_t(packed[i / 8] | 1u << (i % 8));
}
static void unpack_bits(const uint8_t* packed, int64_t n, uint8_t* codes) {
  for (int64_t i = 0; i < n; ++i) codes[i] = uint8_t(packed[i / 8] >> (i % 8) & 1);
}

// OneBit (SignValue): code 1 = +1, 0 = -1, w = h * (2q - 1) (times the column value g_j, which the
// tensor applies: 1 here). From a range alone: h = max(|lo|, |hi|) rounded up to f16 (every value
// then lies in [-h, h]); quant/onebit.h fits h and g by SVID instead (rank-1 of |W|).
static GroupParams sv_params(const QuantFormat& f, float lo, float hi, float) {
  float h = std::max(std::fabs(lo), std::fabs(hi));
  if (h == 0.0f) h = 1.0f;
  h = f16_scale_up(h);
  check_scale_fits(f, h);
  return {h, 0.0f};
}
static uint8_t sv_encode(const QuantFormat&, float x, const GroupParams&) { return x >= 0.0f ? 1 : 0; }
static float sv_decode(const QuantFormat&, uint8_t q, const GroupParams& p) { return sign_value_value(q != 0, p.scale, 1.0f); }
static void sv_encode_n(const QuantFormat& f, const float* x, int64_t n, const GroupParams& p, uint8_t* q) {
  for (int64_t i = 0; i < n; ++i) q[i] = sv_encode(f, x[i], p);
}
static void sv_decode_n(const QuantFormat& f, const uint8_t* q, int64_t n, const GroupParams& p, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = sv_decode(f, q[i], p);
}

static constexpr QuantCodec kIntAsymCodec{unit_tensor_scale, int_params, int_encode, int_decode, int_encode_n,
                                          int_decode_n};
static constexpr QuantCodec kIntSymCodec{unit_tensor_scale, int_params, int_encode, int_decode, int_encode_n,
                                         int_decode_n};
static constexpr QuantCodec kTernaryCodec{ternary_tensor_scale, ternary_params, int_encode, int_decode, int_encode_n,
                                          int_decode_n};
static constexpr QuantCodec kMxfp4Codec{unit_tensor_scale, mxfp4_params, fp4_encode, fp4_decode, fp4_encode_n,
                                        fp4_decode_n};
static constexpr QuantCodec kNvfp4Codec{nvfp4_tensor_scale, nvfp4_params, fp4_encode, fp4_decode, fp4_encode_n,
                                        fp4_decode_n};
static constexpr QuantCodec kTritPlaneCodec{unit_tensor_scale, tp_params, tp_encode, tp_decode, tp_encode_n, tp_decode_n};
static constexpr QuantCodec kSalientBinaryCodec{unit_tensor_scale, sb_params, sb_encode, sb_decode, sb_encode_n,
                                                sb_decode_n};
static constexpr QuantCodec kSignValueCodec{unit_tensor_scale, sv_params, sv_encode, sv_decode, sv_encode_n, sv_decode_n};

// ---- the table -----------------------------------------------------------------------------------

static constexpr PackFn pack_fn(int bits) {
  return bits == 2 ? pack_w<2> : bits == 3 ? pack_w<3> : bits == 4 ? pack_w<4> : pack_w<8>;
}
static constexpr UnpackFn unpack_fn(int bits) {
  return bits == 2 ? unpack_w<2> : bits == 3 ? unpack_w<3> : bits == 4 ? unpack_w<4> : unpack_w<8>;
}

static constexpr QuantFormat int_format(QuantFormatId id, const char* name, int bits, int64_t group, bool sym) {
  return QuantFormat{{id, name, sym ? QuantKind::IntSym : QuantKind::IntAsym, bits,
                      group ? ScaleGranularity::PerGroup : ScaleGranularity::PerChannel, group, ScaleType::F16, !sym,
                      false, 0, -1},
                     sym ? &kIntSymCodec : &kIntAsymCodec,
                     pack_fn(bits),
                     unpack_fn(bits),
                     nullptr,
                     nullptr};
}

template <class B, int QK>
static void ggml_dequant_row(const uint8_t* row, int64_t in, float* y) {
  ggml::dequantize_blocks<B>(row, in / QK, QK, y);
}

// A ggml block format: `bits` is the width of the quant index, `qk` the block size.
template <class B, int QK>
static constexpr QuantFormat ggml_format(QuantFormatId id, const char* name, int bits, int ggml_type,
                                         BlockQuantRowFn quantize) {
  return QuantFormat{{id, name, QuantKind::GgmlBlock, bits, ScaleGranularity::PerGroup, QK, ScaleType::None, false,
                      false, int(sizeof(B)), ggml_type},
                     nullptr,
                     nullptr,
                     nullptr,
                     ggml_dequant_row<B, QK>,
                     quantize};
}

using Id = QuantFormatId;
namespace g = ggml;
static constexpr QuantFormat kFormats[] = {
    int_format(Id::Int2G32, "int2g32", 2, 32, false),
    int_format(Id::Int2G64, "int2g64", 2, 64, false),
    int_format(Id::Int2G128, "int2g128", 2, 128, false),
    int_format(Id::Int2PC, "int2pc", 2, 0, false),
    int_format(Id::Int3G32, "int3g32", 3, 32, false),
    int_format(Id::Int3G64, "int3g64", 3, 64, false),
    int_format(Id::Int3G128, "int3g128", 3, 128, false),
    int_format(Id::Int3PC, "int3pc", 3, 0, false),
    int_format(Id::Int4G32, "int4g32", 4, 32, false),
    int_format(Id::Int4G64, "int4g64", 4, 64, false),
    int_format(Id::Int4G128, "int4g128", 4, 128, false),
    int_format(Id::Int4PC, "int4pc", 4, 0, false),
    int_format(Id::Int2G32S, "int2g32s", 2, 32, true),
    int_format(Id::Int2G64S, "int2g64s", 2, 64, true),
    int_format(Id::Int2G128S, "int2g128s", 2, 128, true),
    int_format(Id::Int2PCS, "int2pcs", 2, 0, true),
    int_format(Id::Int3G32S, "int3g32s", 3, 32, true),
    int_format(Id::Int3G64S, "int3g64s", 3, 64, true),
    int_format(Id::Int3G128S, "int3g128s", 3, 128, true),
    int_format(Id::Int3PCS, "int3pcs", 3, 0, true),
    int_format(Id::Int4G32S, "int4g32s", 4, 32, true),
    int_format(Id::Int4G64S, "int4g64s", 4, 64, true),
    int_format(Id::Int4G128S, "int4g128s", 4, 128, true),
    int_format(Id::Int4PCS, "int4pcs", 4, 0, true),
    int_format(Id::Int8PC, "int8pc", 8, 0, true),
    {{Id::Ternary, "ternary", QuantKind::Ternary, 2, ScaleGranularity::PerTensor, 0, ScaleType::None, false, true, 0,
      -1},
     &kTernaryCodec, pack_w<2>, unpack_w<2>, nullptr, nullptr},
    {{Id::MXFP4, "mxfp4", QuantKind::FP4_MX, 4, ScaleGranularity::PerGroup, 32, ScaleType::E8M0, false, false, 0, -1},
     &kMxfp4Codec, pack_w<4>, unpack_w<4>, nullptr, nullptr},
    {{Id::NVFP4, "nvfp4", QuantKind::FP4_NV, 4, ScaleGranularity::PerGroup, 16, ScaleType::E4M3, false, true, 0, -1},
     &kNvfp4Codec, pack_w<4>, unpack_w<4>, nullptr, nullptr},
    ggml_format<g::block_q4_0, g::QK4_0>(Id::Q4_0, "q4_0", 4, 2, ggml::quantize_row_q4_0),
    ggml_format<g::block_q4_1, g::QK4_1>(Id::Q4_1, "q4_1", 4, 3, ggml::quantize_row_q4_1),
    ggml_format<g::block_q5_0, g::QK5_0>(Id::Q5_0, "q5_0", 5, 6, ggml::quantize_row_q5_0),
    ggml_format<g::block_q5_1, g::QK5_1>(Id::Q5_1, "q5_1", 5, 7, ggml::quantize_row_q5_1),
    ggml_format<g::block_q8_0, g::QK8_0>(Id::Q8_0, "q8_0", 8, 8, ggml::quantize_row_q8_0),
    ggml_format<g::block_q2_K, g::QK_K>(Id::Q2_K, "q2_k", 2, 10, ggml::quantize_row_q2_k),
    ggml_format<g::block_q3_K, g::QK_K>(Id::Q3_K, "q3_k", 3, 11, ggml::quantize_row_q3_k),
    ggml_format<g::block_q4_K, g::QK_K>(Id::Q4_K, "q4_k", 4, 12, ggml::quantize_row_q4_k),
    ggml_format<g::block_q5_K, g::QK_K>(Id::Q5_K, "q5_k", 5, 13, ggml::quantize_row_q5_k),
    ggml_format<g::block_q6_K, g::QK_K>(Id::Q6_K, "q6_k", 6, 14, ggml::quantize_row_q6_k),
    ggml_format<g::block_tq1_0, g::QK_K>(Id::TQ1_0, "tq1_0", 2, 34, ggml::quantize_row_tq1_0),
    ggml_format<g::block_tq2_0, g::QK_K>(Id::TQ2_0, "tq2_0", 2, 35, ggml::quantize_row_tq2_0),
    ggml_format<g::block_iq4_nl, g::QK4_NL>(Id::IQ4_NL, "iq4_nl", 4, 20, ggml::quantize_row_iq4_nl),
    ggml_format<g::block_iq4_xs, g::QK_K>(Id::IQ4_XS, "iq4_xs", 4, 23, ggml::quantize_row_iq4_xs),
    // PTQTP's two trit planes: two 2-bit planes per row, a1 in `scales`, a2 in `zeros` (both f16 per
    // group of 128, the paper's group size): 4 + 32/128 = 4.25 bits per weight as stored here.
    {{Id::TP2G128, "tp2g128", QuantKind::TritPlanes, 4, ScaleGranularity::PerGroup, 128, ScaleType::F16, true, false,
      0, -1},
     &kTritPlaneCodec, tp_pack, tp_unpack, nullptr, nullptr},
    // PTQ1.61: a column mask, sign bits of the binary columns and 4-bit codes of the salient ones per
    // row, (alpha, s) in `scales` and (mu, z) in `zeros` ([out, 2] f16), r_j in `col_scales`. `bits` 1
    // and the codec/pack functions are the binary columns'; the salient columns are int4 asymmetric.
    // At 20 % salient columns of a 4096-wide row: 1.62 bits per weight.
    {{Id::PTQ161, "ptq161", QuantKind::SalientBinary, 1, ScaleGranularity::PerChannel, 0, ScaleType::F16, true, false,
      0, -1},
     &kSalientBinaryCodec, pack_bits, unpack_bits, nullptr, nullptr},
    // Asymmetric int8 groups (one byte a code): the parent format of Matryoshka checkpoints, whose
    // r-bit models are the codes' top bits (quant/matryoshka.h); 8.5 bits per weight at g64.
    int_format(Id::Int8G32, "int8g32", 8, 32, false),
    int_format(Id::Int8G64, "int8g64", 8, 64, false),
    int_format(Id::Int8G128, "int8g128", 8, 128, false),
    // OneBit: one sign bit per weight, h in `scales` ([out, 1] f16), g in `col_scales` ([in] f16):
    // 1 + 16/in + 16/out bits per weight (1.02 at 4096 x 4096; 1.50 at stories260K's 64 x 64).
    {{Id::OneBit, "onebit", QuantKind::SignValue, 1, ScaleGranularity::PerChannel, 0, ScaleType::F16, false, false, 0,
      -1},
     &kSignValueCodec, pack_bits, unpack_bits, nullptr, nullptr},
};

const QuantFormat* quant_format_for_ggml_type(uint32_t ggml_type) {
  for (const auto& f : kFormats)
    if (f.is_ggml_block() && uint32_t(f.ggml_type) == ggml_type) return &f;
  return nullptr;
}

std::span<const QuantFormat> all_quant_formats() { return kFormats; }

const QuantFormat& quant_format(QuantFormatId id) {
  for (const auto& f : kFormats)
    if (f.id == id) return f;
  throw_error("unknown quantization format id ", int(id), " (this build knows ids 1..",
              int(kFormats[std::size(kFormats) - 1].id), ")");
}

std::string quant_format_names() {
  std::string s;
  for (const auto& f : kFormats) s += (s.empty() ? "" : ", ") + std::string(f.name);
  return s;
}

const QuantFormat& parse_quant_format(std::string_view name) {
  std::string lower(name);
  for (auto& c : lower) c = char(std::tolower(static_cast<unsigned char>(c)));
  for (const auto& f : kFormats)
    if (lower == f.name) return f;
  throw_error("unknown quantization format '", name, "' (expected one of: ", quant_format_names(), ")");
}

DType scale_dtype(ScaleType t) {
  switch (t) {
    case ScaleType::F16: return DType::F16;
    case ScaleType::E8M0:
    case ScaleType::E4M3: return DType::U8;
    case ScaleType::None: break;
  }
  throw_error("scale_dtype: format has no per-group scale");
}

// ---- QuantFormat members ------------------------------------------------------------------------

double QuantFormat::bits_per_weight(int64_t out, int64_t in) const {
  LB_CHECK(out > 0 && in > 0, "[", name, "] bits_per_weight of an empty [", out, ", ", in, "] weight");
  check_row_length(in, std::string("bits_per_weight"));
  return double(storage_bytes(out, in)) * 8.0 / double(out * in);
}

void QuantFormat::check_row_length(int64_t in, const std::string& what) const {
  if (!row_fits(in))
    throw_error(what, ": [", name, "] rows of ", in, " values are not a multiple of the block size ", group_size);
}

}  // namespace lowbit
