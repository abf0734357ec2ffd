// The per-element arithmetic of the QAT weight quantizers (ops/qat_quant.h), written once for the
// CPU reference bodies (ops/qat_quant.cpp, T = float or double) and the CUDA bodies
// (ops/cuda/qat_quant.cu, T = float). Header-only and callable from device code, on top of the
// number formats' shared host/device header (core/format_traits.h: FormatTraits, LB_HD). The
// formulas and gradient conventions are stated in quant/lsq.h (LSQ / LSQ+) and quant/paretoq.h
// (ParetoQ's sign and SEQ); here they are only computed.
#pragma once
#include <cmath>

#include "lowbit/core/format_traits.h"

namespace lowbit::ops {

// ParetoQ's low-bit grid: Ŵ = (k + shift) · α / n with k = round(clamp(w/α, -c, c) · n - shift)
// (SEQ), or k = sign(w) with n = 1 (sign). outside: the α gradient of a clamped element (Q±).
struct SeqGrid {
  bool sign;
  double n, shift, outside;
};

namespace qat {

constexpr double kSeqEps = 1e-5;          // the reference's floor of α
constexpr double kSeqClip = 1.0 - 1e-2;   // SEQ's clip of w / α

// Round half to even and std::clamp in T's arithmetic. The f32 cases are core/format_traits.h's
// fmt_rint / fmt_clamp (q_rint(float) calls fmt_rint); the f64 ones are not in the format table,
// which is f32 only, and the CPU reference bodies run T = double for the gradient checks: folding
// them into fmt_rint / fmt_clamp would round every f64 value to f32 first (not the same numbers), so
// they stay here.
LB_HD_INLINE float q_rint(float x) { return fmt_rint(x); }  // = rintf
LB_HD_INLINE double q_rint(double x) { return rint(x); }
template <class T>
LB_HD_INLINE T q_clamp(T v, T lo, T hi) {  // std::clamp; for T = float the same expression as fmt_clamp
  return v < lo ? lo : (hi < v ? hi : v);
}

// ---- LSQ / LSQ+ (quant/lsq.h) -----------------------------------------------------------------
// The code range in signed units (q - zr): symmetric [-Qp, Qp]; asymmetric the codes [0, qmax]
// themselves (the zero point is added to w / s).
// slice (MatQuant, quant/matryoshka.h): 0, or r < bits: the value is the r-bit Matryoshka slice of
// the code (core/format_traits.h matryoshka_slice_code) back on the c-bit grid, asymmetric only.
struct LsqGrid {
  float qlo, qhi;
  bool asym;
  int bits = 0, slice = 0;
};
LB_HD_INLINE LsqGrid lsq_grid(const FormatTraits& f) {
  if (f.kind == QuantKind::IntSym) {
    const float qp = float((1 << (f.bits - 1)) - 1);
    return {-qp, qp, false, f.bits, 0};
  }
  return {0.0f, float(f.qmax()), true, f.bits, 0};
}
// The grid of the r-bit slice (r >= bits: no slice). Callers check that f is asymmetric.
LB_HD_INLINE LsqGrid lsq_grid_sliced(const FormatTraits& f, int r) {
  LsqGrid g = lsq_grid(f);
  g.slice = r > 0 && r < f.bits ? r : 0;
  return g;
}
// The top of the sliced grid on the c-bit scale, 2^c - 2^(c-r) (qhi without a slice): codes above it
// slice to it. The straight-through surrogate of the sliced quantizer clamps u to [qlo, lsq_top].
LB_HD_INLINE float lsq_top(const LsqGrid& g) {
  return g.slice ? g.qhi - float((1 << (g.bits - g.slice)) - 1) : g.qhi;
}
// The code q (an integer of the c-bit grid) as the grid value its slice decodes to: S(q, r) 2^(c-r).
template <class T>
LB_HD_INLINE T lsq_sliced(T q, const LsqGrid& g) {
  if (!g.slice || !(q >= T(0) && q <= T(g.qhi))) return q;  // a NaN stays NaN (no float -> uint8 conversion)
  return T(int(matryoshka_slice_code(uint8_t(q), g.bits, g.slice)) << (g.bits - g.slice));
}
// zr = clamp(round(offset), qlo, qhi) for asymmetric grids, 0 for symmetric ones.
template <class T>
LB_HD_INLINE T lsq_zero(T offset, const LsqGrid& g) {
  return g.asym ? q_clamp(q_rint(offset), T(g.qlo), T(g.qhi)) : T(0);
}
template <class T>
LB_HD_INLINE T lsq_value(T w, T s, T zr, const LsqGrid& g) {
  const T u = w / s + zr;
  return (lsq_sliced(q_rint(q_clamp(u, T(g.qlo), T(g.qhi))), g) - zr) * s;
}
// One element's share of the backward for the upstream gradient d (before the gradient scale):
// dw, and the terms summed over the group into dstep and doffset.
template <class T>
struct LsqGrad {
  T dw, ds, dz;
};
// With a slice, "inside" is qlo <= u <= lsq_top(g) and q the sliced grid value (the values above the
// top all slice to it, so they are the clamped ones of the surrogate).
template <class T>
LB_HD_INLINE LsqGrad<T> lsq_grad(T w, T s, T zr, T d, const LsqGrid& g) {
  const T v = w / s, u = v + zr, hi = T(lsq_top(g));
  if (u >= T(g.qlo) && u <= hi) return {d, d * (lsq_sliced(q_rint(u), g) - zr - v), T(0)};
  const T q = u < T(g.qlo) ? T(g.qlo) : hi;
  return {T(0), d * (q - zr), -d * s};
}

// ---- ParetoQ sign / SEQ (quant/paretoq.h) -----------------------------------------------------
template <class T>
LB_HD_INLINE T seq_alpha(T a) {  // α floored at the reference's eps
  return a > T(kSeqEps) ? a : T(kSeqEps);
}
// The code k of an element w with v = w / α.
template <class T>
LB_HD_INLINE T seq_k(const SeqGrid& q, T w, T v) {
  if (q.sign) return w > 0 ? T(1) : (w < 0 ? T(-1) : T(0));
  return q_rint(q_clamp(v, T(-kSeqClip), T(kSeqClip)) * T(q.n) - T(q.shift));
}
// Ŵ for a floored α a (h = a / n: the grid step, computed once per group by the callers).
template <class T>
LB_HD_INLINE T seq_value(const SeqGrid& q, T w, T a, T h) {
  return (seq_k(q, w, w / a) + T(q.shift)) * h;
}
template <class T>
struct SeqGrad {
  T dw, da;
};
template <class T>
LB_HD_INLINE SeqGrad<T> seq_grad(const SeqGrid& q, T w, T a, T d) {
  const T lim = q.sign ? T(1) : T(kSeqClip);
  const T v = w / a;
  const bool inside = v >= -lim && v <= lim;
  T da;
  if (q.sign) da = d * seq_k(q, w, v);
  else if (inside) da = d * ((seq_k(q, w, v) + T(q.shift)) / T(q.n) - v);
  else da = d * (v < 0 ? T(-q.outside) : T(q.outside));
  return {inside ? d : T(0), da};
}

}  // namespace qat
}  // namespace lowbit::ops
