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

// The conversions are the shared host/device ones of format_traits.h.
float f16_to_f32(uint16_t h) { return fmt_f16_to_f32(h); }
uint16_t f32_to_f16(float f) { return fmt_f32_to_f16(f); }

}  // namespace lowbit
