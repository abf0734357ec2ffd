#include "lowbit/core/vecmath.h"

#include <limits>

#include "lowbit/core/cpu_features.h"
#include "lowbit/core/dtype.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace lowbit::vec {

namespace {
// Cephes expf: exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 in two parts.
__attribute__((always_inline)) inline float exp_poly(float x) {
  x = x < -87.3365f ? -87.3365f : x;
  x = x > 88.0f ? 88.0f : x;
  // k = round(x log2 e) by the 1.5 * 2^23 trick (vectorises everywhere, no floor call).
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(k) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// The kernels, compiled once per instruction set. Reductions keep kLanes partial results (the
// vectoriser maps them to registers without -ffast-math).
constexpr int kLanes = 16;
#define LB_VEC_KERNELS(ATTR, NS)                                                       \
  namespace NS {                                                                       \
  ATTR float max(const float* x, int64_t n) {                                          \
    float acc[kLanes];                                                                 \
    for (int j = 0; j < kLanes; ++j) acc[j] = -std::numeric_limits<float>::infinity(); \
    int64_t i = 0;                                                                     \
    for (; i + kLanes <= n; i += kLanes)                                               \
      for (int j = 0; j < kLanes; ++j) acc[j] = x[i + j] > acc[j] ? x[i + j] : acc[j]; \
    float m = -std::numeric_limits<float>::infinity();                                 \
    for (int j = 0; j < kLanes; ++j) m = acc[j] > m ? acc[j] : m;                      \
    for (; i < n; ++i) m = x[i] > m ? x[i] : m;                                        \
    return m;                                                                          \
  }                                                                                    \
  ATTR float exp_shift_sum(float* x, int64_t n, float shift) {                         \
    float acc[kLanes] = {};                                                            \
    int64_t i = 0;                                                                     \
    for (; i + kLanes <= n; i += kLanes)                                               \
      for (int j = 0; j < kLanes; ++j) {                                               \
        const float e = exp_poly(x[i + j] - shift);                                    \
        x[i + j] = e;                                                                  \
        acc[j] += e;                                                                   \
      }                                                                                \
    float s = 0;                                                                       \
    for (int j = 0; j < kLanes; ++j) s += acc[j];                                      \
    for (; i < n; ++i) s += (x[i] = exp_poly(x[i] - shift));                           \
    return s;                                                                          \
  }                                                                                    \
  ATTR double exp_shift_sum_f64(const float* x, int64_t n, float shift) {              \
    /* float lanes over blocks of 1024, blocks summed in double */                     \
    double s = 0;                                                                      \
    for (int64_t b = 0; b < n; b += 1024) {                                            \
      const int64_t e = b + 1024 < n ? b + 1024 : n;                                   \
      float acc[kLanes] = {};                                                          \
      int64_t i = b;                                                                   \
      for (; i + kLanes <= e; i += kLanes)                                             \
        for (int j = 0; j < kLanes; ++j) acc[j] += exp_poly(x[i + j] - shift);         \
      for (; i < e; ++i) s += double(exp_poly(x[i] - shift));                          \
      for (int j = 0; j < kLanes; ++j) s += double(acc[j]);                            \
    }                                                                                  \
    return s;                                                                          \
  }                                                                                    \
  ATTR void scale(float* x, int64_t n, float s) {                                      \
    for (int64_t i = 0; i < n; ++i) x[i] *= s;                                         \
  }                                                                                    \
  ATTR void silu(const float* x, float* y, int64_t n) {                                \
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] / (1.0f + exp_poly(-x[i]));            \
  }                                                                                    \
  ATTR void swiglu(const float* g, const float* u, float* y, int64_t n) {              \
    for (int64_t i = 0; i < n; ++i) y[i] = g[i] / (1.0f + exp_poly(-g[i])) * u[i];     \
  }                                                                                    \
  }

LB_VEC_KERNELS(, base)
#if defined(__x86_64__) && defined(__GNUC__)
LB_VEC_KERNELS(__attribute__((target("avx2,fma"))), avx2)
LB_VEC_KERNELS(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), avx512)
#define LB_PICK(name)                                                                                     \
  static const auto fn = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&       \
                                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") \
                             ? &avx512::name                                                              \
                         : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? &avx2::name  \
                                                                                           : &base::name;
