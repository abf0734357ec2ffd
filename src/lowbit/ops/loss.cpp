// Losses, each a mean over rows (or elements for MSE).
//  cross-entropy: l_i = lse(z_i) - z_i[t_i];  dz_i = (softmax(z_i) - onehot(t_i)) / n_valid.
//  KL(P||Q) = sum_v P_v (log P_v - log Q_v) per row;  dq = (Q - P) / N;
//             dp = P (log P - log Q - KL_row) / N.
//  MSE = mean (a - b)^2;  da = 2 (a - b) / n = -db.
#include <cmath>
#include <limits>

#include "lowbit/core/threads.h"
#include "lowbit/core/vecmath.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

namespace {
template <class T>
double row_lse(const T* z, int64_t V) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t v = 0; v < V; ++v) mx = std::max(mx, double(z[v]));
  double s = 0;
  for (int64_t v = 0; v < V; ++v) s += std::exp(double(z[v]) - mx);
  return mx + std::log(s);
}
// f32 rows: vectorised max and exp (core/vecmath.h), sums in double.
template <>
double row_lse<float>(const float* z, int64_t V) {
  const float mx = vec::max(z, V);
  return double(mx) + std::log(vec::exp_shift_sum_f64(z, V, mx));
}

// KL(softmax(p) || softmax(q)) of one row, with both rows' log-sum-exp.
struct RowKl {
  double kl, lse_p, lse_q;
};
template <class T>
RowKl row_kl(const T* p, const T* q, int64_t V) {
  RowKl r{0.0, row_lse(p, V), row_lse(q, V)};
  for (int64_t v = 0; v < V; ++v) {
    const double logp = double(p[v]) - r.lse_p, logq = double(q[v]) - r.lse_q;
    r.kl += std::exp(logp) * (logp - logq);
  }
  return r;
}

int64_t count_valid(const Tensor& targets) {
  const int32_t* t = targets.data<int32_t>();
  int64_t n = 0;
  for (int64_t i = 0; i < targets.numel(); ++i) n += t[i] >= 0;
  return n;
}

void check_ce(const char* op, const Tensor& logits, const Tensor& targets) {
  detail::check_contiguous(op, logits, "logits");
  if (logits.dim() != 2) throw_error(op, ": logits must be [N, V], got ", logits.describe());
  if (targets.dtype() != DType::I32) throw_error(op, ": targets must be i32, got ", targets.describe());
  detail::check_shape(op, targets, {logits.size(0)}, "targets");
  if (targets.device() == Device::CPU) {
    const int32_t* t = targets.data<int32_t>();
    for (int64_t i = 0; i < targets.numel(); ++i)
      if (t[i] >= logits.size(1) || t[i] < -1)
        throw_error(op, ": target ", t[i], " at row ", i, " is outside [0, ", logits.size(1), ") and not -1 (ignored)");
  }
}
}  // namespace

void cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& loss, Tensor& lse) {
  const char* op = "cross_entropy_forward";
  check_ce(op, logits, targets);
  const int64_t N = logits.size(0), V = logits.size(1);
  detail::check_shape(op, loss, {}, "loss");
  detail::check_shape(op, lse, {N}, "lse");
  LB_CUDA_ROUTE(logits, cross_entropy_forward, logits, targets, loss, lse);
  detail::dispatch_float(op, logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* z = logits.data<T>();
    const int32_t* t = targets.data<int32_t>();
    T* lp = lse.data<T>();
    double total = 0;
    total += parallel_sum(N, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, V)), [&](int64_t lo_, int64_t hi_) {
      double total = 0;
      for (int64_t i = lo_; i < hi_; ++i) {
        const double l = row_lse(z + i * V, V);
        lp[i] = T(l);
        if (t[i] >= 0) total += l - double(z[i * V + t[i]]);
      }
      return total;
    });
    const int64_t n = count_valid(targets);
    loss.data<T>()[0] = T(n > 0 ? total / double(n) : 0.0);
  });
}

