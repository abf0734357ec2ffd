// CUDA body of the one-pass FP8 encoder (ops/lp_fp8.h). Shapes with C % 4 == 0 and R % 16 == 0
// take the vectorised kernel (float4 loads, 32 x 128 tiles); the general one: one 32 x 32 tile of x
// per block (32 x 8 threads): each element read once, its code written to the row layout directly and, through
// shared memory, to the transposed layout (coalesced both ways); the tile's amax as a warp max and
// one atomicMax per warp on the float's bits (non-negative floats order as integers; a non-finite
// value reports NaN's bits, above every finite one). The amax is then copied into a slot of pinned
// host memory behind an event: the host reads it when it needs it (LpAmax::get waits on that event
// only), so nothing synchronises the stream.
#include <cstdint>
#include <mutex>
#include <vector>

#include "lowbit/ops/cuda/cuda_common.h"
#include "lowbit/ops/cuda/lp_fp8_cuda.h"

namespace lowbit::ops::cuda {

namespace {

// One value's code (0x7f, NaN, for a non-finite one) and its part of the amax: m, and `bad` set
// by a non-finite value.
__device__ __forceinline__ uint8_t encode_one(float v, LpFormat f, float ts, float& m, unsigned int& bad) {
  const float a = fabsf(v);
  if (!(a <= 3.402823466e38f)) {
    bad = 1;
    return 0x7f;
  }
  m = fmaxf(m, a);
  return lp::fp8_code(f, v, ts);
}

// A block's amax into *amax_bits: warp max, one atomicMax per warp on the float's bits.
__device__ __forceinline__ void amax_of_block(float m, unsigned int bad, unsigned int* amax_bits) {
  m = detail::warp_max(m);
  bad = __any_sync(0xffffffffu, bad) ? 1u : 0u;
  if ((threadIdx.x & 31) == 0) atomicMax(amax_bits, bad ? 0x7fc00000u : __float_as_uint(m));
}

__global__ void lp_encode_fp8_dual_kernel(const float* __restrict__ x, uint8_t* __restrict__ codes,
                                          uint8_t* __restrict__ codes_t, int64_t R, int64_t C, LpFormat f, float ts,
                                          unsigned int* __restrict__ amax_bits) {
  __shared__ uint8_t tile[32][33];
  const int64_t r0 = int64_t(blockIdx.y) * 32, c0 = int64_t(blockIdx.x) * 32;
  float m = 0.0f;
  unsigned int bad = 0;
  for (int k = threadIdx.y; k < 32; k += 8) {
    const int64_t r = r0 + k, c = c0 + threadIdx.x;
    if (r < R && c < C) {
      const uint8_t q = encode_one(x[r * C + c], f, ts, m, bad);
      if (codes) codes[r * C + c] = q;
      tile[k][threadIdx.x] = q;
    }
  }
  if (amax_bits) amax_of_block(m, bad, amax_bits);
  if (!codes_t) return;
  __syncthreads();
  for (int k = threadIdx.y; k < 32; k += 8) {  // codes_t [C, R]: row c0 + k, columns r0 + threadIdx.x
    const int64_t c = c0 + k, r = r0 + threadIdx.x;
    if (r < R && c < C) codes_t[c * R + r] = tile[threadIdx.x][k];
  }
}

// The vectorised body (C % 4 == 0, R % 16 == 0, 16-byte aligned rows): a 32 x 128 tile per block
// (32 x 8 threads), each thread reading float4s (4 rows of 4 columns), writing its 4 codes as one
// 32-bit word, and then 16 bytes of the transposed tile (one 128-bit store: a code row of 32 tokens
// is two threads' stores). The same codes and amax as the general kernel above.
__global__ void lp_encode_fp8_dual_vec_kernel(const float* __restrict__ x, uint8_t* __restrict__ codes,
                                              uint8_t* __restrict__ codes_t, int64_t R, int64_t C, LpFormat f,
                                              float ts, unsigned int* __restrict__ amax_bits) {
  __shared__ uint8_t tile[32][132];
  const int64_t r0 = int64_t(blockIdx.y) * 32, c0 = int64_t(blockIdx.x) * 128;
  const int tx = threadIdx.x, ty = threadIdx.y;
  float m = 0.0f;
  unsigned int bad = 0;
  const int64_t c = c0 + 4 * tx;
  for (int k = ty; k < 32; k += 8) {
    const int64_t r = r0 + k;
    uint32_t word = 0;
    if (r < R && c < C) {
      const float4 v4 = *reinterpret_cast<const float4*>(x + r * C + c);
      const float v[4] = {v4.x, v4.y, v4.z, v4.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) word |= uint32_t(encode_one(v[j], f, ts, m, bad)) << (8 * j);
      if (codes) *reinterpret_cast<uint32_t*>(codes + r * C + c) = word;
    }
    *reinterpret_cast<uint32_t*>(&tile[k][4 * tx]) = word;
  }
  if (amax_bits) amax_of_block(m, bad, amax_bits);
  if (!codes_t) return;
  __syncthreads();
  const int t = ty * 32 + tx, col = t >> 1, half = t & 1;  // codes_t row c0 + col, tokens r0 + 16 half ..
  const int64_t cc = c0 + col, rr = r0 + 16 * half;
  if (cc < C && rr < R) {
    uint32_t w[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      w[q] = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) w[q] |= uint32_t(tile[16 * half + 4 * q + j][col]) << (8 * j);
    }
    *reinterpret_cast<uint4*>(codes_t + cc * R + rr) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Pinned host slots for the amaxes in flight, and events to wait on: allocated once, reused.
constexpr int kSlots = 1 << 14;
struct AmaxPool {
  std::mutex mu;
  unsigned int* host = nullptr;  // kSlots pinned words
  std::vector<int> free_slots;
  std::vector<cudaEvent_t> free_events;
};
AmaxPool& pool() {
  static AmaxPool* p = [] {
    auto* a = new AmaxPool();  // never freed: outlives every LpAmax (process exit releases it)
    LB_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&a->host), kSlots * sizeof(unsigned int), cudaHostAllocDefault));
    for (int i = kSlots - 1; i >= 0; --i) a->free_slots.push_back(i);
    return a;
  }();
  return *p;
}