#else
#define LB_PICK(name) static const auto fn = &base::name;
#endif

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) void f16_to_f32_avx512(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i,  // maskz form: the plain one trips GCC 12 -Wmaybe-uninitialized
                     _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = lowbit::f16_to_f32(src[i]);
}
__attribute__((target("avx512f"))) void f16_rows_to_f32_avx512(const uint16_t* src, int64_t ld, float* dst, int64_t n,
                                                              int64_t width) {
  for (int64_t r = 0; r < n; ++r) {
    const uint16_t* s = src + r * ld;
    float* d = dst + r * width;
    int64_t i = 0;
    for (; i + 16 <= width; i += 16)
      _mm512_storeu_ps(d + i, _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
    for (; i < width; ++i) d[i] = lowbit::f16_to_f32(s[i]);
  }
}
__attribute__((target("avx,f16c"))) void f16_to_f32_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = lowbit::f16_to_f32(src[i]);
}
__attribute__((target("avx,f16c"))) bool f32_to_f16_exact_f16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  int bad = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
    bad |= _mm256_movemask_ps(_mm256_cmp_ps(_mm256_cvtph_ps(h), x, _CMP_NEQ_UQ));
  }
  for (; i < n; ++i) bad |= lowbit::f16_to_f32(dst[i] = lowbit::f32_to_f16(src[i])) != src[i];
  return bad == 0;
}
#endif
bool f32_to_f16_exact_scalar(const float* src, uint16_t* dst, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= lowbit::f16_to_f32(dst[i] = lowbit::f32_to_f16(src[i])) == src[i];
  return ok;
}
void f16_to_f32_scalar(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = lowbit::f16_to_f32(src[i]);
}
}  // namespace

void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const auto fn = __builtin_cpu_supports("avx512f")                                 ? &f16_to_f32_avx512
                         : lowbit::cpu::has_f16c() && __builtin_cpu_supports("avx") ? &f16_to_f32_f16c
                                                                                           : &f16_to_f32_scalar;
#else
  static const auto fn = &f16_to_f32_scalar;
#endif
  fn(src, dst, n);
}

void f16_rows_to_f32(const uint16_t* src, int64_t ld, float* dst, int64_t n, int64_t width) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return f16_rows_to_f32_avx512(src, ld, dst, n, width);
#endif
  for (int64_t r = 0; r < n; ++r) f16_to_f32(src + r * ld, dst + r * width, width);
}

bool f32_to_f16_exact(const float* src, uint16_t* dst, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const auto fn = lowbit::cpu::has_f16c() && __builtin_cpu_supports("avx") ? &f32_to_f16_exact_f16c
                                                                                         : &f32_to_f16_exact_scalar;
#else
  static const auto fn = &f32_to_f16_exact_scalar;
#endif
  return fn(src, dst, n);
}

void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  // A shift into the high half: the compiler vectorises this loop on any target.
  for (int64_t i = 0; i < n; ++i) dst[i] = __builtin_bit_cast(float, uint32_t(src[i]) << 16);
}

float exp1(float x) { return exp_poly(x); }
float max(const float* x, int64_t n) {
  LB_PICK(max)
  return fn(x, n);
}
float exp_shift_sum(float* x, int64_t n, float shift) {
  LB_PICK(exp_shift_sum)
  return fn(x, n, shift);
}
double exp_shift_sum_f64(const float* x, int64_t n, float shift) {
  LB_PICK(exp_shift_sum_f64)
  return fn(x, n, shift);
}
void scale(float* x, int64_t n, float s) {
  LB_PICK(scale)
  fn(x, n, s);
}
void silu(const float* x, float* y, int64_t n) {
  LB_PICK(silu)
  fn(x, y, n);
}
void swiglu(const float* g, const float* u, float* y, int64_t n) {
  LB_PICK(swiglu)
  fn(g, u, y, n);
}

}  // namespace lowbit::vec
