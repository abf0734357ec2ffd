#include "lowbit/core/dtype.h"

#include <string>

#include "lowbit/core/error.h"

namespace lowbit {

namespace {
constexpr DTypeInfo kInfos[] = {
    {DType::F32, "f32", 4, true},  {DType::F16, "f16", 2, true}, {DType::BF16, "bf16", 2, true},
    {DType::I8, "i8", 1, false},   {DType::U8, "u8", 1, false},  {DType::I32, "i32", 4, false},
    {DType::F64, "f64", 8, true},  {DType::I64, "i64", 8, false}, {DType::I16, "i16", 2, false},
};
}  // namespace

const DTypeInfo& dtype_info(DType t) {
  auto i = static_cast<size_t>(t);
  if (i >= std::size(kInfos)) throw_error("unknown dtype code ", int(i));
  return kInfos[i];
}

DType parse_dtype(std::string_view name) {
  std::string n(name);
  for (auto& c : n) c = char(std::tolower(static_cast<unsigned char>(c)));
  if (n == "float32" || n == "fp32") n = "f32";
  if (n == "float16" || n == "fp16" || n == "half") n = "f16";
  if (n == "bfloat16") n = "bf16";
  if (n == "float64" || n == "fp64" || n == "double") n = "f64";
  if (n == "int8") n = "i8";
  if (n == "uint8") n = "u8";
  if (n == "int16") n = "i16";
  if (n == "int32") n = "i32";
  if (n == "int64") n = "i64";
  for (const auto& info : kInfos)
    if (n == info.name) return info.dtype;
  throw_error("unknown dtype '", name, "' (expected f32, f16, bf16, f64, i8, u8, i16, i32 or i64)");
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      u = sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13;
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | (exp + 127 - 15) << 23 | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow (incl. inf) after rounding
  if (absu < 0x38800000u) {                                   // subnormal or zero in f16
    if (absu < 0x33000000u) return uint16_t(sign);            // rounds to zero
    uint32_t e = absu >> 23;
    uint32_t mant = (absu & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14 + (113 - e) - 1 ... gives the f16 subnormal mantissa
    uint32_t half = 1u << (shift - 1);
    uint32_t r = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = absu - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);   // round to nearest even on the 13 dropped bits
  return uint16_t(sign | (r >> 13));
}

}  // namespace lowbit
