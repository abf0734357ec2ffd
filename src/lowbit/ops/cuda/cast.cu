// Dtype conversion on the GPU (declared in ops/ops.h): f32 <-> bf16 (and same-dtype copies), one
// memory-bound pass. bf16 mixed-precision training calls it twice per parameter and step (master
// weights to bf16 copies, bf16 gradients back to f32), so it must not stage through the host as
// Tensor::to(DType) does across devices.
#include "lowbit/ops/cuda/cuda_common.h"

namespace lowbit::ops::cuda {

namespace {
using namespace detail;

template <class S, class D>
__global__ void cast_kernel(const S* x, D* y, int64_t n, bool vec) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  // 8 elements per step: 32 (f32) or 16 (bf16) bytes of input when aligned.
  const int64_t n8 = n / 8;
  if (vec) {
    for (int64_t p = tid; p < n8; p += stride) {
      float v[8];
      if constexpr (sizeof(S) == 4) {
        load_pack<S>(x + p * 8, *reinterpret_cast<float(*)[4]>(v));
        load_pack<S>(x + p * 8 + 4, *reinterpret_cast<float(*)[4]>(v + 4));
      } else {
        load_pack<S>(x + p * 8, *reinterpret_cast<float(*)[8]>(v));
      }
      if constexpr (sizeof(D) == 4) {
        store_pack<D>(y + p * 8, *reinterpret_cast<float(*)[4]>(v));
        store_pack<D>(y + p * 8 + 4, *reinterpret_cast<float(*)[4]>(v + 4));
      } else {
        store_pack<D>(y + p * 8, *reinterpret_cast<float(*)[8]>(v));
      }
    }
  }
  for (int64_t i = (vec ? n8 * 8 : 0) + tid; i < n; i += stride) y[i] = from_f<D>(to_f(x[i]));
}
}  // namespace

void cast(const Tensor& x, Tensor& out) {
  LB_CUDA_OP("cast");
  check_on_gpu("cast", out, "out");
  const int64_t n = x.numel();
  if (n == 0) return;
  dispatch("cast", x.dtype(), [&](auto stag) {
    using S = typename decltype(stag)::type;
    dispatch("cast", out.dtype(), [&](auto dtag) {
      using D = typename decltype(dtag)::type;
      const int threads = 256;
      cast_kernel<S, D><<<grid_for((n + 7) / 8, threads), threads, 0, cuda_rt::stream()>>>(ptr<S>(x), ptr<D>(out), n, aligned16(x.raw_data()) && aligned16(out.raw_data()));
      LB_CUDA_LAUNCH_CHECK("cast_kernel");
    });
  });
}

}  // namespace lowbit::ops::cuda
