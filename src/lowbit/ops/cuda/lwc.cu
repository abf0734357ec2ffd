// Learnable weight clipping (LWC) fake quantization on the GPU: the quantizer of OmniQuant (Shao et
// al. 2024, §3.2 eq. 2) that ApiQ (Liao et al. 2024, arXiv 2402.05147) trains with its LoRA
// adapters. quant/lwc.h states the formulas and the straight-through backward; quant/lwc.cpp holds
// the CPU reference bodies, which these kernels follow operation by operation (same fp32 formulas,
// rintf = nearbyint's round-half-to-even, first index wins ties of the max/min).
//
// Layout: one warp per quantization group (row r, group g), lanes striding over the group's
// columns, so a 64-wide group is two coalesced 128-byte loads per warp. The group's max/min (with
// the index that sets it, needed for W's gradient) and, in the backward, the scale gradient are
// warp-shuffle reductions. Forward: one read of W, one write of Q. Backward: one read of W and dQ
// (plus a second, L1-resident pass when dW is wanted), one write of dgamma/dbeta per group; nothing
// is stored between the two (the group state is recomputed, as on the CPU).
// The common case (groups tiling the rows, no gradient for W) takes vectorised kernels instead:
// several groups per warp, float4 loads, values kept in registers (see lwc_forward_fast).
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "lowbit/ops/cuda/cuda_common.h"
#include "lowbit/ops/cuda/cuda_ops.h"

namespace lowbit::ops::cuda {

namespace {
using detail::ptr;

constexpr int kWarpsPerBlock = 8;
constexpr float kMinScale = 1e-5f;  // OmniQuant's CLIPMIN (kLwcMinScale in quant/lwc.h)

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

// (value, index) arg-max over the warp; ties go to the smaller index (the CPU loop keeps the first).
__device__ __forceinline__ void warp_argmax(float& v, int64_t& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t i2 = __shfl_xor_sync(0xffffffffu, i, o);
    if (v2 > v || (v2 == v && i2 < i)) v = v2, i = i2;
  }
}
__device__ __forceinline__ void warp_argmin(float& v, int64_t& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t i2 = __shfl_xor_sync(0xffffffffu, i, o);
    if (v2 < v || (v2 == v && i2 < i)) v = v2, i = i2;
  }
}

struct Group {
  float hi = 0, lo = 0;
  int64_t arg_hi = -1, arg_lo = -1;
  float sg = 1, sb = 1, s = 1, z = 0, qlo = 0, qmax = 0, denom = 1;
  bool trainable_scale = true;
};

// The group state of lwc.cpp's group_state(), computed by the whole warp (every lane gets it).
__device__ __forceinline__ Group group_state(const float* w, int64_t n, float gamma, float beta, const FormatTraits& a) {
  const int lane = threadIdx.x & 31;
  Group st;
  st.qmax = float(a.qmax());
  st.sg = sigmoid_f(gamma);
  if (a.kind != QuantKind::IntSym) {
    float vmax = -INFINITY, vmin = INFINITY;
    int64_t imax = n, imin = n;
    for (int64_t j = lane; j < n; j += 32) {
      const float v = w[j];
      if (v > vmax) vmax = v, imax = j;
      if (v < vmin) vmin = v, imin = j;
    }
    warp_argmax(vmax, imax);
    warp_argmin(vmin, imin);
    if (vmax > 0) st.hi = vmax, st.arg_hi = imax;
    if (vmin < 0) st.lo = vmin, st.arg_lo = imin;
    st.sb = sigmoid_f(beta);
    st.denom = st.qmax;
    float hic = st.sg * st.hi, loc = st.sb * st.lo;
    if (st.hi == 0 && st.lo == 0) {  // all-zero group: the format's (-1, 1) range, nothing to learn
      hic = 1, loc = -1;
      st.trainable_scale = false;
    }
    float s = (hic - loc) / st.denom;
    if (s < kMinScale) s = kMinScale, st.trainable_scale = false;
    st.s = s;
    st.z = fmt_clamp(fmt_rint(-loc / s), 0.f, st.qmax);
    st.qlo = 0;
  } else {
    float vabs = -1.f;
    int64_t iabs = n;
    for (int64_t j = lane; j < n; j += 32) {
      const float v = fabsf(w[j]);
      if (v > vabs) vabs = v, iabs = j;
    }
    warp_argmax(vabs, iabs);
    const float half = int_sym_zero(a);
    st.denom = half - 1;
    st.hi = vabs;
    float amax = st.sg * st.hi;
    if (st.hi == 0) {
      amax = 1;  // all-zero group, as format.h's int_sym_params
      st.trainable_scale = false;
    } else {
      st.arg_hi = iabs;
    }
    float s = amax / st.denom;
    if (s < kMinScale) s = kMinScale, st.trainable_scale = false;
    st.s = s;
    st.z = half;
    st.qlo = 1;
  }
  return st;
}

