// Internal to the CUDA backend (.cu files only): error checking, the stream and cuBLAS handle,
// dtype dispatch, 16-byte packed loads and warp/block reductions shared by the kernels.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "lowbit/core/tensor.h"

namespace lowbit::cuda_rt {

[[noreturn]] void throw_cuda(cudaError_t e, const char* call, const char* file, int line);
[[noreturn]] void throw_cublas(cublasStatus_t s, const char* call, const char* file, int line);

cudaStream_t stream();      // the backend's one stream: every kernel, copy and memset runs on it
cublasHandle_t cublas();    // bound to stream()
bool allow_tf32();
int num_sms();

// Times the enclosing op with CUDA events when profiling is on (device_init.h), else free.
class OpScope {
 public:
  explicit OpScope(const char* name);
  ~OpScope();
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;

 private:
  const char* name_;
  int start_ = -1;
};

}  // namespace lowbit::cuda_rt

// Every CUDA runtime / cuBLAS call goes through these; failures become lowbit::Error with the call
// text, the location and the library's message.
#define LB_CUDA_CHECK(call)                                                                   \
  do {                                                                                        \
    const cudaError_t lb_e_ = (call);                                                         \
    if (lb_e_ != cudaSuccess) ::lowbit::cuda_rt::throw_cuda(lb_e_, #call, __FILE__, __LINE__); \
  } while (0)
#define LB_CUBLAS_CHECK(call)                                                                         \
  do {                                                                                                \
    const cublasStatus_t lb_s_ = (call);                                                              \
    if (lb_s_ != CUBLAS_STATUS_SUCCESS) ::lowbit::cuda_rt::throw_cublas(lb_s_, #call, __FILE__, __LINE__); \
  } while (0)
// After every kernel launch: launch-configuration errors (and earlier asynchronous faults).
#define LB_CUDA_LAUNCH_CHECK(kernel_name)                                                              \
  do {                                                                                                 \
    const cudaError_t lb_e_ = cudaGetLastError();                                                      \
    if (lb_e_ != cudaSuccess) ::lowbit::cuda_rt::throw_cuda(lb_e_, "launch of " kernel_name, __FILE__, __LINE__); \
  } while (0)
#define LB_CUDA_OP(name) ::lowbit::cuda_rt::OpScope lb_op_scope_(name)

namespace lowbit::ops::cuda::detail {

using bf16 = __nv_bfloat16;

template <class T>
T* ptr(const Tensor& t) {
  return static_cast<T*>(t.raw_data());
}

// A type tag (std::type_identity is C++20; the .cu files are C++17).
template <class T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T = float or bf16 according to the dtype.
template <class F>
decltype(auto) dispatch(const char* op, DType dt, F&& f) {
  switch (dt) {
    case DType::F32: return f(TypeTag<float>{});
    case DType::BF16: return f(TypeTag<bf16>{});
    default: throw_error(op, ": CUDA body supports f32 and bf16, got ", dtype_name(dt));
  }
}

inline void check_on_gpu(const char* op, const Tensor& t, const char* name) {
  if (t.defined() && t.device() != Device::CUDA) throw_error(op, ": ", name, " is ", t.describe(), " but the op runs on cuda");
}

// Lists of tensors for argument checks (mixes const and non-const references).
using TensorList = std::initializer_list<const Tensor*>;

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Grid size for grid-stride loops: enough blocks to fill the chip a few times over.
inline unsigned grid_for(int64_t work_items, int threads) {
  const int64_t want = (work_items + threads - 1) / threads;
  const int64_t cap = int64_t(cuda_rt::num_sms()) * 16;
  return unsigned(want < 1 ? 1 : (want < cap ? want : cap));
}

// ---- device-side helpers ------------------------------------------------------------------------
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <class T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }

// Elements per 16-byte pack.
template <class T>
constexpr int kPack = 16 / int(sizeof(T));

// 16-byte load/store of kPack<T> elements, converted to/from float. p must be 16-byte aligned.
template <class T>
__device__ __forceinline__ void load_pack(const T* p, float (&v)[kPack<T>]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kPack<T>; ++i) v[i] = to_f(e[i]);
}
template <class T>
__device__ __forceinline__ void store_pack(T* p, const float (&v)[kPack<T>]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kPack<T>; ++i) e[i] = from_f<T>(v[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Four values stored at p, converted: 16 bytes of f32 or 8 bytes of bf16 (p aligned to that size).
__device__ __forceinline__ void store4(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void store4(bf16* p, float a, float b, float c, float d) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
  uint2 u;
  u.x = *reinterpret_cast<const unsigned*>(&lo);
  u.y = *reinterpret_cast<const unsigned*>(&hi);
  *reinterpret_cast<uint2*>(p) = u;
}

template <class A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// Warp shuffles, then one value per warp through shared memory.
template <class A>
__device__ A block_sum(A v) {
  __shared__ A part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // part[] may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  A r = lane < nw ? part[lane] : A(0);
  return warp_sum(r);
}
__device__ __forceinline__ float block_max(float v) {
  __shared__ float part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  float r = lane < nw ? part[lane] : -INFINITY;
  return warp_max(r);
}

// Online log-sum-exp state (Milakov & Gimelshein 2018): running max m and sum s of exp(x - m).
struct LseState {
  float m = -INFINITY, s = 0.f;
  __device__ __forceinline__ void add(float x) {
    if (x == -INFINITY) return;  // exp(-inf) adds nothing (and -inf - -inf would be NaN)
    if (x > m) {
      s = s * expf(m - x) + 1.f;
      m = x;
    } else {
      s += expf(x - m);
    }
  }
  __device__ __forceinline__ void merge(float m2, float s2) {
    if (m2 == -INFINITY) return;
    if (m == -INFINITY) {
      m = m2;
      s = s2;
      return;
    }
    const float mx = fmaxf(m, m2);
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
  }
};
// Block-wide merge; every thread gets log-sum-exp = m + log(s).
__device__ __forceinline__ float block_lse(LseState st) {
  __shared__ float pm[32], ps[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, st.m, o), s2 = __shfl_xor_sync(0xffffffffu, st.s, o);
    st.merge(m2, s2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    pm[warp] = st.m;
    ps[warp] = st.s;
  }
  __syncthreads();
  LseState r;
  if (lane < nw) {
    r.m = pm[lane];
    r.s = ps[lane];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, r.m, o), s2 = __shfl_xor_sync(0xffffffffu, r.s, o);
    r.merge(m2, s2);
  }
  return r.m + logf(r.s);
}

}  // namespace lowbit::ops::cuda::detail
