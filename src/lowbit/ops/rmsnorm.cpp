// RMSNorm (Zhang & Sennrich 2019): y = x * r * w with r = 1 / sqrt(mean_j x_j^2 + eps).
// Backward: dx_j = r w_j dy_j - x_j r^3 / D * sum_k dy_k w_k x_k;  dw_j = sum_rows dy_j x_j r.
#include <cmath>
#include <vector>

#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

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
      for (int64_t i = lo_; i < hi_; ++i) {
        const T* xr = xp + i * D;
        double ss = 0;
        for (int64_t j = 0; j < D; ++j) ss += double(xr[j]) * double(xr[j]);
        const T r = T(1.0 / std::sqrt(ss / double(D) + eps));
        rp[i] = r;
        for (int64_t j = 0; j < D; ++j) yp[i * D + j] = xr[j] * r * wp[j];
      }
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
