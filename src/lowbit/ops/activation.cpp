// SiLU (Elfwing et al. 2018) and the SwiGLU gate of the Llama MLP (Shazeer 2020):
//   silu(x) = x sigmoid(x),  silu'(x) = sigmoid(x) (1 + x (1 - sigmoid(x))),
//   swiglu(g, u) = silu(g) u,  dg = dy u silu'(g),  du = dy silu(g).
#include <cmath>
#include <type_traits>

#include "lowbit/core/threads.h"
#include "lowbit/core/vecmath.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

namespace {
template <class T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}
void check_unary(const char* op, const Tensor& x, const Tensor& y, const char* yn) {
  detail::check_contiguous(op, x, "x");
  detail::check_shape(op, y, x.shape(), yn);
  detail::check_same_kind(op, x, y, yn);
}
}  // namespace

void silu_forward(const Tensor& x, Tensor& y) {
  check_unary("silu_forward", x, y, "y");
  LB_CUDA_ROUTE(x, silu_forward, x, y);
  detail::dispatch_float("silu_forward", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* xp = x.data<T>();
    T* yp = y.data<T>();
    const int64_t n = x.numel();
    if constexpr (std::is_same_v<T, float>) {
      parallel_for(n, 32768, [&](int64_t b, int64_t e) { vec::silu(xp + b, yp + b, e - b); });
      return;
    }
    parallel_for(n, 32768, [&](int64_t lo_, int64_t hi_) {
      for (int64_t i = lo_; i < hi_; ++i) yp[i] = xp[i] * sigmoid(xp[i]);
    });
  });
}

void silu_backward(const Tensor& dy, const Tensor& x, Tensor& dx) {
  check_unary("silu_backward", x, dx, "dx");
  detail::check_shape("silu_backward", dy, x.shape(), "dy");
  LB_CUDA_ROUTE(x, silu_backward, dy, x, dx);
  detail::dispatch_float("silu_backward", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T *xp = x.data<T>(), *g = dy.data<T>();
    T* dp = dx.data<T>();
    const int64_t n = x.numel();
    parallel_for(n, 32768, [&](int64_t lo_, int64_t hi_) {
      for (int64_t i = lo_; i < hi_; ++i) {
        const T s = sigmoid(xp[i]);
        dp[i] = g[i] * s * (T(1) + xp[i] * (T(1) - s));
      }
    });
  });
}

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& y) {
  check_unary("swiglu_forward", gate, y, "y");
  check_unary("swiglu_forward", gate, up, "up");
  LB_CUDA_ROUTE(gate, swiglu_forward, gate, up, y);
  detail::dispatch_float("swiglu_forward", gate.dtype(), [&](auto t) {
    using T = decltype(t);
    const T *gp = gate.data<T>(), *up_ = up.data<T>();
    T* yp = y.data<T>();
    const int64_t n = gate.numel();
    if constexpr (std::is_same_v<T, float>) {
      // Elementwise (any split gives the same numbers); from 8192 values on (a batched decode step of
      // a few sequences' MLP rows) over the pool.
      parallel_for(n, 4096, [&](int64_t b, int64_t e) { vec::swiglu(gp + b, up_ + b, yp + b, e - b); });
      return;
    }
    parallel_for(n, 32768, [&](int64_t lo_, int64_t hi_) {
      for (int64_t i = lo_; i < hi_; ++i) yp[i] = gp[i] * sigmoid(gp[i]) * up_[i];
    });
  });
}

void swiglu_backward(const Tensor& dy, const Tensor& gate, const Tensor& up, Tensor& dgate, Tensor& dup) {
  check_unary("swiglu_backward", gate, dgate, "dgate");
  check_unary("swiglu_backward", gate, dup, "dup");
  detail::check_shape("swiglu_backward", dy, gate.shape(), "dy");
  detail::check_shape("swiglu_backward", up, gate.shape(), "up");
  LB_CUDA_ROUTE(gate, swiglu_backward, dy, gate, up, dgate, dup);
  detail::dispatch_float("swiglu_backward", gate.dtype(), [&](auto t) {
    using T = decltype(t);
    const T *g = dy.data<T>(), *gp = gate.data<T>(), *up_ = up.data<T>();
    T *dg = dgate.data<T>(), *du = dup.data<T>();
    const int64_t n = gate.numel();
    parallel_for(n, 32768, [&](int64_t lo_, int64_t hi_) {
      for (int64_t i = lo_; i < hi_; ++i) {
        const T s = sigmoid(gp[i]);
        const T silu = gp[i] * s;
        du[i] = g[i] * silu;
        dg[i] = g[i] * up_[i] * s * (T(1) + gp[i] * (T(1) - s));
      }
    });
  });
}

}  // namespace lowbit::ops
