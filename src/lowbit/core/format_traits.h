// The number-format description shared by host code (g++, C++20) and CUDA kernels (nvcc, C++17):
// format identifiers, the traits row of every format (bits, group size, scale/zero storage),
// the scalar codecs (f16, bf16, E2M1 with nearest and stochastic rounding, E4M3, E5M2, E8M0), packing of lowbit's codes, the uniform integer
// codec and the ggml block structs. quant/format.h adds the registry (names, parsing) and the codec
// function pointers on top; the storage layout of every format is documented there.
//
// Everything here is C++17, header-only, free of <span>/exceptions, and callable from device code
// (LB_HD expands to __host__ __device__ under nvcc). A kernel receives the FormatTraits row by
// value (it is trivially copyable) and calls the same functions the CPU reference uses.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LB_HD __host__ __device__
#define LB_HD_INLINE __host__ __device__ __forceinline__
#else
#define LB_HD
#define LB_HD_INLINE inline
#endif

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
  // ggml block formats (the raw blocks of llama.cpp / GGUF, see the structs below)
  Q4_0 = 29, Q4_1 = 30, Q5_0 = 31, Q5_1 = 32, Q8_0 = 33,
  Q2_K = 34, Q3_K = 35, Q4_K = 36, Q5_K = 37, Q6_K = 38,
  TQ1_0 = 39, TQ2_0 = 40, IQ4_NL = 41, IQ4_XS = 42,
  // two ternary planes per weight with two f16 scales per group (PTQTP, Xiao et al. 2025)
  TP2G128 = 43,
  // salient input columns at 4 bits, the rest binarized with row and column factors (PTQ1.61,
  // Zhao et al. 2025): a per-tensor column mask picks the code width of each column
  PTQ161 = 44,
  // asymmetric int8, f16 scale + f16 zero per group: the parent codes of Matryoshka models
  // (MatQuant, Nair et al. 2025, quant/matryoshka.h), whose int4/int2 models are their top bits
  Int8G32 = 45, Int8G64 = 46, Int8G128 = 47,
  // one sign bit per weight with an f16 value per output row and per input column (OneBit, Xu et
  // al. 2024, arXiv 2402.11295): W ~ diag(h) sign(W) diag(g)
  OneBit = 48,
};

// GgmlBlock: the codes tensor holds whole ggml blocks (scales inside), no scales/zeros tensors.
// TritPlanes: a code q in [0, 8] names the pair (t1, t2) = (q % 3 - 1, q / 3 - 1) of two ternary
// planes; w = t1 * a1 + t2 * a2 with the group's two f16 scales (a1 in `scales`, a2 in `zeros`).
// Stored as two 2-bit planes per row (row_bytes below): t1 + 1 for the whole row, then t2 + 1.
// SalientBinary (PTQ1.61): a column mask (QuantizedTensor::col_mask, one bit per input column) says
// which columns are salient. Each row has two "groups" of parameters: group 0 the binary columns
// (scale alpha, zero mu), group 1 the salient columns (scale s, zero z of a 4-bit asymmetric code);
// a binary column j also has its own f16 factor r_j (QuantizedTensor::col_scales). Values:
//   binary column j  : r_j * (mu + alpha * b),  b = +1 (sign bit 1) or -1 (sign bit 0)
//   salient column j : (q - z) * s,              q the column's 4-bit code
// A row of the codes holds the sign bits of the binary columns (bit t of byte t / 8: the t-th binary
// column), then the 4-bit codes of the salient columns in column order (low nibble first), each part
// starting on a byte boundary: masked_row_bytes(in, k) with k salient columns.
// SignValue (OneBit): w_ij = h_i * (2 q_ij - 1) * g_j, q_ij the sign bit (bit j % 8 of byte j / 8 of
// row i, 1 = +1), h_i the row's f16 value (`scales`, one group per row), g_j the column's f16 value
// (QuantizedTensor::col_scales, [in]). Rows of ceil(in / 8) bytes, padding bits 0.
enum class QuantKind : uint8_t {
  IntAsym, IntSym, Ternary, FP4_MX, FP4_NV, GgmlBlock, TritPlanes, SalientBinary, SignValue
};
enum class ScaleGranularity : uint8_t { PerTensor, PerChannel, PerGroup };
// How the per-group scale is stored. None: no per-group scale tensor (ternary, ggml blocks).
enum class ScaleType : uint8_t { None, F16, E8M0, E4M3 };

