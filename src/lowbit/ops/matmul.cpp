// gemm: batched matrix multiply through BLAS (OpenBLAS sgemm/dgemm split over lowbit's thread pool
// on the CPU, core/blas.h; cuBLAS on CUDA).
#include "lowbit/core/blas.h"
#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

using detail::check_contiguous;

void gemm(const Tensor& a, bool ta, const Tensor& b, bool tb, Tensor& c, double alpha, double beta) {
  const char* op = "gemm";
  check_contiguous(op, a, "a");
  check_contiguous(op, b, "b");
  check_contiguous(op, c, "c");
  if (a.dim() < 2 || b.dim() < 2) throw_error(op, ": operands must be at least 2-D, got ", a.describe(), " and ", b.describe());
  // 16-bit weights on the CPU: f32 a times an f16/bf16 matrix b (2-D, broadcast over a's batch),
  // f32 c; b is widened panel by panel inside the product (core/blas.h), never as a whole.
  const bool b16 = a.device() == Device::CPU && b.device() == Device::CPU && a.dtype() == DType::F32 &&
                   (b.dtype() == DType::F16 || b.dtype() == DType::BF16);
  if (b16) {
    if (b.dim() != 2 || ta)
      throw_error(op, ": an f16/bf16 b needs a 2-D b and an untransposed f32 a, got ", a.describe(), (ta ? "^T" : ""),
                  " x ", b.describe());
  } else {
    detail::check_same_kind(op, a, b, "b");
  }
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
  if (b16) {
    blas::gemm_f32_b16(tb, a.numel() / K, N, K, float(alpha), a.data<float>(), K,
                       static_cast<const uint16_t*>(b.raw_data()), tb ? K : N, b.dtype() == DType::BF16, float(beta),
                       c.data<float>(), N);
    return;
  }
  detail::dispatch_float(op, a.dtype(), [&](auto t) {
    using T = decltype(t);
    if (b_broadcast && !ta) {  // one big GEMM: the batch dims of a fold into its rows
      blas::gemm(false, tb, batch * M, N, K, T(alpha), a.data<T>(), K, b.data<T>(), tb ? K : N, T(beta), c.data<T>(),
                 N);
      return;
    }
    const int64_t lda = ta ? M : K, ldb = tb ? K : N;
    auto one = [&](int64_t i) {
      const int64_t bi = b_broadcast ? 0 : i;
      blas::gemm(ta, tb, M, N, K, T(alpha), a.data<T>() + i * M * K, lda, b.data<T>() + bi * K * N, ldb, T(beta),
                 c.data<T>() + i * M * N, N);
    };
    if (batch == 1) return one(0);
    // Many products: one per thread (each single-threaded inside the pool).
    parallel_for(batch, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) one(i);
    });
  });
}

}  // namespace lowbit::ops
