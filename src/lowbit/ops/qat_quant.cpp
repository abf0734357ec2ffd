// CPU reference bodies of the QAT weight quantizers (ops/qat_quant.h), the argument checks, and the
// routing to the CUDA bodies. Per-group sums run serially in T, in column order.
#include "lowbit/ops/qat_quant.h"

#include <string>

#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

namespace {

using detail::check_contiguous;
using detail::check_same_kind;
using detail::check_shape;

constexpr int64_t kRowGrain = 16;

// w [out, in] and the [out, G] tensors (undefined ones skipped), one dtype and device.
void check_args(const char* op, const Tensor& w, const FormatTraits& f, std::initializer_list<std::pair<const Tensor*, const char*>> groups,
                std::initializer_list<std::pair<const Tensor*, const char*>> full) {
  check_contiguous(op, w, "w");
  if (w.dim() != 2 || w.numel() == 0) throw_error(op, " [", f.name, "]: w must be a non-empty [out, in], got ", w.describe());
  if (f.kind != QuantKind::IntAsym && f.kind != QuantKind::IntSym)
    throw_error(op, ": format ", f.name, " is not a uniform integer format");
  const Shape gs{w.size(0), f.n_groups(w.size(1))};
  for (const auto& [t, name] : groups) {
    if (!t->defined()) continue;
    check_contiguous(op, *t, name);
    check_shape(op, *t, gs, name);
    check_same_kind(op, w, *t, name);
  }
  for (const auto& [t, name] : full) {
    check_contiguous(op, *t, name);
    check_shape(op, *t, w.shape(), name);
    check_same_kind(op, w, *t, name);
  }
}

// A Matryoshka slice: 0 (none), or a width below the format's on an asymmetric format.
void check_slice(const char* op, const FormatTraits& f, int slice) {
  if (slice == 0) return;
  if (f.kind != QuantKind::IntAsym || slice < 1 || slice >= f.bits)
    throw_error(op, " [", f.name, "]: a Matryoshka slice of ", slice,
                " bits needs an asymmetric integer format wider than the slice");
}

void check_offset(const char* op, const Tensor& offset, const FormatTraits& f) {
  if ((f.kind == QuantKind::IntAsym) != offset.defined())
    throw_error(op, " [", f.name, "]: ", f.kind == QuantKind::IntAsym ? "asymmetric formats need an offset (zero point)"
                                                                      : "symmetric formats have no offset; it must be undefined");
}

}  // namespace

void lsq_quant_forward(const Tensor& w, const Tensor& step, const Tensor& offset, const FormatTraits& f, Tensor& y,
                       int slice) {
  check_args("lsq_quant_forward", w, f, {{&step, "step"}, {&offset, "offset"}}, {});
  if (!step.defined()) throw_error("lsq_quant_forward: step is undefined");
  check_offset("lsq_quant_forward", offset, f);
  check_slice("lsq_quant_forward", f, slice);
  y = Tensor::empty(w.shape(), w.dtype(), w.device());
  LB_CUDA_ROUTE(w, lsq_quant_forward, w, step, offset, f, y, slice)
  detail::dispatch_float("lsq_quant_forward", w.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t in = w.size(1), G = f.n_groups(in);
    const qat::LsqGrid gr = qat::lsq_grid_sliced(f, slice);
    const T *wp = w.data<T>(), *sp = step.data<T>(), *op = offset.defined() ? offset.data<T>() : nullptr;
    T* yp = y.data<T>();
    parallel_for(w.size(0), kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t g = 0; g < G; ++g) {
          const T s = sp[r * G + g], zr = qat::lsq_zero(op ? op[r * G + g] : T(0), gr);
          for (int64_t j = f.group_begin(g), e = f.group_end(g, in); j < e; ++j)
            yp[r * in + j] = qat::lsq_value(wp[r * in + j], s, zr, gr);
        }
    });
  });
}

