// Row-major matrix products on the CPU, run on lowbit's thread pool (core/threads.h): the output
// is split into column (or row) panels, one single-threaded BLAS call per panel, so the products
// and lowbit's own loops share one set of threads. Inside a parallel region they run serially.
//   C[M, N] = alpha op(A) op(B) + beta C, op(X) = X or X^T; lda/ldb/ldc are row strides.
#pragma once
#include <cstdint>

namespace lowbit::blas {

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
          int64_t ldb, float beta, float* C, int64_t ldc);
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

// f32 A times 16-bit B (f16, or bf16 when b_bf16), f32 C: B is read in panels of a few hundred
// output columns, each widened to f32 in a per-thread buffer and multiplied by single-threaded
// sgemm; panels run on the pool. B is [N, K] when tb, else [K, N] (row stride ldb).
void gemm_f32_b16(bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const uint16_t* B,
                  int64_t ldb, bool b_bf16, float beta, float* C, int64_t ldc);

}  // namespace lowbit::blas
