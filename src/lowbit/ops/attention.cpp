// Causal grouped-query attention (Vaswani et al. 2017; GQA: Ainslie et al. 2023).
// Forward keeps only the row log-sum-exp; backward recomputes the probabilities from it, as
// FlashAttention does (Dao et al. 2022, Alg. 2), so memory stays O(T) per head:
//   P_ij = exp(s_ij - lse_i),  dP_ij = dO_i . V_j,  D_i = dO_i . O_i,
//   dS_ij = P_ij (dP_ij - D_i),  dQ_i = scale sum_j dS_ij K_j,
//   dK_j = scale sum_i dS_ij Q_i,  dV_j = sum_i P_ij dO_i.
#include <cmath>
#include <limits>
#include <vector>

#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

namespace {
struct AttnDims {
  int64_t B, Tq, Tk, H, KVH, hd, group;
};

AttnDims check_attention(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  detail::check_contiguous(op, q, "q");
  detail::check_contiguous(op, k, "k");
  detail::check_contiguous(op, v, "v");
  if (q.dim() != 4 || k.dim() != 4) throw_error(op, ": q and k must be [B, T, heads, head_dim], got ", q.describe(), ", ", k.describe());
  detail::check_shape(op, v, k.shape(), "v");
  detail::check_same_kind(op, q, k, "k");
  detail::check_same_kind(op, q, v, "v");
  AttnDims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 0};
  if (k.size(0) != d.B || k.size(3) != d.hd) throw_error(op, ": k ", k.describe(), " does not match q ", q.describe());
  if (d.KVH == 0 || d.H % d.KVH != 0) throw_error(op, ": ", d.KVH, " kv heads do not divide ", d.H, " heads");
  if (d.Tk < d.Tq) throw_error(op, ": fewer keys (", d.Tk, ") than queries (", d.Tq, ")");
  d.group = d.H / d.KVH;
  return d;
}
}  // namespace

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor& out, Tensor& lse) {
  const char* op = "attention_forward";
  const AttnDims d = check_attention(op, q, k, v);
  detail::check_shape(op, out, q.shape(), "out");
  detail::check_shape(op, lse, {d.B, d.H, d.Tq}, "lse");
  LB_CUDA_ROUTE(q, attention_forward, q, k, v, scale, out, lse);
  detail::dispatch_float(op, q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>();
    T* op_ = out.data<T>();
    T* lp = lse.data<T>();
    const int64_t off = d.Tk - d.Tq;
    // Threads only pay off above ~1e5 multiply-adds (decode steps of small models stay serial).
    const bool par = d.B * d.H * d.Tq * d.Tk * d.hd > 100000;
#pragma omp parallel if (par)
    {
      std::vector<double> s(size_t(d.Tk)), acc(size_t(d.hd));
#pragma omp for collapse(3) schedule(dynamic, 4)
      for (int64_t b = 0; b < d.B; ++b)
        for (int64_t h = 0; h < d.H; ++h)
          for (int64_t i = 0; i < d.Tq; ++i) {
            const int64_t kh = h / d.group, last = off + i;
            const T* qi = qp + ((b * d.Tq + i) * d.H + h) * d.hd;
            double mx = -std::numeric_limits<double>::infinity();
            for (int64_t j = 0; j <= last; ++j) {
              const T* kj = kp + ((b * d.Tk + j) * d.KVH + kh) * d.hd;
              double dot = 0;
              for (int64_t c = 0; c < d.hd; ++c) dot += double(qi[c]) * double(kj[c]);
              s[j] = dot * scale;
              mx = std::max(mx, s[j]);
            }
            double sum = 0;
            for (int64_t j = 0; j <= last; ++j) sum += (s[j] = std::exp(s[j] - mx));
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t j = 0; j <= last; ++j) {
              const T* vj = vp + ((b * d.Tk + j) * d.KVH + kh) * d.hd;
              const double p = s[j] / sum;
              for (int64_t c = 0; c < d.hd; ++c) acc[c] += p * double(vj[c]);
            }
            T* oi = op_ + ((b * d.Tq + i) * d.H + h) * d.hd;
            for (int64_t c = 0; c < d.hd; ++c) oi[c] = T(acc[c]);
            lp[(b * d.H + h) * d.Tq + i] = T(mx + std::log(sum));
          }
    }
  });
}

