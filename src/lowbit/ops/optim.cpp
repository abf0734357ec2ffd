// AdamW (Loshchilov & Hutter 2019), PyTorch's torch.optim.AdamW update:
//   p <- p - lr*wd*p;  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
//   p <- p - lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
#include <algorithm>
#include <cmath>
#include <vector>
#include <cstdlib>

#include "lowbit/core/threads.h"
#include "lowbit/ops/blockwise8.h"
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
  AdamwGroupStep g;
  g.params = params;
  g.hyper = AdamwHyper{lr, beta1, beta2, eps, weight_decay, step};
  adamw_step_groups({g});
}

void adamw_step_groups(const std::vector<AdamwGroupStep>& groups) {
  const char* op = "adamw_step_groups";
  bool fused = false;
  for (const AdamwGroupStep& grp : groups) {
    if (grp.hyper.step < 1) throw_error(op, ": step counts from 1, got ", grp.hyper.step);
    fused = fused || !grp.params.empty();
  }
  for (const AdamwGroupStep& grp : groups)
    for (const AdamwParam& a : grp.params) {
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
  // fusion saves (bench: the per-epoch times of `lowbit quantize --method sapr --apiq-verbose`,
  // bench_apiq_block's ms/step).
  static const bool fusion_on = [] {
    const char* e = std::getenv("LOWBIT_ADAMW_FUSED");
    return !(e && e[0] == '0');
  }();
  if (fused && fusion_on) {
    std::vector<AdamwParam> ps;
    std::vector<AdamwHyper> hs;
    for (const AdamwGroupStep& grp : groups)
      for (const AdamwParam& a : grp.params)
        if (a.param->numel() > 0) ps.push_back(a), hs.push_back(grp.hyper);
    if (!ps.empty()) cuda::adamw_step_fused(ps, hs);
    return;
  }
#endif
  (void)fused;
  for (const AdamwGroupStep& grp : groups) {
    const AdamwHyper& h = grp.hyper;
    for (const AdamwParam& a : grp.params)
      adamw_step(*a.param, *a.grad, *a.m, *a.v, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.step);
  }
}

void adamw8_step(Tensor& param, const Tensor& grad, Tensor& m_codes, Tensor& m_absmax, Tensor& v_codes,
                 Tensor& v_absmax, double lr, double beta1, double beta2, double eps, double weight_decay,
                 int64_t step) {
  const char* op = "adamw8_step";
  for (const Tensor* t : {static_cast<const Tensor*>(&param), &grad, static_cast<const Tensor*>(&m_codes),
                          static_cast<const Tensor*>(&m_absmax), static_cast<const Tensor*>(&v_codes),
                          static_cast<const Tensor*>(&v_absmax)})
    if (t->defined() && detail::on_cuda(*t))
      throw_error(op, ": --optimizer-bits 8 runs on the CPU only for now (", t->describe(), ")");
  detail::check_contiguous(op, param, "param");
  const int64_t n = param.numel(), nb = blockwise8_blocks(n);
  detail::check_shape(op, grad, param.shape(), "grad");
  detail::check_shape(op, m_codes, param.shape(), "m codes");
  detail::check_shape(op, v_codes, param.shape(), "v codes");
  detail::check_shape(op, m_absmax, {nb}, "m absmax");
  detail::check_shape(op, v_absmax, {nb}, "v absmax");
  for (const Tensor* t : {&grad, static_cast<const Tensor*>(&m_codes), static_cast<const Tensor*>(&m_absmax),
                          static_cast<const Tensor*>(&v_codes), static_cast<const Tensor*>(&v_absmax)})
    detail::check_contiguous(op, *t, "a state tensor");
  if (param.dtype() != DType::F32 || grad.dtype() != DType::F32)
    throw_error(op, ": param and grad must be f32, got ", param.describe(), " and ", grad.describe());
  if (m_codes.dtype() != DType::U8 || v_codes.dtype() != DType::U8 || m_absmax.dtype() != DType::F32 ||
      v_absmax.dtype() != DType::F32)
    throw_error(op, ": codes must be u8 and absmax f32, got ", m_codes.describe(), ", ", m_absmax.describe(), ", ",
                v_codes.describe(), ", ", v_absmax.describe());
  if (step < 1) throw_error(op, ": step counts from 1, got ", step);
  const double bc1 = 1.0 - std::pow(beta1, double(step)), bc2 = 1.0 - std::pow(beta2, double(step));
  float* p = param.data<float>();
  const float* g = grad.data<float>();
  uint8_t *mc = m_codes.data<uint8_t>(), *vc = v_codes.data<uint8_t>();
  float *ma = m_absmax.data<float>(), *va = v_absmax.data<float>();
  parallel_for(nb, 8, [&](int64_t b0, int64_t b1) {
    std::vector<float> mbuf(static_cast<size_t>(kBlockwise8Block)), vbuf(static_cast<size_t>(kBlockwise8Block));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kBlockwise8Block, len = std::min(kBlockwise8Block, n - lo);
      blockwise8_decode_block(mc + lo, ma[b], len, true, mbuf.data());
      blockwise8_decode_block(vc + lo, va[b], len, false, vbuf.data());
      for (int64_t k = 0; k < len; ++k) {  // adamw_step's arithmetic
        const int64_t i = lo + k;
        double pi = double(p[i]) * (1.0 - lr * weight_decay);
        const double mi = beta1 * double(mbuf[size_t(k)]) + (1.0 - beta1) * double(g[i]);
        const double vi = beta2 * double(vbuf[size_t(k)]) + (1.0 - beta2) * double(g[i]) * double(g[i]);
        pi -= lr * (mi / bc1) / (std::sqrt(vi / bc2) + eps);
        p[i] = float(pi);
        mbuf[size_t(k)] = float(mi);
        vbuf[size_t(k)] = float(vi);
      }
      ma[b] = blockwise8_encode_block(mbuf.data(), len, true, mc + lo);
      va[b] = blockwise8_encode_block(vbuf.data(), len, false, vc + lo);
    }
  });
}

}  // namespace lowbit::ops