void lsq_quant_backward(const Tensor& w, const Tensor& step, const Tensor& offset, const Tensor& dy,
                        const FormatTraits& f, double grad_scale, Tensor* dw, Tensor& dstep, Tensor* doffset,
                        int slice) {
  check_args("lsq_quant_backward", w, f, {{&step, "step"}, {&offset, "offset"}}, {{&dy, "dy"}});
  if (!step.defined()) throw_error("lsq_quant_backward: step is undefined");
  check_offset("lsq_quant_backward", offset, f);
  check_slice("lsq_quant_backward", f, slice);
  if (!std::isfinite(grad_scale)) throw_error("lsq_quant_backward: gradient scale must be finite");
  if (dw) *dw = Tensor::empty(w.shape(), w.dtype(), w.device());
  dstep = Tensor::empty(step.shape(), step.dtype(), step.device());
  if (doffset && !offset.defined()) doffset = nullptr;
  if (doffset) *doffset = Tensor::empty(offset.shape(), offset.dtype(), offset.device());
  LB_CUDA_ROUTE(w, lsq_quant_backward, w, step, offset, dy, f, grad_scale, dw, dstep, doffset, slice)
  detail::dispatch_float("lsq_quant_backward", w.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t in = w.size(1), G = f.n_groups(in);
    const qat::LsqGrid gr = qat::lsq_grid_sliced(f, slice);
    const T *wp = w.data<T>(), *sp = step.data<T>(), *op = offset.defined() ? offset.data<T>() : nullptr;
    const T* gp = dy.data<T>();
    T* dwp = dw ? dw->data<T>() : nullptr;
    T* dsp = dstep.data<T>();
    T* dzp = doffset ? doffset->data<T>() : nullptr;
    const T gs = T(grad_scale);
    parallel_for(w.size(0), kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t g = 0; g < G; ++g) {
          const T s = sp[r * G + g], zr = qat::lsq_zero(op ? op[r * G + g] : T(0), gr);
          T ds = 0, dz = 0;
          for (int64_t j = f.group_begin(g), e = f.group_end(g, in); j < e; ++j) {
            const qat::LsqGrad<T> d = qat::lsq_grad(wp[r * in + j], s, zr, gp[r * in + j], gr);
            if (dwp) dwp[r * in + j] = d.dw;
            ds += d.ds;
            dz += d.dz;
          }
          dsp[r * G + g] = gs * ds;
          if (dzp) dzp[r * G + g] = gs * dz;
        }
    });
  });
}

void seq_quant_forward(const Tensor& w, const Tensor& alpha, const SeqGrid& q, const FormatTraits& f, Tensor& y) {
  check_args("seq_quant_forward", w, f, {{&alpha, "alpha"}}, {});
  if (!alpha.defined()) throw_error("seq_quant_forward: alpha is undefined");
  y = Tensor::empty(w.shape(), w.dtype(), w.device());
  LB_CUDA_ROUTE(w, seq_quant_forward, w, alpha, q, f, y)
  detail::dispatch_float("seq_quant_forward", w.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t in = w.size(1), G = f.n_groups(in);
    const T *wp = w.data<T>(), *ap = alpha.data<T>();
    T* yp = y.data<T>();
    parallel_for(w.size(0), kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t g = 0; g < G; ++g) {
          const T a = qat::seq_alpha(ap[r * G + g]), h = a / T(q.n);
          for (int64_t j = f.group_begin(g), e = f.group_end(g, in); j < e; ++j)
            yp[r * in + j] = qat::seq_value(q, wp[r * in + j], a, h);
        }
    });
  });
}

void seq_quant_backward(const Tensor& w, const Tensor& alpha, const Tensor& dy, const SeqGrid& q, const FormatTraits& f,
                        double grad_scale, Tensor* dw, Tensor& dalpha) {
  check_args("seq_quant_backward", w, f, {{&alpha, "alpha"}}, {{&dy, "dy"}});
  if (!alpha.defined()) throw_error("seq_quant_backward: alpha is undefined");
  if (!std::isfinite(grad_scale)) throw_error("seq_quant_backward: gradient scale must be finite");
  if (dw) *dw = Tensor::empty(w.shape(), w.dtype(), w.device());
  dalpha = Tensor::empty(alpha.shape(), alpha.dtype(), alpha.device());
  LB_CUDA_ROUTE(w, seq_quant_backward, w, alpha, dy, q, f, grad_scale, dw, dalpha)
  detail::dispatch_float("seq_quant_backward", w.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t in = w.size(1), G = f.n_groups(in);
    const T *wp = w.data<T>(), *ap = alpha.data<T>(), *gp = dy.data<T>();
    T* dwp = dw ? dw->data<T>() : nullptr;
    T* dap = dalpha.data<T>();
    const T gs = T(grad_scale);
    parallel_for(w.size(0), kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t g = 0; g < G; ++g) {
          const T a = qat::seq_alpha(ap[r * G + g]);
          T da = 0;
          for (int64_t j = f.group_begin(g), e = f.group_end(g, in); j < e; ++j) {
            const qat::SeqGrad<T> d = qat::seq_grad(q, wp[r * in + j], a, gp[r * in + j]);
            if (dwp) dwp[r * in + j] = d.dw;
            da += d.da;
          }
          dap[r * G + g] = gs * da;
        }
    });
  });
}

