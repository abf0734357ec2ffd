#include "lowbit/quant/format.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>

#include "lowbit/core/error.h"

namespace lowbit {

// ---- element encodings ---------------------------------------------------------------------

static constexpr std::array<float, 8> kE2M1Magnitudes = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

float e2m1_to_float(uint8_t code) {
  float m = kE2M1Magnitudes[code & 7];
  return (code & 8) ? -m : m;
}

uint8_t float_to_e2m1(float x) {
  float a = std::fabs(x);
  // Midpoints between neighbouring magnitudes; a tie goes to the even index (mantissa bit 0).
  uint8_t idx;
  if (a <= 0.25f) idx = 0;
  else if (a < 0.75f) idx = 1;
  else if (a <= 1.25f) idx = 2;
  else if (a < 1.75f) idx = 3;
  else if (a <= 2.5f) idx = 4;
  else if (a < 3.5f) idx = 5;
  else if (a <= 5.0f) idx = 6;
  else idx = 7;  // saturates at 6
  return uint8_t((x < 0 && idx != 0 ? 8 : 0) | idx);
}

float e4m3_to_float(uint8_t code) {
  int e = (code >> 3) & 0xf, m = code & 7;
  if (e == 0xf && m == 7) return std::nanf("");
  float v = e == 0 ? std::ldexp(float(m) / 8.0f, -6) : std::ldexp(1.0f + float(m) / 8.0f, e - 7);
  return (code & 0x80) ? -v : v;
}

uint8_t float_to_e4m3(float x) {
  // Reference encoder: nearest of the 127 non-negative finite values (codes 0..0x7e are increasing).
  static const std::array<float, 127> values = [] {
    std::array<float, 127> v{};
    for (int c = 0; c < 127; ++c) v[size_t(c)] = e4m3_to_float(uint8_t(c));
    return v;
  }();
  uint8_t sign = std::signbit(x) ? 0x80 : 0;
  float a = std::fabs(x);
  if (!(a < values[126])) return uint8_t(sign | 0x7e);  // saturate (also +inf)
  auto it = std::upper_bound(values.begin(), values.end(), a);  // first value > a
  int hi = int(it - values.begin()), lo = hi - 1;
  float dlo = a - values[size_t(lo)], dhi = values[size_t(hi)] - a;
  int c = dlo < dhi ? lo : dhi < dlo ? hi : (lo % 2 == 0 ? lo : hi);
  return uint8_t(sign | c);
}

float e8m0_to_float(uint8_t e) {
  if (e == 0xff) return std::nanf("");
  return std::ldexp(1.0f, int(e) - 127);
}

// ---- packing ---------------------------------------------------------------------------------

int64_t packed_bytes(int bits, int64_t n) {
  switch (bits) {
    case 2: return (n + 3) / 4;
    case 3: return (n + 7) / 8 * 3;
    case 4: return (n + 1) / 2;
    case 8: return n;
  }
  throw_error("packed_bytes: unsupported code width ", bits, " bits (expected 2, 3, 4 or 8)");
}

static void pack2(const uint8_t* c, int64_t n, uint8_t* p) {
  std::fill(p, p + packed_bytes(2, n), uint8_t(0));
  for (int64_t i = 0; i < n; ++i) p[i / 4] |= uint8_t((c[i] & 3) << (2 * (i % 4)));
}
static void unpack2(const uint8_t* p, int64_t n, uint8_t* c) {
  for (int64_t i = 0; i < n; ++i) c[i] = (p[i / 4] >> (2 * (i % 4))) & 3;
}
static void pack3(const uint8_t* c, int64_t n, uint8_t* p) {
  for (int64_t k = 0; k * 8 < n; ++k) {
    uint32_t word = 0;
    for (int64_t j = 0; j < 8 && k * 8 + j < n; ++j) word |= uint32_t(c[k * 8 + j] & 7) << (3 * j);
    p[3 * k] = uint8_t(word), p[3 * k + 1] = uint8_t(word >> 8), p[3 * k + 2] = uint8_t(word >> 16);
  }
}
static void unpack3(const uint8_t* p, int64_t n, uint8_t* c) {
  for (int64_t k = 0; k * 8 < n; ++k) {
    uint32_t word = uint32_t(p[3 * k]) | uint32_t(p[3 * k + 1]) << 8 | uint32_t(p[3 * k + 2]) << 16;
    for (int64_t j = 0; j < 8 && k * 8 + j < n; ++j) c[k * 8 + j] = (word >> (3 * j)) & 7;
  }
}
static void pack4(const uint8_t* c, int64_t n, uint8_t* p) {
  std::fill(p, p + packed_bytes(4, n), uint8_t(0));
  for (int64_t i = 0; i < n; ++i) p[i / 2] |= uint8_t((c[i] & 15) << (4 * (i % 2)));
}
static void unpack4(const uint8_t* p, int64_t n, uint8_t* c) {
  for (int64_t i = 0; i < n; ++i) c[i] = (p[i / 2] >> (4 * (i % 2))) & 15;
}
static void pack8(const uint8_t* c, int64_t n, uint8_t* p) { std::copy(c, c + n, p); }
static void unpack8(const uint8_t* p, int64_t n, uint8_t* c) { std::copy(p, p + n, c); }

void pack_codes(int bits, const uint8_t* codes, int64_t n, uint8_t* packed) {
  switch (bits) {
    case 2: return pack2(codes, n, packed);
    case 3: return pack3(codes, n, packed);
    case 4: return pack4(codes, n, packed);
    case 8: return pack8(codes, n, packed);
  }
  throw_error("pack_codes: unsupported code width ", bits, " bits");
}

void unpack_codes(int bits, const uint8_t* packed, int64_t n, uint8_t* codes) {
  switch (bits) {
    case 2: return unpack2(packed, n, codes);
    case 3: return unpack3(packed, n, codes);
    case 4: return unpack4(packed, n, codes);
    case 8: return unpack8(packed, n, codes);
  }
  throw_error("unpack_codes: unsupported code width ", bits, " bits");
}

// ---- codecs ------------------------------------------------------------------------------------

// Rounds a positive scale UP to the next f16 value, so that the quantization grid always covers the
// group's range (every in-range weight is then within half a step of the grid). A scale too small for
// f16 becomes the smallest subnormal.
static float f16_scale(const QuantFormat& f, float s) {
  uint16_t h = f32_to_f16(s);
  if (f16_to_f32(h) < s) ++h;  // next representable value (s > 0, so the bit pattern increases)
  float r = f16_to_f32(h);
  if (!std::isfinite(r))
    throw_error("[", f.name, "] group scale ", s, " does not fit in f16 (weights too large: max ~",
                65504.0f * float(f.qmax()), ")");
  return r > 0 ? r : std::ldexp(1.0f, -24);
}

static float unit_tensor_scale(const QuantFormat&, const float*, int64_t) { return 1.0f; }

// Uniform integer (Frantar et al. 2022 / Lin et al. 2023 convention): the range is widened to
// contain 0 so that 0 is exactly representable, as in GPTQ's Quantizer.find_params.
static GroupParams int_asym_params(const QuantFormat& f, float lo, float hi, float) {
  lo = std::min(lo, 0.0f), hi = std::max(hi, 0.0f);
  if (lo == 0.0f && hi == 0.0f) lo = -1.0f, hi = 1.0f;  // all-zero group (GPTQ does the same)
  float qmax = float(f.qmax());
  float s = f16_scale(f, (hi - lo) / qmax);
  float z = std::clamp(std::nearbyint(-lo / s), 0.0f, qmax);
  return {s, z};
}

static GroupParams int_sym_params(const QuantFormat& f, float lo, float hi, float) {
  float a = std::max(std::fabs(lo), std::fabs(hi));
  if (a == 0.0f) a = 1.0f;
  float half = float(1 << (f.bits - 1));
  return {f16_scale(f, a / (half - 1.0f)), half};
}

// Asymmetric codes use [0, qmax]; symmetric ones [1, qmax] so that the grid is symmetric about z.
static float int_code_min(const QuantFormat& f) { return f.kind == QuantKind::IntSym ? 1.0f : 0.0f; }
static inline uint8_t int_code(float x, float scale, float zero, float lo, float hi) {
  return uint8_t(std::clamp(std::nearbyint(x / scale) + zero, lo, hi));
}
static inline float int_value(uint8_t q, float scale, float zero) { return (float(q) - zero) * scale; }

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

static constexpr QuantCodec kIntAsymCodec{unit_tensor_scale, int_asym_params, int_encode, int_decode, int_encode_n,
                                          int_decode_n};
static constexpr QuantCodec kIntSymCodec{unit_tensor_scale, int_sym_params, int_encode, int_decode, int_encode_n,
                                         int_decode_n};
static constexpr QuantCodec kTernaryCodec{ternary_tensor_scale, ternary_params, int_encode, int_decode, int_encode_n,
                                          int_decode_n};
static constexpr QuantCodec kMxfp4Codec{unit_tensor_scale, mxfp4_params, fp4_encode, fp4_decode, fp4_encode_n,
                                        fp4_decode_n};
static constexpr QuantCodec kNvfp4Codec{nvfp4_tensor_scale, nvfp4_params, fp4_encode, fp4_decode, fp4_encode_n,
                                        fp4_decode_n};

// ---- the table -----------------------------------------------------------------------------------

static constexpr PackFn pack_fn(int bits) { return bits == 2 ? pack2 : bits == 3 ? pack3 : bits == 4 ? pack4 : pack8; }
static constexpr UnpackFn unpack_fn(int bits) {
  return bits == 2 ? unpack2 : bits == 3 ? unpack3 : bits == 4 ? unpack4 : unpack8;
}

static constexpr QuantFormat int_format(QuantFormatId id, const char* name, int bits, int64_t group, bool sym) {
  return QuantFormat{id, name, sym ? QuantKind::IntSym : QuantKind::IntAsym, bits,
                     group ? ScaleGranularity::PerGroup : ScaleGranularity::PerChannel, group,
                     ScaleType::F16, !sym, false, sym ? &kIntSymCodec : &kIntAsymCodec,
                     pack_fn(bits), unpack_fn(bits)};
}

using Id = QuantFormatId;
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
    {Id::Ternary, "ternary", QuantKind::Ternary, 2, ScaleGranularity::PerTensor, 0, ScaleType::None, false,
     true, &kTernaryCodec, pack2, unpack2},
    {Id::MXFP4, "mxfp4", QuantKind::FP4_MX, 4, ScaleGranularity::PerGroup, 32, ScaleType::E8M0, false, false,
     &kMxfp4Codec, pack4, unpack4},
    {Id::NVFP4, "nvfp4", QuantKind::FP4_NV, 4, ScaleGranularity::PerGroup, 16, ScaleType::E4M3, false, true,
     &kNvfp4Codec, pack4, unpack4},
};

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

