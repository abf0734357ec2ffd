// RMSNorm and rotary embeddings on the GPU.
//
// RMSNorm forward / dx: one block per row (up to 256 threads, 16-byte packed loads); the row's
// sum of squares (forward) or sum_j dy_j w_j x_j (backward) is a warp-shuffle block reduction;
// the second pass re-reads the row, which is still in L1/L2. dw = sum_rows(dy * x * rstd) is a
// deterministic column reduction (reduce_kernel.cuh) instead of atomics.
//
// RoPE: one thread per (token, pair i). The angle pos * theta^(-2i/hd) and its sine/cosine are
// computed in double (as on the CPU: at position 4096 an fp32 angle would already be off by
// ~2e-4 rad), once per thread, then applied to the pair in every head of the token.
#include <cmath>

#include "lowbit/ops/cuda/cuda_ops.h"
#include "lowbit/ops/cuda/reduce_kernel.cuh"

namespace lowbit::ops::cuda {

namespace {
using namespace detail;

int row_threads(int64_t D, int P) {
  int64_t work = (D + P - 1) / P;
  int64_t t = (work + 31) / 32 * 32;
  return int(t < 32 ? 32 : (t > 256 ? 256 : t));
}

template <class T>
__global__ void rmsnorm_fwd_kernel(const T* x, const T* w, T* y, T* rstd, int64_t D, double eps, bool vec) {
  constexpr int P = kPack<T>;
  const T* xr = x + int64_t(blockIdx.x) * D;
  T* yr = y + int64_t(blockIdx.x) * D;
  float ss = 0;
  if (vec) {
    for (int64_t pk = threadIdx.x; pk < D / P; pk += blockDim.x) {
      float v[P];
      load_pack<T>(xr + pk * P, v);
#pragma unroll
      for (int e = 0; e < P; ++e) ss += v[e] * v[e];
    }
  } else {
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
      const float v = to_f(xr[j]);
      ss += v * v;
    }
  }
  ss = block_sum(ss);
  const float r = float(1.0 / sqrt(double(ss) / double(D) + eps));
  if (threadIdx.x == 0) rstd[blockIdx.x] = from_f<T>(r);
  if (vec) {
    for (int64_t pk = threadIdx.x; pk < D / P; pk += blockDim.x) {
      float v[P], g[P];
      load_pack<T>(xr + pk * P, v);
      load_pack<T>(w + pk * P, g);
#pragma unroll
      for (int e = 0; e < P; ++e) v[e] = v[e] * r * g[e];
      store_pack<T>(yr + pk * P, v);
    }
  } else {
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) yr[j] = from_f<T>(to_f(xr[j]) * r * to_f(w[j]));
  }
}

template <class T>
__global__ void rmsnorm_bwd_dx_kernel(const T* dy, const T* x, const T* w, const T* rstd, T* dx, int64_t D, bool vec) {
  constexpr int P = kPack<T>;
  const int64_t off = int64_t(blockIdx.x) * D;
  const T *xr = x + off, *gr = dy + off;
  T* dr = dx + off;
  float dot = 0;
  if (vec) {
    for (int64_t pk = threadIdx.x; pk < D / P; pk += blockDim.x) {
      float a[P], g[P], ww[P];
      load_pack<T>(xr + pk * P, a);
      load_pack<T>(gr + pk * P, g);
      load_pack<T>(w + pk * P, ww);
#pragma unroll
      for (int e = 0; e < P; ++e) dot += g[e] * ww[e] * a[e];
    }
  } else {
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) dot += to_f(gr[j]) * to_f(w[j]) * to_f(xr[j]);
  }
  dot = block_sum(dot);
  const float r = to_f(rstd[blockIdx.x]);
  const float c = dot * r * r * r / float(D);
  if (vec) {
    for (int64_t pk = threadIdx.x; pk < D / P; pk += blockDim.x) {
      float a[P], g[P], ww[P];
      load_pack<T>(xr + pk * P, a);
      load_pack<T>(gr + pk * P, g);
      load_pack<T>(w + pk * P, ww);
#pragma unroll
      for (int e = 0; e < P; ++e) a[e] = r * ww[e] * g[e] - a[e] * c;
      store_pack<T>(dr + pk * P, a);
    }
  } else {
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x)
      dr[j] = from_f<T>(r * to_f(w[j]) * to_f(gr[j]) - to_f(xr[j]) * c);
  }
}

template <class T>
struct DwF {  // dw_c = sum_r dy[r, c] x[r, c] rstd[r]
  const T *dy, *x, *rstd;
  int64_t D;
  __device__ float operator()(int64_t r, int64_t c) const {
    return to_f(dy[r * D + c]) * to_f(x[r * D + c]) * to_f(rstd[r]);
  }
};