// One row of the format table: plain data plus the size arithmetic every user needs.
struct FormatTraits {
  QuantFormatId id;
  const char* name;  // "int4g128", "int4g128s", "int8pc", "ternary", "mxfp4", "nvfp4", "q4_k", ...
  QuantKind kind;
  int bits;                      // bits per stored code (ggml blocks: bits of the quant index)
  ScaleGranularity granularity;
  int64_t group_size;            // along `in`; 0 = one group per output channel (or per tensor);
                                 // ggml blocks: the block size (32 or 256)
  ScaleType scale_type;          // per-group scale storage
  bool has_zero;                 // per-group f16 zero point
  bool has_tensor_scale;         // one f32 scale for the whole tensor
  int block_bytes;               // ggml blocks: bytes per block of group_size weights; 0 otherwise
  int ggml_type;                 // ggml_type / GGUF tensor type id; -1 when the format has none

  LB_HD constexpr bool is_ggml_block() const { return kind == QuantKind::GgmlBlock; }
  // SalientBinary: the tensor carries a column mask and per-column factors; its row width depends on
  // the number of salient columns k (masked_row_bytes).
  LB_HD constexpr bool has_column_mask() const { return kind == QuantKind::SalientBinary; }
  // A per-column f16 factor tensor (col_scales): SalientBinary's r_j of the binary columns
  // ([in - k]), SignValue's g_j of every column ([in]).
  LB_HD constexpr bool has_column_scales() const {
    return kind == QuantKind::SalientBinary || kind == QuantKind::SignValue;
  }
  // The share of salient columns the nominal sizes of a SalientBinary format assume (row_bytes(in),
  // storage_bytes): PTQ1.61's 20 %, k = in / 5. A tensor's real sizes come from its own mask.
  LB_HD constexpr int64_t nominal_salient(int64_t in) const { return has_column_mask() ? in / 5 : 0; }
  LB_HD static constexpr int64_t masked_row_bytes(int64_t in, int64_t salient) {
    return (in - salient + 7) / 8 + (salient + 1) / 2;
  }
  // Set bits of a column mask of n bytes (k), eight bytes a step with a branch-free bit count (the
  // library is built without -mpopcnt, where std::popcount is a libgcc call; packed views count
  // their masks on every product).
  static inline int64_t mask_count(const uint8_t* m, int64_t n) {
    int64_t k = 0, b = 0;
    const auto bits = [](uint64_t v) {
      v -= (v >> 1) & 0x5555555555555555ull;
      v = (v & 0x3333333333333333ull) + ((v >> 2) & 0x3333333333333333ull);
      v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0full;
      return int64_t((v * 0x0101010101010101ull) >> 56);
    };
    for (; b + 8 <= n; b += 8) {
      uint64_t v;
      std::memcpy(&v, m + b, 8);
      k += bits(v);
    }
    uint64_t t = 0;
    std::memcpy(&t, m + b, size_t(n - b));
    return k + bits(t);
  }
  // Largest code value produced (2^bits-1, 2 for ternary, 8 for trit-plane pairs).
  LB_HD constexpr int qmax() const {
    return kind == QuantKind::Ternary ? 2 : kind == QuantKind::TritPlanes ? 8 : (1 << bits) - 1;
  }
  LB_HD constexpr int64_t n_groups(int64_t in) const {
    if (kind == QuantKind::SalientBinary) return 2;  // (alpha, mu) of the binary columns, (s, z) of the salient
    return group_size ? (in + group_size - 1) / group_size : 1;
  }
  LB_HD constexpr int64_t group_begin(int64_t g) const { return group_size ? g * group_size : 0; }
  LB_HD constexpr int64_t group_end(int64_t g, int64_t in) const {
    return group_size ? ((g + 1) * group_size < in ? (g + 1) * group_size : in) : in;
  }
  LB_HD constexpr int64_t group_of_column(int64_t col) const { return group_size ? col / group_size : 0; }
  // Packed bytes per row of `in` codes. ggml blocks: in / block size * block bytes (`in` must be a
  // multiple of the block size; callers check with row_fits()).
  LB_HD constexpr int64_t row_bytes(int64_t in) const {
    if (is_ggml_block()) return in / group_size * block_bytes;
    if (kind == QuantKind::TritPlanes) return 2 * ((in + 3) / 4);  // two 2-bit planes
    if (kind == QuantKind::SalientBinary) return masked_row_bytes(in, nominal_salient(in));  // nominal
    if (kind == QuantKind::SignValue) return (in + 7) / 8;                                    // sign bits
    return bits == 2 ? (in + 3) / 4 : bits == 3 ? (in + 7) / 8 * 3 : bits == 4 ? (in + 1) / 2 : in;
  }
  LB_HD constexpr bool row_fits(int64_t in) const { return !is_ggml_block() || in % group_size == 0; }
  // Bits of metadata per group stored outside the codes (scale + zero), excluding the tensor scale.
  LB_HD constexpr int metadata_bits_per_group() const {
    return (scale_type == ScaleType::F16 ? 16 : scale_type == ScaleType::None ? 0 : 8) + (has_zero ? 16 : 0);
  }
  // Exact storage (codes, scales, zeros, tensor scale) of an [out, in] weight.
  LB_HD constexpr int64_t storage_bytes(int64_t out, int64_t in) const {
    const int64_t groups = out * (scale_type == ScaleType::None ? 0 : n_groups(in));
    // SalientBinary (nominal k): the column mask bits and the f16 factor of every binary column
    // SignValue: the f16 value g_j of every column
    const int64_t columns = has_column_mask()                ? (in + 7) / 8 + 2 * (in - nominal_salient(in))
                            : kind == QuantKind::SignValue ? 2 * in
                                                           : 0;
    return out * row_bytes(in) + groups * metadata_bits_per_group() / 8 + (has_tensor_scale ? 4 : 0) + columns;
  }
};

