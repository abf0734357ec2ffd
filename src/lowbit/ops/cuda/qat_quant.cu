// CUDA bodies of the QAT weight quantizers (ops/qat_quant.h): LSQ / LSQ+, ParetoQ's sign / SEQ, and
// E2E-QP's frozen-code dequantization. The per-element arithmetic is ops/qat_quant_math.h, the same
// functions the CPU reference bodies call (f32 here), so the forwards match the CPU bit for bit and
// the backwards up to the order of the per-group sums.
//
// Forwards: element-parallel grid-stride loops (one read of w, one write of y; the group's
// parameters are L1/L2-resident). Backwards: one warp per quantization group (row r, group g),
// lanes striding over the group's columns (coalesced), dw written on the way, the group sums
// reduced by warp shuffles and written by lane 0. group_scale (E2E-QP's frozen I8 codes) on rows
// and groups of whole 4-column quads: row kernels that read and write 4 columns per thread
// (group_scale_forward_quads, group_scale_backward_quads: fewer lanes per group of 64).
#include <cstdint>
#include <type_traits>

#include "lowbit/ops/cuda/cuda_common.h"
#include "lowbit/ops/cuda/cuda_ops.h"

namespace lowbit::ops::cuda {

namespace {
using detail::ptr;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

unsigned warp_blocks(int64_t groups) { return unsigned((groups + kWarpsPerBlock - 1) / kWarpsPerBlock); }

// f32, on the GPU (the CPU entry points checked shapes, contiguity and that every tensor shares w's
// dtype and device).
void check_f32(const char* op, const Tensor& w) {
  if (w.dtype() != DType::F32) throw_error(op, ": the CUDA body supports f32, got ", w.describe());
  detail::check_on_gpu(op, w, "w");
}

__global__ void lsq_forward_kernel(const float* __restrict__ w, const float* __restrict__ step,
                                   const float* __restrict__ offset, float* __restrict__ y, int64_t out, int64_t in,
                                   FormatTraits f, int slice) {
  const qat::LsqGrid gr = qat::lsq_grid_sliced(f, slice);
  const int64_t G = f.n_groups(in), n = out * in;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = (i / in) * G + f.group_of_column(i % in);
    y[i] = qat::lsq_value(w[i], step[k], qat::lsq_zero(offset ? offset[k] : 0.0f, gr), gr);
  }
}

__global__ void lsq_backward_kernel(const float* __restrict__ w, const float* __restrict__ step,
                                    const float* __restrict__ offset, const float* __restrict__ dy,
                                    float* __restrict__ dw, float* __restrict__ dstep, float* __restrict__ doffset,
                                    int64_t out, int64_t in, FormatTraits f, float gscale, int slice) {
  const int64_t G = f.n_groups(in);
  const int64_t gid = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (gid >= out * G) return;  // whole warps exit together
  const int lane = threadIdx.x & 31;
  const int64_t r = gid / G, g = gid % G, e = f.group_end(g, in);
  const qat::LsqGrid gr = qat::lsq_grid_sliced(f, slice);
  const float s = step[gid], zr = qat::lsq_zero(offset ? offset[gid] : 0.0f, gr);
  float ds = 0, dz = 0;
  for (int64_t j = f.group_begin(g) + lane; j < e; j += 32) {
    const qat::LsqGrad<float> d = qat::lsq_grad(w[r * in + j], s, zr, dy[r * in + j], gr);
    if (dw) dw[r * in + j] = d.dw;
    ds += d.ds;
    dz += d.dz;
  }
  ds = detail::warp_sum(ds);
  dz = detail::warp_sum(dz);
  if (lane == 0) {
    dstep[gid] = gscale * ds;
    if (doffset) doffset[gid] = gscale * dz;
  }
}

__global__ void seq_forward_kernel(const float* __restrict__ w, const float* __restrict__ alpha, float* __restrict__ y,
                                   int64_t out, int64_t in, FormatTraits f, SeqGrid q) {
  const int64_t G = f.n_groups(in), n = out * in;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float a = qat::seq_alpha(alpha[(i / in) * G + f.group_of_column(i % in)]);
    y[i] = qat::seq_value(q, w[i], a, a / float(q.n));
  }
}

