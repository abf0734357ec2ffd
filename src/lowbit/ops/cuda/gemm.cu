// gemm through cuBLAS. cuBLAS is column-major; a row-major [R, C] matrix is the column-major
// [C, R] matrix at the same address, so the row-major product C = op(A) op(B) is computed as the
// column-major product C^T = op(B)^T op(A)^T: the operands swap places and each keeps its own
// transpose flag. f64 runs cuBLAS's f64 GEMM; f32 runs on FP32 cores (or TF32 tensor cores when allowed, see device_init.h);
// bf16 inputs use tensor cores with fp32 accumulation (CUBLAS_COMPUTE_32F) and write a bf16 or an
// f32 result (the mixed-precision products of autograd's AutocastBf16Guard).
#include "lowbit/ops/cuda/cuda_common.h"
#include "lowbit/ops/cuda/cuda_ops.h"

namespace lowbit::ops::cuda {

void gemm(const Tensor& a, bool ta, const Tensor& b, bool tb, Tensor& c, double alpha, double beta) {
  LB_CUDA_OP("gemm");
  detail::check_on_gpu("gemm", b, "b");
  detail::check_on_gpu("gemm", c, "c");
  const int64_t M = ta ? a.size(-1) : a.size(-2), K = ta ? a.size(-2) : a.size(-1);
  const int64_t N = tb ? b.size(-2) : b.size(-1);
  int64_t batch = a.numel() / (M * K > 0 ? M * K : 1);
  const bool b_broadcast = b.dim() == 2 && a.dim() > 2;
  int64_t rows = M;
  if (b_broadcast && !ta) {  // a's batch folds into its rows: one large GEMM
    rows = batch * M;
    batch = 1;
  }
  if (rows > INT32_MAX || N > INT32_MAX || K > INT32_MAX)
    throw_error("gemm: dimensions exceed cuBLAS's 32-bit limit: ", a.describe(), " x ", b.describe());
  if (K == 0) {  // empty inner dimension: C = beta C
    if (beta == 0.0) c.zero_();
    else scale(c, beta, c);
    return;
  }
  cudaDataType_t dt, dc;
  cublasComputeType_t ct = CUBLAS_COMPUTE_32F;
  switch (a.dtype()) {
    case DType::F32:
      dt = CUDA_R_32F;
      if (cuda_rt::allow_tf32()) ct = CUBLAS_COMPUTE_32F_FAST_TF32;
      break;
    case DType::BF16: dt = CUDA_R_16BF; break;
    case DType::F64:  // AdaRound's f64 solver (methods/adaround.cpp): cuBLAS's f64 GEMM
      dt = CUDA_R_64F;
      ct = CUBLAS_COMPUTE_64F;
      break;
    default: throw_error("gemm: CUDA body supports f32, f64 and bf16, got ", a.describe());
  }
  // C is a's type, or f32 for bf16 operands (mixed precision: the product is kept in fp32).
  if (c.dtype() == a.dtype()) dc = dt;
  else if (a.dtype() == DType::BF16 && c.dtype() == DType::F32) dc = CUDA_R_32F;
  else throw_error("gemm: result ", c.describe(), " does not fit operands ", a.describe());
  const float al32 = float(alpha), be32 = float(beta);
  const bool f64 = a.dtype() == DType::F64;
  const void* al = f64 ? static_cast<const void*>(&alpha) : static_cast<const void*>(&al32);
  const void* be = f64 ? static_cast<const void*>(&beta) : static_cast<const void*>(&be32);
  const cublasOperation_t op_b = tb ? CUBLAS_OP_T : CUBLAS_OP_N, op_a = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int ldb = int(tb ? K : N), lda = int(ta ? M : K), ldc = int(N);
  cublasHandle_t h = cuda_rt::cublas();
  if (batch == 1) {
    LB_CUBLAS_CHECK(cublasGemmEx(h, op_b, op_a, int(N), int(rows), int(K), al, b.raw_data(), dt, ldb, a.raw_data(), dt,
                                 lda, be, c.raw_data(), dc, ldc, ct, CUBLAS_GEMM_DEFAULT));
  } else {
    const long long sb = b_broadcast ? 0 : K * N, sa = M * K, sc = M * N;
    LB_CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, op_b, op_a, int(N), int(M), int(K), al, b.raw_data(), dt, ldb, sb,
                                               a.raw_data(), dt, lda, sa, be, c.raw_data(), dc, ldc, sc, int(batch), ct,
                                               CUBLAS_GEMM_DEFAULT));
  }
}

}  // namespace lowbit::ops::cuda