// ---- scalar codecs ---------------------------------------------------------------------------

LB_HD_INLINE uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
LB_HD_INLINE float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE half <-> float, round to nearest even, NaN kept (quiet), overflow to inf.
LB_HD_INLINE float fmt_f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return bits_f32(sign);
    int e = -1;  // subnormal: normalise
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    return bits_f32(sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13);
  }
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (mant << 13));
  return bits_f32(sign | (exp + 127 - 15) << 23 | (mant << 13));
}

LB_HD_INLINE uint16_t fmt_f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow (incl. inf) after rounding
  if (absu < 0x38800000u) {                                   // subnormal or zero in f16
    if (absu < 0x33000000u) return uint16_t(sign);            // rounds to zero
    const uint32_t e = absu >> 23;
    const uint32_t mant = (absu & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;
    const uint32_t half = 1u << (shift - 1);
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = absu - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);   // round to nearest even on the 13 dropped bits
  return uint16_t(sign | (r >> 13));
}

LB_HD_INLINE float fmt_bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }
LB_HD_INLINE uint16_t fmt_f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// Round half to even under the default rounding mode (std::nearbyint / CUDA rintf).
LB_HD_INLINE float fmt_rint(float x) { return rintf(x); }

// E2M1: 4-bit code (sign bit 3), magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
LB_HD_INLINE float e2m1_to_float(uint8_t code) {
  const int i = code & 7, e = i >> 1, m = i & 1;
  const float mag = e == 0 ? 0.5f * float(m) : (1.0f + 0.5f * float(m)) * float(1 << (e - 1));
  return (code & 8) ? -mag : mag;
}
// Round to nearest, ties to the even code, saturating at +-6.
LB_HD_INLINE uint8_t float_to_e2m1(float x) {
  const float a = fabsf(x);
  uint8_t idx;
  if (a <= 0.25f) idx = 0;
  else if (a < 0.75f) idx = 1;
  else if (a <= 1.25f) idx = 2;
  else if (a < 1.75f) idx = 3;
  else if (a <= 2.5f) idx = 4;
  else if (a < 3.5f) idx = 5;
  else if (a <= 5.0f) idx = 6;
  else idx = 7;  // saturates at 6 (NaN too)
  return uint8_t((x < 0 && idx != 0 ? 8 : 0) | idx);
}

