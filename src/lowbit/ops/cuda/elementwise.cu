// Elementwise ops, activations, reductions and AdamW on the GPU. All are memory-bound: each is
// one pass of the generic elementwise kernel (elementwise_kernel.cuh) or of a deterministic
// reduction (reduce_kernel.cuh). Arithmetic is fp32 (bf16 tensors are widened on load); the
// formulas are written exactly as in the CPU bodies so that f32 results agree to a few ulps.
#include <algorithm>
#include <cmath>

#include "lowbit/ops/cuda/cuda_ops.h"
#include "lowbit/ops/cuda/elementwise_kernel.cuh"
#include "lowbit/ops/cuda/reduce_kernel.cuh"

namespace lowbit::ops::cuda {

namespace {
using detail::EwArgs;
using detail::launch_ew;
using detail::ptr;

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

struct AddF {
  __device__ void operator()(const float (&x)[2], float (&y)[1]) const { y[0] = x[0] + x[1]; }
};
struct SubF {
  __device__ void operator()(const float (&x)[2], float (&y)[1]) const { y[0] = x[0] - x[1]; }
};
struct MulF {
  __device__ void operator()(const float (&x)[2], float (&y)[1]) const { y[0] = x[0] * x[1]; }
};
struct ScaleF {
  float s;
  __device__ void operator()(const float (&x)[1], float (&y)[1]) const { y[0] = s * x[0]; }
};
struct AxpyF {  // inputs (x, y) -> y + alpha x
  float alpha;
  __device__ void operator()(const float (&x)[2], float (&y)[1]) const { y[0] = x[1] + alpha * x[0]; }
};
struct SiluF {
  __device__ void operator()(const float (&x)[1], float (&y)[1]) const { y[0] = x[0] * sigmoidf_(x[0]); }
};
struct SiluBwdF {  // (dy, x) -> dx
  __device__ void operator()(const float (&x)[2], float (&y)[1]) const {
    const float s = sigmoidf_(x[1]);
    y[0] = x[0] * s * (1.f + x[1] * (1.f - s));
  }
};
struct SwigluF {  // (gate, up) -> silu(gate) up
  __device__ void operator()(const float (&x)[2], float (&y)[1]) const { y[0] = x[0] * sigmoidf_(x[0]) * x[1]; }
};
struct SwigluBwdF {  // (dy, gate, up) -> (dgate, dup)
  __device__ void operator()(const float (&x)[3], float (&y)[2]) const {
    const float s = sigmoidf_(x[1]);
    y[1] = x[0] * (x[1] * s);
    y[0] = x[0] * x[2] * s * (1.f + x[1] * (1.f - s));
  }
};
// AdamW, PyTorch semantics (ops/optim.cpp): decoupled decay, then the bias-corrected step.
// 1 - beta is computed in double on the host: in fp32, 1 - 0.999f = 9.9998713e-4, a relative error
// of 1.3e-5 in every v update.
// Every rounding is spelled out (fmaf, and __fmul_rn / __fadd_rn, which the compiler never contracts
// into an FMA): with plain `a * b + c * d` nvcc may fuse either product, and it chose differently in
// the per-tensor and the multi-tensor kernels (H100, 2026-12-07: 1-2 ulp apart), so the fused
// multi-tensor update was not bit-identical to adamw_step. Now every kernel that calls this computes
// the same values.
struct AdamwF {  // (p, g, m, v) -> (p, m, v)
  float decay, b1, one_minus_b1, b2, one_minus_b2, step_size, inv_sqrt_bc2, eps;
  __device__ __forceinline__ void operator()(const float (&x)[4], float (&y)[3]) const {
    const float g = x[1];
    const float m = fmaf(b1, x[2], __fmul_rn(one_minus_b1, g));
    const float v = fmaf(b2, x[3], __fmul_rn(__fmul_rn(one_minus_b2, g), g));
    const float denom = __fadd_rn(__fmul_rn(sqrtf(v), inv_sqrt_bc2), eps);
    y[0] = fmaf(x[0], decay, -__fdiv_rn(__fmul_rn(step_size, m), denom));
    y[1] = m;
    y[2] = v;
  }
};

// The coefficients of one AdamW step (host side; shared by adamw_step and the multi-tensor kernel).
AdamwF adamw_coefficients(const AdamwHyper& h) {
  const double bc1 = 1.0 - std::pow(h.beta1, double(h.step)), bc2 = 1.0 - std::pow(h.beta2, double(h.step));
  return AdamwF{float(1.0 - h.lr * h.weight_decay), float(h.beta1),         float(1.0 - h.beta1),
                float(h.beta2),                     float(1.0 - h.beta2),   float(h.lr / bc1),
                float(1.0 / std::sqrt(bc2)),        float(h.eps)};
}

template <class F>
void binary(const char* op, const Tensor& a, const Tensor& b, Tensor& out, F f) {
  LB_CUDA_OP(op);
  detail::check_on_gpu(op, b, "b");
  detail::check_on_gpu(op, out, "out");
  const int64_t row = a.shape() == b.shape() ? 0 : b.numel();
  detail::dispatch(op, a.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    EwArgs<T, 2, 1> args{{ptr<T>(a), ptr<T>(b)}, {0, row}, {ptr<T>(out)}};
    launch_ew(op, args, a.numel(), f);
  });
}

template <class T>
struct SumF {
  const T* x;
  __device__ double operator()(int64_t i) const { return double(detail::to_f(x[i])); }
};
template <class T>
struct SquareF {
  const T* x;
  __device__ double operator()(int64_t i) const {
    const double v = detail::to_f(x[i]);
    return v * v;
  }
};
template <class T>
struct ColumnF {
  const T* x;
  int64_t C;
  __device__ float operator()(int64_t r, int64_t c) const { return detail::to_f(x[r * C + c]); }
};
}  // namespace

