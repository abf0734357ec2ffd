// The native FP8 GEMM of low-precision training (ops/lp_quant.h fp8_gemm): cuBLASLt on the FP8
// tensor cores of Hopper-class GPUs. Row-major y [M, N] = alpha a [M, K] b [N, K]^T is the
// column-major y^T [N, M] = b a^T: cuBLASLt's A is b (column-major [K, N], transposed), its B is a
// (column-major [K, M], not transposed) — the "TN" layout FP8 kernels require, with both operands
// contiguous along K. The per-tensor scales are folded into alpha (host pointer), the output is
// f32, accumulation f32 with fast accumulation off (partial sums promoted to full precision).
// One cuBLASLt handle and one 32 MiB workspace per process (the backend's device), the chosen
// algorithm cached per shape and format pair.
#include <cublasLt.h>

#include <map>
#include <mutex>
#include <tuple>

#include "lowbit/ops/cuda/cuda_common.h"
#include "lowbit/ops/cuda/cuda_ops.h"

namespace lowbit::ops::cuda {

namespace {

constexpr size_t kWorkspace = size_t(32) << 20;

struct LtState {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::mutex mu;
  std::map<std::tuple<int64_t, int64_t, int64_t, int, int>, cublasLtMatmulAlgo_t> algos;
};

LtState& lt() {
  static LtState* s = [] {
    auto* st = new LtState();  // never freed: it outlives every caller (process exit releases it)
    LB_CUBLAS_CHECK(cublasLtCreate(&st->handle));
    LB_CUDA_CHECK(cudaMalloc(&st->workspace, kWorkspace));
    return st;
  }();
  return *s;
}

cudaDataType_t fp8_type(LpFormat f) { return f == LpFormat::E4M3 ? CUDA_R_8F_E4M3 : CUDA_R_8F_E5M2; }

// RAII holders of the descriptors of one call.
struct Desc {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Desc() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace

void fp8_gemm(const Tensor& a, LpFormat fa, const Tensor& b, LpFormat fb, float alpha, Tensor& y) {
  LB_CUDA_OP("fp8_gemm");
  detail::check_on_gpu("fp8_gemm", b, "b");
  detail::check_on_gpu("fp8_gemm", y, "y");
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  if (!fp8_gemm_shape_ok(M, N, K))
    throw_error("fp8_gemm: [", M, ", ", K, "] x [", N, ", ", K, "]^T: the CUDA body needs M, N and K multiples of 16 "
                "(cuBLASLt's FP8 alignment); use the emulated path for this shape");
  LtState& s = lt();
  Desc dsc;
  // cuBLASLt's operands: A = b (K x N column-major, transposed), B = a (K x M column-major).
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  LB_CUBLAS_CHECK(cublasLtMatmulDescCreate(&dsc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  LB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(dsc.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  LB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(dsc.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  const int8_t fast = 0;
  LB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(dsc.op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast)));
  LB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&dsc.a, fp8_type(fb), uint64_t(K), uint64_t(N), K));
  LB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&dsc.b, fp8_type(fa), uint64_t(K), uint64_t(M), K));
  LB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&dsc.d, CUDA_R_32F, uint64_t(N), uint64_t(M), N));
  cublasLtMatmulAlgo_t algo;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    const auto key = std::make_tuple(M, N, K, int(fa), int(fb));
    auto it = s.algos.find(key);
    if (it == s.algos.end()) {
      LB_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&dsc.pref));
      LB_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(dsc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                           &kWorkspace, sizeof(kWorkspace)));
      cublasLtMatmulHeuristicResult_t h{};
      int found = 0;
      LB_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(s.handle, dsc.op, dsc.a, dsc.b, dsc.d, dsc.d, dsc.pref, 1, &h, &found));
      if (found < 1)
        throw_error("fp8_gemm: cuBLASLt has no FP8 kernel for [", M, ", ", K, "] x [", N, ", ", K, "]^T (",
                    lp_format_name(fa), " x ", lp_format_name(fb), ") on this GPU (FP8 tensor cores need sm_89 or newer)");
      it = s.algos.emplace(key, h.algo).first;
    }
    algo = it->second;
  }
  const float beta = 0.0f;
  LB_CUBLAS_CHECK(cublasLtMatmul(s.handle, dsc.op, &alpha, b.raw_data(), dsc.a, a.raw_data(), dsc.b, &beta, y.raw_data(),
                                 dsc.d, y.raw_data(), dsc.d, &algo, s.workspace, kWorkspace, cuda_rt::stream()));
}

}  // namespace lowbit::ops::cuda