// Y: float, or bf16 when the consumer is a bf16 GEMM (autocast): the f32 value rounded to nearest
// even as it is stored, so no separate cast pass over Q is needed.
template <class Y>
__global__ void lwc_forward_kernel(const float* __restrict__ w, const float* __restrict__ gamma,
                                   const float* __restrict__ beta, Y* __restrict__ y, int64_t out, int64_t in,
                                   FormatTraits a) {
  const int64_t G = a.n_groups(in);
  const int64_t gid = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (gid >= out * G) return;  // whole warps exit together
  const int64_t r = gid / G, g = gid % G;
  const int64_t b = a.group_begin(g), e = a.group_end(g, in);
  const float* wg = w + r * in + b;
  Y* yg = y + r * in + b;
  const Group st = group_state(wg, e - b, gamma[gid], beta ? beta[gid] : 0.f, a);
  for (int64_t j = threadIdx.x & 31; j < e - b; j += 32) {
    yg[j] = detail::from_f<Y>(int_value(int_code(wg[j], st.s, st.z, st.qlo, st.qmax), st.s, st.z));
  }
}

__global__ void lwc_backward_kernel(const float* __restrict__ w, const float* __restrict__ gamma,
                                    const float* __restrict__ beta, const float* __restrict__ dy,
                                    float* __restrict__ dw, float* __restrict__ dgamma, float* __restrict__ dbeta,
                                    int64_t out, int64_t in, FormatTraits a) {
  const int64_t G = a.n_groups(in);
  const int64_t gid = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (gid >= out * G) return;
  const int lane = threadIdx.x & 31;
  const int64_t r = gid / G, g = gid % G;
  const int64_t b = a.group_begin(g), n = a.group_end(g, in) - b;
  const float* wg = w + r * in + b;
  const float* dyg = dy + r * in + b;
  const Group st = group_state(wg, n, gamma[gid], beta ? beta[gid] : 0.f, a);
  // dQ/ds: round(u) - u on the grid (round() passed straight through), q_clamped - z outside it.
  float ds = 0;
  for (int64_t j = lane; j < n; j += 32) {
    const float u = wg[j] / st.s, nu = rintf(u), q = nu + st.z;
    ds += (q >= st.qlo && q <= st.qmax) ? dyg[j] * (nu - u) : dyg[j] * (fminf(fmaxf(q, st.qlo), st.qmax) - st.z);
  }
  ds = detail::warp_sum(ds);
  float dg = 0, db = 0, dhi_w = 0, dlo_w = 0;
  if (st.trainable_scale) {
    const float dhic = ds / st.denom;
    dg = dhic * st.hi * st.sg * (1 - st.sg);
    if (st.arg_hi >= 0) dhi_w = dhic * st.sg * ((a.kind == QuantKind::IntSym && wg[st.arg_hi] < 0) ? -1.f : 1.f);
    if (a.kind != QuantKind::IntSym) {
      const float dloc = -ds / st.denom;
      db = dloc * st.lo * st.sb * (1 - st.sb);
      if (st.arg_lo >= 0) dlo_w = dloc * st.sb;
    }
  }
  if (lane == 0) {
    dgamma[gid] = dg;
    if (dbeta) dbeta[gid] = db;
  }
  if (!dw) return;
  float* dwg = dw + r * in + b;
  for (int64_t j = lane; j < n; j += 32) {
    const float u = wg[j] / st.s, q = rintf(u) + st.z;
    float d = (q >= st.qlo && q <= st.qmax) ? dyg[j] : 0.f;
    // The CPU adds the max/min paths after writing the element (two separate additions).
    if (j == st.arg_hi) d += dhi_w;
    if (j == st.arg_lo) d += dlo_w;
    dwg[j] = d;
  }
}