void cross_entropy_backward(const Tensor& dloss, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                            Tensor& dlogits) {
  const char* op = "cross_entropy_backward";
  check_ce(op, logits, targets);
  const int64_t N = logits.size(0), V = logits.size(1);
  detail::check_shape(op, dlogits, logits.shape(), "dlogits");
  detail::check_shape(op, lse, {N}, "lse");
  LB_CUDA_ROUTE(logits, cross_entropy_backward, dloss, logits, targets, lse, dlogits);
  detail::dispatch_float(op, logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t n = count_valid(targets);
    const double g = n > 0 ? double(dloss.data<T>()[0]) / double(n) : 0.0;
    const T *z = logits.data<T>(), *lp = lse.data<T>();
    const int32_t* t = targets.data<int32_t>();
    T* d = dlogits.data<T>();
    parallel_for(N, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, V)), [&](int64_t lo_, int64_t hi_) {
      for (int64_t i = lo_; i < hi_; ++i) {
        if (t[i] < 0) {
          for (int64_t v = 0; v < V; ++v) d[i * V + v] = T(0);
          continue;
        }
        for (int64_t v = 0; v < V; ++v) d[i * V + v] = T(g * std::exp(double(z[i * V + v]) - double(lp[i])));
        d[i * V + t[i]] -= T(g);
      }
    });
  });
}

void kl_div_forward(const Tensor& p_logits, const Tensor& q_logits, Tensor& loss) {
  const char* op = "kl_div_forward";
  detail::check_contiguous(op, p_logits, "p_logits");
  detail::check_contiguous(op, q_logits, "q_logits");
  detail::check_same_shape(op, p_logits, q_logits, "p_logits", "q_logits");
  detail::check_same_kind(op, p_logits, q_logits, "q_logits");
  detail::check_shape(op, loss, {}, "loss");
  LB_CUDA_ROUTE(p_logits, kl_div_forward, p_logits, q_logits, loss);
  const int64_t V = p_logits.size(-1), N = p_logits.numel() / (V > 0 ? V : 1);
  detail::dispatch_float(op, p_logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *p = p_logits.data<T>(), *q = q_logits.data<T>();
    double total = 0;
    total += parallel_sum(N, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, V)), [&](int64_t lo_, int64_t hi_) {
      double total = 0;
      for (int64_t i = lo_; i < hi_; ++i) total += row_kl(p + i * V, q + i * V, V).kl;
      return total;
    });
    loss.data<T>()[0] = T(N > 0 ? total / double(N) : 0.0);
  });
}

void kl_div_backward(const Tensor& dloss, const Tensor& p_logits, const Tensor& q_logits, Tensor& dp, Tensor& dq) {
  const char* op = "kl_div_backward";
  detail::check_same_shape(op, p_logits, q_logits, "p_logits", "q_logits");
  if (dp.defined()) detail::check_shape(op, dp, p_logits.shape(), "dp");
  if (dq.defined()) detail::check_shape(op, dq, q_logits.shape(), "dq");
  LB_CUDA_ROUTE(p_logits, kl_div_backward, dloss, p_logits, q_logits, dp, dq);
  const int64_t V = p_logits.size(-1), N = p_logits.numel() / (V > 0 ? V : 1);
  detail::dispatch_float(op, p_logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const double g = double(dloss.data<T>()[0]) / double(N > 0 ? N : 1);
    const T *p = p_logits.data<T>(), *q = q_logits.data<T>();
    T* dpp = dp.defined() ? dp.data<T>() : nullptr;
    T* dqp = dq.defined() ? dq.data<T>() : nullptr;
    parallel_for(N, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, V)), [&](int64_t lo_, int64_t hi_) {
      for (int64_t i = lo_; i < hi_; ++i) {
        const RowKl r = row_kl(p + i * V, q + i * V, V);
        const double kl = r.kl;
        for (int64_t v = 0; v < V; ++v) {
          const double logp = double(p[i * V + v]) - r.lse_p, logq = double(q[i * V + v]) - r.lse_q;
          const double P = std::exp(logp), Q = std::exp(logq);
          if (dqp) dqp[i * V + v] = T(g * (Q - P));
          if (dpp) dpp[i * V + v] = T(g * P * (logp - logq - kl));
        }
      }
    });
  });
}

