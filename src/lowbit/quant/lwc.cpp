// Learnable-weight-clipping fake quantization: forward and backward side by side (see lwc.h for the
// formulas and the gradient conventions).
#include "lowbit/quant/lwc.h"

#include <algorithm>
#include <cmath>

#include "lowbit/quant/quantize.h"

#ifdef LOWBIT_WITH_CUDA
#include "lowbit/ops/cuda/cuda_ops.h"
#endif

namespace lowbit {

namespace {

template <class T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Everything about one group that forward and backward share. The backward recomputes it from the
// inputs instead of storing it (it is a few flops per element, and nothing is kept alive).
template <class T>
struct GroupState {
  T hi = 0, lo = 0;                  // asym: 0-inclusive max/min; sym: absmax in hi
  int64_t arg_hi = -1, arg_lo = -1;  // element (group-relative) that sets hi / lo; -1: a constant bound
  T sg = 1, sb = 1;                  // sigmoid(gamma), sigmoid(beta)
  T s = 1, z = 0;                    // scale and (integer-valued) zero point
  T qlo = 0, qmax = 0;               // code range
  T denom = 1;                       // s = clipped range / denom
  bool trainable_scale = true;       // false: s is a constant (clamped at kLwcMinScale, or an all-zero group)
};

template <class T>
GroupState<T> group_state(const QuantFormat& f, const T* w, int64_t n, T gamma, T beta) {
  GroupState<T> st;
  st.qmax = T(f.qmax());
  st.sg = sigmoid(gamma);
  if (f.kind == QuantKind::IntAsym) {
    int64_t imax = 0, imin = 0;
    for (int64_t j = 1; j < n; ++j) {
      if (w[j] > w[imax]) imax = j;
      if (w[j] < w[imin]) imin = j;
    }
    if (w[imax] > 0) st.hi = w[imax], st.arg_hi = imax;
    if (w[imin] < 0) st.lo = w[imin], st.arg_lo = imin;
    st.sb = sigmoid(beta);
    st.denom = st.qmax;
    T hic = st.sg * st.hi, loc = st.sb * st.lo;
    if (st.hi == 0 && st.lo == 0) {  // all-zero group: the format's (-1, 1) range, nothing to learn
      hic = 1, loc = -1;
      st.trainable_scale = false;
    }
    T s = (hic - loc) / st.denom;
    if (s < T(kLwcMinScale)) s = T(kLwcMinScale), st.trainable_scale = false;
    st.s = s;
    st.z = std::clamp(T(std::nearbyint(-loc / s)), T(0), st.qmax);
    st.qlo = 0;
  } else {  // IntSym
    int64_t iabs = 0;
    for (int64_t j = 1; j < n; ++j)
      if (std::fabs(w[j]) > std::fabs(w[iabs])) iabs = j;
    const T half = T(int64_t(1) << (f.bits - 1));
    st.denom = half - 1;
    st.hi = std::fabs(w[iabs]);
    T a = st.sg * st.hi;
    if (st.hi == 0) {
      a = 1;  // all-zero group, as format.h's int_sym_params
      st.trainable_scale = false;
    } else {
      st.arg_hi = iabs;
    }
    T s = a / st.denom;
    if (s < T(kLwcMinScale)) s = T(kLwcMinScale), st.trainable_scale = false;
    st.s = s;
    st.z = half;
    st.qlo = 1;
  }
  return st;
}

template <class T>
void lwc_forward(const QuantFormat& f, const T* w, const T* gamma, const T* beta, int64_t out, int64_t in, T* y) {
  const int64_t G = f.n_groups(in);
#pragma omp parallel for schedule(static) if (out * in > (int64_t(1) << 16))
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t b = f.group_begin(g), e = f.group_end(g, in);
      const T* wg = w + r * in + b;
      const auto st = group_state<T>(f, wg, e - b, gamma[r * G + g], beta ? beta[r * G + g] : T(0));
      for (int64_t j = 0; j < e - b; ++j) {
        const T q = std::clamp(T(std::nearbyint(wg[j] / st.s)) + st.z, st.qlo, st.qmax);
        y[r * in + b + j] = (q - st.z) * st.s;
      }
    }
}

// dy [out, in] -> dw (may be null), dgamma, dbeta (null for symmetric formats); all written.
template <class T>
void lwc_backward(const QuantFormat& f, const T* w, const T* gamma, const T* beta, const T* dy, int64_t out,
                  int64_t in, T* dw, T* dgamma, T* dbeta) {
  const int64_t G = f.n_groups(in);
#pragma omp parallel for schedule(static) if (out * in > (int64_t(1) << 16))
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t b = f.group_begin(g), e = f.group_end(g, in);
      const T* wg = w + r * in + b;
      const T* dyg = dy + r * in + b;
      T* dwg = dw ? dw + r * in + b : nullptr;
      const auto st = group_state<T>(f, wg, e - b, gamma[r * G + g], beta ? beta[r * G + g] : T(0));
      T ds = 0;
      for (int64_t j = 0; j < e - b; ++j) {
        const T u = wg[j] / st.s, n = T(std::nearbyint(u)), q = n + st.z;
        if (q >= st.qlo && q <= st.qmax) {  // on the grid: STE for round(), d/ds of round_ste(u)*s
          if (dwg) dwg[j] = dyg[j];
          ds += dyg[j] * (n - u);
        } else {  // clamped: Q = (qc - z) * s
          if (dwg) dwg[j] = 0;
          ds += dyg[j] * (std::clamp(q, st.qlo, st.qmax) - st.z);
        }
      }
      T dg = 0, db = 0;
      if (st.trainable_scale) {
        // s = (sg*hi - sb*lo) / denom (asym) or sg*hi / denom (sym, hi = absmax).
        const T dhic = ds / st.denom;
        dg = dhic * st.hi * st.sg * (1 - st.sg);
        if (dwg && st.arg_hi >= 0) {
          const T sign = (f.kind == QuantKind::IntSym && wg[st.arg_hi] < 0) ? T(-1) : T(1);
          dwg[st.arg_hi] += dhic * st.sg * sign;
        }
        if (f.kind == QuantKind::IntAsym) {
          const T dloc = -ds / st.denom;
          db = dloc * st.lo * st.sb * (1 - st.sb);
          if (dwg && st.arg_lo >= 0) dwg[st.arg_lo] += dloc * st.sb;
        }
      }
      dgamma[r * G + g] = dg;
      if (dbeta) dbeta[r * G + g] = db;
    }
}

