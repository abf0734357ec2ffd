// The arithmetic of INT4 training's quantizers (ops/lp_int4.h), written once for the CPU reference
// body (ops/lp_int4.cpp) and the CUDA body (ops/cuda/lp_int4.cu), so that the two agree bit for bit
// (C++17: nvcc compiles it too). The random numbers are lp_quant_math.h's counter-based draws
// (lp::uniform(seed, element or row index)): a pure function of the index, so the order in which
// threads visit the elements does not matter.
//
// Per element (LB_HD): the INT4 quantize-dequantize of HQ and of bit splitting's coarse half, bit
// splitting's stochastically rounded fine half, and LSS's reweighted sum of the two halves. Every
// product that an addition follows is rounded on its own (mul_rn: __fmul_rn on the device, which
// nvcc never contracts into an FMA; the host build is ISO C++ with -ffp-contract=off, GCC's default
// for -std=c++20, so a plain product there). Per row: the sum of squares behind the leverage scores,
// in f64 in column order (each square of an f32 value is exact in f64, so an FMA could not change it
// either). Host only: the water-filled keep-probabilities and the keep draws of LSS, which need the
// whole score vector (2T values; the CUDA body reads the row norms back and runs these on the host).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "lowbit/core/format_traits.h"
#include "lowbit/ops/act_quant_math.h"
#include "lowbit/ops/lp_quant_math.h"

namespace lowbit::ops::lp {

constexpr float kInt4Max = 7.0f;  // the symmetric INT4 grid [-7, 7]

// a * b rounded once, never fused with a following addition (ops/act_quant_math.h's).
using ::lowbit::ops::aq::mul_rn;

// rint (round half to even) and floor for |x| < 2^22 without a libm call (the CPU build targets
// baseline x86-64, which has no rounding instruction): adding and subtracting 1.5 * 2^23 rounds to an
// integer in the default rounding mode. The values here are at most ~7.5 in magnitude (x / s, s =
// amax / 7). Neither GCC (no -ffast-math) nor nvcc reassociates the two additions.
LB_HD_INLINE float rint_small(float x) {
  constexpr float big = 12582912.0f;
  return (x + big) - big;
}
LB_HD_INLINE float floor_small(float x) {
  const float r = rint_small(x);
  return r > x ? r - 1.0f : r;
}
LB_HD_INLINE float clamp_int4(float q) { return q < -kInt4Max ? -kInt4Max : (q > kInt4Max ? kInt4Max : q); }

// s clamp(rint(v / s), -7, 7); 0 when s is 0 (an all-zero tensor).
LB_HD_INLINE float int4_qdq(float v, float s) { return s > 0 ? mul_rn(clamp_int4(rint_small(v / s)), s) : 0.0f; }

// Bit splitting of one element (lp_int4_bitsplit): hi = INT4(g) with scale s_hi, lo = s_lo SR((g - hi) /
// s_lo) drawing u = lp::uniform(mix64(seed ^ 1), element index). s_hi > 0.
LB_HD_INLINE void int4_bitsplit(float g, float s_hi, float s_lo, float u, float& hi, float& lo) {
  hi = int4_qdq(g, s_hi);
  const float r = (g - hi) / s_lo, f = floor_small(r);
  const float q = f + float(u < r - f);
  lo = mul_rn(clamp_int4(q), s_lo);
}

// One element of LSS's estimate: the kept hi and lo values times their rows' factors (1 / p or 0).
LB_HD_INLINE float lss_combine(float hi, float fh, float lo, float fl) { return mul_rn(hi, fh) + mul_rn(lo, fl); }

// ss + a^2 in f64 (a^2 exact): the row sums of squares of the leverage scores, summed in column order.
LB_HD_INLINE double sumsq_step(double ss, double a) { return ss + a * a; }

// ---- host only ------------------------------------------------------------------------------------
// The keep-probabilities of LSS for scores s (>= 0) and a budget (expected number kept, > 0):
// p_i = min(1, c s_i) with sum p_i = min(budget, #nonzero) (ops::lp_lss_probabilities).
inline void lss_probabilities(const double* s, int64_t n, double budget, double* p) {
  std::vector<int64_t> nz;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = 0;
    if (s[i] > 0) nz.push_back(i);
  }
  if (double(nz.size()) <= budget) {  // every nonzero row fits the budget: kept for certain
    for (int64_t i : nz) p[i] = 1;
    return;
  }
  // Water filling: the largest scores take p = 1 while c s_i >= 1 for c = (budget - j) / (the rest's sum).
  std::sort(nz.begin(), nz.end(), [&](int64_t a, int64_t b) { return s[a] > s[b]; });
  double rest = 0;
  for (int64_t i : nz) rest += s[i];
  size_t j = 0;
  while (j < nz.size() && (budget - double(j)) * s[nz[j]] >= rest) {
    p[nz[j]] = 1;
    rest -= s[nz[j]];
    ++j;
  }
  const double c = rest > 0 ? (budget - double(j)) / rest : 0;
  for (size_t k = j; k < nz.size(); ++k) p[nz[k]] = std::min(1.0, c * s[nz[k]]);
}

// LSS's draws over the 2T stacked rows: row i is kept when p_i >= 1 or lp::uniform(mix64(seed ^ 2), i)
// < p_i; factor[i] = float(1 / p_i) when kept, else 0. Counts into nonzero / kept / certain (rows with
// a nonzero score).
struct LssCounts {
  int64_t nonzero = 0, kept = 0, certain = 0;
};
inline LssCounts lss_factors(const double* score, const double* p, int64_t n, uint64_t seed, float* factor) {
  const uint64_t draw_seed = mix64(seed ^ 0x2ull);
  LssCounts st;
  for (int64_t i = 0; i < n; ++i) {
    const double pi = p[i];
    const bool keep = pi >= 1 || (pi > 0 && uniform(draw_seed, uint64_t(i)) < pi);
    factor[i] = keep ? float(1.0 / pi) : 0.0f;
    if (score[i] > 0) ++st.nonzero, st.certain += pi >= 1, st.kept += keep;
  }
  return st;
}

}  // namespace lowbit::ops::lp
