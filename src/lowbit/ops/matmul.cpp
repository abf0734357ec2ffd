// gemm: batched matrix multiply through BLAS (OpenBLAS sgemm/dgemm on the CPU, cuBLAS on CUDA).
#include <cblas.h>

#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

using detail::check_contiguous;

void gemm(const Tensor& a, bool ta, const Tensor& b, bool tb, Tensor& c, double alpha, double beta) {
  const char* op = "gemm";
  check_contiguous(op, a, "a");
  check_contiguous(op, b, "b");
  check_contiguous(op, c, "c");
  if (a.dim() < 2 || b.dim() < 2) throw_error(op, ": operands must be at least 2-D, got ", a.describe(), " and ", b.describe());
  detail::check_same_kind(op, a, b, "b");
  // Mixed precision on the GPU: bf16 operands may write an f32 result (fp32 accumulation either way).
  if (!(a.dtype() == DType::BF16 && c.dtype() == DType::F32 && a.device() == Device::CUDA && c.device() == Device::CUDA))
    detail::check_same_kind(op, a, c, "c");
  const int64_t M = ta ? a.size(-1) : a.size(-2), K = ta ? a.size(-2) : a.size(-1);
  const int64_t Kb = tb ? b.size(-1) : b.size(-2), N = tb ? b.size(-2) : b.size(-1);
  if (K != Kb) throw_error(op, ": inner dimensions differ: ", a.describe(), (ta ? "^T" : ""), " x ", b.describe(), (tb ? "^T" : ""));
  const int64_t batch = a.numel() / (M * K > 0 ? M * K : 1);
  const bool b_broadcast = b.dim() == 2 && a.dim() > 2;
  if (!b_broadcast && b.numel() / (K * N > 0 ? K * N : 1) != batch && a.dim() == b.dim())
    throw_error(op, ": batch dims differ: ", a.describe(), " and ", b.describe());
  Shape cs(a.shape().begin(), a.shape().end() - 2);
  cs.push_back(M);
  cs.push_back(N);
  detail::check_shape(op, c, cs, "c");
  if (M == 0 || N == 0) return;
  LB_CUDA_ROUTE(a, gemm, a, ta, b, tb, c, alpha, beta);
  if (b_broadcast && !ta) {
    // One big GEMM: the batch dims of a fold into its rows.
    const int64_t rows = batch * M;
    auto go = [&](auto t) {
      using T = decltype(t);
      if constexpr (std::is_same_v<T, float>)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(rows), int(N), int(K), float(alpha),
                    a.data<float>(), int(K), b.data<float>(), tb ? int(K) : int(N), float(beta), c.data<float>(), int(N));
      else
        cblas_dgemm(CblasRowMajor, CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(rows), int(N), int(K), alpha,
                    a.data<double>(), int(K), b.data<double>(), tb ? int(K) : int(N), beta, c.data<double>(), int(N));
    };
    detail::dispatch_float(op, a.dtype(), go);
    return;
  }
  const int lda = ta ? int(M) : int(K), ldb = tb ? int(K) : int(N);
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t bi = b_broadcast ? 0 : i;
    auto go = [&](auto t) {
      using T = decltype(t);
      const T* ap = a.data<T>() + i * M * K;
      const T* bp = b.data<T>() + bi * K * N;
      T* cp = c.data<T>() + i * M * N;
      if constexpr (std::is_same_v<T, float>)
        cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(M), int(N), int(K),
                    float(alpha), ap, lda, bp, ldb, float(beta), cp, int(N));
      else
        cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(M), int(N), int(K),
                    alpha, ap, lda, bp, ldb, beta, cp, int(N));
    };
    detail::dispatch_float(op, a.dtype(), go);
  }
}

}  // namespace lowbit::ops