template <class F>
auto dispatch_float(DType dt, F&& fn) {
  switch (dt) {
    case DType::F32: return fn(float{});
    case DType::F64: return fn(double{});
    default: throw_error("lwc_fake_quant: CPU body supports f32 and f64, got ", dtype_name(dt));
  }
}

void check_inputs(const Tensor& w, const Tensor& gamma, const Tensor& beta, const QuantFormat& f) {
  LB_CHECK(lwc_supports(f), "lwc_fake_quant: format ", f.name,
           " has no learnable clipping (it supports intB{gG,pc}[s], int8pc and the ggml types ", lwc_ggml_names(), ")");
  LB_CHECK(w.dim() == 2 && w.numel() > 0, "lwc_fake_quant [", f.name, "]: weight must be a non-empty [out, in], got ",
           w.describe());
  LB_CHECK(!lwc_is_ggml(f) || w.size(1) % f.group_size == 0, "lwc_fake_quant [", f.name, "]: rows of ", w.size(1),
           " values are not whole ", f.group_size, "-value blocks");
  const Shape gs{w.size(0), lwc_n_groups(f, w.size(1))};
  LB_CHECK(gamma.defined() && gamma.shape() == gs, "lwc_fake_quant [", f.name, "]: gamma must be ", shape_str(gs),
           lwc_is_ggml(f) ? " (one logit per sub-block of " + std::to_string(lwc_ggml_sub_block(f)) + " values)"
                          : std::string(" (one logit per group)"),
           ", got ", gamma.defined() ? gamma.describe() : std::string("undefined"));
  if (lwc_has_beta(f))
    LB_CHECK(beta.defined() && beta.shape() == gs, "lwc_fake_quant [", f.name, "]: beta must be ", shape_str(gs),
             ", got ", beta.defined() ? beta.describe() : std::string("undefined"));
  else
    LB_CHECK(!beta.defined(), "lwc_fake_quant [", f.name,
             "]: symmetric formats clip with one factor (gamma); beta must be undefined");
  for (const Tensor* t : {&w, &gamma, &beta}) {
    if (!t->defined()) continue;
    LB_CHECK(t->device() == w.device(), "lwc_fake_quant [", f.name, "]: ", t->describe(),
             " is not on the weight's device (", device_name(w.device()), ")");
    LB_CHECK(t->dtype() == w.dtype(), "lwc_fake_quant [", f.name, "]: clipping logits ", t->describe(),
             " must have the weight's dtype ", dtype_name(w.dtype()));
  }
}

void check_like(const Tensor& t, const Tensor& w, const Shape& s, const char* what, const QuantFormat& f) {
  LB_CHECK(t.defined() && t.shape() == s && t.dtype() == w.dtype() && t.device() == w.device() && t.is_contiguous(),
           "lwc [", f.name, "]: ", what, " must be a contiguous ", dtype_name(w.dtype()), " ", shape_str(s), " on ",
           device_name(w.device()), ", got ", t.defined() ? t.describe() : std::string("undefined"));
}