// ---- Vectorised kernels for the common case --------------------------------------------------
// Groups of 4 * LPG * VPL columns that tile every row (in % group_size == 0), 16-byte aligned rows,
// and no gradient for W (ApiQ's W is frozen): LPG lanes own one group, each holding VPL float4s of
// it in registers (consecutive lanes read consecutive 16-byte vectors: coalesced). A group is then
// read once (forward: W; backward: W and dQ), its max/min is an LPG-lane shuffle reduction without
// the arg index (only W's gradient needs it), and nothing is re-read. Same fp32 formulas as
// group_state() and the generic kernels (the forward is bit-identical; the backward's sum dQ/ds is
// reduced in a different order). Lanes of a group past the end still take part in the shuffles
// (full-warp masks) but neither load nor store.
struct FastState {
  float s = 1, z = 0, qlo = 0, qmax = 0;
  float dg_coef = 0, db_coef = 0;  // dgamma = ds * dg_coef, dbeta = ds * db_coef (0: not trainable)
};

template <int LPG>
__device__ __forceinline__ float sub_max(float v) {
#pragma unroll
  for (int o = LPG / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <int LPG>
__device__ __forceinline__ float sub_min(float v) {
#pragma unroll
  for (int o = LPG / 2; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <int LPG>
__device__ __forceinline__ float sub_sum(float v) {
#pragma unroll
  for (int o = LPG / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// This thread's place: group gid (LPG lanes each), lane sub within it; ok is false past the end.
template <int LPG>
struct FastLane {
  int64_t gid;
  int sub;
  bool ok;
  __device__ explicit FastLane(int64_t groups) {
    const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    gid = t / LPG;
    sub = int(t % LPG);
    ok = gid < groups;
  }
};
// The lane's VPL float4s of its group in p [groups * GS] (rows are tiled by whole groups, so group
// gid starts at element gid * GS); zeros past the end.
template <int LPG, int VPL>
__device__ __forceinline__ void load_group(const float* __restrict__ p, const FastLane<LPG>& ln, float4 (&v)[VPL]) {
  const float4* g = reinterpret_cast<const float4*>(p + (ln.ok ? ln.gid : 0) * (4 * LPG * VPL));
#pragma unroll
  for (int k = 0; k < VPL; ++k) v[k] = ln.ok ? g[k * LPG + ln.sub] : make_float4(0, 0, 0, 0);
}

template <int LPG, int VPL>
__device__ __forceinline__ FastState fast_state(const float4 (&w)[VPL], float gamma, float beta, const FormatTraits& a) {
  FastState st;
  st.qmax = float(a.qmax());
  const float sg = sigmoid_f(gamma);
  bool trainable = true;
  if (a.kind != QuantKind::IntSym) {
    float vmax = -INFINITY, vmin = INFINITY;
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      vmax = fmaxf(vmax, fmaxf(fmaxf(w[v].x, w[v].y), fmaxf(w[v].z, w[v].w)));
      vmin = fminf(vmin, fminf(fminf(w[v].x, w[v].y), fminf(w[v].z, w[v].w)));
    }
    vmax = sub_max<LPG>(vmax);
    vmin = sub_min<LPG>(vmin);
    const float hi = vmax > 0 ? vmax : 0.f, lo = vmin < 0 ? vmin : 0.f;
    const float sb = sigmoid_f(beta);
    float hic = sg * hi, loc = sb * lo;
    if (hi == 0 && lo == 0) hic = 1, loc = -1, trainable = false;
    float s = (hic - loc) / st.qmax;
    if (s < kMinScale) s = kMinScale, trainable = false;
    st.s = s;
    st.z = fmt_clamp(fmt_rint(-loc / s), 0.f, st.qmax);
    st.qlo = 0;
    if (trainable) {
      st.dg_coef = hi * sg * (1 - sg) / st.qmax;
      st.db_coef = -lo * sb * (1 - sb) / st.qmax;
    }
  } else {
    float vabs = -1.f;
#pragma unroll
    for (int v = 0; v < VPL; ++v)
      vabs = fmaxf(vabs, fmaxf(fmaxf(fabsf(w[v].x), fabsf(w[v].y)), fmaxf(fabsf(w[v].z), fabsf(w[v].w))));
    vabs = sub_max<LPG>(vabs);
    const float half = int_sym_zero(a), denom = half - 1;
    float amax = sg * vabs;
    if (vabs == 0) amax = 1, trainable = false;
    float s = amax / denom;
    if (s < kMinScale) s = kMinScale, trainable = false;
    st.s = s;
    st.z = half;
    st.qlo = 1;
    if (trainable) st.dg_coef = vabs * sg * (1 - sg) / denom;
  }
  return st;
}

// The state of the lane's group, reading its clipping logits (zeros past the end).
template <int LPG, int VPL>
__device__ __forceinline__ FastState fast_state(const float4 (&w)[VPL], const FastLane<LPG>& ln,
                                                const float* __restrict__ gamma, const float* __restrict__ beta,
                                                const FormatTraits& a) {
  return fast_state<LPG, VPL>(w, ln.ok ? gamma[ln.gid] : 0.f, (ln.ok && beta) ? beta[ln.gid] : 0.f, a);
}

__device__ __forceinline__ float fq(float w, const FastState& st) {
  return int_value(int_code(w, st.s, st.z, st.qlo, st.qmax), st.s, st.z);
}
// dQ/ds of one element times its upstream gradient (see lwc_backward_kernel).
__device__ __forceinline__ float ds_term(float w, float dy, const FastState& st) {
  const float u = w / st.s, nu = rintf(u), q = nu + st.z;
  return (q >= st.qlo && q <= st.qmax) ? dy * (nu - u) : dy * (fminf(fmaxf(q, st.qlo), st.qmax) - st.z);
}

template <int LPG, int VPL, class Y>
__global__ void __launch_bounds__(256) lwc_forward_fast(const float* __restrict__ w, const float* __restrict__ gamma,
                                                        const float* __restrict__ beta, Y* __restrict__ y,
                                                        int64_t groups, FormatTraits a) {
  constexpr int GS = 4 * LPG * VPL;
  const FastLane<LPG> ln(groups);
  float4 v[VPL];
  load_group<LPG, VPL>(w, ln, v);
  const FastState st = fast_state<LPG, VPL>(v, ln, gamma, beta, a);
  if (!ln.ok) return;
  Y* yg = y + ln.gid * GS;
#pragma unroll
  for (int k = 0; k < VPL; ++k)
    // 16 bytes of f32 or 8 of bf16, aligned: group starts are multiples of 4 elements of a 16-byte aligned tensor.
    detail::store4(yg + 4 * (k * LPG + ln.sub), fq(v[k].x, st), fq(v[k].y, st), fq(v[k].z, st), fq(v[k].w, st));
}

template <int LPG, int VPL>
__global__ void __launch_bounds__(256) lwc_backward_fast(const float* __restrict__ w, const float* __restrict__ gamma,
                                                         const float* __restrict__ beta, const float* __restrict__ dy,
                                                         float* __restrict__ dgamma, float* __restrict__ dbeta,
                                                         int64_t groups, FormatTraits a) {
  const FastLane<LPG> ln(groups);
  float4 v[VPL], d[VPL];
  load_group<LPG, VPL>(w, ln, v);
  load_group<LPG, VPL>(dy, ln, d);
  const FastState st = fast_state<LPG, VPL>(v, ln, gamma, beta, a);
  float ds = 0;
#pragma unroll
  for (int k = 0; k < VPL; ++k)
    ds += ds_term(v[k].x, d[k].x, st) + ds_term(v[k].y, d[k].y, st) + ds_term(v[k].z, d[k].z, st) +
          ds_term(v[k].w, d[k].w, st);
  ds = sub_sum<LPG>(ds);
  if (!ln.ok || ln.sub != 0) return;
  dgamma[ln.gid] = ds * st.dg_coef;
  if (dbeta) dbeta[ln.gid] = ds * st.db_coef;
}

// The fast kernels' (LPG, VPL) for a format, or {0, 0} when the generic kernels must run.
struct FastShape {
  int lpg = 0, vpl = 0;
};
FastShape fast_shape(const FormatTraits& a, int64_t in, std::initializer_list<const Tensor*> vec_tensors) {
  const int64_t gs = a.group_size;
  if (gs <= 0 || gs % 4 != 0 || in % gs != 0) return {};
  const int64_t v4 = gs / 4;  // float4s per group
  if ((v4 & (v4 - 1)) != 0 || v4 > 128) return {};
  for (const Tensor* t : vec_tensors)
    if (reinterpret_cast<uintptr_t>(t->raw_data()) % 16 != 0) return {};
  if (v4 <= 32) return {int(v4), 1};
  return {32, int(v4 / 32)};
}

dim3 fast_grid(const FastShape& fs, int64_t groups) {
  const int64_t blocks = (groups * fs.lpg + 255) / 256;
  if (blocks > int64_t(0x7fffffff)) throw_error("lwc: ", groups, " groups exceed one launch");
  return dim3(unsigned(blocks));
}

// Calls f(std::integral_constant<int, LPG>, std::integral_constant<int, VPL>) for fs.
template <class F>
void dispatch_fast(const FastShape& fs, F&& f) {
  using std::integral_constant;
  switch (fs.lpg * 8 + fs.vpl) {
    case 1 * 8 + 1: f(integral_constant<int, 1>{}, integral_constant<int, 1>{}); break;
    case 2 * 8 + 1: f(integral_constant<int, 2>{}, integral_constant<int, 1>{}); break;
    case 4 * 8 + 1: f(integral_constant<int, 4>{}, integral_constant<int, 1>{}); break;
    case 8 * 8 + 1: f(integral_constant<int, 8>{}, integral_constant<int, 1>{}); break;
    case 16 * 8 + 1: f(integral_constant<int, 16>{}, integral_constant<int, 1>{}); break;
    case 32 * 8 + 1: f(integral_constant<int, 32>{}, integral_constant<int, 1>{}); break;
    case 32 * 8 + 2: f(integral_constant<int, 32>{}, integral_constant<int, 2>{}); break;
    case 32 * 8 + 4: f(integral_constant<int, 32>{}, integral_constant<int, 4>{}); break;
    default: throw_error("lwc: internal error, no fast kernel for ", fs.lpg, " x ", fs.vpl);
  }
}

void check_args(const char* op, const Tensor& w, const Tensor& gamma, const Tensor& beta, const FormatTraits& a,
                std::initializer_list<const Tensor*> more) {
  detail::check_on_gpu(op, w, "w");
  detail::check_on_gpu(op, gamma, "gamma");
  detail::check_on_gpu(op, beta, "beta");
  for (const Tensor* t : more) detail::check_on_gpu(op, *t, "an argument");
  if (w.dtype() != DType::F32)
    throw_error(op, ": the CUDA body supports f32 weights only, got ", w.describe());
  for (const Tensor* t : {&w, &gamma, &beta}) {
    if (!t->defined()) continue;
    if (t->dtype() != DType::F32 || !t->is_contiguous())
      throw_error(op, ": ", t->describe(), " must be a contiguous f32 tensor");
  }
  for (const Tensor* t : more)
    if (t->defined() && (t->dtype() != DType::F32 || !t->is_contiguous()))
      throw_error(op, ": ", t->describe(), " must be a contiguous f32 tensor");
  if (a.kind != QuantKind::IntAsym && a.kind != QuantKind::IntSym)
    throw_error(op, ": [", a.name, "] is not a uniform integer format");
  if (a.bits < 2 || a.bits > 8) throw_error(op, ": unsupported bit width ", a.bits);
  if ((a.kind == QuantKind::IntSym) == beta.defined()) throw_error(op, ": beta must be given exactly for asymmetric formats");
}

unsigned blocks_for(int64_t groups) {
  const int64_t b = (groups + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (b > int64_t(0x7fffffff)) throw_error("lwc: ", groups, " groups exceed one launch");
  return unsigned(b);
}

}  // namespace

void lwc_forward(const Tensor& w, const Tensor& gamma, const Tensor& beta, const FormatTraits& a, Tensor& y) {
  LB_CUDA_OP("lwc_forward");
  check_args("lwc_forward", w, gamma, beta, a, {});
  detail::check_on_gpu("lwc_forward", y, "y");
  if ((y.dtype() != DType::F32 && y.dtype() != DType::BF16) || !y.is_contiguous())
    throw_error("lwc_forward: the output ", y.describe(), " must be a contiguous f32 or bf16 tensor");
  const int64_t out = w.size(0), in = w.size(1);
  const int64_t groups = out * a.n_groups(in);
  auto launch = [&](auto ytag) {
    using Y = typename decltype(ytag)::type;
    if (const FastShape fs = fast_shape(a, in, {&w, &y}); fs.lpg > 0) {
      dispatch_fast(fs, [&](auto L, auto V) {
        lwc_forward_fast<decltype(L)::value, decltype(V)::value, Y><<<fast_grid(fs, groups), 256, 0, cuda_rt::stream()>>>(
            ptr<float>(w), ptr<float>(gamma), beta.defined() ? ptr<float>(beta) : nullptr, ptr<Y>(y), groups, a);
      });
      LB_CUDA_LAUNCH_CHECK("lwc_forward_fast");
      return;
    }
    lwc_forward_kernel<Y><<<blocks_for(groups), kWarpsPerBlock * 32, 0, cuda_rt::stream()>>>(
        ptr<float>(w), ptr<float>(gamma), beta.defined() ? ptr<float>(beta) : nullptr, ptr<Y>(y), out, in, a);
    LB_CUDA_LAUNCH_CHECK("lwc_forward_kernel");
  };
  if (y.dtype() == DType::BF16) launch(detail::TypeTag<detail::bf16>{});
  else launch(detail::TypeTag<float>{});
}

void lwc_backward(const Tensor& w, const Tensor& gamma, const Tensor& beta, const Tensor& dy, const FormatTraits& a,
                  Tensor& dw, Tensor& dgamma, Tensor& dbeta) {
  LB_CUDA_OP("lwc_backward");
  check_args("lwc_backward", w, gamma, beta, a, {&dy, &dw, &dgamma, &dbeta});
  if (beta.defined() != dbeta.defined()) throw_error("lwc_backward: dbeta must be given exactly when beta is");
  const int64_t out = w.size(0), in = w.size(1);
  const int64_t groups = out * a.n_groups(in);
  if (!dw.defined()) {
    if (const FastShape fs = fast_shape(a, in, {&w, &dy}); fs.lpg > 0) {
      dispatch_fast(fs, [&](auto L, auto V) {
        lwc_backward_fast<decltype(L)::value, decltype(V)::value>
            <<<fast_grid(fs, groups), 256, 0, cuda_rt::stream()>>>(ptr<float>(w), ptr<float>(gamma),
                                                                  beta.defined() ? ptr<float>(beta) : nullptr,
                                                                  ptr<float>(dy), ptr<float>(dgamma),
                                                                  dbeta.defined() ? ptr<float>(dbeta) : nullptr,
                                                                  groups, a);
      });
      LB_CUDA_LAUNCH_CHECK("lwc_backward_fast");
      return;
    }
  }
  lwc_backward_kernel<<<blocks_for(groups), kWarpsPerBlock * 32, 0, cuda_rt::stream()>>>(
      ptr<float>(w), ptr<float>(gamma), beta.defined() ? ptr<float>(beta) : nullptr, ptr<float>(dy),
      dw.defined() ? ptr<float>(dw) : nullptr, ptr<float>(dgamma), dbeta.defined() ? ptr<float>(dbeta) : nullptr, out,
      in, a);
  LB_CUDA_LAUNCH_CHECK("lwc_backward_kernel");
}

}  // namespace lowbit::ops::cuda
