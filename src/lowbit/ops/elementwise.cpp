// Elementwise arithmetic, reductions used by autograd (row sums, totals, squared norms).
#include <cmath>

#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

namespace {

// b is a's shape, or a vector of a's last-dim size broadcast over rows. Returns the row length
// of b's broadcast (0 = same shape).
int64_t check_binary(const char* op, const Tensor& a, const Tensor& b, const Tensor& out) {
  detail::check_contiguous(op, a, "a");
  detail::check_contiguous(op, b, "b");
  detail::check_contiguous(op, out, "out");
  detail::check_same_kind(op, a, b, "b");
  detail::check_same_kind(op, a, out, "out");
  detail::check_same_shape(op, out, a, "out", "a");
  if (a.shape() == b.shape()) return 0;
  if (b.dim() == 1 && a.dim() >= 1 && b.size(0) == a.size(-1)) return b.size(0);
  throw_error(op, ": cannot broadcast ", b.describe(), " to ", a.describe());
}

template <class Fn>
void binary(const char* op, const Tensor& a, const Tensor& b, Tensor& out, Fn fn) {
  const int64_t row = check_binary(op, a, b, out);
  detail::dispatch_float(op, a.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* x = a.data<T>();
    const T* y = b.data<T>();
    T* o = out.data<T>();
    const int64_t n = a.numel();
    if (row == 0) {
      parallel_for(n, 32768, [&](int64_t lo_, int64_t hi_) {
        for (int64_t i = lo_; i < hi_; ++i) o[i] = fn(x[i], y[i]);
      });
    } else {
      parallel_for(n, 32768, [&](int64_t lo_, int64_t hi_) {
        for (int64_t i = lo_; i < hi_; ++i) o[i] = fn(x[i], y[i % row]);
      });
    }
  });
}

}  // namespace

void add(const Tensor& a, const Tensor& b, Tensor& out) {
  LB_CUDA_ROUTE(a, add, a, b, out);
  binary("add", a, b, out, [](auto x, auto y) { return x + y; });
}
void sub(const Tensor& a, const Tensor& b, Tensor& out) {
  LB_CUDA_ROUTE(a, sub, a, b, out);
  binary("sub", a, b, out, [](auto x, auto y) { return x - y; });
}
void mul(const Tensor& a, const Tensor& b, Tensor& out) {
  LB_CUDA_ROUTE(a, mul, a, b, out);
  binary("mul", a, b, out, [](auto x, auto y) { return x * y; });
}

void scale(const Tensor& x, double s, Tensor& out) {
  detail::check_contiguous("scale", x, "x");
  detail::check_contiguous("scale", out, "out");
  detail::check_same_shape("scale", out, x, "out", "x");
  detail::check_same_kind("scale", x, out, "out");
  LB_CUDA_ROUTE(x, scale, x, s, out);
  detail::dispatch_float("scale", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* p = x.data<T>();
    T* o = out.data<T>();
    for (int64_t i = 0; i < x.numel(); ++i) o[i] = T(s) * p[i];
  });
}

void axpy(double alpha, const Tensor& x, Tensor& y) {
  detail::check_contiguous("axpy", x, "x");
  detail::check_contiguous("axpy", y, "y");
  detail::check_same_shape("axpy", x, y, "x", "y");
  detail::check_same_kind("axpy", x, y, "y");
  LB_CUDA_ROUTE(x, axpy, alpha, x, y);
  detail::dispatch_float("axpy", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* p = x.data<T>();
    T* o = y.data<T>();
    const int64_t n = x.numel();
    parallel_for(n, 32768, [&](int64_t lo_, int64_t hi_) {
      for (int64_t i = lo_; i < hi_; ++i) o[i] += T(alpha) * p[i];
    });
  });
}

void sum_rows(const Tensor& x, Tensor& out) {
  detail::check_contiguous("sum_rows", x, "x");
  const int64_t C = x.size(-1), R = x.numel() / (C > 0 ? C : 1);
  detail::check_shape("sum_rows", out, {C}, "out");
  detail::check_same_kind("sum_rows", x, out, "out");
  LB_CUDA_ROUTE(x, sum_rows, x, out);
  detail::dispatch_float("sum_rows", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* p = x.data<T>();
    T* o = out.data<T>();
    for (int64_t c = 0; c < C; ++c) o[c] = 0;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c) o[c] += p[r * C + c];
  });
}

void sum(const Tensor& x, Tensor& out) {
  detail::check_contiguous("sum", x, "x");
  detail::check_shape("sum", out, {}, "out");
  detail::check_same_kind("sum", x, out, "out");
  LB_CUDA_ROUTE(x, sum, x, out);
  detail::dispatch_float("sum", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* p = x.data<T>();
    double s = 0;
    for (int64_t i = 0; i < x.numel(); ++i) s += p[i];
    out.data<T>()[0] = T(s);
  });
}

double sum_squares(const Tensor& x) {
  detail::check_contiguous("sum_squares", x, "x");
#ifdef LOWBIT_WITH_CUDA
  if (detail::on_cuda(x)) return cuda::sum_squares(x);
#else
  if (detail::on_cuda(x)) detail::no_cuda("sum_squares");
#endif
  return detail::dispatch_float("sum_squares", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* p = x.data<T>();
    double s = 0;
    const int64_t n = x.numel();
    s += parallel_sum(n, 32768, [&](int64_t lo_, int64_t hi_) {
      double s = 0;
      for (int64_t i = lo_; i < hi_; ++i) s += double(p[i]) * double(p[i]);
      return s;
    });
    return s;
  });
}

}  // namespace lowbit::ops
