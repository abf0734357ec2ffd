#include "lowbit/core/vecmath.h"

#include <limits>

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
}  // namespace

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
