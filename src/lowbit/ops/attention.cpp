// Causal grouped-query attention (Vaswani et al. 2017; GQA: Ainslie et al. 2023).
// Forward keeps only the row log-sum-exp; backward recomputes the probabilities from it, as
// FlashAttention does (Dao et al. 2022, Alg. 2), so nothing of size T x T outlives a call:
//   S = scale Q K^T (causal),  P_ij = exp(S_ij - lse_i),  O = P V,
//   dP = dO V^T,  D_i = dO_i . O_i,  dS = P (dP - D),
//   dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO.
// CPU body: the products are BLAS calls on strided views ([B, T, heads, hd] rows are read with a
// leading dimension of heads*hd, so no copies). Forward: tiles of 64 query rows x the keys they
// may see (causal blocks above the diagonal are skipped), softmax with the vectorised exp of
// core/vecmath.h, tiles spread over lowbit's thread pool with single-threaded BLAS inside; no
// T x T score matrix is ever allocated. Backward (training): per (batch, kv head), a Tq x Tk block.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "lowbit/core/blas.h"
#include "lowbit/core/threads.h"
#include "lowbit/core/vecmath.h"
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

template <class T>
void gemm_ld(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
             int64_t ldb, T beta, T* C, int64_t ldc) {
  blas::gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// Softmax of one score row in place over its first n entries; returns the log-sum-exp.
inline float softmax_row(float* s, int64_t n) {
  const float mx = vec::max(s, n);
  const float sum = vec::exp_shift_sum(s, n, mx);
  vec::scale(s, n, 1.0f / sum);
  return mx + std::log(sum);
}
inline double softmax_row(double* s, int64_t n) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
  const double inv = 1.0 / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  return mx + std::log(sum);
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
    const int64_t off = d.Tk - d.Tq, ldq = d.H * d.hd, ldk = d.KVH * d.hd;
    // Query tiles of Bq rows: a tile needs keys [0, off + last row], so the causal upper triangle
    // is never computed, and at most Bq x Tk scores exist per thread.
    const int64_t Bq = d.Tk <= 4096 ? 64 : 16, tiles = (d.Tq + Bq - 1) / Bq;
    parallel_each(d.B * d.H * tiles, [&](int64_t item) {
      // Largest tiles first: item order runs the last (longest) query tiles early.
      const int64_t qt = tiles - 1 - item / (d.B * d.H), bh = item % (d.B * d.H);
      const int64_t b = bh / d.H, h = bh % d.H, kh = h / d.group;
      const int64_t i0 = qt * Bq, i1 = std::min(d.Tq, i0 + Bq), rows = i1 - i0, kn = off + i1;
      thread_local std::vector<T> S;
      if (S.size() < size_t(rows * kn)) S.resize(size_t(rows * kn));
      const T* Q = qp + ((b * d.Tq + i0) * d.H + h) * d.hd;
      const T* K = kp + (b * d.Tk * d.KVH + kh) * d.hd;
      const T* V = vp + (b * d.Tk * d.KVH + kh) * d.hd;
      T* O = op_ + ((b * d.Tq + i0) * d.H + h) * d.hd;
      gemm_ld<T>(false, true, rows, kn, d.hd, T(scale), Q, ldq, K, ldk, T(0), S.data(), kn);
      for (int64_t r = 0; r < rows; ++r) {
        T* s = S.data() + r * kn;
        const int64_t valid = off + i0 + r + 1;
        lp[(b * d.H + h) * d.Tq + i0 + r] = T(softmax_row(s, valid));
        for (int64_t j = valid; j < kn; ++j) s[j] = 0;
      }
      gemm_ld<T>(false, false, rows, d.hd, kn, T(1), S.data(), kn, V, ldk, T(0), O, ldq);
    });
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
    const int64_t off = d.Tk - d.Tq, ldq = d.H * d.hd, ldk = d.KVH * d.hd;
    // Each (batch, kv head) owns its dK/dV rows, so groups run in parallel without races.
    parallel_each(d.B * d.KVH, [&](int64_t bk) {
      const int64_t b = bk / d.KVH, kh = bk % d.KVH;
      std::vector<T> P(static_cast<size_t>(d.Tq * d.Tk)), dP(static_cast<size_t>(d.Tq * d.Tk));
      const T* K = kp + (b * d.Tk * d.KVH + kh) * d.hd;
      const T* V = vp + (b * d.Tk * d.KVH + kh) * d.hd;
      T* dK = dkp + (b * d.Tk * d.KVH + kh) * d.hd;
      T* dV = dvp + (b * d.Tk * d.KVH + kh) * d.hd;
      for (int64_t j = 0; j < d.Tk; ++j)
        for (int64_t c = 0; c < d.hd; ++c) dK[j * ldk + c] = dV[j * ldk + c] = 0;
      for (int64_t h = kh * d.group; h < (kh + 1) * d.group; ++h) {
        const int64_t qoff = (b * d.Tq * d.H + h) * d.hd;
        const T *Q = qp + qoff, *O = op_ + qoff, *dO = gp + qoff;
        T* dQ = dqp + qoff;
        gemm_ld<T>(false, true, d.Tq, d.Tk, d.hd, T(scale), Q, ldq, K, ldk, T(0), P.data(), d.Tk);
        gemm_ld<T>(false, true, d.Tq, d.Tk, d.hd, T(1), dO, ldq, V, ldk, T(0), dP.data(), d.Tk);
        for (int64_t i = 0; i < d.Tq; ++i) {
          T* p = P.data() + i * d.Tk;
          T* g = dP.data() + i * d.Tk;
          const int64_t last = off + i;
          const T l = lp[(b * d.H + h) * d.Tq + i];
          T Di = 0;
          for (int64_t c = 0; c < d.hd; ++c) Di += dO[i * ldq + c] * O[i * ldq + c];
          for (int64_t j = 0; j <= last; ++j) {
            p[j] = std::exp(p[j] - l);
            g[j] = p[j] * (g[j] - Di) * T(scale);  // dS, with the scale of S folded in
          }
          for (int64_t j = last + 1; j < d.Tk; ++j) p[j] = g[j] = 0;
        }
        gemm_ld<T>(false, false, d.Tq, d.hd, d.Tk, T(1), dP.data(), d.Tk, K, ldk, T(0), dQ, ldq);
        gemm_ld<T>(true, false, d.Tk, d.hd, d.Tq, T(1), dP.data(), d.Tk, Q, ldq, T(1), dK, ldk);
        gemm_ld<T>(true, false, d.Tk, d.hd, d.Tq, T(1), P.data(), d.Tk, dO, ldq, T(1), dV, ldk);
      }
    });
  });
}

}  // namespace lowbit::ops