void mse_forward(const Tensor& a, const Tensor& b, Tensor& loss) {
  const char* op = "mse_forward";
  detail::check_contiguous(op, a, "a");
  detail::check_contiguous(op, b, "b");
  detail::check_same_shape(op, a, b, "a", "b");
  detail::check_same_kind(op, a, b, "b");
  detail::check_shape(op, loss, {}, "loss");
  LB_CUDA_ROUTE(a, mse_forward, a, b, loss);
  detail::dispatch_float(op, a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *x = a.data<T>(), *y = b.data<T>();
    const int64_t n = a.numel();
    double s = 0;
    s += parallel_sum(n, 32768, [&](int64_t lo_, int64_t hi_) {
      double s = 0;
      for (int64_t i = lo_; i < hi_; ++i) {
        const double d = double(x[i]) - double(y[i]);
        s += d * d;
      }
      return s;
    });
    loss.data<T>()[0] = T(n > 0 ? s / double(n) : 0.0);
  });
}

void mse_backward(const Tensor& dloss, const Tensor& a, const Tensor& b, Tensor& da, Tensor& db) {
  const char* op = "mse_backward";
  detail::check_same_shape(op, a, b, "a", "b");
  if (da.defined()) detail::check_shape(op, da, a.shape(), "da");
  if (db.defined()) detail::check_shape(op, db, b.shape(), "db");
  LB_CUDA_ROUTE(a, mse_backward, dloss, a, b, da, db);
  detail::dispatch_float(op, a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t n = a.numel();
    const T g = T(2.0 * double(dloss.data<T>()[0]) / double(n > 0 ? n : 1));
    const T *x = a.data<T>(), *y = b.data<T>();
    T* dap = da.defined() ? da.data<T>() : nullptr;
    T* dbp = db.defined() ? db.data<T>() : nullptr;
    parallel_for(n, 32768, [&](int64_t lo_, int64_t hi_) {
      for (int64_t i = lo_; i < hi_; ++i) {
        const T d = g * (x[i] - y[i]);
        if (dap) dap[i] = d;
        if (dbp) dbp[i] = -d;
      }
    });
  });
}

namespace {
void check_weighted(const char* op, const Tensor& a, const Tensor& b, const Tensor& w) {
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&a, "a"}, {&b, "b"}, {&w, "w"}})
    detail::check_contiguous(op, *t, name);
  detail::check_same_shape(op, a, b, "a", "b");
  detail::check_same_shape(op, a, w, "a", "w");
  detail::check_same_kind(op, a, b, "b");
  detail::check_same_kind(op, a, w, "w");
}
}  // namespace

void weighted_sq_err_forward(const Tensor& a, const Tensor& b, const Tensor& w, double scale, Tensor& loss) {
  const char* op = "weighted_sq_err_forward";
  check_weighted(op, a, b, w);
  detail::check_shape(op, loss, {}, "loss");
  detail::check_same_kind(op, a, loss, "loss");
  LB_CUDA_ROUTE(a, weighted_sq_err_forward, a, b, w, scale, loss);
  detail::dispatch_float(op, a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *x = a.data<T>(), *y = b.data<T>(), *s = w.data<T>();
    const double total = parallel_sum(a.numel(), 32768, [&](int64_t lo_, int64_t hi_) {
      double acc = 0;
      for (int64_t i = lo_; i < hi_; ++i) {
        const double d = double(x[i]) - double(y[i]);
        acc += double(s[i]) * d * d;
      }
      return acc;
    });
    loss.data<T>()[0] = T(scale * total);
  });
}

void weighted_sq_err_backward(const Tensor& dloss, const Tensor& a, const Tensor& b, const Tensor& w, double scale,
                              Tensor& da) {
  const char* op = "weighted_sq_err_backward";
  check_weighted(op, a, b, w);
  detail::check_shape(op, da, a.shape(), "da");
  detail::check_contiguous(op, da, "da");
  detail::check_same_kind(op, a, da, "da");
  detail::check_shape(op, dloss, {}, "dloss");
  LB_CUDA_ROUTE(a, weighted_sq_err_backward, dloss, a, b, w, scale, da);
  detail::dispatch_float(op, a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const double g = 2.0 * scale * double(dloss.data<T>()[0]);
    const T *x = a.data<T>(), *y = b.data<T>(), *s = w.data<T>();
    T* d = da.data<T>();
    parallel_for(a.numel(), 32768, [&](int64_t lo_, int64_t hi_) {
      for (int64_t i = lo_; i < hi_; ++i) d[i] = T(g * double(s[i]) * (double(x[i]) - double(y[i])));
    });
  });
}

}  // namespace lowbit::ops
