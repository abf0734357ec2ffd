// RMSNorm (Zhang & Sennrich 2019): y = x * r * w with r = 1 / sqrt(mean_j x_j^2 + eps).
// Backward: dx_j = r w_j dy_j - x_j r^3 / D * sum_k dy_k w_k x_k;  dw_j = sum_rows dy_j x_j r.
#include <cmath>
#include <vector>

#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

namespace {
// Rows i .. i+R-1: each row's sum of squares in double, in column order (one sum per row, exactly
// as row by row); R rows at once only so that their R independent additions overlap (the sum of
// one row is a chain of dependent additions; decode steps of several sequences normalize 8 rows).
template <int R, class T>
void rows(const T* xp, const T* wp, int64_t D, double eps, int64_t i, T* yp, T* rp) {
  double ss[R] = {};
  for (int64_t j = 0; j < D; ++j)
    for (int r = 0; r < R; ++r) {
      const double v = double(xp[(i + r) * D + j]);
      ss[r] += v * v;
    }
  for (int r = 0; r < R; ++r) {
    const T* xr = xp + (i + r) * D;
    const T s = T(1.0 / std::sqrt(ss[r] / double(D) + eps));
    rp[i + r] = s;
    for (int64_t j = 0; j < D; ++j) yp[(i + r) * D + j] = xr[j] * s * wp[j];
  }
}
}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) {
  const char* op = "rmsnorm_forward";
  detail::check_contiguous(op, x, "x");
  const int64_t D = x.size(-1), M = x.numel() / (D > 0 ? D : 1);
  detail::check_shape(op, w, {D}, "w");
  detail::check_shape(op, y, x.shape(), "y");
  detail::check_shape(op, rstd, {M}, "rstd");
  detail::check_same_kind(op, x, w, "w");
  detail::check_same_kind(op, x, y, "y");
  detail::check_same_kind(op, x, rstd, "rstd");
  LB_CUDA_ROUTE(x, rmsnorm_forward, x, w, eps, y, rstd);
  detail::dispatch_float(op, x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* xp = x.data<T>();
    const T* wp = w.data<T>();
    T* yp = y.data<T>();
    T* rp = rstd.data<T>();
    parallel_for(M, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, D)), [&](int64_t lo_, int64_t hi_) {
      int64_t i = lo_;
      for (; i + 8 <= hi_; i += 8) rows<8>(xp, wp, D, eps, i, yp, rp);
      for (; i + 4 <= hi_; i += 4) rows<4>(xp, wp, D, eps, i, yp, rp);
      for (; i < hi_; ++i) rows<1>(xp, wp, D, eps, i, yp, rp);
    });
  });
}

void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw) {
  const char* op = "rmsnorm_backward";
  detail::check_contiguous(op, x, "x");
  const int64_t D = x.size(-1), M = x.numel() / (D > 0 ? D : 1);
  detail::check_shape(op, dy, x.shape(), "dy");
  detail::check_shape(op, dx, x.shape(), "dx");
  detail::check_shape(op, dw, {D}, "dw");
  detail::check_shape(op, rstd, {M}, "rstd");
  LB_CUDA_ROUTE(x, rmsnorm_backward, dy, x, w, rstd, dx, dw);
  detail::dispatch_float(op, x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T *dyp = dy.data<T>(), *xp = x.data<T>(), *wp = w.data<T>(), *rp = rstd.data<T>();
    T* dxp = dx.data<T>();
    std::vector<double> dw_acc(size_t(D), 0.0);
    for (int64_t i = 0; i < M; ++i) {
      const T* xr = xp + i * D;
      const T* g = dyp + i * D;
      const double r = rp[i];
      double dot = 0;
      for (int64_t j = 0; j < D; ++j) {
        dot += double(g[j]) * double(wp[j]) * double(xr[j]);
        dw_acc[j] += double(g[j]) * double(xr[j]) * r;
      }
      const double c = dot * r * r * r / double(D);
      for (int64_t j = 0; j < D; ++j) dxp[i * D + j] = T(r * double(wp[j]) * double(g[j]) - double(xr[j]) * c);
    }
    T* dwp = dw.data<T>();
    for (int64_t j = 0; j < D; ++j) dwp[j] = T(dw_acc[j]);
  });
}

}  // namespace lowbit::ops
