// CUDA bodies of the activation / KV fake quantizer, the randomized Hadamard transform (ops/ops.h:
// fake_quant, hadamard_transform) and BitNet's quantizers (ops/ternary.h), f32 and f64. The
// per-element arithmetic is ops/act_quant_math.h's, the functions the CPU reference bodies call:
//   fake_quant              one thread per group: its min / max in the group's order, then each
//                           element (aq::fq_grid, aq::fq_value) — the CPU's numbers bit for bit.
//   act_quant_int4_absmean  one thread per row: the row's sum of |x| in double in column order (as
//                           the CPU), then each element — bit for bit.
//   hadamard_transform      one block per row, in place in y (global memory, __syncthreads between
//                           the stages): signs, the small matrix's products per block of m (each
//                           output summed in the CPU's order with products and sums rounded on their
//                           own), the butterflies, the norm — bit for bit.
//   ternary_fake_quant      gamma: mean |w| as a deterministic device reduction in double (another
//                           summation order than the CPU's chunked sum: gamma may differ in the last
//                           place of a double, which the rounding to f32 almost always absorbs), or
//                           the median of |w| selected on the host (|w| read back); then one thread
//                           per element (aq::ternary_qdq). One synchronisation (gamma is returned).
#include <algorithm>
#include <cmath>
#include <vector>

#include "lowbit/ops/act_quant_math.h"
#include "lowbit/ops/cuda/cuda_common.h"
#include "lowbit/ops/cuda/cuda_ops.h"
#include "lowbit/ops/cuda/reduce_kernel.cuh"

namespace lowbit::ops::cuda {

namespace {
using detail::ptr;

constexpr int kThreads = 256;

template <class F>
void dispatch_f32_f64(const char* op, DType dt, F&& f) {
  if (dt == DType::F64) return f(detail::TypeTag<double>{});
  if (dt == DType::F32) return f(detail::TypeTag<float>{});
  throw_error(op, ": CUDA body supports f32 and f64, got ", dtype_name(dt));
}

template <class T>
__global__ void fake_quant_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t N, int64_t groups_per_line,
                                  int64_t total, int64_t group, bool per_column, double clip, int bits, bool asym) {
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < total; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t line = g / groups_per_line, start = (g % groups_per_line) * group;
    const int64_t base = per_column ? start * N + line : line * N + start, stride = per_column ? N : 1;
    double lo = 0, hi = 0;
    for (int64_t k = 0; k < group; ++k) {
      const double v = double(x[base + k * stride]);
      lo = aq::min_of(lo, v);
      hi = aq::max_of(hi, v);
    }
    const aq::FqGrid grid = aq::fq_grid(lo, hi, clip, bits, asym);
    for (int64_t k = 0; k < group; ++k) y[base + k * stride] = T(aq::fq_value(double(x[base + k * stride]), grid));
  }
}

template <class T>
__global__ void int4_absmean_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t M, int64_t C) {
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < M; r += int64_t(gridDim.x) * blockDim.x) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    double sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += fabs(double(xr[c]));
    const double s = aq::int4_absmean_step(sum, (long long)C);
    for (int64_t c = 0; c < C; ++c) yr[c] = T(aq::int4_absmean_value(double(xr[c]), s));
  }
}

// One block per row (grid-stride over rows). tmp: an [M, n] scratch, used when S is given.
template <class T>
__global__ void hadamard_kernel(const T* __restrict__ x, const T* __restrict__ signs, const T* __restrict__ S,
                                T* __restrict__ y, T* __restrict__ tmp, int64_t M, int64_t n, int64_t m, bool transpose,
                                T norm) {
  const int64_t p = n / m;
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* xr = x + r * n;
    T* buf = y + r * n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      buf[i] = (!transpose && signs) ? aq::mul_rn(xr[i], signs[i]) : xr[i];
    __syncthreads();
    if (S) {  // each block of m values times S (forward) or S^T (transpose), summed in b order
      T* t = tmp + r * n;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const int64_t a = i / m, c = i % m;
        const T* blk = buf + a * m;
        T acc = 0;
        for (int64_t b = 0; b < m; ++b) acc = aq::add_rn(acc, aq::mul_rn(blk[b], transpose ? S[c * m + b] : S[b * m + c]));
        t[i] = acc;
      }
      __syncthreads();
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) buf[i] = t[i];
      __syncthreads();
    }
    for (int64_t h = 1; h < p; h *= 2) {  // butterflies over the block index a (stride m)
      for (int64_t j = threadIdx.x; j < n / 2; j += blockDim.x) {
        const int64_t pair = j / m, b = j % m;
        const int64_t a = (pair / h) * 2 * h + pair % h;
        T& u = buf[a * m + b];
        T& v = buf[(a + h) * m + b];
        const T su = aq::add_rn(u, v), d = aq::add_rn(u, -v);
        u = su;
        v = d;
      }
      __syncthreads();
    }
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      buf[i] = aq::mul_rn(aq::mul_rn(buf[i], norm), (transpose && signs) ? signs[i] : T(1));
    __syncthreads();
  }
}

