// The per-element arithmetic of low-precision training's operand quantizer (ops/lp_quant.h), written
// once for the CPU reference body and the CUDA body (LB_HD, C++17): the counter-based random numbers
// of stochastic rounding and of the Hadamard signs, the 16/32-point randomized Hadamard transform,
// the scale rules of each format and the quantize-dequantize of one value. The element and scale
// codecs are the format table's (core/format_traits.h: E2M1, E4M3, E5M2, bf16 and stochastic E2M1
// rounding). Everything is computed in f32 (a double input is converted first), so the
// two bodies agree bit for bit.
#pragma once
#include <cstdint>

#include "lowbit/core/format_traits.h"

namespace lowbit::ops {

// Element formats of the emulated GEMM operands.
//   None   the value itself (a high-precision layer; tests)
//   BF16   rounded to bf16 (round to nearest even): what a bf16 tensor-core GEMM reads
//   E4M3   FP8 E4M3 ("fn", max 448) with one f32 scale per tensor (the forward operands of FP8 training)
//   E5M2   FP8 E5M2 (max 57344) with one f32 scale per tensor (the gradients of FP8 training)
//   MXFP4  E2M1 values, one power-of-two (UE8M0) scale per tile (OCP MX: tiles of 32)
//   NVFP4  E2M1 values, one E4M3 scale per tile (16 values) under one f32 scale per tensor
//   E2M1   E2M1 values, one f32 scale per tile, S = tile amax / 6 (the vector-wise absmax scaling of
//          Wang et al. 2025, arXiv 2501.17116: tiles of one whole row, per token / per output channel)
enum class LpFormat : uint8_t { None = 0, BF16 = 1, E4M3 = 2, E5M2 = 3, MXFP4 = 4, NVFP4 = 5, E2M1 = 6 };
enum class LpRounding : uint8_t { Nearest = 0, Stochastic = 1 };

// How one operand is quantized (trivially copyable: kernels take it by value).
struct LpQuantSpec {
  LpFormat format = LpFormat::None;
  // MXFP4 / NVFP4: the scale tile, tile_rows x tile_cols values of the 2-D tensor (1 x 16: blocks
  // along a row; 16 x 1: along a column; 16 x 16: the 2-D weight blocks). Edge tiles may be partial.
  int32_t tile_rows = 1, tile_cols = 16;
  // Stochastic: E2M1 values (MXFP4 / NVFP4) round up with probability equal to the distance to the
  // lower neighbour over the gap (unbiased). Element k of the tensor draws lp_uniform(seed, k).
  LpRounding rounding = LpRounding::Nearest;
  uint64_t seed = 0;
  // Randomized Hadamard transform before quantizing (NVFP4 paper sec. 4.2: the weight-gradient GEMM
  // inputs): -1 none; 0: each column's values in groups of rht_size consecutive rows; 1: each row's
  // values in groups of rht_size consecutive columns. A last group shorter than rht_size is left as
  // it is. rht_size: a power of two, 2 .. 256. The signs depend on (rht_seed, position in the group):
  // the two operands of one GEMM share rht_seed, so H^T H = I cancels in their product.
  int32_t rht_axis = -1, rht_size = 16;
  uint64_t rht_seed = 0;
  // E4M3 / E5M2: the decode scale s (x ~ s q) to use, e.g. amax history / 448 (delayed scaling);
  // 0: current scaling, s = amax of this tensor / the format's largest value.
  float tensor_scale = 0;
};

namespace lp {

// SplitMix64's finaliser: the counter-based generator of the random draws.
LB_HD_INLINE uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
// Uniform in [0, 1) with 24 random bits (exact in f32), a pure function of (seed, index).
LB_HD_INLINE float uniform(uint64_t seed, uint64_t index) {
  return float(mix64(seed ^ mix64(index)) >> 40) * 5.9604644775390625e-08f;  // 2^-24
}
// The Hadamard sign of position k in a group: +1 or -1.
LB_HD_INLINE float rht_sign(uint64_t seed, int k) {
  return (mix64(seed * 0xD1B54A32D192ED03ull + uint64_t(k) + 0x632BE59BD9B4E019ull) >> 63) ? -1.0f : 1.0f;
}

// In place on v[0], v[stride], ..., v[(n-1) stride] (n a power of two):
//   forward  v <- H_n (D v) / sqrt(n)
//   inverse  v <- D (H_n v) / sqrt(n)   (H_n symmetric, H_n H_n = n I: the two are each other's inverse)
// with D = diag(rht_sign(seed, k)). Butterflies in the Sylvester order; the 1/sqrt(n) scaling is a
// single multiply per value at the end (exact for n = 4^j, one rounding otherwise). Each of the n
// entries is a run of `width` contiguous values transformed alike (width 1: one vector; width C with
// stride C: every column of n rows at once, with contiguous loops), the same operations in the same
// order for each value.
LB_HD_INLINE void rht_apply_rows(float* v, int64_t stride, int64_t width, int n, uint64_t seed, bool inverse) {
  if (!inverse)
    for (int k = 0; k < n; ++k) {
      const float sg = rht_sign(seed, k);
      for (int64_t c = 0; c < width; ++c) v[k * stride + c] *= sg;
    }
  for (int h = 1; h < n; h *= 2)
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        float* p = v + j * stride;
        float* q = v + (j + h) * stride;
        for (int64_t c = 0; c < width; ++c) {
          const float a = p[c], b = q[c];
          p[c] = a + b;
          q[c] = a - b;
        }
      }
  float inv = 1.0f;
  for (int m = n; m > 1; m /= 4) inv *= m >= 4 ? 0.5f : 0.70710678118654752f;
  for (int k = 0; k < n; ++k) {
    const float f = inverse ? inv * rht_sign(seed, k) : inv;
    for (int64_t c = 0; c < width; ++c) v[k * stride + c] *= f;
  }
}
LB_HD_INLINE void rht_apply(float* v, int64_t stride, int n, uint64_t seed, bool inverse) {
  rht_apply_rows(v, stride, 1, n, seed, inverse);
}

// The largest magnitude of the element format (per-tensor and NVFP4 scales map the amax onto it).
LB_HD_INLINE float format_max(LpFormat f) {
  return f == LpFormat::E4M3 ? 448.0f : f == LpFormat::E5M2 ? 57344.0f : 6.0f;
}
LB_HD_INLINE bool is_fp4(LpFormat f) { return f == LpFormat::MXFP4 || f == LpFormat::NVFP4 || f == LpFormat::E2M1; }
LB_HD_INLINE bool is_fp8(LpFormat f) { return f == LpFormat::E4M3 || f == LpFormat::E5M2; }

// The per-tensor scale of the current amax: E4M3/E5M2 s = amax / max (x ~ s q); NVFP4 the f32
// second-level scale g = amax / (448 * 6), which maps the largest block scale onto E4M3's 448
// (NVFP4 paper eq. 1-2). 0 for an all-zero tensor; other formats have none (0).
LB_HD_INLINE float tensor_scale(LpFormat f, float amax) {
  if (!(amax > 0)) return 0.0f;
  if (is_fp8(f)) return amax / format_max(f);
  if (f == LpFormat::NVFP4) return amax / (448.0f * 6.0f);
  return 0.0f;
}

// The decode scale S of one E2M1 tile (x ~ S q), from the tile's amax:
//   NVFP4  S = e4m3(bmax / 6 / g) g              (the E4M3 block scale under the tensor scale g)
//   MXFP4  S = 2^(floor(log2 bmax) - 2)           (OCP MX: the exponent of bmax less E2M1's emax 2;
//                                                  values up to 8 S: those above 6 S saturate)
//          S = 2^ceil(log2(bmax / 6))              with stochastic rounding: no value saturates, so
//                                                  the rounding stays unbiased (Tseng et al. 2025
//                                                  scale by 3/4 for the same reason)
// clamped to the E8M0 range 2^-127 .. 2^127;
//   E2M1   S = bmax / 6 in f32                   (the largest value maps onto 6)
// 0 for an all-zero tile (its values stay 0).
LB_HD_INLINE float tile_scale(LpFormat f, float bmax, float g, bool stochastic) {
  if (!(bmax > 0)) return 0.0f;
  if (f == LpFormat::E2M1) return bmax / 6.0f;
  if (f == LpFormat::NVFP4) return g > 0 ? e4m3_to_float(float_to_e4m3(bmax / 6.0f / g)) * g : 0.0f;
  int e;
  if (!stochastic) {
    (void)frexpf(bmax, &e);  // bmax = m 2^e, m in [0.5, 1): floor(log2 bmax) = e - 1
    e = e - 1 - 2;
  } else {
    const float q = bmax / 6.0f;
    const float m = frexpf(q, &e);  // ceil(log2 q) = e, or e - 1 when q is a power of two
    if (m == 0.5f) e -= 1;
  }
  e = e < -127 ? -127 : e > 127 ? 127 : e;
  return ldexpf(1.0f, e);
}

// e2m1_to_float(float_to_e2m1(v)) without branches (the codec's thresholds, ties to the even code,
// saturating at 6), so that tile loops run without mispredictions; equal to the codec for every
// finite v (tests/ops/test_lp_quant.cpp sweeps it; a negative v that rounds to 0 gives -0). Not for
// NaN (lp_quantize never passes one).
LB_HD_INLINE float e2m1_round_nearest(float v) {
  const float a = fabsf(v);
  const int idx = int(a > 0.25f) + int(a >= 0.75f) + int(a > 1.25f) + int(a >= 1.75f) + int(a > 2.5f) +
                  int(a >= 3.5f) + int(a > 5.0f);
  const int halves = idx + int(idx > 4) * (idx - 4) + int(idx == 7) * 2;  // 0 1 2 3 4 6 8 12
  return bits_f32(f32_bits(0.5f * float(halves)) | (f32_bits(v) & 0x80000000u));
}
// e2m1_to_float(float_to_e2m1_stochastic(v, u)), the same way.
LB_HD_INLINE float e2m1_round_stochastic(float v, float u) {
  float a = fabsf(v);
  a = a < 6.0f ? a : 6.0f;
  const float step = 0.5f * float(1 + int(a >= 2.0f) + 2 * int(a >= 4.0f));  // 0.5, 1, 2
  const float lo = float(int(a / step)) * step;  // a / step is exact, in [0, 12]: truncation is floor
  const float mag = lo + step * float(int(u * step < a - lo));
  return bits_f32(f32_bits(mag) | (f32_bits(v) & 0x80000000u));
}

// One E2M1 value with decode scale S (S = 0: 0, as x / 0 rounds to a finite code).
LB_HD_INLINE float qdq_e2m1(float x, float S, bool stochastic, float u) {
  return (stochastic ? e2m1_round_stochastic(x / S, u) : e2m1_round_nearest(x / S)) * S;
}

// Quantize-dequantize one value with decode scale S (S = 0: the value is 0; None and BF16 ignore S).
// u: the uniform draw of stochastic rounding (E2M1 only).
LB_HD_INLINE float qdq(LpFormat f, float x, float S, bool stochastic, float u) {
  switch (f) {
    case LpFormat::None: return x;
    case LpFormat::BF16: return fmt_bf16_to_f32(fmt_f32_to_bf16(x));
    case LpFormat::E4M3: return S > 0 ? e4m3_to_float(float_to_e4m3(x / S)) * S : 0.0f;
    case LpFormat::E5M2: return S > 0 ? e5m2_to_float(float_to_e5m2(x / S)) * S : 0.0f;
    default: return qdq_e2m1(x, S, stochastic, u);
  }
}

// The FP8 code of x under decode scale S, the code of qdq's E4M3/E5M2 cases (S = 0: code 0, value
// 0), and the value of a code (native FP8 GEMMs, ops::lp_quantize_fp8).
LB_HD_INLINE uint8_t fp8_code(LpFormat f, float x, float S) {
  if (!(S > 0)) return 0;
  return f == LpFormat::E4M3 ? float_to_e4m3(x / S) : float_to_e5m2(x / S);
}
LB_HD_INLINE float fp8_value(LpFormat f, uint8_t code) {
  return f == LpFormat::E4M3 ? e4m3_to_float(code) : e5m2_to_float(code);
}

// ---- the differentiable gradient estimator (DGE) of FP4 training --------------------------------
// Wang et al. 2025, "Optimizing Large Language Model Training Using FP4 Quantization" (arXiv
// 2501.17116), sec. 3.1: on each interval [lo, lo + d] between neighbouring E2M1 values (in scaled
// units, v = x / S) the step of round-to-nearest is approximated by the power function
//   f(v) = lo + d/2 (1 + sign(u) |u|^(1/k)),   u = 2 (v - lo) / d - 1  in [-1, 1],
// which passes through both grid values and is steepest at the rounding threshold (u = 0); its
// derivative
//   f'(v) = (1/k) |u|^(1/k - 1)
// replaces the straight-through estimator's 1 in the backward of the weight quantizer, clipped to at
// most `clip` (the paper's 3.0; the derivative is infinite at u = 0). k = 1 is f(v) = v (the STE);
// k -> infinity is the step itself. Odd-symmetric: f(-v) = -f(v), f'(-v) = f'(v). |v| >= 6 (the
// saturated end; with the E2M1 format's absmax scaling only the amax itself, up to rounding) takes
// the last interval's end, f'(6) = 1/k. The intervals: steps of 0.5 below 2, 1 in [2, 4), 2 in [4, 6].
template <class T>
LB_HD_INLINE void dge_interval(T& a, T& lo, T& d) {  // a = |v|, clamped to 6 (NaN too: no UB below)
  if (!(a < T(6))) a = T(6);
  d = a < T(2) ? T(0.5) : a < T(4) ? T(1) : T(2);
  const T base = a < T(2) ? T(0) : a < T(4) ? T(2) : T(4);
  T steps = T(int((a - base) / d));  // whole steps above base (a >= 0)
  if (a >= T(6)) steps = T(0);       // 6 closes [4, 6]
  lo = base + steps * d;
}
// f(v) in the arithmetic of T (tests compare its f64 finite differences with dge_derivative).
template <class T>
LB_HD_INLINE T dge_smooth(T v, T k) {
  T a = v < T(0) ? -v : v, lo, d;
  dge_interval(a, lo, d);
  const T u = T(2) * (a - lo) / d - T(1);
  const T mag = u == T(0) ? T(0) : (u < T(0) ? -std::pow(-u, T(1) / k) : std::pow(u, T(1) / k));
  const T f = lo + d / T(2) * (T(1) + mag);
  return v < T(0) ? -f : f;
}
// min(f'(v), clip) in f32 (the backward's factor).
LB_HD_INLINE float dge_derivative(float v, float k, float clip) {
  float a = fabsf(v), lo, d;
  dge_interval(a, lo, d);
  const float u = fabsf(2.0f * (a - lo) / d - 1.0f);
  const float g = powf(u, 1.0f / k - 1.0f) / k;  // u = 0: +inf (k > 1), clipped below
  return g < clip ? g : clip;
}

}  // namespace lp
}  // namespace lowbit::ops