__global__ void seq_backward_kernel(const float* __restrict__ w, const float* __restrict__ alpha,
                                    const float* __restrict__ dy, float* __restrict__ dw, float* __restrict__ dalpha,
                                    int64_t out, int64_t in, FormatTraits f, SeqGrid q, float gscale) {
  const int64_t G = f.n_groups(in);
  const int64_t gid = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (gid >= out * G) return;
  const int lane = threadIdx.x & 31;
  const int64_t r = gid / G, g = gid % G, e = f.group_end(g, in);
  const float a = qat::seq_alpha(alpha[gid]);
  float da = 0;
  for (int64_t j = f.group_begin(g) + lane; j < e; j += 32) {
    const qat::SeqGrad<float> d = qat::seq_grad(q, w[r * in + j], a, dy[r * in + j]);
    if (dw) dw[r * in + j] = d.dw;
    da += d.da;
  }
  da = detail::warp_sum(da);
  if (lane == 0) dalpha[gid] = gscale * da;
}

// Y: float, or bf16 under autocast (the product rounded to nearest even as it is stored).
template <class C, class Y>
__global__ void group_scale_forward_kernel(const C* __restrict__ codes, const float* __restrict__ step,
                                           Y* __restrict__ y, int64_t out, int64_t in, FormatTraits f) {
  const int64_t G = f.n_groups(in), n = out * in;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = detail::from_f<Y>(float(codes[i]) * step[(i / in) * G + f.group_of_column(i % in)]);
}

// I8 codes, rows of whole quads (in % 4 == 0) and groups of whole quads (group size % 4 == 0, or one
// group per row): one thread per 4 columns of row blockIdx.y — a 4-byte load of codes, one step, a
// 16- (f32) or 8-byte (bf16) store, and no 64-bit division per element as in the generic kernel.
// The same products as the generic kernel (bit-identical).
template <class Y>
__global__ void group_scale_forward_quads(const int8_t* __restrict__ codes, const float* __restrict__ step,
                                          Y* __restrict__ y, int in, int G, int group_size) {
  const int q = int(blockIdx.x) * blockDim.x + threadIdx.x;
  if (4 * q >= in) return;
  const int64_t row = int64_t(blockIdx.y) * in + 4 * q;
  const char4 c = *reinterpret_cast<const char4*>(codes + row);
  const float s = step[int64_t(blockIdx.y) * G + (group_size ? (4 * q) / group_size : 0)];
  detail::store4(y + row, float(c.x) * s, float(c.y) * s, float(c.z) * s, float(c.w) * s);
}

// dstep for I8 codes on whole quads (as group_scale_forward_quads): LPG lanes per group (a group's
// quad count rounded up to a power of two, at most a warp: 16 lanes for groups of 64), each summing
// codes · dy over its quads (a 4-byte code load and a 16-byte dy load), then a shuffle tree over the
// LPG lanes. Lanes past the last group compute zeros so that every shuffle has the whole warp.
template <int LPG>
__global__ void __launch_bounds__(kThreads) group_scale_backward_quads(const int8_t* __restrict__ codes,
                                                                       const float* __restrict__ dy,
                                                                       float* __restrict__ dstep, int64_t groups,
                                                                       int in, int G, int group_size) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t gid = t / LPG;
  const int sub = int(t % LPG);
  const bool ok = gid < groups;
  float s = 0;
  if (ok) {
    const int64_t r = gid / G;
    const int g = int(gid - r * G);
    const int b = group_size ? g * group_size : 0, e = group_size ? min(b + group_size, in) : in;
    const int8_t* cr = codes + r * in;
    const float* dr = dy + r * in;
    for (int j = b + 4 * sub; j < e; j += 4 * LPG) {
      const char4 c = *reinterpret_cast<const char4*>(cr + j);
      const float4 d = *reinterpret_cast<const float4*>(dr + j);
      s += float(c.x) * d.x + float(c.y) * d.y + float(c.z) * d.z + float(c.w) * d.w;
    }
  }
#pragma unroll
  for (int o = LPG / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (ok && sub == 0) dstep[gid] = s;
}

