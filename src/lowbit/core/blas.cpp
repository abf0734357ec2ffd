#include "lowbit/core/blas.h"

#include <cblas.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "lowbit/core/threads.h"
#include "lowbit/core/vecmath.h"

namespace lowbit::blas {

namespace {
template <class T>
void gemm_1t(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
             int64_t ldb, T beta, T* C, int64_t ldc) {
  const auto TA = ta ? CblasTrans : CblasNoTrans, TB = tb ? CblasTrans : CblasNoTrans;
  if constexpr (std::is_same_v<T, float>)
    cblas_sgemm(CblasRowMajor, TA, TB, int(M), int(N), int(K), alpha, A, int(lda), B, int(ldb), beta, C, int(ldc));
  else
    cblas_dgemm(CblasRowMajor, TA, TB, int(M), int(N), int(K), alpha, A, int(lda), B, int(ldb), beta, C, int(ldc));
}

template <class T>
void gemm_split(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
                int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  const double flops = 2.0 * double(M) * double(N) * double(K);
  const int nt = num_threads();
  if (nt < 2 || flops < 4e6) return gemm_1t(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  // Split the larger output side into panels (multiples of 16 where possible) so every thread
  // packs only its part of one operand.
  if (N >= M) {
    const int64_t unit = N >= 16 * nt ? 16 : 1, units = (N + unit - 1) / unit;
    parallel_for(units, 1, [&](int64_t u0, int64_t u1) {
      const int64_t n0 = u0 * unit, n1 = std::min(N, u1 * unit);
      const T* Bp = tb ? B + n0 * ldb : B + n0;  // op(B) columns n0..n1
      gemm_1t(ta, tb, M, n1 - n0, K, alpha, A, lda, Bp, ldb, beta, C + n0, ldc);
    });
  } else {
    const int64_t unit = M >= 16 * nt ? 16 : 1, units = (M + unit - 1) / unit;
    parallel_for(units, 1, [&](int64_t u0, int64_t u1) {
      const int64_t m0 = u0 * unit, m1 = std::min(M, u1 * unit);
      const T* Ap = ta ? A + m0 : A + m0 * lda;  // op(A) rows m0..m1
      gemm_1t(ta, tb, m1 - m0, N, K, alpha, Ap, lda, B, ldb, beta, C + m0 * ldc, ldc);
    });
  }
}
}  // namespace

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
          int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_split<float>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  gemm_split<double>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm_f32_b16(bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const uint16_t* B,
                  int64_t ldb, bool b_bf16, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  // Panel width: ~512 KiB of widened weights (stays in L2 next to the packed A block).
  int64_t nb = std::clamp<int64_t>(131072 / std::max<int64_t>(K, 1), 16, 512) / 16 * 16;
  const int64_t panels = (N + nb - 1) / nb;
  auto widen = [&](const uint16_t* src, float* dst, int64_t n) {
    if (b_bf16)
      vec::bf16_to_f32(src, dst, n);
    else
      vec::f16_to_f32(src, dst, n);
  };
  parallel_each(panels, [&](int64_t p) {
    const int64_t n0 = p * nb, w = std::min(N, n0 + nb) - n0;
    thread_local std::vector<float> buf;
    if (buf.size() < size_t(w * K)) buf.resize(size_t(w * K));
    if (tb) {  // rows n0..n0+w of B [N, K]
      for (int64_t r = 0; r < w; ++r) widen(B + (n0 + r) * ldb, buf.data() + r * K, K);
      gemm_1t<float>(false, true, M, w, K, alpha, A, lda, buf.data(), K, beta, C + n0, ldc);
    } else {  // columns n0..n0+w of B [K, N]
      for (int64_t k = 0; k < K; ++k) widen(B + k * ldb + n0, buf.data() + k * w, w);
      gemm_1t<float>(false, false, M, w, K, alpha, A, lda, buf.data(), w, beta, C + n0, ldc);
    }
  });
}

}  // namespace lowbit::blas
