// AdamW (Loshchilov & Hutter 2019), PyTorch's torch.optim.AdamW update:
//   p <- p - lr*wd*p;  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
//   p <- p - lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
#include <cmath>
#include <cstdlib>

#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr, double beta1, double beta2,
                double eps, double weight_decay, int64_t step) {
  const char* op = "adamw_step";
  detail::check_contiguous(op, param, "param");
  detail::check_shape(op, grad, param.shape(), "grad");
  detail::check_shape(op, m, param.shape(), "m");
  detail::check_shape(op, v, param.shape(), "v");
  if (step < 1) throw_error(op, ": step counts from 1, got ", step);
  LB_CUDA_ROUTE(param, adamw_step, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step);
  const double bc1 = 1.0 - std::pow(beta1, double(step)), bc2 = 1.0 - std::pow(beta2, double(step));
  detail::dispatch_float(op, param.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T *p = param.data<T>(), *mp = m.data<T>(), *vp = v.data<T>();
    const T* g = grad.data<T>();
    const int64_t n = param.numel();
    parallel_for(n, 32768, [&](int64_t lo_, int64_t hi_) {
      for (int64_t i = lo_; i < hi_; ++i) {
        double pi = double(p[i]) * (1.0 - lr * weight_decay);
        const double mi = beta1 * double(mp[i]) + (1.0 - beta1) * double(g[i]);
        const double vi = beta2 * double(vp[i]) + (1.0 - beta2) * double(g[i]) * double(g[i]);
        pi -= lr * (mi / bc1) / (std::sqrt(vi / bc2) + eps);
        p[i] = T(pi);
        mp[i] = T(mi);
        vp[i] = T(vi);
      }
    });
  });
}

void adamw_step_multi(const std::vector<AdamwParam>& params, double lr, double beta1, double beta2, double eps,
                      double weight_decay, int64_t step) {
  const char* op = "adamw_step_multi";
  if (step < 1) throw_error(op, ": step counts from 1, got ", step);
  bool fused = !params.empty();
  for (const AdamwParam& a : params) {
    LB_CHECK(a.param && a.grad && a.m && a.v, op, ": a parameter entry has a null tensor");
    detail::check_contiguous(op, *a.param, "param");
    detail::check_shape(op, *a.grad, a.param->shape(), "grad");
    detail::check_shape(op, *a.m, a.param->shape(), "m");
    detail::check_shape(op, *a.v, a.param->shape(), "v");
    for (const Tensor* t : {static_cast<const Tensor*>(a.param), a.grad, static_cast<const Tensor*>(a.m),
                            static_cast<const Tensor*>(a.v)})
      fused = fused && detail::on_cuda(*t) && t->dtype() == DType::F32 && t->is_contiguous();
  }
#ifdef LOWBIT_WITH_CUDA
  // LOWBIT_ADAMW_FUSED=0 (read once): one launch per tensor (adamw_step), for measuring what the
  // fusion saves (bench: the per-epoch times of `lowbit quantize --method sapr --apiq-verbose`).
  static const bool fusion_on = [] {
    const char* e = std::getenv("LOWBIT_ADAMW_FUSED");
    return !(e && e[0] == '0');
  }();
  if (fused && fusion_on) {
    std::vector<AdamwParam> nonempty;
    for (const AdamwParam& a : params)
      if (a.param->numel() > 0) nonempty.push_back(a);
    if (!nonempty.empty()) cuda::adamw_step_multi(nonempty, lr, beta1, beta2, eps, weight_decay, step);
    return;
  }
#endif
  (void)fused;
  for (const AdamwParam& a : params)
    adamw_step(*a.param, *a.grad, *a.m, *a.v, lr, beta1, beta2, eps, weight_decay, step);
}

}  // namespace lowbit::ops
