// The per-element arithmetic of the activation / KV fake quantizers (ops/ops.h fake_quant), BitNet's
// quantizers (ops/ternary.h) and the randomized Hadamard transform's products (ops/ops.h
// hadamard_transform), written once for the CPU reference bodies (ops/hadamard.cpp, ops/ternary.cpp)
// and the CUDA bodies (ops/cuda/act_quant.cu), so that the two agree bit for bit where the reductions
// run in the same order. C++17: nvcc compiles it too. Products that an addition follows are rounded
// on their own (mul_rn: __fmul_rn / __dmul_rn on the device, which nvcc never contracts into an FMA;
// the host build is ISO C++ with -ffp-contract=off, so a plain product there).
#pragma once
#include <cmath>

#include "lowbit/core/format_traits.h"

namespace lowbit::ops::aq {

LB_HD_INLINE float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LB_HD_INLINE double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
LB_HD_INLINE float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LB_HD_INLINE double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// std::min / std::max / std::clamp's semantics (NaN handling included: a NaN compared is skipped by
// min/max and passed through by clamp), for both compilers.
LB_HD_INLINE double min_of(double a, double b) { return b < a ? b : a; }
LB_HD_INLINE double max_of(double a, double b) { return a < b ? b : a; }
LB_HD_INLINE double clamp_of(double v, double lo, double hi) { return v < lo ? lo : (hi < v ? hi : v); }

// One group's grid of fake_quant: from the group's min / max (both start at 0: the grid holds zero;
// min_of(lo, v) / max_of(hi, v) over the group) times the clip ratio. s <= 0 (an all-zero group)
// quantizes every element to 0.
struct FqGrid {
  double s = 0, zero = 0, qlo = 0, qhi = 0;
};
LB_HD_INLINE FqGrid fq_grid(double lo, double hi, double clip, int bits, bool asymmetric) {
  lo *= clip;
  hi *= clip;
  FqGrid g;
  if (asymmetric) {
    const double qmax = ldexp(1.0, bits) - 1;
    g.s = (hi - lo) / qmax;
    g.zero = g.s > 0 ? rint(-lo / g.s) : 0;
    g.qlo = 0;
    g.qhi = qmax;
  } else {
    g.s = max_of(hi, -lo) / (ldexp(1.0, bits - 1) - 1);
    g.qlo = -ldexp(1.0, bits - 1);
    g.qhi = ldexp(1.0, bits - 1) - 1;
  }
  return g;
}
// x fake-quantized on the group's grid (in double; the caller rounds to its dtype).
LB_HD_INLINE double fq_value(double x, const FqGrid& g) {
  if (!(g.s > 0)) return 0.0;
  const double q = clamp_of(rint(x / g.s) + g.zero, g.qlo, g.qhi);
  return (q - g.zero) * g.s;
}

// BitNet's ternary weight: gamma * RoundClip(w / gamma, -1, 1), in T.
template <class T>
LB_HD_INLINE T ternary_qdq(T w, T gamma) {
  const T c = rint(w / gamma);
  return (c < T(-1) ? T(-1) : (c > T(1) ? T(1) : c)) * gamma;
}

// BitNet v2's INT4 absmean activation: s = max(mean|x|, 1e-5) / sqrt(7) from the row's sum of |x|
// (in double, column order), then s * clamp(round(x / s), -8, 7).
LB_HD_INLINE double int4_absmean_step(double abs_sum, long long cols) {
  const double beta = max_of(cols > 0 ? abs_sum / double(cols) : 0.0, 1e-5);
  return beta * (1.0 / sqrt(7.0));
}
LB_HD_INLINE double int4_absmean_value(double x, double s) { return clamp_of(rint(x / s), -8.0, 7.0) * s; }

}  // namespace lowbit::ops::aq
