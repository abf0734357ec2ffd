// CUDA bodies of quant_matmul and quant_embedding on packed weights (kernels and the device layout
// in quant_gemv.cuh). Decode: activation quantization + the dp4a GEMV; prefill: f32 tiles of
// dequantized rows (at most 64 MiB) multiplied with cuBLAS; embeddings: the same row decoder on a
// list of ids.
#include <algorithm>

#include "lowbit/ops/cuda/cuda_common.h"
#include "lowbit/ops/cuda/cuda_ops.h"
#include "lowbit/ops/cuda/quant_gemv.cuh"

namespace lowbit::ops::cuda {

namespace {

qgemv::Weight kernel_weight(const DevicePackedWeight& d) {
  if (d.out > INT32_MAX || d.in > INT32_MAX) throw_error("quant_matmul: weight [", d.out, ", ", d.in, "] too large for the GPU kernels");
  qgemv::Weight w;
  w.codes = static_cast<const uint8_t*>(d.codes.raw_data());
  w.params = static_cast<const __half2*>(d.params.raw_data());
  w.row_bytes = d.row_bytes;
  w.N = int(d.out);
  w.K = int(d.in);
  w.G = int(d.group_size);
  w.n_groups = int(d.n_groups);
  w.bits = d.bits;
  w.order = d.order;
  w.offset = d.offset;
  return w;
}

void gemv(const qgemv::Weight& w, const float* x, int64_t M, float* y, qgemv::Variant v) {
  const int64_t nb = w.K / 32;
  Tensor xq = Tensor::empty({M, int64_t(w.K)}, DType::I8, Device::CUDA);
  Tensor xds = Tensor::empty({M, nb, 2}, DType::F32, Device::CUDA);
  LB_CUDA_CHECK(qgemv::launch_quantize(w, x, int(M), detail::ptr<int8_t>(xq), detail::ptr<float2>(xds), v,
                                       cuda_rt::stream()));
  for (int64_t m0 = 0; m0 < M; m0 += 8) {  // chunks of 8 token rows (Int8 forced with M > 8)
    const int mc = int(std::min<int64_t>(8, M - m0));
    LB_CUDA_CHECK(qgemv::launch_gemv_m(w, detail::ptr<int8_t>(xq) + m0 * w.K, detail::ptr<float2>(xds) + m0 * nb, mc,
                                       y + m0 * w.N, v, cuda_rt::stream()));
  }
}

template <class Out>
void dequant_rows(const qgemv::Weight& w, int64_t r0, int64_t n, const int32_t* ids, Out* out) {
  const int64_t items = n * (w.K / 32);
  if (items == 0) return;
  qgemv::dequant_rows_kernel<Out><<<unsigned((items + 127) / 128), 128, 0, cuda_rt::stream()>>>(w, r0, n, ids, out,
                                                                                                nullptr);
  LB_CUDA_LAUNCH_CHECK("qgemv::dequant_rows_kernel");
}

void dequant_gemm(const qgemv::Weight& w, const float* x, int64_t M, float* y) {
  const int64_t K = w.K, N = w.N;
  if (M > INT32_MAX) throw_error("quant_matmul: ", M, " rows exceed cuBLAS's 32-bit limit");
  const int64_t tile = std::clamp<int64_t>((int64_t(16) << 20) / K, 1, N);  // <= 64 MiB of f32
  Tensor buf = Tensor::empty({tile, K}, DType::F32, Device::CUDA);
  const float al = 1.f, be = 0.f;
  const cublasComputeType_t ct = cuda_rt::allow_tf32() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  for (int64_t o0 = 0; o0 < N; o0 += tile) {
    const int64_t n = std::min(tile, N - o0);
    dequant_rows<float>(w, o0, n, nullptr, detail::ptr<float>(buf));
    // Row-major y[:, o0:o0+n] = x · tileᵀ: column-major yᵀ (ld N) = tile (col-major [K, n], op T) · xᵀ.
    LB_CUBLAS_CHECK(cublasGemmEx(cuda_rt::cublas(), CUBLAS_OP_T, CUBLAS_OP_N, int(n), int(M), int(K), &al, buf.raw_data(),
                                 CUDA_R_32F, int(K), x, CUDA_R_32F, int(K), &be, y + o0, CUDA_R_32F, int(N), ct,
                                 CUBLAS_GEMM_DEFAULT));
  }
}

}  // namespace

void quant_matmul(const Tensor& x, const PackedWeight& w, Tensor& y, bool int8, CudaGemv kernel) {
  LB_CUDA_OP("quant_matmul");
  const qgemv::Weight kw = kernel_weight(*w.device);
  const int64_t M = x.size(0);
  const qgemv::Variant v = kernel == CudaGemv::V1 ? qgemv::Variant::V1
                           : kernel == CudaGemv::V2 ? qgemv::Variant::V2
                                                    : qgemv::Variant::V2Pdl;
  if (int8) gemv(kw, detail::ptr<float>(x), M, detail::ptr<float>(y), v);
  else dequant_gemm(kw, detail::ptr<float>(x), M, detail::ptr<float>(y));
}

void quant_embedding(const PackedWeight& w, const Tensor& ids, Tensor& out) {
  LB_CUDA_OP("quant_embedding");
  const qgemv::Weight kw = kernel_weight(*w.device);
  const Tensor host = ids.to(Device::CPU);
  const int64_t n = host.numel();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = host.data<int32_t>()[i];
    if (id < 0 || id >= w.out)
      throw_error("quant_embedding: token id ", id, " at position ", i, " is outside the vocabulary [0, ", w.out, ")");
  }
  const Tensor dev = ids.device() == Device::CUDA ? ids : ids.to(Device::CUDA);
  dequant_rows<float>(kw, 0, n, detail::ptr<int32_t>(dev), detail::ptr<float>(out));
}

}  // namespace lowbit::ops::cuda