void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, double scale, Tensor& dq, Tensor& dk, Tensor& dv) {
  const char* op = "attention_backward";
  const AttnDims d = check_attention(op, q, k, v);
  detail::check_shape(op, dout, q.shape(), "dout");
  detail::check_shape(op, out, q.shape(), "out");
  detail::check_shape(op, lse, {d.B, d.H, d.Tq}, "lse");
  detail::check_shape(op, dq, q.shape(), "dq");
  detail::check_shape(op, dk, k.shape(), "dk");
  detail::check_shape(op, dv, v.shape(), "dv");
  LB_CUDA_ROUTE(q, attention_backward, dout, q, k, v, out, lse, scale, dq, dk, dv);
  detail::dispatch_float(op, q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>(), *op_ = out.data<T>(), *gp = dout.data<T>();
    const T* lp = lse.data<T>();
    T *dqp = dq.data<T>(), *dkp = dk.data<T>(), *dvp = dv.data<T>();
    const int64_t off = d.Tk - d.Tq;
    // Each (batch, kv head) pair owns its dK/dV rows: no write races across threads.
    const bool par = d.B * d.H * d.Tq * d.Tk * d.hd > 100000;
#pragma omp parallel if (par)
    {
      std::vector<double> dqi(size_t(d.hd));
      std::vector<double> dk_acc(size_t(d.Tk * d.hd)), dv_acc(size_t(d.Tk * d.hd));
#pragma omp for collapse(2) schedule(dynamic, 1)
      for (int64_t b = 0; b < d.B; ++b)
        for (int64_t kh = 0; kh < d.KVH; ++kh) {
          std::fill(dk_acc.begin(), dk_acc.end(), 0.0);
          std::fill(dv_acc.begin(), dv_acc.end(), 0.0);
          for (int64_t h = kh * d.group; h < (kh + 1) * d.group; ++h)
            for (int64_t i = 0; i < d.Tq; ++i) {
              const int64_t last = off + i;
              const int64_t qrow = ((b * d.Tq + i) * d.H + h) * d.hd;
              const T *qi = qp + qrow, *gi = gp + qrow, *oi = op_ + qrow;
              const double l = lp[(b * d.H + h) * d.Tq + i];
              double Di = 0;
              for (int64_t c = 0; c < d.hd; ++c) Di += double(gi[c]) * double(oi[c]);
              std::fill(dqi.begin(), dqi.end(), 0.0);
              for (int64_t j = 0; j <= last; ++j) {
                const int64_t krow = ((b * d.Tk + j) * d.KVH + kh) * d.hd;
                const T *kj = kp + krow, *vj = vp + krow;
                double s = 0, dp = 0;
                for (int64_t c = 0; c < d.hd; ++c) {
                  s += double(qi[c]) * double(kj[c]);
                  dp += double(gi[c]) * double(vj[c]);
                }
                const double pj = std::exp(s * scale - l);
                const double ds = pj * (dp - Di) * scale;
                double* dkj = &dk_acc[size_t(j * d.hd)];
                double* dvj = &dv_acc[size_t(j * d.hd)];
                for (int64_t c = 0; c < d.hd; ++c) {
                  dqi[c] += ds * double(kj[c]);
                  dkj[c] += ds * double(qi[c]);
                  dvj[c] += pj * double(gi[c]);
                }
              }
              for (int64_t c = 0; c < d.hd; ++c) dqp[qrow + c] = T(dqi[c]);
            }
          for (int64_t j = 0; j < d.Tk; ++j) {
            const int64_t krow = ((b * d.Tk + j) * d.KVH + kh) * d.hd;
            for (int64_t c = 0; c < d.hd; ++c) {
              dkp[krow + c] = T(dk_acc[size_t(j * d.hd + c)]);
              dvp[krow + c] = T(dv_acc[size_t(j * d.hd + c)]);
            }
          }
        }
    }
  });
}

}  // namespace lowbit::ops