// E4M3 "fn" (no infinities, max 448, 0x7f/0xff NaN).
LB_HD_INLINE float e4m3_to_float(uint8_t code) {
  const uint32_t e = (code >> 3) & 0xfu, m = code & 7u;
  const uint32_t sign = uint32_t(code & 0x80u) << 24;
  if (e == 0xf && m == 7) return bits_f32(0x7fc00000u);
  if (e == 0) {
    const float v = float(m) * 0.001953125f;  // m/8 * 2^-6, exact
    return (code & 0x80) ? -v : v;
  }
  return bits_f32(sign | (e + 127 - 7) << 23 | m << 20);
}
// Round to nearest even, saturating to +-448 (NaN and inf saturate too).
LB_HD_INLINE uint8_t float_to_e4m3(float x) {
  const uint8_t sign = (f32_bits(x) >> 31) ? 0x80 : 0;
  const float a = fabsf(x);
  if (!(a < 448.0f)) return uint8_t(sign | 0x7e);
  // Codes 0..0x7e increase with the value and have the same parity as their mantissa, so rounding
  // the position on the grid half-to-even picks the even code on ties; a carry into the next
  // exponent is the next code.
  if (a < 0.015625f) return uint8_t(sign | uint8_t(fmt_rint(a * 512.0f)));  // subnormal step 2^-9
  const int e = int((f32_bits(a) >> 23) & 0xffu) - 127;                     // -6 .. 8
  const float frac = (bits_f32(f32_bits(a) - (uint32_t(e) << 23)) - 1.0f) * 8.0f;  // a/2^e - 1, scaled
  return uint8_t(sign | uint8_t(((e + 7) << 3) + int(fmt_rint(frac))));
}

// E5M2 (OCP FP8, the gradient format of FP8 training: IEEE-like, max 57344, subnormal step 2^-16,
// 0x7c inf, 0x7d..0x7f NaN): the top byte of an IEEE half.
LB_HD_INLINE float e5m2_to_float(uint8_t code) {
  const uint32_t e = (code >> 2) & 0x1fu, m = code & 3u;
  const uint32_t sign = uint32_t(code & 0x80u) << 24;
  if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m ? 0x400000u : 0u));
  if (e == 0) {
    const float v = float(m) * 1.52587890625e-05f;  // m/4 * 2^-14 = m * 2^-16, exact
    return (code & 0x80) ? -v : v;
  }
  return bits_f32(sign | (e + 127 - 15) << 23 | m << 21);
}
// Round to nearest even, saturating to +-57344 (inf and NaN saturate too: training casts saturate).
LB_HD_INLINE uint8_t float_to_e5m2(float x) {
  const uint8_t sign = (f32_bits(x) >> 31) ? 0x80 : 0;
  const float a = fabsf(x);
  if (!(a < 57344.0f)) return uint8_t(sign | 0x7b);
  // As float_to_e4m3: codes 0..0x7b increase with the value with the parity of their mantissa.
  if (a < 6.103515625e-05f) return uint8_t(sign | uint8_t(fmt_rint(a * 65536.0f)));  // subnormal step 2^-16
  const int e = int((f32_bits(a) >> 23) & 0xffu) - 127;                             // -14 .. 15
  const float frac = (bits_f32(f32_bits(a) - (uint32_t(e) << 23)) - 1.0f) * 4.0f;
  const int code = ((e + 15) << 2) + int(fmt_rint(frac));
  return uint8_t(sign | uint8_t(code > 0x7b ? 0x7b : code));  // 57344 < a' < 61440 rounds into 0x7c: saturate
}

// Stochastic rounding onto the E2M1 grid (the gradients of FP4 training): x between two
// neighbouring grid values lo <= |x| <= hi goes to hi with probability (|x| - lo) / (hi - lo),
// given u uniform in [0, 1), so E[value] = x for |x| <= 6 (beyond 6: saturates at 6).
LB_HD_INLINE uint8_t float_to_e2m1_stochastic(float x, float u) {
  const float a = fabsf(x);
  uint8_t idx;
  if (!(a < 6.0f)) {
    idx = 7;  // NaN saturates too
  } else {
    // grid steps: 0.5 below 2, 1 in [2, 4), 2 in [4, 6)
    const float step = a < 2.0f ? 0.5f : a < 4.0f ? 1.0f : 2.0f;
    const float base = a < 2.0f ? 0.0f : a < 4.0f ? 2.0f : 4.0f;
    const int base_idx = a < 2.0f ? 0 : a < 4.0f ? 4 : 6;
    const float k = floorf((a - base) / step);  // whole steps above base
    const float lo = base + k * step;
    const int up = u * step < a - lo ? 1 : 0;
    idx = uint8_t(base_idx + int(k) + up);
  }
  return uint8_t((x < 0 && idx != 0 ? 8 : 0) | idx);
}