template <class C>
__global__ void group_scale_backward_kernel(const C* __restrict__ codes, const float* __restrict__ dy,
                                            float* __restrict__ dstep, int64_t out, int64_t in, FormatTraits f) {
  const int64_t G = f.n_groups(in);
  const int64_t gid = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (gid >= out * G) return;
  const int lane = threadIdx.x & 31;
  const int64_t r = gid / G, g = gid % G, e = f.group_end(g, in);
  float s = 0;
  for (int64_t j = f.group_begin(g) + lane; j < e; j += 32) s += float(codes[r * in + j]) * dy[r * in + j];
  s = detail::warp_sum(s);
  if (lane == 0) dstep[gid] = s;
}

}  // namespace

void lsq_quant_forward(const Tensor& w, const Tensor& step, const Tensor& offset, const FormatTraits& f, Tensor& y,
                       int slice) {
  LB_CUDA_OP("lsq_quant_forward");
  check_f32("lsq_quant_forward", w);
  const int64_t out = w.size(0), in = w.size(1);
  lsq_forward_kernel<<<detail::grid_for(out * in, kThreads), kThreads, 0, cuda_rt::stream()>>>(
      ptr<float>(w), ptr<float>(step), offset.defined() ? ptr<float>(offset) : nullptr, ptr<float>(y), out, in, f, slice);
  LB_CUDA_LAUNCH_CHECK("lsq_forward_kernel");
}

void lsq_quant_backward(const Tensor& w, const Tensor& step, const Tensor& offset, const Tensor& dy,
                        const FormatTraits& f, double grad_scale, Tensor* dw, Tensor& dstep, Tensor* doffset,
                        int slice) {
  LB_CUDA_OP("lsq_quant_backward");
  check_f32("lsq_quant_backward", w);
  const int64_t out = w.size(0), in = w.size(1);
  lsq_backward_kernel<<<warp_blocks(out * f.n_groups(in)), kThreads, 0, cuda_rt::stream()>>>(
      ptr<float>(w), ptr<float>(step), offset.defined() ? ptr<float>(offset) : nullptr, ptr<float>(dy),
      dw ? ptr<float>(*dw) : nullptr, ptr<float>(dstep), doffset ? ptr<float>(*doffset) : nullptr, out, in, f,
      float(grad_scale), slice);
  LB_CUDA_LAUNCH_CHECK("lsq_backward_kernel");
}

void seq_quant_forward(const Tensor& w, const Tensor& alpha, const SeqGrid& q, const FormatTraits& f, Tensor& y) {
  LB_CUDA_OP("seq_quant_forward");
  check_f32("seq_quant_forward", w);
  const int64_t out = w.size(0), in = w.size(1);
  seq_forward_kernel<<<detail::grid_for(out * in, kThreads), kThreads, 0, cuda_rt::stream()>>>(
      ptr<float>(w), ptr<float>(alpha), ptr<float>(y), out, in, f, q);
  LB_CUDA_LAUNCH_CHECK("seq_forward_kernel");
}

void seq_quant_backward(const Tensor& w, const Tensor& alpha, const Tensor& dy, const SeqGrid& q, const FormatTraits& f,
                        double grad_scale, Tensor* dw, Tensor& dalpha) {
  LB_CUDA_OP("seq_quant_backward");
  check_f32("seq_quant_backward", w);
  const int64_t out = w.size(0), in = w.size(1);
  seq_backward_kernel<<<warp_blocks(out * f.n_groups(in)), kThreads, 0, cuda_rt::stream()>>>(
      ptr<float>(w), ptr<float>(alpha), ptr<float>(dy), dw ? ptr<float>(*dw) : nullptr, ptr<float>(dalpha), out, in, f,
      q, float(grad_scale));
  LB_CUDA_LAUNCH_CHECK("seq_backward_kernel");
}

