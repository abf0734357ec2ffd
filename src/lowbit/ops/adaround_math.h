// AdaRound's per-weight arithmetic (methods/adaround.h), written once for the CPU reference body
// (ops/adaround.cpp), the CUDA body (ops/cuda/adaround.cu) and the host objective that the gradient
// checks read (AdaRoundProblem::loss). C++17: nvcc compiles it too. T is double (the CPU's solver
// and the GPU's: the loop runs in f64 on both) or float.
//
// One weight k of a layer: V the rounding variable, fl = floor(W/s) + z (its code before the
// rounding), s its group's step, z its zero point, [qmin, qmax] the code range:
//   u = sigmoid(V)(zeta - gamma) + gamma,  h = clamp(u, 0, 1)          (the rectified sigmoid)
//   c = fl + h,  Q = s (clamp(c, qmin, qmax) - z)                         (the soft weight)
//   dh/dV = sigmoid(V)(1 - sigmoid(V))(zeta - gamma) where 0 < u < 1, else 0
//   regularizer  reg (1 - |2h - 1|^beta),  d/dh = -2 reg beta |2h - 1|^(beta - 1) sign(2h - 1)
//   d loss / dV = (inside ? -(E H)_k s : 0) dh/dV + d reg/dh dh/dV,  inside = qmin <= c <= qmax
// (E = W - Q; rec = 1/2 sum_rows E H E^T, so d rec / dQ = -(E H)). torch.clamp's gradient passes
// at the bounds, hence "inside" includes them.
#pragma once
#include <cmath>

#include "lowbit/core/format_traits.h"

namespace lowbit::ops::adaround {

// The grid and the rectified sigmoid's stretch, shared by every weight of a layer.
struct Grid {
  double qmin = 0, qmax = 0;
  double zeta = 1.1, gamma = -0.1;
};

template <class T>
struct Soft {
  T q;       // the soft weight s (clamp(fl + h, qmin, qmax) - z)
  T h;       // h(V)
  T dhdv;    // dh/dV (0 where the rectified sigmoid is clipped)
  bool inside;
};

template <class T>
LB_HD_INLINE Soft<T> soft(T v, T fl, T s, T z, const Grid& g) {
  const T zg = T(g.zeta) - T(g.gamma);
  const T sg = T(1) / (T(1) + exp(-v));
  const T u = sg * zg + T(g.gamma);
  const T h = u < T(0) ? T(0) : (u > T(1) ? T(1) : u);
  const T c = fl + h;
  const T lo = T(g.qmin), hi = T(g.qmax);
  Soft<T> r;
  r.h = h;
  r.dhdv = (u <= T(0) || u >= T(1)) ? T(0) : sg * (T(1) - sg) * zg;
  r.inside = c >= lo && c <= hi;
  r.q = ((c < lo ? lo : (c > hi ? hi : c)) - z) * s;
  return r;
}

// |2h - 1|^(beta - 1), 0 where 2h - 1 = 0 (the regularizer's factor).
template <class T>
LB_HD_INLINE T reg_factor(T h, T beta) {
  const T a = fabs(T(2) * h - T(1));
  return a > T(0) ? pow(a, beta - T(1)) : T(0);
}

// The regularizer's term of one weight: reg (1 - |2h - 1|^beta).
template <class T>
LB_HD_INLINE T reg_term(T h, T beta, T reg) {
  const T a = fabs(T(2) * h - T(1));
  return reg * (T(1) - reg_factor(h, beta) * a);
}

// d loss / dV of one weight; eh = (E H)_k.
template <class T>
LB_HD_INLINE T grad(const Soft<T>& p, T eh, T s, T beta, T reg) {
  if (p.dhdv == T(0)) return T(0);
  T dh = p.inside ? -eh * s : T(0);
  const T a = fabs(T(2) * p.h - T(1));
  if (reg > T(0) && a > T(0)) dh -= reg * beta * reg_factor(p.h, beta) * (T(2) * p.h > T(1) ? T(2) : T(-2));
  return dh * p.dhdv;
}

// One Adam step (Kingma & Ba; PyTorch's arithmetic, as ops::adamw_step with no weight decay) of x
// with gradient g; bc1 = 1 - beta1^t, bc2 = 1 - beta2^t.
template <class T>
LB_HD_INLINE void adam(T& x, T& m, T& v, T g, double lr, double beta1, double beta2, double eps, double bc1, double bc2) {
  const double mi = beta1 * double(m) + (1.0 - beta1) * double(g);
  const double vi = beta2 * double(v) + (1.0 - beta2) * double(g) * double(g);
  x = T(double(x) - lr * (mi / bc1) / (sqrt(vi / bc2) + eps));
  m = T(mi);
  v = T(vi);
}

}  // namespace lowbit::ops::adaround
