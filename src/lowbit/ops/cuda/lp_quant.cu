// CUDA body of the operand quantizer of low-precision training (ops/lp_quant.h). The arithmetic is
// ops/lp_quant_math.h, the functions the CPU reference body calls, so the two agree bit for bit:
//   copy x -> y, then in place on y: one thread per Hadamard group (rht_apply), a grid-stride amax
//   (warp max, one atomicMax on the float's bits per warp: non-negative floats order as integers,
//   NaN above inf), the amax read back to the host (one synchronisation per call: the emulation
//   favours one code path over speed), then one thread per element (per-tensor formats) or per
//   scale tile (tile_scale + qdq over the tile, element k drawing lp::uniform(seed, k)).
// lp_quantize_fp8 writes the FP8 codes of the same values for the native FP8 GEMM (fp8_gemm.cu);
// FP4 stays emulated (Hopper has no FP4 tensor cores; docs/results/low-precision-training.md).
#include <cstdint>

#include "lowbit/ops/cuda/cuda_common.h"
#include "lowbit/ops/cuda/cuda_ops.h"
#include "lowbit/ops/lp_quant_math.h"

namespace lowbit::ops::cuda {

namespace {
using detail::ptr;

constexpr int kThreads = 256;

__global__ void lp_rht_kernel(float* __restrict__ v, int64_t R, int64_t C, LpQuantSpec s) {
  const int hn = s.rht_size;
  const int64_t along = s.rht_axis == 0 ? R : C, across = s.rht_axis == 0 ? C : R;
  const int64_t total = (along / hn) * across;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = t / across, o = t % across;
    float* base = s.rht_axis == 0 ? v + g * hn * C + o : v + o * C + g * hn;
    lp::rht_apply(base, s.rht_axis == 0 ? C : 1, hn, s.rht_seed, false);
  }
}

__global__ void lp_amax_kernel(const float* __restrict__ v, int64_t n, unsigned int* __restrict__ amax_bits) {
  float m = 0.0f;
  unsigned int bad = 0;  // NaN/inf: reported as the bits of a NaN
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float a = fabsf(v[i]);
    if (!(a <= 3.402823466e38f)) bad = 1;
    else m = fmaxf(m, a);
  }
  m = detail::warp_max(m);
  bad = __any_sync(0xffffffffu, bad) ? 1u : 0u;
  if ((threadIdx.x & 31) == 0) atomicMax(amax_bits, bad ? 0x7fc00000u : __float_as_uint(m));
}

__global__ void lp_fill_nan_kernel(float* __restrict__ v, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    v[i] = __int_as_float(0x7fc00000);
}

__global__ void lp_tensor_kernel(float* __restrict__ v, int64_t n, LpFormat f, float ts) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    v[i] = lp::qdq(f, v[i], ts, false, 0.0f);
}

__global__ void lp_tile_kernel(float* __restrict__ v, int64_t R, int64_t C, LpQuantSpec s, float ts) {
  const int64_t tr = s.tile_rows, tc = s.tile_cols;
  const int64_t TR = (R + tr - 1) / tr, TC = (C + tc - 1) / tc;
  const bool sr = s.rounding == LpRounding::Stochastic;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < TR * TC; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = t / TC, j = t % TC;
    const int64_t r0 = i * tr, r1 = r0 + tr < R ? r0 + tr : R, c0 = j * tc, c1 = c0 + tc < C ? c0 + tc : C;
    float bmax = 0.0f;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = c0; c < c1; ++c) bmax = fmaxf(bmax, fabsf(v[r * C + c]));
    const float S = lp::tile_scale(s.format, bmax, ts, sr);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t k = r * C + c;
        v[k] = lp::qdq(s.format, v[k], S, sr, sr ? lp::uniform(s.seed, uint64_t(k)) : 0.0f);
      }
  }
}

// FP8 codes of a 32 x 32 tile per block (32 x 8 threads): read along x's rows, written along the
// rows of codes — through shared memory when transposed — so both sides are coalesced.
__global__ void lp_fp8_codes_kernel(const float* __restrict__ x, uint8_t* __restrict__ codes, int64_t R, int64_t C,
                                    LpFormat f, float ts, bool transpose) {
  __shared__ uint8_t tile[32][33];
  const int64_t r0 = int64_t(blockIdx.y) * 32, c0 = int64_t(blockIdx.x) * 32;
  for (int k = threadIdx.y; k < 32; k += 8) {
    const int64_t r = r0 + k, c = c0 + threadIdx.x;
    if (r < R && c < C) {
      const float v = x[r * C + c];
      const uint8_t q = isfinite(v) ? lp::fp8_code(f, v, ts) : uint8_t(0x7f);
      if (transpose) tile[k][threadIdx.x] = q;
      else codes[r * C + c] = q;
    }
  }
  if (!transpose) return;
  __syncthreads();
  for (int k = threadIdx.y; k < 32; k += 8) {  // codes [C, R]: row c0 + k, columns r0 + threadIdx.x
    const int64_t c = c0 + k, r = r0 + threadIdx.x;
    if (r < R && c < C) codes[c * R + r] = tile[threadIdx.x][k];
  }
}

