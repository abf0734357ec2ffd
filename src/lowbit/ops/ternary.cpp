// CPU reference bodies of BitNet b1.58's weight and activation quantizers (ops/ternary.h); the CUDA
// bodies are ops/cuda/act_quant.cu (the per-element arithmetic shared: ops/act_quant_math.h).
#include "lowbit/ops/ternary.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "lowbit/core/threads.h"
#include "lowbit/ops/act_quant_math.h"
#include "lowbit/ops/dispatch.h"
#include "lowbit/ops/ops.h"

namespace lowbit::ops {

TernaryScale parse_ternary_scale(const std::string& name, const std::string& what) {
  if (name == "mean") return TernaryScale::AbsMean;
  if (name == "median") return TernaryScale::AbsMedian;
  throw_error(what, ": '", name, "' is not a ternary scale (expected mean or median)");
}

const char* ternary_scale_name(TernaryScale s) { return s == TernaryScale::AbsMedian ? "median" : "mean"; }

ActScale parse_act_scale(const std::string& name, const std::string& what) {
  if (name == "absmax") return ActScale::AbsMax;
  if (name == "absmean") return ActScale::AbsMean;
  throw_error(what, ": '", name, "' is not an activation quantizer (expected absmax or absmean)");
}

const char* act_scale_name(ActScale s) { return s == ActScale::AbsMean ? "absmean" : "absmax"; }

namespace {

void check_float(const char* op, const Tensor& t, const char* name) {
  if (!t.defined()) throw_error(op, ": ", name, " is undefined");
  if (t.dtype() != DType::F32 && t.dtype() != DType::F64)
    throw_error(op, ": ", name, " is ", t.describe(), "; f32 or f64 expected");
}

// out reused when it already fits (shape, dtype, device, contiguous), else allocated like x.
void fit_output(const Tensor& x, Tensor& out) {
  if (!out.defined() || out.shape() != x.shape() || out.dtype() != x.dtype() || !out.is_contiguous() ||
      out.device() != x.device())
    out = Tensor::empty(x.shape(), x.dtype(), x.device());
}

// gamma in T's precision: the mean as quant/format.cpp's ternary_tensor_scale computes it (a double
// sum, then T), or the median of |w| (the lower middle element for an even count, as torch.median).
template <class T>
T gamma_of(const T* w, int64_t n, TernaryScale scale) {
  T g = 0;
  if (n > 0 && scale == TernaryScale::AbsMean) {
    const double sum = parallel_sum(n, 1 << 16, [&](int64_t lo, int64_t hi) {
      double s = 0;
      for (int64_t i = lo; i < hi; ++i) s += std::fabs(double(w[i]));
      return s;
    });
    g = T(sum / double(n));
  } else if (n > 0) {
    std::vector<T> a(size_t(n), T(0));
    for (int64_t i = 0; i < n; ++i) a[size_t(i)] = std::fabs(w[i]);
    const auto mid = a.begin() + (n - 1) / 2;
    std::nth_element(a.begin(), mid, a.end());
    g = *mid;
  }
  return g < T(1e-5f) ? T(1e-5f) : g;  // std::max's rule (the CUDA body's too)
}

}  // namespace

double ternary_gamma(const Tensor& w, TernaryScale scale) {
  check_float("ternary_gamma", w, "w");
  const Tensor wc = w.contiguous();
  if (detail::on_cuda(wc)) {
#ifdef LOWBIT_WITH_CUDA
    return cuda::ternary_gamma(wc, scale);
#else
    detail::no_cuda("ternary_gamma");
#endif
  }
  return detail::dispatch_float("ternary_gamma", wc.dtype(), [&](auto tag) -> double {
    using T = decltype(tag);
    return double(gamma_of<T>(wc.data<T>(), wc.numel(), scale));
  });
}

double ternary_fake_quant(const Tensor& w, TernaryScale scale, Tensor& out) {
  check_float("ternary_fake_quant", w, "w");
  const Tensor wc = w.contiguous();
  fit_output(wc, out);
  if (detail::on_cuda(wc)) {
#ifdef LOWBIT_WITH_CUDA
    return cuda::ternary_fake_quant(wc, scale, out);
#else
    detail::no_cuda("ternary_fake_quant");
#endif
  }
  return detail::dispatch_float("ternary_fake_quant", wc.dtype(), [&](auto tag) -> double {
    using T = decltype(tag);
    const T* p = wc.data<T>();
    T* o = out.data<T>();
    const int64_t n = wc.numel();
    const T g = gamma_of<T>(p, n, scale);
    parallel_for(n, 1 << 15, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) o[i] = aq::ternary_qdq<T>(p[i], g);
    });
    return double(g);
  });
}

void act_quant_int8(const Tensor& x, Tensor& out) {
  check_float("act_quant_int8", x, "x");
  if (x.dim() != 2) throw_error("act_quant_int8: x must be [rows, channels], got ", x.describe());
  const Tensor xc = x.contiguous();
  fit_output(xc, out);
  // Per-token symmetric int8 with the absmax scale: the general fake quantizer with one group a row.
  fake_quant(xc, 8, false, 1.0, xc.size(1), false, out);
}

void act_quant_int4_absmean(const Tensor& x, Tensor& out) {
  const char* op = "act_quant_int4_absmean";
  check_float(op, x, "x");
  if (x.dim() != 2) throw_error(op, ": x must be [rows, channels], got ", x.describe());
  const Tensor xc = x.contiguous();
  fit_output(xc, out);
  LB_CUDA_ROUTE(xc, act_quant_int4_absmean, xc, out);
  const int64_t M = xc.size(0), C = xc.size(1);
  detail::dispatch_float(op, xc.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = xc.data<T>();
    T* yp = out.data<T>();
    parallel_for(M, std::max<int64_t>(1, 8192 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = xp + r * C;
        T* yr = yp + r * C;
        double sum = 0;
        for (int64_t c = 0; c < C; ++c) sum += std::fabs(double(xr[c]));
        const double s = aq::int4_absmean_step(sum, C);  // beta / sqrt(7): the grid's step
        for (int64_t c = 0; c < C; ++c) yr[c] = T(aq::int4_absmean_value(double(xr[c]), s));
      }
    });
  });
}

}  // namespace lowbit::ops