// E8M0: unsigned biased exponent (bias 127), 2^(e-127); 0xff is NaN.
LB_HD_INLINE float e8m0_to_float(uint8_t e) {
  if (e == 0xff) return bits_f32(0x7fc00000u);
  if (e == 0) return bits_f32(0x00400000u);  // 2^-127 (subnormal)
  return bits_f32(uint32_t(e) << 23);
}

// ---- packing of lowbit's codes (layout in quant/format.h) -------------------------------------

LB_HD_INLINE int64_t packed_code_bytes(int bits, int64_t n) {
  return bits == 2 ? (n + 3) / 4 : bits == 3 ? (n + 7) / 8 * 3 : bits == 4 ? (n + 1) / 2 : n;
}

// Byte b of the packed row of n codes (padding bits zero); one byte per thread in kernels.
LB_HD_INLINE uint8_t packed_code_byte(int bits, const uint8_t* codes, int64_t n, int64_t b) {
  auto at = [&](int64_t k) -> uint32_t { return k < n ? uint32_t(codes[k]) : 0u; };
  uint32_t byte = 0;
  if (bits == 8) {
    byte = at(b);
  } else if (bits == 4) {
    byte = (at(2 * b) & 15u) | ((at(2 * b + 1) & 15u) << 4);
  } else if (bits == 2) {
    for (int j = 0; j < 4; ++j) byte |= (at(4 * b + j) & 3u) << (2 * j);
  } else {  // 3 bits: 8 codes per little-endian 24-bit word
    const int64_t word = b / 3;
    uint32_t w24 = 0;
    for (int j = 0; j < 8; ++j) w24 |= (at(8 * word + j) & 7u) << (3 * j);
    byte = w24 >> (8 * (b % 3));
  }
  return uint8_t(byte & 0xffu);
}

// Code i of a packed row.
LB_HD_INLINE uint8_t unpack_code(int bits, const uint8_t* packed, int64_t i) {
  switch (bits) {
    case 2: return uint8_t((packed[i / 4] >> (2 * (i % 4))) & 3);
    case 4: return uint8_t((packed[i / 2] >> (4 * (i % 2))) & 15);
    case 3: {
      const int64_t k = i / 8, j = i % 8;
      const uint32_t w = uint32_t(packed[3 * k]) | uint32_t(packed[3 * k + 1]) << 8 | uint32_t(packed[3 * k + 2]) << 16;
      return uint8_t((w >> (3 * j)) & 7);
    }
    default: return packed[i];
  }
}

LB_HD_INLINE void pack_code_row(int bits, const uint8_t* codes, int64_t n, uint8_t* packed) {
  const int64_t nb = packed_code_bytes(bits, n);
  for (int64_t b = 0; b < nb; ++b) packed[b] = packed_code_byte(bits, codes, n, b);
}
LB_HD_INLINE void unpack_code_row(int bits, const uint8_t* packed, int64_t n, uint8_t* codes) {
  for (int64_t i = 0; i < n; ++i) codes[i] = unpack_code(bits, packed, i);
}

// ---- uniform integer codec (IntAsym / IntSym / Ternary): GPTQ's Quantizer conventions -----------
// Asymmetric codes use [0, qmax]; symmetric ones [1, qmax] around z = 2^(bits-1).

LB_HD_INLINE float int_code_min(const FormatTraits& f) { return f.kind == QuantKind::IntSym ? 1.0f : 0.0f; }
// std::clamp semantics (the first bound wins for NaN-free input).
LB_HD_INLINE float fmt_clamp(float v, float lo, float hi) { return v < lo ? lo : (hi < v ? hi : v); }
LB_HD_INLINE float fmt_min(float a, float b) { return b < a ? b : a; }  // std::min
LB_HD_INLINE float fmt_max(float a, float b) { return a < b ? b : a; }  // std::max
LB_HD_INLINE uint8_t int_code(float x, float scale, float zero, float lo, float hi) {
  return uint8_t(fmt_clamp(fmt_rint(x / scale) + zero, lo, hi));
}
LB_HD_INLINE float int_value(uint8_t q, float scale, float zero) { return (float(q) - zero) * scale; }
// Trit-plane pair code (QuantKind::TritPlanes): q = 3 * (t2 + 1) + (t1 + 1), w = t1 * a1 + t2 * a2.
// Codes above 8 never come out of the encoder (checkpoint loads reject them).
// PTQ1.61 (SalientBinary) values, the one arithmetic of the decoders and kernels' references.
LB_HD_INLINE float salient_binary_value(bool plus, float r, float alpha, float mu) {
  return r * (plus ? mu + alpha : mu - alpha);
}
LB_HD_INLINE float salient_int4_value(int q, float s, float z) { return (float(q) - z) * s; }
// OneBit (SignValue): w = h * (+-1) * g, the sign bit `plus`, the row's value h, the column's g.
LB_HD_INLINE float sign_value_value(bool plus, float h, float g) { return plus ? h * g : -(h * g); }