struct PinnedAmax : LpAmax::Source {
  int slot = -1;
  cudaEvent_t event = nullptr;
  double wait() override {
    LB_CUDA_CHECK(cudaEventSynchronize(event));
    unsigned int bits;
    {
      std::lock_guard<std::mutex> lock(pool().mu);
      bits = pool().host[slot];
    }
    return double(bits_f32(bits));
  }
  ~PinnedAmax() override {
    std::lock_guard<std::mutex> lock(pool().mu);
    if (slot >= 0) pool().free_slots.push_back(slot);
    if (event) pool().free_events.push_back(event);
  }
};

}  // namespace

void lp_encode_fp8_dual(const Tensor& x, LpFormat format, float scale, Tensor* codes, Tensor* codes_t, LpAmax* amax) {
  LB_CUDA_OP("lp_encode_fp8_dual");
  const int64_t R = x.size(0), C = x.size(1);
  cudaStream_t st = cuda_rt::stream();
  if (R == 0 || C == 0) {
    if (amax) *amax = LpAmax(0.0);
    return;
  }
  Tensor bits;
  if (amax) {
    bits = Tensor::empty({1}, DType::I32, Device::CUDA);
    LB_CUDA_CHECK(cudaMemsetAsync(bits.raw_data(), 0, sizeof(uint32_t), st));
  }
  uint8_t* cp = codes ? static_cast<uint8_t*>(codes->raw_data()) : nullptr;
  uint8_t* tp = codes_t ? static_cast<uint8_t*>(codes_t->raw_data()) : nullptr;
  const bool vec = C % 4 == 0 && R % 16 == 0 && reinterpret_cast<uintptr_t>(x.raw_data()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(cp) % 4 == 0 && reinterpret_cast<uintptr_t>(tp) % 16 == 0;
  if (unsigned((R + 31) / 32) > 65535u)
    throw_error("lp_encode_fp8_dual: ", R, " rows exceed the CUDA body's grid (at most 2,097,120)");
  if (vec) {
    const dim3 grid(unsigned((C + 127) / 128), unsigned((R + 31) / 32)), block(32, 8);
    lp_encode_fp8_dual_vec_kernel<<<grid, block, 0, st>>>(detail::ptr<float>(x), cp, tp, R, C, format, scale,
                                                           amax ? static_cast<unsigned int*>(bits.raw_data()) : nullptr);
    LB_CUDA_LAUNCH_CHECK("lp_encode_fp8_dual_vec_kernel");
  } else {
    const dim3 grid(unsigned((C + 31) / 32), unsigned((R + 31) / 32)), block(32, 8);
    lp_encode_fp8_dual_kernel<<<grid, block, 0, st>>>(detail::ptr<float>(x), cp, tp, R, C, format, scale,
                                                       amax ? static_cast<unsigned int*>(bits.raw_data()) : nullptr);
    LB_CUDA_LAUNCH_CHECK("lp_encode_fp8_dual_kernel");
  }
  if (!amax) return;
  auto src = std::make_shared<PinnedAmax>();
  {
    AmaxPool& p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    if (p.free_slots.empty())
      throw_error("lp_encode_fp8_dual: more than ", kSlots, " amaxes in flight (nothing reads them back)");
    src->slot = p.free_slots.back();
    p.free_slots.pop_back();
    if (!p.free_events.empty()) {
      src->event = p.free_events.back();
      p.free_events.pop_back();
    }
  }
  if (!src->event) LB_CUDA_CHECK(cudaEventCreateWithFlags(&src->event, cudaEventDisableTiming));
  LB_CUDA_CHECK(cudaMemcpyAsync(pool().host + src->slot, bits.raw_data(), sizeof(uint32_t), cudaMemcpyDeviceToHost, st));
  LB_CUDA_CHECK(cudaEventRecord(src->event, st));
  *amax = LpAmax(std::shared_ptr<LpAmax::Source>(std::move(src)));
}

}  // namespace lowbit::ops::cuda