template <class T>
__global__ void ternary_qdq_kernel(const T* __restrict__ w, T* __restrict__ out, int64_t n, T gamma) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = aq::ternary_qdq<T>(w[i], gamma);
}

template <class T>
struct AbsF {
  const T* x;
  __device__ double operator()(int64_t i) const { return fabs(double(x[i])); }
};

// gamma in T's precision, as the CPU body's gamma_of: the mean of |w| (a double sum, then T) or the
// median (the lower middle element), at least 1e-5.
template <class T>
T device_gamma(const Tensor& w, TernaryScale scale) {
  const int64_t n = w.numel();
  T g = 0;
  if (n > 0 && scale == TernaryScale::AbsMean) {
    Tensor r = Tensor::empty({}, DType::F64, Device::CUDA);
    detail::reduce_sum<float>(n, AbsF<T>{ptr<T>(w)}, 1.0, nullptr, ptr<double>(r));
    g = T(r.item() / double(n));
  } else if (n > 0) {
    const Tensor h = w.to(Device::CPU);
    std::vector<T> a(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) a[size_t(i)] = std::fabs(h.data<T>()[i]);
    const auto mid = a.begin() + (n - 1) / 2;
    std::nth_element(a.begin(), mid, a.end());
    g = *mid;
  }
  return g < T(1e-5f) ? T(1e-5f) : g;
}

}  // namespace

void fake_quant(const Tensor& x, int bits, bool asymmetric, double clip, int64_t group, bool per_column, Tensor& y) {
  const char* op = "fake_quant";
  LB_CUDA_OP(op);
  const int64_t M = x.size(0), N = x.size(1), along = per_column ? M : N;
  const int64_t groups_per_line = along / group, total = groups_per_line * (per_column ? N : M);
  if (total == 0) return;
  dispatch_f32_f64(op, x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    fake_quant_kernel<T><<<detail::grid_for(total, kThreads), kThreads, 0, cuda_rt::stream()>>>(
        ptr<T>(x), ptr<T>(y), N, groups_per_line, total, group, per_column, clip, bits, asymmetric);
    LB_CUDA_LAUNCH_CHECK("fake_quant_kernel");
  });
}

void act_quant_int4_absmean(const Tensor& x, Tensor& out) {
  const char* op = "act_quant_int4_absmean";
  LB_CUDA_OP(op);
  const int64_t M = x.size(0), C = x.size(1);
  if (M == 0 || C == 0) return;
  dispatch_f32_f64(op, x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    int4_absmean_kernel<T><<<detail::grid_for(M, kThreads), kThreads, 0, cuda_rt::stream()>>>(ptr<T>(x), ptr<T>(out), M, C);
    LB_CUDA_LAUNCH_CHECK("int4_absmean_kernel");
  });
}

void hadamard_transform(const Tensor& x, const Tensor& signs, const Tensor& small, bool transpose, Tensor& y) {
  const char* op = "hadamard_transform";
  LB_CUDA_OP(op);
  const int64_t n = x.size(-1), M = n > 0 ? x.numel() / n : 0;
  if (M == 0) return;
  const int64_t m = small.defined() ? small.size(0) : 1, p = n / m;
  dispatch_f32_f64(op, x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    Tensor tmp;
    if (small.defined()) tmp = Tensor::empty(x.shape(), x.dtype(), Device::CUDA);
    const unsigned blocks = unsigned(std::min<int64_t>(M, 65535));
    hadamard_kernel<T><<<blocks, kThreads, 0, cuda_rt::stream()>>>(
        ptr<T>(x), signs.defined() ? ptr<T>(signs) : nullptr, small.defined() ? ptr<T>(small) : nullptr, ptr<T>(y),
        small.defined() ? ptr<T>(tmp) : nullptr, M, n, m, transpose, T(1.0 / std::sqrt(double(p))));
    LB_CUDA_LAUNCH_CHECK("hadamard_kernel");
  });
}

double ternary_gamma(const Tensor& w, TernaryScale scale) {
  LB_CUDA_OP("ternary_gamma");
  double g = 0;
  dispatch_f32_f64("ternary_gamma", w.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    g = double(device_gamma<T>(w, scale));
  });
  return g;
}

double ternary_fake_quant(const Tensor& w, TernaryScale scale, Tensor& out) {
  const char* op = "ternary_fake_quant";
  LB_CUDA_OP(op);
  detail::check_on_gpu(op, out, "out");
  double g = 0;
  dispatch_f32_f64(op, w.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T gamma = device_gamma<T>(w, scale);
    g = double(gamma);
    const int64_t n = w.numel();
    if (n == 0) return;
    ternary_qdq_kernel<T><<<detail::grid_for(n, kThreads), kThreads, 0, cuda_rt::stream()>>>(ptr<T>(w), ptr<T>(out), n, gamma);
    LB_CUDA_LAUNCH_CHECK("ternary_qdq_kernel");
  });
  return g;
}

}  // namespace lowbit::ops::cuda