void add(const Tensor& a, const Tensor& b, Tensor& out) { binary("add", a, b, out, AddF{}); }
void sub(const Tensor& a, const Tensor& b, Tensor& out) { binary("sub", a, b, out, SubF{}); }
void mul(const Tensor& a, const Tensor& b, Tensor& out) { binary("mul", a, b, out, MulF{}); }

void scale(const Tensor& x, double s, Tensor& out) {
  LB_CUDA_OP("scale");
  detail::check_on_gpu("scale", out, "out");
  detail::dispatch("scale", x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    EwArgs<T, 1, 1> args{{ptr<T>(x)}, {0}, {ptr<T>(out)}};
    launch_ew("scale", args, x.numel(), ScaleF{float(s)});
  });
}

void axpy(double alpha, const Tensor& x, Tensor& y) {
  LB_CUDA_OP("axpy");
  detail::check_on_gpu("axpy", y, "y");
  detail::dispatch("axpy", x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    EwArgs<T, 2, 1> args{{ptr<T>(x), ptr<T>(y)}, {0, 0}, {ptr<T>(y)}};
    launch_ew("axpy", args, x.numel(), AxpyF{float(alpha)});
  });
}

void sum_rows(const Tensor& x, Tensor& out) {
  LB_CUDA_OP("sum_rows");
  detail::check_on_gpu("sum_rows", out, "out");
  const int64_t C = x.size(-1), R = x.numel() / (C > 0 ? C : 1);
  detail::dispatch("sum_rows", x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    detail::column_sum<T>(C > 0 ? R : 0, C, ColumnF<T>{ptr<T>(x), C}, ptr<T>(out));
  });
}

void sum(const Tensor& x, Tensor& out) {
  LB_CUDA_OP("sum");
  detail::check_on_gpu("sum", out, "out");
  detail::dispatch("sum", x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    detail::reduce_sum<T>(x.numel(), SumF<T>{ptr<T>(x)}, 1.0, ptr<T>(out), nullptr);
  });
}

double sum_squares(const Tensor& x) {
  LB_CUDA_OP("sum_squares");
  Tensor r = Tensor::empty({}, DType::F64, Device::CUDA);
  detail::dispatch("sum_squares", x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    detail::reduce_sum<T>(x.numel(), SquareF<T>{ptr<T>(x)}, 1.0, nullptr, ptr<double>(r));
  });
  return r.item();
}

void silu_forward(const Tensor& x, Tensor& y) {
  LB_CUDA_OP("silu_forward");
  detail::check_on_gpu("silu_forward", y, "y");
  detail::dispatch("silu_forward", x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    EwArgs<T, 1, 1> args{{ptr<T>(x)}, {0}, {ptr<T>(y)}};
    launch_ew("silu_forward", args, x.numel(), SiluF{});
  });
}