// codes f32 or I8 (integer codes); step, dy, y, dstep f32.
void group_scale_forward(const Tensor& codes, const Tensor& step, const FormatTraits& f, Tensor& y) {
  LB_CUDA_OP("group_scale_forward");
  check_f32("group_scale_forward", step);
  const int64_t out = codes.size(0), in = codes.size(1);
  const unsigned grid = detail::grid_for(out * in, kThreads);
  auto launch = [&](auto ytag) {
    using Y = typename decltype(ytag)::type;
    const bool quads = codes.dtype() == DType::I8 && in % 4 == 0 && f.group_size % 4 == 0 && out <= 65535 &&
                       in < (int64_t(1) << 30) && reinterpret_cast<uintptr_t>(codes.raw_data()) % 4 == 0 &&
                       reinterpret_cast<uintptr_t>(y.raw_data()) % 16 == 0;
    if (quads) {
      const dim3 qgrid(unsigned((in / 4 + kThreads - 1) / kThreads), unsigned(out));
      group_scale_forward_quads<<<qgrid, kThreads, 0, cuda_rt::stream()>>>(
          ptr<int8_t>(codes), ptr<float>(step), ptr<Y>(y), int(in), int(f.n_groups(in)), int(f.group_size));
    } else if (codes.dtype() == DType::I8) {
      group_scale_forward_kernel<<<grid, kThreads, 0, cuda_rt::stream()>>>(ptr<int8_t>(codes), ptr<float>(step),
                                                                            ptr<Y>(y), out, in, f);
    } else {
      check_f32("group_scale_forward", codes);
      group_scale_forward_kernel<<<grid, kThreads, 0, cuda_rt::stream()>>>(ptr<float>(codes), ptr<float>(step),
                                                                            ptr<Y>(y), out, in, f);
    }
  };
  if (y.dtype() == DType::BF16) launch(detail::TypeTag<detail::bf16>{});
  else launch(detail::TypeTag<float>{});
  LB_CUDA_LAUNCH_CHECK("group_scale_forward_kernel");
}

void group_scale_backward(const Tensor& codes, const Tensor& dy, const FormatTraits& f, Tensor& dstep) {
  LB_CUDA_OP("group_scale_backward");
  check_f32("group_scale_backward", dy);
  const int64_t out = codes.size(0), in = codes.size(1);
  const unsigned grid = warp_blocks(out * f.n_groups(in));
  if (codes.dtype() == DType::I8 && in % 4 == 0 && f.group_size % 4 == 0 && in < (int64_t(1) << 30) &&
      reinterpret_cast<uintptr_t>(codes.raw_data()) % 4 == 0 && reinterpret_cast<uintptr_t>(dy.raw_data()) % 16 == 0) {
    const int64_t groups = out * f.n_groups(in), quads = f.group_size ? f.group_size / 4 : 32;
    const int lpg = quads >= 32 ? 32 : quads >= 16 ? 16 : quads >= 8 ? 8 : 4;
    const int64_t blocks = (groups * lpg + kThreads - 1) / kThreads;
    if (blocks > int64_t(0x7fffffff)) throw_error("group_scale_backward: ", groups, " groups exceed one launch");
    auto go = [&](auto L) {
      group_scale_backward_quads<decltype(L)::value><<<unsigned(blocks), kThreads, 0, cuda_rt::stream()>>>(
          ptr<int8_t>(codes), ptr<float>(dy), ptr<float>(dstep), groups, int(in), int(f.n_groups(in)), int(f.group_size));
    };
    if (lpg == 32) go(std::integral_constant<int, 32>{});
    else if (lpg == 16) go(std::integral_constant<int, 16>{});
    else if (lpg == 8) go(std::integral_constant<int, 8>{});
    else go(std::integral_constant<int, 4>{});
  } else if (codes.dtype() == DType::I8) {
    group_scale_backward_kernel<<<grid, kThreads, 0, cuda_rt::stream()>>>(ptr<int8_t>(codes), ptr<float>(dy),
                                                                           ptr<float>(dstep), out, in, f);
  } else {
    check_f32("group_scale_backward", codes);
    group_scale_backward_kernel<<<grid, kThreads, 0, cuda_rt::stream()>>>(ptr<float>(codes), ptr<float>(dy),
                                                                           ptr<float>(dstep), out, in, f);
  }
  LB_CUDA_LAUNCH_CHECK("group_scale_backward_kernel");
}

}  // namespace lowbit::ops::cuda