[[maybe_unused]] bool on_cuda(const Tensor& w) { return w.device() == Device::CUDA; }

}  // namespace

bool lwc_supports(const QuantFormat& f) {
  return f.kind == QuantKind::IntAsym || f.kind == QuantKind::IntSym || lwc_is_ggml(f);
}

int64_t lwc_n_groups(const QuantFormat& f, int64_t in) {
  return lwc_is_ggml(f) ? in / lwc_ggml_sub_block(f) : f.n_groups(in);
}

bool lwc_has_beta(const QuantFormat& f) { return lwc_is_ggml(f) ? lwc_ggml_has_beta(f) : f.kind == QuantKind::IntAsym; }

QuantizedTensor lwc_encode(const Tensor& w, const Tensor& gamma, const Tensor& beta, const QuantFormat& f) {
  if (lwc_is_ggml(f)) return lwc_encode_ggml(w, gamma, beta, f);
  const Tensor w32 = w.to(Device::CPU).to(DType::F32).contiguous();
  return quantize_with_params(w32, f, lwc_clipped_params(w32, gamma, beta, f), 1.0f);
}

void lwc_forward_into(const Tensor& w, const Tensor& gamma, const Tensor& beta, const QuantFormat& f, Tensor& y) {
  check_inputs(w, gamma, beta, f);
  for (const Tensor* t : {&w, &gamma, &beta})
    LB_CHECK(!t->defined() || t->is_contiguous(), "lwc_forward_into [", f.name, "]: ", t->describe(), " must be contiguous");
  // A bf16 output of f32 weights: Q rounded to bf16 as it is written (the operand of a bf16 GEMM
  // under autocast; the CUDA kernels store bf16 directly, the CPU body rounds an f32 result).
  if (y.defined() && y.dtype() == DType::BF16 && w.dtype() == DType::F32 && !lwc_is_ggml(f)) {
    LB_CHECK(y.shape() == w.shape() && y.device() == w.device() && y.is_contiguous(), "lwc [", f.name,
             "]: the bf16 output must be a contiguous ", shape_str(w.shape()), " on ", device_name(w.device()),
             ", got ", y.describe());
    if (!on_cuda(w)) {
      Tensor y32 = Tensor::empty(w.shape(), DType::F32, w.device());
      lwc_forward_into(w, gamma, beta, f, y32);
      y.copy_(y32);  // round to nearest even
      return;
    }
  } else {
    check_like(y, w, w.shape(), "the output", f);
  }
  const int64_t out = w.size(0), in = w.size(1);
  if (lwc_is_ggml(f)) return lwc_ggml_forward_into(w, gamma, beta, f, y);
  if (on_cuda(w)) {
#ifdef LOWBIT_WITH_CUDA
    ops::cuda::lwc_forward(w, gamma, beta, static_cast<const FormatTraits&>(f), y);
    return;
#else
    throw_error("lwc_fake_quant: tensor is on CUDA but this build has no CUDA backend");
#endif
  }
  dispatch_float(w.dtype(), [&](auto t) {
    using T = decltype(t);
    lwc_forward<T>(f, w.data<T>(), gamma.data<T>(), beta.defined() ? beta.data<T>() : nullptr, out, in, y.data<T>());
  });
}

void lwc_backward_into(const Tensor& w, const Tensor& gamma, const Tensor& beta, const Tensor& dy,
                       const QuantFormat& f, Tensor& dw, Tensor& dgamma, Tensor& dbeta) {
  check_inputs(w, gamma, beta, f);
  for (const Tensor* t : {&w, &gamma, &beta})
    LB_CHECK(!t->defined() || t->is_contiguous(), "lwc_backward_into [", f.name, "]: ", t->describe(), " must be contiguous");
  check_like(dy, w, w.shape(), "the output gradient", f);
  if (dw.defined()) check_like(dw, w, w.shape(), "dw", f);
  check_like(dgamma, w, gamma.shape(), "dgamma", f);
  LB_CHECK(beta.defined() == dbeta.defined(), "lwc_backward_into [", f.name, "]: dbeta must be given exactly when beta is");
  if (dbeta.defined()) check_like(dbeta, w, beta.shape(), "dbeta", f);
  const int64_t out = w.size(0), in = w.size(1);
  if (lwc_is_ggml(f)) {
    LB_CHECK(!dw.defined(), "lwc_backward_into [", f.name, "]: on the ggml block grids the weight is frozen (no dW)");
    return lwc_ggml_backward_into(w, gamma, beta, dy, f, dgamma, dbeta);
  }
  if (on_cuda(w)) {
#ifdef LOWBIT_WITH_CUDA
    ops::cuda::lwc_backward(w, gamma, beta, dy, static_cast<const FormatTraits&>(f), dw, dgamma, dbeta);
    return;
#else
    throw_error("lwc_fake_quant: tensor is on CUDA but this build has no CUDA backend");
#endif
  }
  dispatch_float(w.dtype(), [&](auto t) {
    using T = decltype(t);
    lwc_backward<T>(f, w.data<T>(), gamma.data<T>(), beta.defined() ? beta.data<T>() : nullptr, dy.data<T>(), out,
                    in, dw.defined() ? dw.data<T>() : nullptr, dgamma.data<T>(),
                    dbeta.defined() ? dbeta.data<T>() : nullptr);
  });
}

