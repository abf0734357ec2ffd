// The Exact body's f32 dot products (quant_matmul_kernels.h, F32DotRows): one summation order for
// every output whatever the batch, the tiling, the threads or the ISA. The x86 copies are compiled
// for their own targets (the library is built without -march) and picked at run time.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <utility>

#include "lowbit/ops/quant_matmul_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include "lowbit/core/target_region.h"
#endif

namespace lowbit::ops::qmm {

// The reference form of the order (std::fma: one rounding per term, as the x86 copies' FMAs).
void portable_f32_dot_rows(const float* x, int64_t ldx, int64_t M, const float* w, int64_t ldw, int64_t N, int64_t n,
                           float* y, int64_t ldy) {
  const int64_t n8 = n - n % 8;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < N; ++j) {
      const float* a = x + m * ldx;
      const float* b = w + j * ldw;
      float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = 0; i < n8; i += 8)
        for (int l = 0; l < 8; ++l) s[l] = std::fma(a[i + l], b[i + l], s[l]);
      float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
      for (int64_t i = n8; i < n; ++i) t = std::fma(a[i], b[i], t);
      y[m * ldy + j] = t;
    }
}

#if defined(__x86_64__) || defined(__i386__)
namespace {
constexpr int kMaxTileCols = 8;
}

// 16 vector registers: r x c accumulators plus the operands.
LB_TARGET_BEGIN("avx2,fma")
namespace f32_avx2 {
#define F32_MR 4
#define F32_NR(r) ((r) == 1 ? 8 : (r) == 2 ? 6 : (r) == 3 ? 4 : 3)
#include "lowbit/ops/quant_matmul_f32_x86.inc"
}  // namespace f32_avx2
LB_TARGET_END()

// AVX-512 VL: 32 vector registers (ymm16-31), still 256-bit accumulators (the same lanes).
LB_TARGET_BEGIN("avx2,fma,avx512f,avx512vl")
namespace f32_avx512 {
#define F32_MR 4
#define F32_NR(r) ((r) <= 2 ? 8 : 6)
#include "lowbit/ops/quant_matmul_f32_x86.inc"
}  // namespace f32_avx512
LB_TARGET_END()

F32DotRows x86_f32_dot_rows(bool wide) {
  static const bool avx512 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  }();
  return wide && avx512 ? &f32_avx512::f32_dot_rows : &f32_avx2::f32_dot_rows;
}
#endif

}  // namespace lowbit::ops::qmm