int QuantFormat::qmax() const { return kind == QuantKind::Ternary ? 2 : (1 << bits) - 1; }

int64_t QuantFormat::n_groups(int64_t in) const { return group_size ? (in + group_size - 1) / group_size : 1; }
int64_t QuantFormat::group_begin(int64_t g) const { return group_size ? g * group_size : 0; }
int64_t QuantFormat::group_end(int64_t g, int64_t in) const {
  return group_size ? std::min(in, (g + 1) * group_size) : in;
}
int64_t QuantFormat::group_of_column(int64_t col) const { return group_size ? col / group_size : 0; }
int64_t QuantFormat::row_bytes(int64_t in) const { return packed_bytes(bits, in); }

int QuantFormat::metadata_bits_per_group() const {
  int b = scale_type == ScaleType::F16 ? 16 : scale_type == ScaleType::None ? 0 : 8;
  return b + (has_zero ? 16 : 0);
}

int64_t QuantFormat::storage_bytes(int64_t out, int64_t in) const {
  int64_t groups = out * (scale_type == ScaleType::None ? 0 : n_groups(in));
  return out * row_bytes(in) + groups * metadata_bits_per_group() / 8 + (has_tensor_scale ? 4 : 0);
}

double QuantFormat::bits_per_weight(int64_t out, int64_t in) const {
  LB_CHECK(out > 0 && in > 0, "[", name, "] bits_per_weight of an empty [", out, ", ", in, "] weight");
  return double(storage_bytes(out, in)) * 8.0 / double(out * in);
}

}  // namespace lowbit
