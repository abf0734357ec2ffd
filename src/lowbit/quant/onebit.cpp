#include "lowbit/quant/onebit.h"

#include <algorithm>
#include <cmath>

#include "lowbit/core/error.h"
#include "lowbit/ops/ops.h"

namespace lowbit {

SvidMethod parse_svid_method(const std::string& name) {
  if (name == "power") return SvidMethod::Power;
  if (name == "nmf") return SvidMethod::Nmf;
  throw_error("unknown SVID method '", name, "' (expected power or nmf)");
}

const char* svid_method_name(SvidMethod m) { return m == SvidMethod::Nmf ? "nmf" : "power"; }

namespace {

Tensor cpu_weight(const Tensor& w, const char* who) {
  LB_CHECK(w.defined() && w.dim() == 2 && w.numel() > 0, who, ": weight must be a non-empty [out, in], got ",
           w.defined() ? w.describe() : std::string("undefined"));
  return w.to(Device::CPU).to(DType::F64).contiguous();
}

double norm2(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

}  // namespace

Svid svid(const Tensor& w_in, SvidMethod m, int iters) {
  const Tensor w = cpu_weight(w_in, "svid");
  const int64_t out = w.size(0), in = w.size(1);
  std::vector<double> a(size_t(out * in));
  const double* pw = w.data<double>();
  for (int64_t i = 0; i < out * in; ++i) a[size_t(i)] = std::fabs(pw[i]);
  Svid r;
  r.h.assign(size_t(out), 0.0);
  r.g.assign(size_t(in), 1.0);  // a positive start: the iterates stay non-negative
  if (m == SvidMethod::Nmf)  // Lee & Seung start from positive values: h = row means of |W|
    for (int64_t i = 0; i < out; ++i) {
      double s = 0;
      for (int64_t j = 0; j < in; ++j) s += a[size_t(i * in + j)];
      r.h[size_t(i)] = std::max(s / double(in), 1e-30);
    }
  std::vector<double> prev;
  for (int it = 0; it < iters; ++it) {
    prev = r.h;
    if (m == SvidMethod::Power) {
      // u <- A v / |A v|, v <- Aᵀ u / |Aᵀ u| (power iteration on Aᵀ A, A = |W|)
      for (int64_t i = 0; i < out; ++i) {
        double s = 0;
        for (int64_t j = 0; j < in; ++j) s += a[size_t(i * in + j)] * r.g[size_t(j)];
        r.h[size_t(i)] = s;
      }
      const double nh = norm2(r.h);
      if (nh == 0) break;  // W = 0
      for (double& x : r.h) x /= nh;
      std::fill(r.g.begin(), r.g.end(), 0.0);
      for (int64_t i = 0; i < out; ++i)
        for (int64_t j = 0; j < in; ++j) r.g[size_t(j)] += a[size_t(i * in + j)] * r.h[size_t(i)];
      // leave g = Aᵀ u unnormalised: then h gᵀ = u uᵀ A is the rank-1 projection (g = σ v)
    } else {
      // Multiplicative updates for min |A - h gᵀ|_F, h, g >= 0 (Lee & Seung 2001):
      //   h <- h ⊙ (A g) / (h gᵀg),  g <- g ⊙ (Aᵀ h) / (g hᵀh)
      double gg = 0;
      for (double x : r.g) gg += x * x;
      if (gg == 0) break;
      for (int64_t i = 0; i < out; ++i) {
        double s = 0;
        for (int64_t j = 0; j < in; ++j) s += a[size_t(i * in + j)] * r.g[size_t(j)];
        const double den = r.h[size_t(i)] * gg;
        r.h[size_t(i)] = den > 0 ? r.h[size_t(i)] * s / den : 0.0;
      }
      double hh = 0;
      for (double x : r.h) hh += x * x;
      if (hh == 0) break;
      std::vector<double> ah(size_t(in), 0.0);
      for (int64_t i = 0; i < out; ++i)
        for (int64_t j = 0; j < in; ++j) ah[size_t(j)] += a[size_t(i * in + j)] * r.h[size_t(i)];
      for (int64_t j = 0; j < in; ++j) {
        const double den = r.g[size_t(j)] * hh;
        r.g[size_t(j)] = den > 0 ? r.g[size_t(j)] * ah[size_t(j)] / den : 0.0;
      }
    }
    // Converged when h's direction stops moving (compare normalised vectors).
    const double n0 = norm2(prev), n1 = norm2(r.h);
    if (it > 0 && n0 > 0 && n1 > 0) {
      double d = 0;
      for (int64_t i = 0; i < out; ++i) {
        const double e = r.h[size_t(i)] / n1 - prev[size_t(i)] / n0;
        d += e * e;
      }
      if (d < 1e-20) break;
    }
  }
  // Balance: the same norm for h and g (the product h gᵀ unchanged).
  const double nh = norm2(r.h), ng = norm2(r.g);
  if (nh > 0 && ng > 0) {
    const double s = std::sqrt(ng / nh);
    for (double& x : r.h) x *= s;
    for (double& x : r.g) x /= s;
  }
  return r;
}

QuantizedTensor onebit_pack(const Tensor& w_in, const std::vector<double>& h, const std::vector<double>& g) {
  const Tensor w = cpu_weight(w_in, "onebit_pack");
  const QuantFormat& f = quant_format(QuantFormatId::OneBit);
  const int64_t out = w.size(0), in = w.size(1);
  LB_CHECK(int64_t(h.size()) == out && int64_t(g.size()) == in, "onebit_pack: h must have ", out, " and g ", in,
           " values for a [", out, ", ", in, "] weight, got ", h.size(), " and ", g.size());
  QuantizedTensor q;
  q.format = f.id;
  q.shape = {out, in};
  q.codes = Tensor::zeros({out, f.row_bytes(in)}, DType::U8);
  q.scales = Tensor::empty({out, 1}, DType::F16);
  q.col_scales = Tensor::empty({in}, DType::F16);
  const double* pw = w.data<double>();
  uint8_t* c = q.codes.data<uint8_t>();
  const int64_t rb = f.row_bytes(in);
  for (int64_t i = 0; i < out; ++i)
    for (int64_t j = 0; j < in; ++j)
      if (pw[i * in + j] >= 0) c[i * rb + j / 8] = uint8_t(c[i * rb + j / 8] | 1u << (j % 8));
  auto store = [&](const std::vector<double>& v, uint16_t* dst, const char* what) {
    for (size_t k = 0; k < v.size(); ++k) {
      const float x = float(v[k]);
      LB_CHECK(std::isfinite(x) && std::fabs(x) <= 65504.0f, "[onebit] value ", what, "[", k, "] = ", v[k],
               " does not fit in f16");
      dst[k] = f32_to_f16(x);
    }
  };
  store(h, static_cast<uint16_t*>(q.scales.raw_data()), "h");
  store(g, static_cast<uint16_t*>(q.col_scales.raw_data()), "g");
  q.validate();
  return q;
}

QuantizedTensor onebit_quantize(const Tensor& w, SvidMethod m) {
  const Svid s = svid(w, m);
  return onebit_pack(w, s.h, s.g);
}

// ---- the training layer's weight function ------------------------------------------------------

namespace {

template <class T>
void onebit_value(const T* w, const T* h, const T* g, int64_t out, int64_t in, T* y) {
#pragma omp parallel for schedule(static) if (out * in > (int64_t(1) << 14))
  for (int64_t i = 0; i < out; ++i)
    for (int64_t j = 0; j < in; ++j) {
      const T v = h[i] * g[j];
      y[i * in + j] = w[i * in + j] >= T(0) ? v : -v;
    }
}

// dW = G ⊙ h gᵀ, dh_i = Σ_j G_ij s_ij g_j, dg_j = Σ_i G_ij s_ij h_i.
template <class T>
void onebit_grads(const T* w, const T* h, const T* gv, const T* G, int64_t out, int64_t in, T* dw, T* dh, T* dg) {
  if (dg) std::fill(dg, dg + in, T(0));
  for (int64_t i = 0; i < out; ++i) {
    T acc = 0;
    for (int64_t j = 0; j < in; ++j) {
      const T gij = G[i * in + j];
      const T sg = w[i * in + j] >= T(0) ? gij : -gij;
      if (dw) dw[i * in + j] = gij * h[i] * gv[j];
      acc += sg * gv[j];
      if (dg) dg[j] += sg * h[i];
    }
    if (dh) dh[i] = acc;
  }
}

template <class F>
auto dispatch_float(DType dt, F&& fn) {
  switch (dt) {
    case DType::F32: return fn(float{});
    case DType::F64: return fn(double{});
    default: throw_error("onebit_weight: CPU body supports f32 and f64, got ", dtype_name(dt));
  }
}

}  // namespace

Var onebit_weight(const Var& w, const Var& h, const Var& g) {
  LB_CHECK(w.defined() && w.value().dim() == 2, "onebit_weight: W must be [out, in]");
  const Tensor& wv = w.value();
  const int64_t out = wv.size(0), in = wv.size(1);
  LB_CHECK(wv.device() == Device::CPU && (wv.dtype() == DType::F32 || wv.dtype() == DType::F64),
           "onebit_weight: W must be f32 or f64 on the CPU (no CUDA body), got ", wv.describe());
  LB_CHECK(h.defined() && h.value().shape() == Shape({out}) && h.value().dtype() == wv.dtype() &&
               h.value().device() == Device::CPU,
           "onebit_weight: h must be ", dtype_name(wv.dtype()), " [", out, "] on the CPU, got ",
           h.defined() ? h.value().describe() : std::string("undefined"));
  LB_CHECK(g.defined() && g.value().shape() == Shape({in}) && g.value().dtype() == wv.dtype() &&
               g.value().device() == Device::CPU,
           "onebit_weight: g must be ", dtype_name(wv.dtype()), " [", in, "] on the CPU, got ",
           g.defined() ? g.value().describe() : std::string("undefined"));
  const Tensor W = wv.contiguous(), H = h.value().contiguous(), Gv = g.value().contiguous();
  Tensor y = Tensor::empty({out, in}, wv.dtype());
  dispatch_float(wv.dtype(), [&](auto t) {
    using T = decltype(t);
    onebit_value<T>(W.data<T>(), H.data<T>(), Gv.data<T>(), out, in, y.data<T>());
  });
  return make_result(y, {w, h, g}, "onebit_weight", [w, h, g, W, H, Gv, out, in](const Tensor& grad) {
    const Tensor G = grad.contiguous();
    const DType dt = W.dtype();
    Tensor dw = w.requires_grad() ? Tensor::empty({out, in}, dt) : Tensor();
    Tensor dh = h.requires_grad() ? Tensor::empty({out}, dt) : Tensor();
    Tensor dg = g.requires_grad() ? Tensor::empty({in}, dt) : Tensor();
    dispatch_float(dt, [&](auto t) {
      using T = decltype(t);
      onebit_grads<T>(W.data<T>(), H.data<T>(), Gv.data<T>(), G.data<T>(), out, in, dw.defined() ? dw.data<T>() : nullptr,
                      dh.defined() ? dh.data<T>() : nullptr, dg.defined() ? dg.data<T>() : nullptr);
    });
    if (dw.defined()) accumulate_grad(w, dw);
    if (dh.defined()) accumulate_grad(h, dh);
    if (dg.defined()) accumulate_grad(g, dg);
  });
}

// ---- OneBitTrainLinear ------------------------------------------------------------------------

namespace {
Tensor f16_rounded(const std::vector<double>& v, DType dt) {
  Tensor t = Tensor::empty({int64_t(v.size())}, DType::F64);
  for (size_t k = 0; k < v.size(); ++k) t.data<double>()[k] = double(f16_to_f32(f32_to_f16(float(v[k]))));
  return t.to(dt);
}
Tensor f16_rounded(const Tensor& t) {
  const Tensor c = t.to(DType::F64).contiguous();
  std::vector<double> v(c.data<double>(), c.data<double>() + c.numel());
  return f16_rounded(v, t.dtype());
}
}  // namespace

OneBitTrainLinear::OneBitTrainLinear(const Tensor& weight, const Tensor& bias, SvidMethod init) {
  LB_CHECK(weight.defined() && weight.dim() == 2, "qat --method onebit: weight must be [out, in], got ",
           weight.defined() ? weight.describe() : std::string("undefined"));
  LB_CHECK(weight.device() == Device::CPU, "qat --method onebit: the OneBit layer has CPU bodies only; got a weight on ",
           weight.describe());
  const DType dt = weight.dtype() == DType::F64 ? DType::F64 : DType::F32;
  const Svid s = svid(weight, init);
  weight_ = Var(weight.to(dt).contiguous().clone(), true);
  h_ = Var(f16_rounded(s.h, dt), true);
  g_ = Var(f16_rounded(s.g, dt), true);
  if (bias.defined()) bias_ = Var(bias.to(Device::CPU).to(dt).contiguous().clone(), false);
}

Var OneBitTrainLinear::forward(const Var& x) const { return linear(x, quantized_weight(), bias_); }

Tensor OneBitTrainLinear::effective_weight() const {
  NoGradGuard ng;
  return quantized_weight().value();
}

void OneBitTrainLinear::snap_values() {
  Var h = h_, g = g_;
  h.mutable_value().copy_(f16_rounded(h_.value()));
  g.mutable_value().copy_(f16_rounded(g_.value()));
}

QuantizedTensor OneBitTrainLinear::encode() const {
  const Tensor h = h_.value().to(DType::F64).contiguous(), g = g_.value().to(DType::F64).contiguous();
  return onebit_pack(weight_.value(), std::vector<double>(h.data<double>(), h.data<double>() + h.numel()),
                     std::vector<double>(g.data<double>(), g.data<double>() + g.numel()));
}

}  // namespace lowbit
