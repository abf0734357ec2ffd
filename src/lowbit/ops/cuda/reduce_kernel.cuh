// Deterministic reductions (no atomics: the same input gives the same bits on every run).
//  * Full reductions: a grid-stride pass where each block writes one fp64 partial sum, then one
//    block adds the partials. fp64 accumulation matches the CPU bodies, which sum in double.
//  * Column reductions over the rows of an [R, C] matrix (bias gradients, RMSNorm's dw): blocks
//    of 32 columns x 8 row-lanes, each warp reading 32 consecutive columns of a row (coalesced);
//    the rows are split into S slices so that ~4 blocks per SM are in flight, each slice writes a
//    [S, C] fp32 partial and a second kernel adds the S partials per column.
#pragma once
#include "lowbit/ops/cuda/cuda_common.h"

namespace lowbit::ops::cuda::detail {

// F: __device__ double operator()(int64_t i) const
template <class F>
__global__ void reduce_partial_kernel(int64_t n, F f, double* partial) {
  double acc = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) acc += f(i);
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <class T>
__global__ void reduce_final_kernel(const double* partial, int np, double mult, T* out_t, double* out_d) {
  double acc = 0;
  for (int i = threadIdx.x; i < np; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    if (out_t) *out_t = from_f<T>(float(acc * mult));
    if (out_d) *out_d = acc * mult;
  }
}

// out_t (a T scalar on the device) and/or out_d (a double on the device) := mult * sum_i f(i).
template <class T, class F>
void reduce_sum(int64_t n, F f, double mult, T* out_t, double* out_d) {
  const int threads = 256;
  const unsigned nb = grid_for(n, threads);
  Tensor partial = Tensor::empty({int64_t(nb)}, DType::F64, Device::CUDA);
  double* pp = ptr<double>(partial);
  reduce_partial_kernel<F><<<nb, threads, 0, cuda_rt::stream()>>>(n, f, pp);
  LB_CUDA_LAUNCH_CHECK("reduce_partial_kernel");
  reduce_final_kernel<T><<<1, 1024, 0, cuda_rt::stream()>>>(pp, int(nb), mult, out_t, out_d);
  LB_CUDA_LAUNCH_CHECK("reduce_final_kernel");
}

// F: __device__ float operator()(int64_t r, int64_t c) const
template <class F>
__global__ void colreduce_partial_kernel(int64_t R, int64_t C, int64_t rows_per_split, F f, float* partial) {
  __shared__ float sm[8][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t c = int64_t(blockIdx.x) * 32 + tx;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < R ? r0 + rows_per_split : R;
  float acc = 0;
  if (c < C)
    for (int64_t r = r0 + ty; r < r1; r += 8) acc += f(r, c);
  sm[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && c < C) {
    float s = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) s += sm[k][tx];
    partial[int64_t(blockIdx.y) * C + c] = s;
  }
}

template <class T>
__global__ void colreduce_final_kernel(const float* partial, int S, int64_t C, T* out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float s = 0;
  for (int k = 0; k < S; ++k) s += partial[int64_t(k) * C + c];
  out[c] = from_f<T>(s);
}

// out[c] := sum_r f(r, c) for an [R, C] problem.
template <class T, class F>
void column_sum(int64_t R, int64_t C, F f, T* out) {
  if (C == 0) return;
  const int64_t col_blocks = (C + 31) / 32;
  int64_t S = (int64_t(cuda_rt::num_sms()) * 4 + col_blocks - 1) / col_blocks;
  const int64_t max_s = (R + 63) / 64;  // at least 64 rows per slice
  S = S < 1 ? 1 : (S > max_s ? max_s : S);
  if (S < 1) S = 1;
  if (S > 65535) S = 65535;
  const int64_t rps = R > 0 ? (R + S - 1) / S : 1;
  S = R > 0 ? (R + rps - 1) / rps : 1;
  Tensor partial = Tensor::empty({S, C}, DType::F32, Device::CUDA);
  float* pp = ptr<float>(partial);
  colreduce_partial_kernel<F><<<dim3(unsigned(col_blocks), unsigned(S)), 256, 0, cuda_rt::stream()>>>(R, C, rps, f, pp);
  LB_CUDA_LAUNCH_CHECK("colreduce_partial_kernel");
  colreduce_final_kernel<T><<<unsigned((C + 255) / 256), 256, 0, cuda_rt::stream()>>>(pp, int(S), C, out);
  LB_CUDA_LAUNCH_CHECK("colreduce_final_kernel");
}

}  // namespace lowbit::ops::cuda::detail
