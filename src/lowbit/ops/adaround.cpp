// AdaRound's element-wise passes (ops/adaround.h): argument checks, the CUDA route and the CPU
// reference body (ops/adaround_math.h per weight, in parallel over the weights).
#include "lowbit/ops/adaround.h"

#include <cmath>

#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

namespace {

void check_operands(const char* op, const Tensor& ref, std::initializer_list<std::pair<const Tensor*, const char*>> ts) {
  detail::check_contiguous(op, ref, "v");
  if (ref.dim() != 2) throw_error(op, ": v must be [out, in], got ", ref.describe());
  if (ref.dtype() != DType::F32 && ref.dtype() != DType::F64) throw_error(op, ": v must be f32 or f64, got ", ref.describe());
  for (const auto& [t, name] : ts) {
    detail::check_contiguous(op, *t, name);
    detail::check_same_kind(op, ref, *t, name);
    detail::check_shape(op, *t, ref.shape(), name);
  }
}

void check_grid(const char* op, const adaround::Grid& g) {
  if (!(g.qmin <= g.qmax) || !(g.zeta > 1) || !(g.gamma < 0))
    throw_error(op, ": needs qmin <= qmax, zeta > 1 and gamma < 0 (got [", g.qmin, ", ", g.qmax, "], zeta ", g.zeta,
                ", gamma ", g.gamma, ")");
}

constexpr int64_t kGrain = 16384;

}  // namespace

void adaround_soft_error(const Tensor& v, const Tensor& w, const Tensor& fl, const Tensor& s, const Tensor& z,
                         const adaround::Grid& g, Tensor& e) {
  const char* op = "adaround_soft_error";
  check_operands(op, v, {{&w, "w"}, {&fl, "fl"}, {&s, "s"}, {&z, "z"}, {&e, "e"}});
  check_grid(op, g);
  LB_CUDA_ROUTE(v, adaround_soft_error, v, w, fl, s, z, g, e);
  detail::dispatch_float(op, v.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *V = v.data<T>(), *W = w.data<T>(), *F = fl.data<T>(), *S = s.data<T>(), *Z = z.data<T>();
    T* E = e.data<T>();
    parallel_for(v.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) E[k] = W[k] - adaround::soft<T>(V[k], F[k], S[k], Z[k], g).q;
    });
  });
}

void adaround_adam_step(Tensor& v, Tensor& m, Tensor& m2, const Tensor& eh, const Tensor& fl, const Tensor& s,
                        const Tensor& z, const adaround::Grid& g, const AdaRoundStep& st) {
  const char* op = "adaround_adam_step";
  check_operands(op, v, {{&m, "m"}, {&m2, "m2"}, {&eh, "eh"}, {&fl, "fl"}, {&s, "s"}, {&z, "z"}});
  check_grid(op, g);
  if (st.t < 1) throw_error(op, ": step counts from 1, got ", st.t);
  if (!(st.lr > 0) || !(st.beta > 0) || !(st.reg >= 0))
    throw_error(op, ": needs lr > 0, beta > 0 and reg >= 0 (got ", st.lr, ", ", st.beta, ", ", st.reg, ")");
  LB_CUDA_ROUTE(v, adaround_adam_step, v, m, m2, eh, fl, s, z, g, st);
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  const double bc1 = 1 - std::pow(b1, double(st.t)), bc2 = 1 - std::pow(b2, double(st.t));
  detail::dispatch_float(op, v.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T *V = v.data<T>(), *M = m.data<T>(), *M2 = m2.data<T>();
    const T *EH = eh.data<T>(), *F = fl.data<T>(), *S = s.data<T>(), *Z = z.data<T>();
    parallel_for(v.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const adaround::Soft<T> p = adaround::soft<T>(V[k], F[k], S[k], Z[k], g);
        const T gr = adaround::grad<T>(p, EH[k], S[k], T(st.beta), T(st.reg));
        adaround::adam<T>(V[k], M[k], M2[k], gr, st.lr, b1, b2, eps, bc1, bc2);
      }
    });
  });
}

}  // namespace lowbit::ops