// The amax of x (NaN when x holds NaN/inf), read back to the host.
float amax_to_host(const float* v, int64_t n, cudaStream_t st) {
  Tensor bits = Tensor::empty({1}, DType::I32, Device::CUDA);
  LB_CUDA_CHECK(cudaMemsetAsync(bits.raw_data(), 0, sizeof(uint32_t), st));
  lp_amax_kernel<<<detail::grid_for(n, kThreads), kThreads, 0, st>>>(v, n, static_cast<unsigned int*>(bits.raw_data()));
  LB_CUDA_LAUNCH_CHECK("lp_amax_kernel");
  uint32_t host_bits = 0;
  LB_CUDA_CHECK(cudaMemcpyAsync(&host_bits, bits.raw_data(), sizeof(uint32_t), cudaMemcpyDeviceToHost, st));
  LB_CUDA_CHECK(cudaStreamSynchronize(st));
  return bits_f32(host_bits);
}

}  // namespace

void lp_quantize_fp8(const Tensor& x, const LpQuantSpec& spec, Tensor& codes, LpQuantStats* stats, bool transpose) {
  LB_CUDA_OP("lp_quantize_fp8");
  detail::check_on_gpu("lp_quantize_fp8", codes, "codes");
  const int64_t R = x.size(0), C = x.size(1), n = R * C;
  cudaStream_t st = cuda_rt::stream();
  if (n == 0) {
    if (stats) *stats = {};
    return;
  }
  float ts = spec.tensor_scale;
  if (stats || !(ts > 0)) {
    const float amax = amax_to_host(ptr<float>(x), n, st);
    if (!(amax <= 3.402823466e38f)) {
      if (stats) *stats = {double(amax), 0.0};
      LB_CUDA_CHECK(cudaMemsetAsync(codes.raw_data(), 0x7f, size_t(n), st));
      return;
    }
    if (!(ts > 0)) ts = lp::tensor_scale(spec.format, amax);
    if (stats) *stats = {double(amax), double(ts)};
  }
  const dim3 grid(unsigned((C + 31) / 32), unsigned((R + 31) / 32)), block(32, 8);
  if (grid.y > 65535u) throw_error("lp_quantize_fp8: ", R, " rows exceed the CUDA body's grid (at most 2,097,120)");
  lp_fp8_codes_kernel<<<grid, block, 0, st>>>(ptr<float>(x), static_cast<uint8_t*>(codes.raw_data()), R, C,
                                               spec.format, ts, transpose);
  LB_CUDA_LAUNCH_CHECK("lp_fp8_codes_kernel");
}

void lp_quantize(const Tensor& x, const LpQuantSpec& spec, Tensor& y, LpQuantStats* stats) {
  LB_CUDA_OP("lp_quantize");
  if (x.dtype() != DType::F32) throw_error("lp_quantize: the CUDA body supports f32, got ", x.describe());
  detail::check_on_gpu("lp_quantize", y, "y");
  const int64_t R = x.size(0), C = x.size(1), n = R * C;
  cudaStream_t st = cuda_rt::stream();
  float* v = ptr<float>(y);
  if (n == 0) {
    if (stats) *stats = {};
    return;
  }
  LB_CUDA_CHECK(cudaMemcpyAsync(v, ptr<float>(x), size_t(n) * sizeof(float), cudaMemcpyDeviceToDevice, st));
  if (spec.rht_axis >= 0) {
    const int64_t along = spec.rht_axis == 0 ? R : C, across = spec.rht_axis == 0 ? C : R;
    const int64_t groups = (along / spec.rht_size) * across;
    if (groups > 0) {
      lp_rht_kernel<<<detail::grid_for(groups, kThreads), kThreads, 0, st>>>(v, R, C, spec);
      LB_CUDA_LAUNCH_CHECK("lp_rht_kernel");
    }
  }
  const float amax = amax_to_host(v, n, st);
  if (!(amax <= 3.402823466e38f)) {
    if (stats) *stats = {double(amax), 0.0};
    lp_fill_nan_kernel<<<detail::grid_for(n, kThreads), kThreads, 0, st>>>(v, n);
    LB_CUDA_LAUNCH_CHECK("lp_fill_nan_kernel");
    return;
  }
  const LpFormat f = spec.format;
  float ts = 0;
  if (lp::is_fp8(f)) ts = spec.tensor_scale > 0 ? spec.tensor_scale : lp::tensor_scale(f, amax);
  else if (f == LpFormat::NVFP4) ts = lp::tensor_scale(f, amax);
  if (stats) *stats = {double(amax), double(ts)};
  if (!lp::is_fp4(f)) {
    if (f == LpFormat::None) return;
    lp_tensor_kernel<<<detail::grid_for(n, kThreads), kThreads, 0, st>>>(v, n, f, ts);
    LB_CUDA_LAUNCH_CHECK("lp_tensor_kernel");
    return;
  }
  const int64_t tiles = ((R + spec.tile_rows - 1) / spec.tile_rows) * ((C + spec.tile_cols - 1) / spec.tile_cols);
  lp_tile_kernel<<<detail::grid_for(tiles, kThreads), kThreads, 0, st>>>(v, R, C, spec, ts);
  LB_CUDA_LAUNCH_CHECK("lp_tile_kernel");
}

}  // namespace lowbit::ops::cuda
