// Element types of tensors. Values are stable (they appear in files); never reuse one.
#pragma once
#include <cstdint>
#include <cstring>
#include <string_view>

#include "lowbit/core/format_traits.h"

namespace lowbit {

enum class DType : uint8_t { F32 = 0, F16 = 1, BF16 = 2, I8 = 3, U8 = 4, I32 = 5, F64 = 6, I64 = 7, I16 = 8 };

struct DTypeInfo {
  DType dtype;
  const char* name;  // "f32", "bf16", ...
  int size;          // bytes per element
  bool is_float;
};

const DTypeInfo& dtype_info(DType t);
inline int dtype_size(DType t) { return dtype_info(t).size; }
inline const char* dtype_name(DType t) { return dtype_info(t).name; }
// Parses "f32", "float32", "bf16", ... Throws lowbit::Error for unknown names.
DType parse_dtype(std::string_view name);

template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::F32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::F64; };
template <> struct dtype_of<int8_t> { static constexpr DType value = DType::I8; };
template <> struct dtype_of<uint8_t> { static constexpr DType value = DType::U8; };
template <> struct dtype_of<int16_t> { static constexpr DType value = DType::I16; };
template <> struct dtype_of<int32_t> { static constexpr DType value = DType::I32; };
template <> struct dtype_of<int64_t> { static constexpr DType value = DType::I64; };

// ---- 16-bit float conversions (round to nearest even; NaN preserved) ----------------
// The arithmetic is format_traits.h's (shared with CUDA kernels).
inline float bf16_to_f32(uint16_t h) { return fmt_bf16_to_f32(h); }
inline uint16_t f32_to_bf16(float f) { return fmt_f32_to_bf16(f); }
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

}  // namespace lowbit