void silu_backward(const Tensor& dy, const Tensor& x, Tensor& dx) {
  LB_CUDA_OP("silu_backward");
  detail::check_on_gpu("silu_backward", dy, "dy");
  detail::check_on_gpu("silu_backward", dx, "dx");
  if (dy.dtype() != x.dtype() || !dy.is_contiguous()) throw_error("silu_backward: dy ", dy.describe(), " must be a contiguous ", dtype_name(x.dtype()));
  detail::dispatch("silu_backward", x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    EwArgs<T, 2, 1> args{{ptr<T>(dy), ptr<T>(x)}, {0, 0}, {ptr<T>(dx)}};
    launch_ew("silu_backward", args, x.numel(), SiluBwdF{});
  });
}

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& y) {
  LB_CUDA_OP("swiglu_forward");
  detail::check_on_gpu("swiglu_forward", up, "up");
  detail::check_on_gpu("swiglu_forward", y, "y");
  detail::dispatch("swiglu_forward", gate.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    EwArgs<T, 2, 1> args{{ptr<T>(gate), ptr<T>(up)}, {0, 0}, {ptr<T>(y)}};
    launch_ew("swiglu_forward", args, gate.numel(), SwigluF{});
  });
}

void swiglu_backward(const Tensor& dy, const Tensor& gate, const Tensor& up, Tensor& dgate, Tensor& dup) {
  LB_CUDA_OP("swiglu_backward");
  for (const Tensor* t : detail::TensorList{&dy, &up, &dgate, &dup}) detail::check_on_gpu("swiglu_backward", *t, "an argument");
  if (dy.dtype() != gate.dtype() || !dy.is_contiguous()) throw_error("swiglu_backward: dy ", dy.describe(), " must be a contiguous ", dtype_name(gate.dtype()));
  detail::dispatch("swiglu_backward", gate.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    EwArgs<T, 3, 2> args{{ptr<T>(dy), ptr<T>(gate), ptr<T>(up)}, {0, 0, 0}, {ptr<T>(dgate), ptr<T>(dup)}};
    launch_ew("swiglu_backward", args, gate.numel(), SwigluBwdF{});
  });
}

void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr, double beta1, double beta2,
                double eps, double weight_decay, int64_t step) {
  LB_CUDA_OP("adamw_step");
  for (const Tensor* t : detail::TensorList{&grad, &m, &v}) {
    detail::check_on_gpu("adamw_step", *t, "an argument");
    if (t->dtype() != param.dtype() || !t->is_contiguous())
      throw_error("adamw_step: grad/m/v must be contiguous ", dtype_name(param.dtype()), ", got ", t->describe());
  }
  const AdamwF f = adamw_coefficients(AdamwHyper{lr, beta1, beta2, eps, weight_decay, step});
  detail::dispatch("adamw_step", param.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    EwArgs<T, 4, 3> args{{ptr<T>(param), ptr<T>(grad), ptr<T>(m), ptr<T>(v)}, {0, 0, 0, 0},
                         {ptr<T>(param), ptr<T>(m), ptr<T>(v)}};
    launch_ew("adamw_step", args, param.numel(), f);
  });
}