LB_HD_INLINE float trit_pair_value(uint8_t q, float a1, float a2) {
  const int t2 = q / 3, t1 = q - 3 * t2;
  return float(t1 - 1) * a1 + float(t2 - 1) * a2;
}
// Zero point of symmetric formats.
LB_HD_INLINE float int_sym_zero(const FormatTraits& f) { return float(1 << (f.bits - 1)); }

// The next f16 value >= s (s > 0), as a float; +inf when s does not fit (caller reports), the
// smallest f16 subnormal when s rounds to 0. The grid then always covers the group's range.
LB_HD_INLINE float f16_scale_up(float s) {
  uint16_t h = fmt_f32_to_f16(s);
  if (fmt_f16_to_f32(h) < s) ++h;
  const float r = fmt_f16_to_f32(h);
  if (!(r - r == 0.0f)) return r;  // inf
  return r > 0 ? r : 5.9604644775390625e-08f;  // 2^-24
}

struct IntParams {
  float scale, zero;
};
// Group parameters of a range [lo, hi] (scale rounded up to f16); scale is +inf when the weights are
// too large for f16 (the caller raises the error).
LB_HD_INLINE IntParams int_params_from_range(const FormatTraits& f, float lo, float hi) {
  const float qmax = float(f.qmax());
  if (f.kind == QuantKind::IntSym) {
    float a = fmt_max(fabsf(lo), fabsf(hi));
    if (a == 0.0f) a = 1.0f;
    const float half = int_sym_zero(f);
    return {f16_scale_up(a / (half - 1.0f)), half};
  }
  lo = fmt_min(lo, 0.0f), hi = fmt_max(hi, 0.0f);
  if (lo == 0.0f && hi == 0.0f) lo = -1.0f, hi = 1.0f;  // all-zero group (GPTQ does the same)
  const float s = f16_scale_up((hi - lo) / qmax);
  return {s, fmt_clamp(fmt_rint(-lo / s), 0.0f, qmax)};
}

// ---- Matryoshka slicing (MatQuant, Nair et al. 2025, arXiv 2502.06786, §3, eq. 6) -------------
// The r-bit model nested in c-bit asymmetric codes q in [0, 2^c - 1] is their r most significant
// bits, rounded: S(q, r) = clamp(round(q / 2^(c-r)), 0, 2^r - 1) (the paper's slice before its
// left shift). The rounding is a rounded right shift, ties up ((q + 2^(c-r-1)) >> (c-r), as IST's
// MatGPTQ reference `matryoshka_slice` computes it); the clamp catches the codes that round up to
// 2^r (int8 -> int2: q >= 224 gives 3). r >= c is the identity. The slice keeps the c-bit group
// parameters (s, z): w_r = s * (S(q, r) * 2^(c-r) - z) (the paper's dequantization on the c-bit
// grid), an ordinary r-bit code with scale s * 2^(c-r) and zero z / 2^(c-r) (both exact in f16).
// Every user -- the training quantizer (ops/qat_quant_math.h) and the checkpoint slicer
// (quant/matryoshka.h) -- calls this one function.
LB_HD_INLINE uint8_t matryoshka_slice_code(uint8_t q, int c, int r) {
  if (r >= c) return q;
  const int k = c - r;
  const int v = (int(q) + (1 << (k - 1))) >> k;
  const int top = (1 << r) - 1;
  return uint8_t(v < top ? v : top);
}

}  // namespace lowbit

#include "lowbit/core/ggml_blocks.h"