Var lwc_fake_quant(const Var& w, const Var& gamma, const Var& beta, const QuantFormat& f) {
  LB_CHECK(w.defined() && gamma.defined(), "lwc_fake_quant [", f.name, "]: undefined weight or gamma");
  const Tensor wv = w.value().contiguous(), gv = gamma.value().contiguous();
  const Tensor bv = beta.defined() ? beta.value().contiguous() : Tensor();
  LB_CHECK(!lwc_is_ggml(f) || !w.requires_grad(), "lwc_fake_quant [", f.name,
           "]: on the ggml block grids the weight is frozen; it must not require a gradient");
  Tensor y = Tensor::empty(wv.shape(), wv.dtype(), wv.device());
  lwc_forward_into(wv, gv, bv, f, y);
  std::vector<Var> inputs{w, gamma};
  if (beta.defined()) inputs.push_back(beta);
  return make_result(y, inputs, "lwc_fake_quant", [w, gamma, beta, wv, gv, bv, &f](const Tensor& g) {
    const Tensor gc = g.contiguous();
    Tensor dw = w.requires_grad() ? Tensor::empty(wv.shape(), wv.dtype(), wv.device()) : Tensor();
    Tensor dg = Tensor::empty(gv.shape(), gv.dtype(), gv.device());
    Tensor db = bv.defined() ? Tensor::empty(bv.shape(), bv.dtype(), bv.device()) : Tensor();
    lwc_backward_into(wv, gv, bv, gc, f, dw, dg, db);
    if (dw.defined()) accumulate_grad(w, dw);
    accumulate_grad(gamma, dg);
    if (db.defined()) accumulate_grad(beta, db);
  });
}

std::vector<GroupParams> lwc_clipped_params(const Tensor& w_in, const Tensor& gamma_in, const Tensor& beta_in,
                                            const QuantFormat& f) {
  const Tensor w = w_in.to(Device::CPU).to(DType::F32).contiguous();
  const Tensor gamma = gamma_in.to(Device::CPU).to(DType::F64).contiguous();
  const Tensor beta = beta_in.defined() ? beta_in.to(Device::CPU).to(DType::F64).contiguous() : Tensor();
  check_inputs(w, gamma.to(DType::F32), beta.defined() ? beta.to(DType::F32) : Tensor(), f);
  LB_CHECK(!lwc_is_ggml(f), "lwc_clipped_params [", f.name, "]: ggml block types are encoded by lwc_encode_ggml");
  const int64_t out = w.size(0), in = w.size(1), G = f.n_groups(in);
  const float* pw = w.data<float>();
  const double* pg = gamma.data<double>();
  const double* pb = beta.defined() ? beta.data<double>() : nullptr;
  std::vector<GroupParams> params(size_t(out * G));
  // Rows are independent; params_from_range may throw (a scale that f16 cannot hold), and
  // parallel_rows then rethrows the first row's error, as a sequential loop would.
  parallel_rows(out, out * in, [&](int64_t r) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t b = f.group_begin(g), e = f.group_end(g, in);
      float lo = pw[r * in + b], hi = lo;
      for (int64_t j = b + 1; j < e; ++j) lo = std::min(lo, pw[r * in + j]), hi = std::max(hi, pw[r * in + j]);
      const double sg = sigmoid(pg[r * G + g]);
      float clo, chi;
      if (f.kind == QuantKind::IntAsym) {
        chi = float(sg * double(std::max(hi, 0.0f)));
        clo = float(sigmoid(pb[r * G + g]) * double(std::min(lo, 0.0f)));
      } else {
        const float a = float(sg * double(std::max(std::fabs(lo), std::fabs(hi))));
        clo = -a, chi = a;
      }
      params[size_t(r * G + g)] = f.codec->params_from_range(f, clo, chi, 1.0f);
    }
  });
  return params;
}

}  // namespace lowbit
