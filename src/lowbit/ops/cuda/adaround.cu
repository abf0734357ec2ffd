// CUDA bodies of AdaRound's element-wise passes (ops/adaround.h): one thread per weight (grid-stride),
// the arithmetic ops/adaround_math.h's, the functions the CPU reference body calls. f64 (the solver's
// dtype) and f32. Not bit-identical to the CPU: the device's exp/pow differ from glibc's in the last
// place and nvcc contracts products into FMAs (tests/ops/test_parity.cpp, Parity.AdaRound: 1e-12 in f64).
#include <cmath>

#include "lowbit/ops/adaround_math.h"
#include "lowbit/ops/cuda/cuda_common.h"
#include "lowbit/ops/cuda/cuda_ops.h"

namespace lowbit::ops::cuda {

namespace {
using detail::ptr;

constexpr int kThreads = 256;

template <class T>
__global__ void soft_error_kernel(const T* __restrict__ v, const T* __restrict__ w, const T* __restrict__ fl,
                                  const T* __restrict__ s, const T* __restrict__ z, adaround::Grid g, T* __restrict__ e,
                                  int64_t n) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x)
    e[k] = w[k] - adaround::soft<T>(v[k], fl[k], s[k], z[k], g).q;
}

template <class T>
__global__ void adam_step_kernel(T* __restrict__ v, T* __restrict__ m, T* __restrict__ m2, const T* __restrict__ eh,
                                 const T* __restrict__ fl, const T* __restrict__ s, const T* __restrict__ z,
                                 adaround::Grid g, T beta, T reg, double lr, double bc1, double bc2, int64_t n) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    const adaround::Soft<T> p = adaround::soft<T>(v[k], fl[k], s[k], z[k], g);
    const T gr = adaround::grad<T>(p, eh[k], s[k], beta, reg);
    adaround::adam<T>(v[k], m[k], m2[k], gr, lr, 0.9, 0.999, 1e-8, bc1, bc2);
  }
}

template <class F>
void dispatch_f32_f64(const char* op, DType dt, F&& f) {
  if (dt == DType::F64) return f(detail::TypeTag<double>{});
  if (dt == DType::F32) return f(detail::TypeTag<float>{});
  throw_error(op, ": CUDA body supports f32 and f64, got ", dtype_name(dt));
}

}  // namespace

void adaround_soft_error(const Tensor& v, const Tensor& w, const Tensor& fl, const Tensor& s, const Tensor& z,
                         const adaround::Grid& g, Tensor& e) {
  const char* op = "adaround_soft_error";
  LB_CUDA_OP(op);
  const int64_t n = v.numel();
  if (n == 0) return;
  dispatch_f32_f64(op, v.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    soft_error_kernel<T><<<detail::grid_for(n, kThreads), kThreads, 0, cuda_rt::stream()>>>(
        ptr<T>(v), ptr<T>(w), ptr<T>(fl), ptr<T>(s), ptr<T>(z), g, ptr<T>(e), n);
    LB_CUDA_LAUNCH_CHECK("adaround soft_error_kernel");
  });
}

void adaround_adam_step(Tensor& v, Tensor& m, Tensor& m2, const Tensor& eh, const Tensor& fl, const Tensor& s,
                        const Tensor& z, const adaround::Grid& g, const AdaRoundStep& st) {
  const char* op = "adaround_adam_step";
  LB_CUDA_OP(op);
  const int64_t n = v.numel();
  if (n == 0) return;
  const double bc1 = 1 - std::pow(0.9, double(st.t)), bc2 = 1 - std::pow(0.999, double(st.t));
  dispatch_f32_f64(op, v.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    adam_step_kernel<T><<<detail::grid_for(n, kThreads), kThreads, 0, cuda_rt::stream()>>>(
        ptr<T>(v), ptr<T>(m), ptr<T>(m2), ptr<T>(eh), ptr<T>(fl), ptr<T>(s), ptr<T>(z), g, T(st.beta), T(st.reg), st.lr,
        bc1, bc2, n);
    LB_CUDA_LAUNCH_CHECK("adaround adam_step_kernel");
  });
}

}  // namespace lowbit::ops::cuda