template <class T>
__global__ void rope_kernel(const T* x, T* y, int64_t BT, int64_t T_, int H, int hd, int64_t pos0, double theta,
                            bool interleaved, bool inverse, RopeScaling scaling) {
  const int half = hd / 2;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= BT * half) return;
  const int64_t bt = idx / half;
  const int i = int(idx % half);
  const double pos = double(pos0 + bt % T_);
  const double ang = pos * rope_scaled_freq(pow(theta, -double(2 * i) / double(hd)), scaling);
  double s, c;
  sincos(ang, &s, &c);
  if (inverse) s = -s;
  const float cf = float(c), sf = float(s);
  for (int h = 0; h < H; ++h) {
    const int64_t base = (bt * H + h) * hd;
    const int64_t i0 = interleaved ? base + 2 * i : base + i;
    const int64_t i1 = interleaved ? base + 2 * i + 1 : base + i + half;
    const float x0 = to_f(x[i0]), x1 = to_f(x[i1]);
    y[i0] = from_f<T>(x0 * cf - x1 * sf);
    y[i1] = from_f<T>(x0 * sf + x1 * cf);
  }
}
}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) {
  LB_CUDA_OP("rmsnorm_forward");
  const int64_t D = x.size(-1), M = x.numel() / (D > 0 ? D : 1);
  if (M == 0 || D == 0) return;
  if (M > INT32_MAX) throw_error("rmsnorm_forward: too many rows (", M, ")");
  dispatch("rmsnorm_forward", x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int P = kPack<T>;
    const bool vec = D % P == 0 && aligned16(x.raw_data()) && aligned16(w.raw_data()) && aligned16(y.raw_data());
    rmsnorm_fwd_kernel<T><<<unsigned(M), row_threads(D, vec ? P : 1), 0, cuda_rt::stream()>>>(
        ptr<T>(x), ptr<T>(w), ptr<T>(y), ptr<T>(rstd), D, eps, vec);
    LB_CUDA_LAUNCH_CHECK("rmsnorm_fwd_kernel");
  });
}

void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw) {
  LB_CUDA_OP("rmsnorm_backward");
  const char* op = "rmsnorm_backward";
  for (const Tensor* t : TensorList{&dy, &w, &rstd, &dx, &dw}) {
    check_on_gpu(op, *t, "an argument");
    if (t->dtype() != x.dtype() || !t->is_contiguous())
      throw_error(op, ": every argument must be a contiguous ", dtype_name(x.dtype()), " tensor, got ", t->describe());
  }
  const int64_t D = x.size(-1), M = x.numel() / (D > 0 ? D : 1);
  if (D == 0) return;
  if (M > INT32_MAX) throw_error(op, ": too many rows (", M, ")");
  dispatch(op, x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int P = kPack<T>;
    if (M > 0) {
      const bool vec = D % P == 0 && aligned16(x.raw_data()) && aligned16(w.raw_data()) && aligned16(dy.raw_data()) &&
                       aligned16(dx.raw_data());
      rmsnorm_bwd_dx_kernel<T><<<unsigned(M), row_threads(D, vec ? P : 1), 0, cuda_rt::stream()>>>(
          ptr<T>(dy), ptr<T>(x), ptr<T>(w), ptr<T>(rstd), ptr<T>(dx), D, vec);
      LB_CUDA_LAUNCH_CHECK("rmsnorm_bwd_dx_kernel");
    }
    column_sum<T>(M, D, DwF<T>{ptr<T>(dy), ptr<T>(x), ptr<T>(rstd), D}, ptr<T>(dw));
  });
}

void rope(const Tensor& x, int64_t pos0, double theta, RopeStyle style, bool inverse, Tensor& y,
          const RopeScaling& scaling) {
  LB_CUDA_OP("rope");
  check_on_gpu("rope", y, "y");
  const int64_t B = x.size(0), T_ = x.size(1), H = x.size(2), hd = x.size(3);
  const int64_t n = B * T_ * (hd / 2);
  if (n == 0 || H == 0) return;
  dispatch("rope", x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int threads = 128;
    rope_kernel<T><<<unsigned((n + threads - 1) / threads), threads, 0, cuda_rt::stream()>>>(
        ptr<T>(x), ptr<T>(y), B * T_, T_, int(H), int(hd), pos0, theta, style == RopeStyle::Interleaved, inverse,
        scaling);
    LB_CUDA_LAUNCH_CHECK("rope_kernel");
  });
}

}  // namespace lowbit::ops::cuda