namespace {

// group_scale's arguments: codes [out, in] of the float dtype of `t` (step [out, G] or dy [out, in]),
// or I8 (integer codes, one byte a weight), on t's device.
void check_group_scale(const char* op, const Tensor& codes, const FormatTraits& f, const Tensor& t, bool t_full,
                       const char* name) {
  if (codes.defined() && codes.dtype() == DType::I8) {
    check_contiguous(op, codes, "codes");
    if (codes.dim() != 2 || codes.numel() == 0)
      throw_error(op, " [", f.name, "]: codes must be a non-empty [out, in], got ", codes.describe());
    if (f.kind != QuantKind::IntAsym && f.kind != QuantKind::IntSym)
      throw_error(op, ": format ", f.name, " is not a uniform integer format");
    check_contiguous(op, t, name);
    check_shape(op, t, t_full ? codes.shape() : Shape{codes.size(0), f.n_groups(codes.size(1))}, name);
    if (t.device() != codes.device()) throw_error(op, ": ", name, " is ", t.describe(), " but the codes are ", codes.describe());
    return;
  }
  if (t_full) {
    check_args(op, codes, f, {}, {{&t, name}});
  } else {
    check_args(op, codes, f, {{&t, name}}, {});
    if (!t.defined()) throw_error(op, ": ", name, " is undefined");
  }
}

// Calls f(T{}, C{}) with T the float type of `dt` and C the codes' element type (T or int8_t).
template <class Fn>
void dispatch_codes(const char* op, DType dt, DType codes, Fn&& fn) {
  detail::dispatch_float(op, dt, [&](auto tag) {
    using T = decltype(tag);
    if (codes == DType::I8) fn(T{}, int8_t{});
    else fn(T{}, T{});
  });
}

}  // namespace

void group_scale_forward(const Tensor& codes, const Tensor& step, const FormatTraits& f, Tensor& y) {
  check_group_scale("group_scale_forward", codes, f, step, false, "step");
  if (y.defined() && y.dtype() == DType::BF16) {  // written in bf16 (autocast's GEMM operand)
    if (step.dtype() != DType::F32 || y.shape() != codes.shape() || y.device() != codes.device() || !y.is_contiguous())
      throw_error("group_scale_forward [", f.name, "]: a bf16 output needs an f32 step and a contiguous ",
                  shape_str(codes.shape()), " on ", device_name(codes.device()), ", got step ", step.describe(),
                  " and output ", y.describe());
    if (detail::on_cuda(codes)) {
      LB_CUDA_ROUTE(codes, group_scale_forward, codes, step, f, y)
    }
    Tensor y32;
    group_scale_forward(codes, step, f, y32);
    y.copy_(y32);  // round to nearest even
    return;
  }
  y = Tensor::empty(codes.shape(), step.dtype(), codes.device());
  LB_CUDA_ROUTE(codes, group_scale_forward, codes, step, f, y)
  dispatch_codes("group_scale_forward", step.dtype(), codes.dtype(), [&](auto tag, auto ctag) {
    using T = decltype(tag);
    using C = decltype(ctag);
    const int64_t in = codes.size(1), G = f.n_groups(in);
    const C* cp = codes.data<C>();
    const T* sp = step.data<T>();
    T* yp = y.data<T>();
    parallel_for(codes.size(0), kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < in; ++j) yp[r * in + j] = T(cp[r * in + j]) * sp[r * G + f.group_of_column(j)];
    });
  });
}

void group_scale_backward(const Tensor& codes, const Tensor& dy, const FormatTraits& f, Tensor& dstep) {
  check_group_scale("group_scale_backward", codes, f, dy, true, "dy");
  const int64_t in = codes.size(1), G = f.n_groups(in);
  dstep = Tensor::empty({codes.size(0), G}, dy.dtype(), codes.device());
  LB_CUDA_ROUTE(codes, group_scale_backward, codes, dy, f, dstep)
  dispatch_codes("group_scale_backward", dy.dtype(), codes.dtype(), [&](auto tag, auto ctag) {
    using T = decltype(tag);
    using C = decltype(ctag);
    const C* cp = codes.data<C>();
    const T* gp = dy.data<T>();
    T* dp = dstep.data<T>();
    parallel_for(codes.size(0), kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t g = 0; g < G; ++g) {
          T s = 0;
          for (int64_t j = f.group_begin(g), e = f.group_end(g, in); j < e; ++j) s += T(cp[r * in + j]) * gp[r * in + j];
          dp[r * G + g] = s;
        }
    });
  });
}

}  // namespace lowbit::ops
