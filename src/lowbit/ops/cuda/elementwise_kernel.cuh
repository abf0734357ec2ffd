// A generic elementwise kernel: NI inputs, NO outputs, a functor on float values per element.
// Each thread handles 16-byte packs (4 f32 or 8 bf16) in a grid-stride loop when every pointer is
// 16-byte aligned (and a broadcast row length is a multiple of the pack), else single elements;
// a scalar loop finishes the tail. Memory-bound: one read per input and one write per output.
#pragma once
#include "lowbit/ops/cuda/cuda_common.h"

namespace lowbit::ops::cuda::detail {

template <class T, int NI, int NO>
struct EwArgs {
  const T* in[NI];
  int64_t row[NI] = {};  // 0: same size as the output; > 0: a vector of this length repeated over rows
  T* out[NO] = {};       // null: output not wanted
};

// F: __device__ void operator()(const float (&x)[NI], float (&y)[NO]) const
template <class T, int NI, int NO, class F>
__global__ void ew_kernel(EwArgs<T, NI, NO> a, int64_t n, int64_t npack, F f) {
  constexpr int P = kPack<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t pk = tid; pk < npack; pk += stride) {
    const int64_t i0 = pk * P;
    float x[NI][P];
#pragma unroll
    for (int k = 0; k < NI; ++k) load_pack<T>(a.in[k] + (a.row[k] ? i0 % a.row[k] : i0), x[k]);
    float y[NO][P];
#pragma unroll
    for (int e = 0; e < P; ++e) {
      float xi[NI], yo[NO];
#pragma unroll
      for (int k = 0; k < NI; ++k) xi[k] = x[k][e];
      f(xi, yo);
#pragma unroll
      for (int o = 0; o < NO; ++o) y[o][e] = yo[o];
    }
#pragma unroll
    for (int o = 0; o < NO; ++o)
      if (a.out[o]) store_pack<T>(a.out[o] + i0, y[o]);
  }
  for (int64_t i = npack * P + tid; i < n; i += stride) {
    float xi[NI], yo[NO];
#pragma unroll
    for (int k = 0; k < NI; ++k) xi[k] = to_f(a.in[k][a.row[k] ? i % a.row[k] : i]);
    f(xi, yo);
#pragma unroll
    for (int o = 0; o < NO; ++o)
      if (a.out[o]) a.out[o][i] = from_f<T>(yo[o]);
  }
}

template <class T, int NI, int NO, class F>
void launch_ew(const char* name, const EwArgs<T, NI, NO>& a, int64_t n, F f) {
  if (n == 0) return;
  constexpr int P = kPack<T>;
  bool vec = true;
  for (int k = 0; k < NI; ++k) vec = vec && aligned16(a.in[k]) && a.row[k] % P == 0;
  for (int o = 0; o < NO; ++o) vec = vec && (a.out[o] == nullptr || aligned16(a.out[o]));
  const int64_t npack = vec ? n / P : 0;
  const int threads = 256;
  ew_kernel<T, NI, NO, F><<<grid_for(npack > 0 ? npack : n, threads), threads, 0, cuda_rt::stream()>>>(a, n, npack, f);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) cuda_rt::throw_cuda(e, name, __FILE__, __LINE__);
}

}  // namespace lowbit::ops::cuda::detail