// ---- AdamW over parameter groups: one launch per kAdamwMultiMax tensors ----------------------------
// The tensors' pointers, sizes and their groups' coefficients travel in the kernel's parameters
// (about 2.5 KB of the 4 KB allowed). Block b updates chunk (b - first[t]) of tensor t, first[] the
// prefix sums of the tensors' chunk counts; the per-element arithmetic is AdamwF's, as
// adamw_step's, with tensor t's own coefficients (its group's lr, weight decay and step count). A
// tensor whose four arrays are 16-byte aligned is read and written four floats at a time.
namespace {
constexpr int kAdamwChunk = 4096;  // elements per block

struct AdamwMultiArgs {
  float* p[kAdamwMultiMax];
  const float* g[kAdamwMultiMax];
  float* m[kAdamwMultiMax];
  float* v[kAdamwMultiMax];
  int64_t n[kAdamwMultiMax];
  AdamwF f[kAdamwMultiMax];
  int first[kAdamwMultiMax + 1];
  unsigned vec;  // bit t: tensor t's arrays are 16-byte aligned
  int count;
};
static_assert(sizeof(AdamwMultiArgs) <= 4000, "kernel parameters are limited to 4 KB");
static_assert(kAdamwMultiMax <= 32, "AdamwMultiArgs::vec has one bit per tensor");

__global__ void adamw_multi_kernel(const __grid_constant__ AdamwMultiArgs a) {
  const int b = int(blockIdx.x);
  int t = 0;
  while (t + 1 < a.count && a.first[t + 1] <= b) ++t;
  const int64_t lo = int64_t(b - a.first[t]) * kAdamwChunk;
  const int64_t hi = lo + kAdamwChunk < a.n[t] ? lo + kAdamwChunk : a.n[t];
  float* p = a.p[t];
  const float* g = a.g[t];
  float* m = a.m[t];
  float* v = a.v[t];
  const AdamwF f = a.f[t];
  int64_t i0 = lo;
  if ((a.vec >> t) & 1u) {  // lo is a multiple of 4096: the float4 view starts aligned
    const int64_t n4 = (hi - lo) / 4;
    for (int64_t q = threadIdx.x; q < n4; q += blockDim.x) {
      const int64_t i = lo + 4 * q;
      const float4 pp = *reinterpret_cast<const float4*>(p + i), gg = *reinterpret_cast<const float4*>(g + i);
      const float4 mm = *reinterpret_cast<const float4*>(m + i), vv = *reinterpret_cast<const float4*>(v + i);
      float4 po, mo, vo;
      float y[3];
      f({pp.x, gg.x, mm.x, vv.x}, y), po.x = y[0], mo.x = y[1], vo.x = y[2];
      f({pp.y, gg.y, mm.y, vv.y}, y), po.y = y[0], mo.y = y[1], vo.y = y[2];
      f({pp.z, gg.z, mm.z, vv.z}, y), po.z = y[0], mo.z = y[1], vo.z = y[2];
      f({pp.w, gg.w, mm.w, vv.w}, y), po.w = y[0], mo.w = y[1], vo.w = y[2];
      *reinterpret_cast<float4*>(p + i) = po;
      *reinterpret_cast<float4*>(m + i) = mo;
      *reinterpret_cast<float4*>(v + i) = vo;
    }
    i0 = lo + 4 * n4;
  }
  for (int64_t i = i0 + threadIdx.x; i < hi; i += blockDim.x) {
    const float x[4] = {p[i], g[i], m[i], v[i]};
    float y[3];
    f(x, y);
    p[i] = y[0];
    m[i] = y[1];
    v[i] = y[2];
  }
}
}  // namespace

void adamw_step_fused(const std::vector<AdamwParam>& params, const std::vector<AdamwHyper>& hyper) {
  LB_CUDA_OP("adamw_step_groups");
  if (hyper.size() != params.size())
    throw_error("adamw_step_groups: ", params.size(), " tensors but ", hyper.size(), " hyper-parameter sets");
  for (size_t s0 = 0; s0 < params.size(); s0 += kAdamwMultiMax) {
    AdamwMultiArgs a{};
    a.count = int(std::min<size_t>(kAdamwMultiMax, params.size() - s0));
    int blocks = 0;
    for (int k = 0; k < a.count; ++k) {
      const AdamwParam& q = params[s0 + size_t(k)];
      a.p[k] = q.param->data<float>();
      a.g[k] = q.grad->data<float>();
      a.m[k] = q.m->data<float>();
      a.v[k] = q.v->data<float>();
      a.n[k] = q.param->numel();
      a.f[k] = adamw_coefficients(hyper[s0 + size_t(k)]);
      if (detail::aligned16(a.p[k]) && detail::aligned16(a.g[k]) && detail::aligned16(a.m[k]) && detail::aligned16(a.v[k])) a.vec |= 1u << k;
      a.first[k] = blocks;
      const int64_t nb = (a.n[k] + kAdamwChunk - 1) / kAdamwChunk;
      if (nb > int64_t(1) << 30 || blocks + nb > int64_t(1) << 30)
        throw_error("adamw_step_groups: ", a.n[k], " elements is too many for one launch");
      blocks += int(nb);
    }
    a.first[a.count] = blocks;
    adamw_multi_kernel<<<blocks, 256, 0, cuda_rt::stream()>>>(a);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) cuda_rt::throw_cuda(e, "adamw_step_groups", __FILE__, __LINE__);
  }
}

}  // namespace lowbit::ops::cuda
