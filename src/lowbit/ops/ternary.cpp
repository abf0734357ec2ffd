// CPU reference bodies of BitNet b1.58's weight and activation quantizers (ops/ternary.h).
#include "lowbit/ops/ternary.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "lowbit/core/threads.h"
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

void check_cpu_float(const char* op, const Tensor& t, const char* name) {
  if (!t.defined()) throw_error(op, ": ", name, " is undefined");
  if (t.device() != Device::CPU)
    throw_error(op, ": ", name, " is ", t.describe(), "; BitLinear's quantizers have CPU bodies only");
  if (t.dtype() != DType::F32 && t.dtype() != DType::F64)
    throw_error(op, ": ", name, " is ", t.describe(), "; f32 or f64 expected");
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
  return std::max(g, T(1e-5f));
}

}  // namespace

double ternary_gamma(const Tensor& w, TernaryScale scale) {
  check_cpu_float("ternary_gamma", w, "w");
  const Tensor wc = w.contiguous();
  return detail::dispatch_float("ternary_gamma", wc.dtype(), [&](auto tag) -> double {
    using T = decltype(tag);
    return double(gamma_of<T>(wc.data<T>(), wc.numel(), scale));
  });
}

double ternary_fake_quant(const Tensor& w, TernaryScale scale, Tensor& out) {
  check_cpu_float("ternary_fake_quant", w, "w");
  const Tensor wc = w.contiguous();
  if (!out.defined() || out.shape() != wc.shape() || out.dtype() != wc.dtype() || !out.is_contiguous() ||
      out.device() != Device::CPU)
    out = Tensor::empty(wc.shape(), wc.dtype());
  return detail::dispatch_float("ternary_fake_quant", wc.dtype(), [&](auto tag) -> double {
    using T = decltype(tag);
    const T* p = wc.data<T>();
    T* o = out.data<T>();
    const int64_t n = wc.numel();
    const T g = gamma_of<T>(p, n, scale);
    parallel_for(n, 1 << 15, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) o[i] = std::clamp(std::rint(p[i] / g), T(-1), T(1)) * g;
    });
    return double(g);
  });
}

void act_quant_int8(const Tensor& x, Tensor& out) {
  check_cpu_float("act_quant_int8", x, "x");
  if (x.dim() != 2) throw_error("act_quant_int8: x must be [rows, channels], got ", x.describe());
  const Tensor xc = x.contiguous();
  if (!out.defined() || out.shape() != xc.shape() || out.dtype() != xc.dtype() || !out.is_contiguous() ||
      out.device() != Device::CPU)
    out = Tensor::empty(xc.shape(), xc.dtype());
  // Per-token symmetric int8 with the absmax scale: the general fake quantizer with one group a row.
  fake_quant(xc, 8, false, 1.0, xc.size(1), false, out);
}

void act_quant_int4_absmean(const Tensor& x, Tensor& out) {
  const char* op = "act_quant_int4_absmean";
  check_cpu_float(op, x, "x");
  if (x.dim() != 2) throw_error(op, ": x must be [rows, channels], got ", x.describe());
  const Tensor xc = x.contiguous();
  if (!out.defined() || out.shape() != xc.shape() || out.dtype() != xc.dtype() || !out.is_contiguous() ||
      out.device() != Device::CPU)
    out = Tensor::empty(xc.shape(), xc.dtype());
  const int64_t M = xc.size(0), C = xc.size(1);
  const double inv_sqrt7 = 1.0 / std::sqrt(7.0);
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
        const double beta = std::max(C > 0 ? sum / double(C) : 0.0, 1e-5);
        const double s = beta * inv_sqrt7;  // beta / sqrt(7): the grid's step
        for (int64_t c = 0; c < C; ++c) yr[c] = T(std::clamp(std::nearbyint(double(xr[c]) / s), -8.0, 7.0) * s);
      }
    });
  });
}

}  // namespace lowbit::ops
