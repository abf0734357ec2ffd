// Causal grouped-query attention on the GPU: a tiled, fused forward and backward in the manner of
// FlashAttention-2 (Dao 2023), in fp32 arithmetic on CUDA cores. The T x T score matrix never
// reaches device memory: the forward keeps an online softmax per query row and writes the row's
// log-sum-exp; the backward recomputes the probabilities from it.
//
// Layout: q [B, Tq, H, hd], k/v [B, Tk, KVH, hd], out like q, lse [B, H, Tq]. Query i sits at
// position Tk - Tq + i and sees keys 0..that position; head h reads kv head h / (H / KVH).
//
// Tiling. 256 threads as a 16 x 16 grid (ty, tx). Head dims up to 128 are padded to HDP = 64 or
// 128 with zeros in shared memory (zeros change no dot product; padded outputs are not stored).
// Shared-memory rows are padded by 4 floats: with that stride, the eight 16-byte reads of a
// quarter-warp that walk eight consecutive rows fall in eight different bank groups.
//  * Forward, one block per (64 query rows, head, batch). Q tile stays in shared memory; K/V
//    tiles of BK keys stream through. Thread (ty, tx) owns query rows 4ty..4ty+3 and key columns
//    tx + 16j of S = Q K^T, then output columns 4tx + 64g of O. Row max / sum reductions are
//    shuffles among the 16 lanes that share a row. Probabilities go through shared memory
//    (P tile) for the P V product. Query tiles are launched heaviest (latest) first.
//  * Backward, one block per (64 keys, kv head, batch), looping over the heads of its group and
//    over the query tiles that can see its keys. dK and dV accumulate in registers; per query
//    tile the block computes S^T and dP^T = V dO^T in one pass over hd, forms
//    P = exp(S - lse) and dS = P (dP - D) with D = rowsum(dO * O) (a small pre-pass), then
//    dV += P^T dO, dK += dS^T Q, and dQ += dS K, the last added with fp32 atomics into a zeroed
//    fp32 buffer (so dQ's last bits may vary between runs; dK and dV are deterministic).
// Scores are kept in base 2 (scale * log2 e folded in) so exponentials are exp2f.
// bf16 with head_dim 64 or 128 takes the FlashAttention-2-class tensor-core kernels
// (attention_fa2.cuh: mma.sync with S / P in registers, deterministic backward); LOWBIT_ATTENTION
// selects among them for A/B timing: fa2 (default), fa2-atomic (dQ with fp32 atomics), wmma (the
// earlier WMMA kernels, attention_wmma.cuh, softmax through shared memory). f32 with head_dim 64 or 128 when TF32 is allowed (cuda_rt::allow_tf32(), as for the f32
// GEMMs): TF32 products with fp32 softmax and accumulation (attention_wmma_tf32.cuh).
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "lowbit/ops/cuda/cuda_common.h"
#include "lowbit/ops/cuda/cuda_ops.h"

namespace lowbit::ops::cuda {

namespace attn_detail {
using namespace detail;

constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int HDP>
constexpr int kFwdBQ = 64;
template <int HDP>
constexpr int kFwdBK = HDP == 64 ? 64 : 32;
template <int HDP>
constexpr int kBwdBK = 64;
template <int HDP>
constexpr int kBwdBQ = HDP == 64 ? 64 : 32;

template <class T>
__device__ __forceinline__ float4 load4(const T* p);
template <>
__device__ __forceinline__ float4 load4<float>(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}
template <>
__device__ __forceinline__ float4 load4<bf16>(const bf16* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const bf16* e = reinterpret_cast<const bf16*>(&raw);
  return make_float4(to_f(e[0]), to_f(e[1]), to_f(e[2]), to_f(e[3]));
}

// Rows [r0, r0 + R) of a token-major tensor (row r at src + r * rs, hd values) into shared
// memory [R][HDP + 4] as fp32; rows >= nrows and columns >= hd become 0. vec: hd % 4 == 0 and the
// base is aligned for 4-element loads.
template <class T, int R, int HDP>
__device__ __forceinline__ void load_tile(float* dst, const T* src, int64_t rs, int r0, int nrows, int hd, bool vec) {
  constexpr int G = HDP / 4, LD = HDP + 4;
  for (int idx = threadIdx.x; idx < R * G; idx += kThreads) {
    const int r = idx / G, d = (idx % G) * 4, row = r0 + r;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row < nrows && d < hd) {
      const T* p = src + int64_t(row) * rs + d;
      if (vec) {
        v = load4<T>(p);
      } else {
        v.x = to_f(p[0]);
        v.y = d + 1 < hd ? to_f(p[1]) : 0.f;
        v.z = d + 2 < hd ? to_f(p[2]) : 0.f;
        v.w = d + 3 < hd ? to_f(p[3]) : 0.f;
      }
    }
    *reinterpret_cast<float4*>(dst + r * LD + d) = v;
  }
}

__device__ __forceinline__ float dot4(const float4& a, const float4& b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}
__device__ __forceinline__ void axpy4(float a, const float4& x, float (&y)[4]) {
  y[0] = fmaf(a, x.x, y[0]);
  y[1] = fmaf(a, x.y, y[1]);
  y[2] = fmaf(a, x.z, y[2]);
  y[3] = fmaf(a, x.w, y[3]);
}
// Reductions over the 16 lanes (tx) that share a row.
__device__ __forceinline__ float row16_max(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float row16_sum(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T, class LT>
struct FwdParams {
  const T *q, *k, *v;
  T* out;
  LT* lse;
  int Tq, Tk, H, KVH, hd, group;
  float scale_log2;
  bool vec;
};

template <class T, class LT, int HDP>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(FwdParams<T, LT> p) {
  constexpr int BQ = kFwdBQ<HDP>, BK = kFwdBK<HDP>;
  constexpr int RQ = BQ / 16, CK = BK / 16, DG = HDP / 64, LD = HDP + 4, LDP = BK + 4;
  extern __shared__ float4 smem4[];
  float* sQ = reinterpret_cast<float*>(smem4);
  float* sK = sQ + BQ * LD;
  float* sV = sK + BK * LD;
  float* sP = sV + BK * LD;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
  const int h = blockIdx.y, b = blockIdx.z, kh = h / p.group;
  const int off = p.Tk - p.Tq;
  const int64_t qs = int64_t(p.H) * p.hd, ks = int64_t(p.KVH) * p.hd;
  const T* qb = p.q + (int64_t(b) * p.Tq * p.H + h) * p.hd;
  const T* kb = p.k + (int64_t(b) * p.Tk * p.KVH + kh) * p.hd;
  const T* vb = p.v + (int64_t(b) * p.Tk * p.KVH + kh) * p.hd;
  load_tile<T, BQ, HDP>(sQ, qb, qs, q0, p.Tq, p.hd, p.vec);

  float o[RQ][DG][4], m[RQ], l[RQ];
#pragma unroll
  for (int i = 0; i < RQ; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int g = 0; g < DG; ++g)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[i][g][e] = 0.f;
  }
  // Keys past the last query's position are masked for every row of the tile.
  const int kend = min(p.Tk, off + q0 + BQ);
  for (int k0 = 0; k0 < kend; k0 += BK) {
    __syncthreads();  // the previous tile's P V reads are done
    load_tile<T, BK, HDP>(sK, kb, ks, k0, p.Tk, p.hd, p.vec);
    load_tile<T, BK, HDP>(sV, vb, ks, k0, p.Tk, p.hd, p.vec);
    __syncthreads();

    float s[RQ][CK];
#pragma unroll
    for (int i = 0; i < RQ; ++i)
#pragma unroll
      for (int j = 0; j < CK; ++j) s[i][j] = 0.f;
#pragma unroll 4
    for (int d = 0; d < HDP; d += 4) {
      float4 qv[RQ], kv[CK];
#pragma unroll
      for (int i = 0; i < RQ; ++i) qv[i] = *reinterpret_cast<const float4*>(sQ + (ty * RQ + i) * LD + d);
#pragma unroll
      for (int j = 0; j < CK; ++j) kv[j] = *reinterpret_cast<const float4*>(sK + (tx + 16 * j) * LD + d);
#pragma unroll
      for (int i = 0; i < RQ; ++i)
#pragma unroll
        for (int j = 0; j < CK; ++j) s[i][j] = dot4(qv[i], kv[j], s[i][j]);
    }

    // Online softmax (Milakov & Gimelshein 2018): rescale the running sum and output by
    // 2^(m_old - m_new) whenever a row's maximum grows.
#pragma unroll
    for (int i = 0; i < RQ; ++i) {
      const int qpos = off + q0 + ty * RQ + i;
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < CK; ++j) {
        const int key = k0 + tx + 16 * j;
        s[i][j] = (key < p.Tk && key <= qpos) ? s[i][j] * p.scale_log2 : -INFINITY;
        mx = fmaxf(mx, s[i][j]);
      }
      mx = row16_max(mx);
      const float mnew = fmaxf(m[i], mx);
      const float base = mnew == -INFINITY ? 0.f : mnew;  // fully masked so far: avoid -inf - -inf
      const float alpha = exp2f(m[i] - base);
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < CK; ++j) {
        s[i][j] = exp2f(s[i][j] - base);
        rs += s[i][j];
      }
      rs = row16_sum(rs);
      l[i] = l[i] * alpha + rs;
      m[i] = mnew;
#pragma unroll
      for (int g = 0; g < DG; ++g)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[i][g][e] *= alpha;
#pragma unroll
      for (int j = 0; j < CK; ++j) sP[(ty * RQ + i) * LDP + tx + 16 * j] = s[i][j];
    }
    __syncthreads();

    const int kn = min(BK, kend - k0);
    for (int c = 0; c < kn; ++c) {
      float4 vv[DG];
#pragma unroll
      for (int g = 0; g < DG; ++g) vv[g] = *reinterpret_cast<const float4*>(sV + c * LD + tx * 4 + 64 * g);
#pragma unroll
      for (int i = 0; i < RQ; ++i) {
        const float pv = sP[(ty * RQ + i) * LDP + c];
#pragma unroll
        for (int g = 0; g < DG; ++g) axpy4(pv, vv[g], o[i][g]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < RQ; ++i) {
    const int row = q0 + ty * RQ + i;
    if (row >= p.Tq) continue;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    T* orow = p.out + ((int64_t(b) * p.Tq + row) * p.H + h) * p.hd;
#pragma unroll
    for (int g = 0; g < DG; ++g)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int d = tx * 4 + 64 * g + e;
        if (d < p.hd) orow[d] = from_f<T>(o[i][g][e] * inv);
      }
    if (tx == 0) p.lse[(int64_t(b) * p.H + h) * p.Tq + row] = from_f<LT>((m[i] + log2f(l[i])) * kLn2);
  }
}

// D[b, h, i] = sum_d dO[b, i, h, d] O[b, i, h, d]: one warp per row.
template <class T>
__global__ void attn_bwd_dot_kernel(const T* dout, const T* out, float* D, int64_t rows, int Tq, int H, int hd) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  const T *g = dout + r * hd, *o = out + r * hd;
  float acc = 0.f;
  for (int d = lane; d < hd; d += 32) acc += to_f(g[d]) * to_f(o[d]);
  acc = warp_sum(acc);
  if (lane == 0) {
    const int64_t h = r % H, bi = r / H, i = bi % Tq, b = bi / Tq;
    D[(b * H + h) * Tq + i] = acc;
  }
}

template <class T, class LT>
struct BwdParams {
  const T *q, *k, *v, *dout;
  const LT* lse;
  const float* D;
  float* dq;  // fp32 accumulator [B, Tq, H, hd], zeroed
  T *dk, *dv;
  int Tq, Tk, H, KVH, hd, group;
  float scale, scale_log2;
  bool vec;
};

template <class T, class LT, int HDP>
__global__ void __launch_bounds__(kThreads) attn_bwd_kernel(BwdParams<T, LT> p) {
  constexpr int BK = kBwdBK<HDP>, BQ = kBwdBQ<HDP>;
  constexpr int RK = BK / 16, CQ = BQ / 16, DG = HDP / 64, LD = HDP + 4, LDS = BQ + 4;
  extern __shared__ float4 smem4[];
  float* sK = reinterpret_cast<float*>(smem4);
  float* sV = sK + BK * LD;
  float* sQ = sV + BK * LD;
  float* sO = sQ + BQ * LD;  // dO
  float* sP = sO + BQ * LD;  // P^T  [BK][BQ]
  float* sS = sP + BK * LDS;  // dS^T [BK][BQ]
  float* sL = sS + BK * LDS;  // lse (base 2) of the tile's query rows
  float* sD = sL + BQ;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int k0 = blockIdx.x * BK, kh = blockIdx.y, b = blockIdx.z;
  const int off = p.Tk - p.Tq;
  const int64_t qs = int64_t(p.H) * p.hd, ks = int64_t(p.KVH) * p.hd;
  load_tile<T, BK, HDP>(sK, p.k + (int64_t(b) * p.Tk * p.KVH + kh) * p.hd, ks, k0, p.Tk, p.hd, p.vec);
  load_tile<T, BK, HDP>(sV, p.v + (int64_t(b) * p.Tk * p.KVH + kh) * p.hd, ks, k0, p.Tk, p.hd, p.vec);

  float dk[RK][DG][4], dv[RK][DG][4];
#pragma unroll
  for (int i = 0; i < RK; ++i)
#pragma unroll
    for (int g = 0; g < DG; ++g)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[i][g][e] = dv[i][g][e] = 0.f;

  // The first query that sees key k0 is k0 - off.
  const int qfirst = (max(0, k0 - off) / BQ) * BQ;
  for (int hh = 0; hh < p.group; ++hh) {
    const int h = kh * p.group + hh;
    const T* qb = p.q + (int64_t(b) * p.Tq * p.H + h) * p.hd;
    const T* ob = p.dout + (int64_t(b) * p.Tq * p.H + h) * p.hd;
    const int64_t lrow = (int64_t(b) * p.H + h) * p.Tq;
    for (int q0 = qfirst; q0 < p.Tq; q0 += BQ) {
      __syncthreads();  // previous tile fully consumed
      load_tile<T, BQ, HDP>(sQ, qb, qs, q0, p.Tq, p.hd, p.vec);
      load_tile<T, BQ, HDP>(sO, ob, qs, q0, p.Tq, p.hd, p.vec);
      for (int i = threadIdx.x; i < BQ; i += kThreads) {
        const int row = q0 + i;
        sL[i] = row < p.Tq ? to_f(p.lse[lrow + row]) * kLog2e : 0.f;
        sD[i] = row < p.Tq ? p.D[lrow + row] : 0.f;
      }
      __syncthreads();

      // S^T = K Q^T and dP^T = V dO^T for this thread's 4 keys x CQ queries.
      float s[RK][CQ], dp[RK][CQ];
#pragma unroll
      for (int i = 0; i < RK; ++i)
#pragma unroll
        for (int j = 0; j < CQ; ++j) s[i][j] = dp[i][j] = 0.f;
#pragma unroll 2
      for (int d = 0; d < HDP; d += 4) {
        float4 kv[RK], vv[RK], qv[CQ], ov[CQ];
#pragma unroll
        for (int i = 0; i < RK; ++i) {
          kv[i] = *reinterpret_cast<const float4*>(sK + (ty * RK + i) * LD + d);
          vv[i] = *reinterpret_cast<const float4*>(sV + (ty * RK + i) * LD + d);
        }
#pragma unroll
        for (int j = 0; j < CQ; ++j) {
          qv[j] = *reinterpret_cast<const float4*>(sQ + (tx + 16 * j) * LD + d);
          ov[j] = *reinterpret_cast<const float4*>(sO + (tx + 16 * j) * LD + d);
        }
#pragma unroll
        for (int i = 0; i < RK; ++i)
#pragma unroll
          for (int j = 0; j < CQ; ++j) {
            s[i][j] = dot4(kv[i], qv[j], s[i][j]);
            dp[i][j] = dot4(vv[i], ov[j], dp[i][j]);
          }
      }
#pragma unroll
      for (int i = 0; i < RK; ++i)
#pragma unroll
        for (int j = 0; j < CQ; ++j) {
          const int key = k0 + ty * RK + i, qc = tx + 16 * j, qi = q0 + qc;
          const bool ok = key < p.Tk && qi < p.Tq && key <= off + qi;
          const float pr = ok ? exp2f(s[i][j] * p.scale_log2 - sL[qc]) : 0.f;
          sP[(ty * RK + i) * LDS + qc] = pr;
          sS[(ty * RK + i) * LDS + qc] = pr * (dp[i][j] - sD[qc]);
        }
      __syncthreads();

      // dV += P^T dO, dK += dS^T Q (rows: this thread's keys; columns 4tx + 64g).
      for (int c = 0; c < BQ; ++c) {
        float4 ov[DG], qv[DG];
#pragma unroll
        for (int g = 0; g < DG; ++g) {
          ov[g] = *reinterpret_cast<const float4*>(sO + c * LD + tx * 4 + 64 * g);
          qv[g] = *reinterpret_cast<const float4*>(sQ + c * LD + tx * 4 + 64 * g);
        }
#pragma unroll
        for (int i = 0; i < RK; ++i) {
          const float pr = sP[(ty * RK + i) * LDS + c], ds = sS[(ty * RK + i) * LDS + c];
#pragma unroll
          for (int g = 0; g < DG; ++g) {
            axpy4(pr, ov[g], dv[i][g]);
            axpy4(ds, qv[g], dk[i][g]);
          }
        }
      }

      // dQ += scale dS K for queries ty*CQ + i of the tile.
      float dq[CQ][DG][4];
#pragma unroll
      for (int i = 0; i < CQ; ++i)
#pragma unroll
        for (int g = 0; g < DG; ++g)
#pragma unroll
          for (int e = 0; e < 4; ++e) dq[i][g][e] = 0.f;
      for (int r = 0; r < BK; ++r) {
        float4 kv[DG];
#pragma unroll
        for (int g = 0; g < DG; ++g) kv[g] = *reinterpret_cast<const float4*>(sK + r * LD + tx * 4 + 64 * g);
#pragma unroll
        for (int i = 0; i < CQ; ++i) {
          const float ds = sS[r * LDS + ty * CQ + i];
#pragma unroll
          for (int g = 0; g < DG; ++g) axpy4(ds, kv[g], dq[i][g]);
        }
      }
#pragma unroll
      for (int i = 0; i < CQ; ++i) {
        const int qi = q0 + ty * CQ + i;
        if (qi >= p.Tq) continue;
        float* dst = p.dq + ((int64_t(b) * p.Tq + qi) * p.H + h) * p.hd;
#pragma unroll
        for (int g = 0; g < DG; ++g)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int d = tx * 4 + 64 * g + e;
            if (d < p.hd) atomicAdd(dst + d, dq[i][g][e] * p.scale);
          }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < RK; ++i) {
    const int key = k0 + ty * RK + i;
    if (key >= p.Tk) continue;
    const int64_t base = ((int64_t(b) * p.Tk + key) * p.KVH + kh) * p.hd;
#pragma unroll
    for (int g = 0; g < DG; ++g)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int d = tx * 4 + 64 * g + e;
        if (d < p.hd) {
          p.dk[base + d] = from_f<T>(dk[i][g][e] * p.scale);
          p.dv[base + d] = from_f<T>(dv[i][g][e]);
        }
      }
  }
}

template <class T>
__global__ void f32_to_kernel(const float* src, T* dst, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) dst[i] = from_f<T>(src[i]);
}

template <int HDP>
constexpr size_t fwd_smem_bytes() {
  return size_t((kFwdBQ<HDP> + 2 * kFwdBK<HDP>) * (HDP + 4) + kFwdBQ<HDP> * (kFwdBK<HDP> + 4)) * sizeof(float);
}
template <int HDP>
constexpr size_t bwd_smem_bytes() {
  return size_t((2 * kBwdBK<HDP> + 2 * kBwdBQ<HDP>) * (HDP + 4) + 2 * kBwdBK<HDP> * (kBwdBQ<HDP> + 4) +
                2 * kBwdBQ<HDP>) *
         sizeof(float);
}

int head_dim_pad(const char* op, int64_t hd) {
  if (hd <= 0 || hd > 128) throw_error(op, ": head_dim ", hd, " is not supported by the CUDA kernels (1..128)");
  return hd <= 64 ? 64 : 128;
}

bool vec_ok(int64_t hd, DType dt, TensorList ts) {
  if (hd % 4 != 0) return false;
  const uintptr_t align = dt == DType::F32 ? 16 : 8;
  for (const Tensor* t : ts)
    if (reinterpret_cast<uintptr_t>(t->raw_data()) % align != 0) return false;
  return true;
}

void check_dims(const char* op, const Tensor& q, const Tensor& k) {
  if (q.size(0) > 65535 || q.size(2) > 65535 || k.size(2) > 65535 || q.size(1) > INT32_MAX / 2 || k.size(1) > INT32_MAX / 2)
    throw_error(op, ": sizes out of range for the CUDA kernels: ", q.describe(), ", ", k.describe());
}

template <class F>
void dispatch_lse(const char* op, const Tensor& q, const Tensor& lse, F&& f) {
  dispatch(op, q.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (lse.dtype() == DType::F32) f(TypeTag<T>{}, TypeTag<float>{});
    else if (lse.dtype() == q.dtype()) f(TypeTag<T>{}, TypeTag<T>{});
    else throw_error(op, ": lse must be f32 or ", dtype_name(q.dtype()), ", got ", lse.describe());
  });
}

template <class K>
void set_smem(K kernel, size_t bytes) {
  LB_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

// The tensor-core kernels serve head_dim 64 or 128 with 16-byte aligned operands: bf16 always
// (attention_wmma.cuh), f32 when TF32 is allowed (attention_wmma_tf32.cuh). LOWBIT_CUDA_SIMT_ATTENTION=1
// forces the fp32 CUDA-core kernels (tests, timing).
bool use_wmma(const Tensor& q, TensorList ts) {
  const bool tc_dtype = q.dtype() == DType::BF16 || (q.dtype() == DType::F32 && cuda_rt::allow_tf32());
  if (!tc_dtype || (q.size(3) != 64 && q.size(3) != 128)) return false;
  if (const char* e = std::getenv("LOWBIT_CUDA_SIMT_ATTENTION"); e && e[0] == '1') return false;
  for (const Tensor* t : ts)
    if (!aligned16(t->raw_data())) return false;
  return true;
}

// LOWBIT_ATTENTION for the bf16 tensor-core path: fa2 (default, deterministic backward),
// fa2-atomic (the same forward; dQ accumulated with fp32 atomics in the dK/dV kernel), wmma (the
// WMMA kernels of attention_wmma.cuh). Read per call so tests can switch it.
enum class Bf16Kernel { Fa2, Fa2Atomic, Wmma };
Bf16Kernel bf16_kernel() {
  const char* e = std::getenv("LOWBIT_ATTENTION");
  if (e == nullptr || e[0] == '\0' || std::strcmp(e, "fa2") == 0) return Bf16Kernel::Fa2;
  if (std::strcmp(e, "fa2-atomic") == 0) return Bf16Kernel::Fa2Atomic;
  if (std::strcmp(e, "wmma") == 0) return Bf16Kernel::Wmma;
  throw_error("attention: LOWBIT_ATTENTION=", e, " is not one of fa2, fa2-atomic, wmma");
}
}  // namespace attn_detail
}  // namespace lowbit::ops::cuda

#include "lowbit/ops/cuda/attention_fa2.cuh"
#include "lowbit/ops/cuda/attention_wmma.cuh"
#include "lowbit/ops/cuda/attention_wmma_tf32.cuh"

namespace lowbit::ops::cuda {
using namespace attn_detail;

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor& out, Tensor& lse) {
  LB_CUDA_OP("attention_forward");
  const char* op = "attention_forward";
  for (const Tensor* t : TensorList{&k, &v, &out, &lse}) check_on_gpu(op, *t, "an argument");
  if (out.dtype() != q.dtype() || !out.is_contiguous() || !lse.is_contiguous())
    throw_error(op, ": out must be a contiguous ", dtype_name(q.dtype()), " tensor and lse contiguous");
  check_dims(op, q, k);
  const int B = int(q.size(0)), Tq = int(q.size(1)), H = int(q.size(2)), hd = int(q.size(3));
  const int Tk = int(k.size(1)), KVH = int(k.size(2));
  if (B == 0 || Tq == 0 || H == 0) return;
  const int hdp = head_dim_pad(op, hd);
  const bool vec = vec_ok(hd, q.dtype(), {&q, &k, &v});
  const bool wmma_path = use_wmma(q, {&q, &k, &v});
  dispatch_lse(op, q, lse, [&](auto ttag, auto ltag) {
    using T = typename decltype(ttag)::type;
    using LT = typename decltype(ltag)::type;
    if constexpr (std::is_same_v<T, bf16>) {
      // The FlashAttention-2 kernels also store out with 16-byte writes.
      if (wmma_path && aligned16(out.raw_data()) && bf16_kernel() != Bf16Kernel::Wmma) {
        FwdParams<bf16, LT> p{ptr<bf16>(q), ptr<bf16>(k), ptr<bf16>(v), ptr<bf16>(out), ptr<LT>(lse),
                              Tq, Tk, H, KVH, hd, H / KVH, float(scale) * kLog2e, true};
        auto launch = [&](auto hd_tag) {
          constexpr int HD = decltype(hd_tag)::value;
          constexpr size_t smem = fa2_attn::fwd_smem<HD>();
          set_smem(fa2_attn::fwd_kernel<LT, HD>, smem);
          const dim3 grid(unsigned((Tq + fa2_attn::kFwdBQ - 1) / fa2_attn::kFwdBQ), unsigned(H), unsigned(B));
          fa2_attn::fwd_kernel<LT, HD><<<grid, fa2_attn::kThreads, smem, cuda_rt::stream()>>>(p);
          LB_CUDA_LAUNCH_CHECK("fa2_attn::fwd_kernel");
        };
        if (hd == 64) launch(std::integral_constant<int, 64>{});
        else launch(std::integral_constant<int, 128>{});
        return;
      }
      if (wmma_path) {
        FwdParams<bf16, LT> p{ptr<bf16>(q), ptr<bf16>(k), ptr<bf16>(v), ptr<bf16>(out), ptr<LT>(lse),
                              Tq, Tk, H, KVH, hd, H / KVH, float(scale) * kLog2e, true};
        auto launch = [&](auto hd_tag) {
          constexpr int HD = decltype(hd_tag)::value;
          constexpr size_t smem = wmma_attn::fwd_smem<HD>();
          set_smem(wmma_attn::fwd_kernel<LT, HD>, smem);
          const dim3 grid(unsigned((Tq + wmma_attn::kTile - 1) / wmma_attn::kTile), unsigned(H), unsigned(B));
          wmma_attn::fwd_kernel<LT, HD><<<grid, wmma_attn::kThreadsW, smem, cuda_rt::stream()>>>(p);
          LB_CUDA_LAUNCH_CHECK("wmma_attn::fwd_kernel");
        };
        if (hd == 64) launch(std::integral_constant<int, 64>{});
        else launch(std::integral_constant<int, 128>{});
        return;
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      if (wmma_path) {  // f32 with TF32 allowed
        FwdParams<float, LT> p{ptr<float>(q), ptr<float>(k), ptr<float>(v), ptr<float>(out), ptr<LT>(lse),
                               Tq, Tk, H, KVH, hd, H / KVH, float(scale) * kLog2e, true};
        auto launch = [&](auto hd_tag) {
          constexpr int HD = decltype(hd_tag)::value;
          namespace wt = wmma_tf32_attn;
          constexpr size_t smem = wt::fwd_smem<HD>();
          set_smem(wt::fwd_kernel<LT, HD>, smem);
          const dim3 grid(unsigned((Tq + wt::kTile - 1) / wt::kTile), unsigned(H), unsigned(B));
          wt::fwd_kernel<LT, HD><<<grid, wt::kFwdThreads, smem, cuda_rt::stream()>>>(p);
          LB_CUDA_LAUNCH_CHECK("wmma_tf32_attn::fwd_kernel");
        };
        if (hd == 64) launch(std::integral_constant<int, 64>{});
        else launch(std::integral_constant<int, 128>{});
        return;
      }
    }
    FwdParams<T, LT> p{ptr<T>(q), ptr<T>(k), ptr<T>(v), ptr<T>(out), ptr<LT>(lse),
                       Tq, Tk, H, KVH, hd, H / KVH, float(scale) * kLog2e, vec};
    auto launch = [&](auto hdp_tag) {
      constexpr int HDP = decltype(hdp_tag)::value;
      constexpr size_t smem = fwd_smem_bytes<HDP>();
      set_smem(attn_fwd_kernel<T, LT, HDP>, smem);
      const dim3 grid(unsigned((Tq + kFwdBQ<HDP> - 1) / kFwdBQ<HDP>), unsigned(H), unsigned(B));
      attn_fwd_kernel<T, LT, HDP><<<grid, kThreads, smem, cuda_rt::stream()>>>(p);
      LB_CUDA_LAUNCH_CHECK("attn_fwd_kernel");
    };
    if (hdp == 64) launch(std::integral_constant<int, 64>{});
    else launch(std::integral_constant<int, 128>{});
  });
}

void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, double scale, Tensor& dq, Tensor& dk, Tensor& dv) {
  LB_CUDA_OP("attention_backward");
  const char* op = "attention_backward";
  for (const Tensor* t : TensorList{&dout, &k, &v, &out, &lse, &dq, &dk, &dv}) check_on_gpu(op, *t, "an argument");
  for (const Tensor* t : TensorList{&dout, &out, &dq, &dk, &dv})
    if (t->dtype() != q.dtype() || !t->is_contiguous())
      throw_error(op, ": dout, out, dq, dk, dv must be contiguous ", dtype_name(q.dtype()), ", got ", t->describe());
  if (!lse.is_contiguous()) throw_error(op, ": lse must be contiguous");
  check_dims(op, q, k);
  const int B = int(q.size(0)), Tq = int(q.size(1)), H = int(q.size(2)), hd = int(q.size(3));
  const int Tk = int(k.size(1)), KVH = int(k.size(2));
  if (B == 0 || Tk == 0 || KVH == 0) return;
  const int hdp = head_dim_pad(op, hd);
  const bool vec = vec_ok(hd, q.dtype(), {&q, &k, &v, &dout});
  const bool wmma_path = use_wmma(q, {&q, &k, &v, &dout});
  const int64_t rows = int64_t(B) * Tq * H;
  Tensor D = Tensor::empty({B, H, Tq}, DType::F32, Device::CUDA);
  // bf16 on the FlashAttention-2 kernels: deterministic (dQ by its own kernel, written in bf16) or
  // with dQ atomics into an fp32 buffer (LOWBIT_ATTENTION=fa2-atomic).
  // dq is stored with 16-byte writes, dk / dv with 4-byte ones.
  const bool fa2_aligned = aligned16(dq.raw_data()) && aligned16(dk.raw_data()) && aligned16(dv.raw_data());
  const Bf16Kernel kind = q.dtype() == DType::BF16 && wmma_path ? bf16_kernel() : Bf16Kernel::Wmma;
  const bool fa2 = q.dtype() == DType::BF16 && wmma_path && fa2_aligned && kind != Bf16Kernel::Wmma;
  const bool fa2_det = fa2 && kind == Bf16Kernel::Fa2;
  const bool direct = q.dtype() == DType::F32;  // accumulate dQ in place
  Tensor dq_acc;
  if (!fa2_det) {
    dq_acc = direct ? dq : Tensor::empty(q.shape(), DType::F32, Device::CUDA);
    dq_acc.zero_();
  }
  dispatch_lse(op, q, lse, [&](auto ttag, auto ltag) {
    using T = typename decltype(ttag)::type;
    using LT = typename decltype(ltag)::type;
    if (rows > 0) {
      attn_bwd_dot_kernel<T><<<unsigned((rows * 32 + 255) / 256), 256, 0, cuda_rt::stream()>>>(
          ptr<T>(dout), ptr<T>(out), ptr<float>(D), rows, Tq, H, hd);
      LB_CUDA_LAUNCH_CHECK("attn_bwd_dot_kernel");
    }
    if constexpr (std::is_same_v<T, bf16>) {
      if (fa2) {
        fa2_attn::BwdParams<LT> p{ptr<bf16>(q), ptr<bf16>(k), ptr<bf16>(v), ptr<bf16>(dout), ptr<LT>(lse),
                                  ptr<float>(D), ptr<bf16>(dq), fa2_det ? nullptr : ptr<float>(dq_acc),
                                  ptr<bf16>(dk), ptr<bf16>(dv), Tq, Tk, H, KVH, H / KVH, float(scale),
                                  float(scale) * kLog2e};
        auto launch = [&](auto hd_tag, auto atomic_tag) {
          constexpr int HD = decltype(hd_tag)::value;
          constexpr bool kAtomic = decltype(atomic_tag)::value;
          namespace fa = fa2_attn;
          constexpr size_t smem = fa::dkdv_smem<HD, kAtomic>();
          set_smem(fa::dkdv_kernel<LT, HD, kAtomic>, smem);
          const dim3 grid(unsigned((Tk + fa::kBwdRows - 1) / fa::kBwdRows), unsigned(KVH), unsigned(B));
          fa::dkdv_kernel<LT, HD, kAtomic><<<grid, fa::kThreads, smem, cuda_rt::stream()>>>(p);
          LB_CUDA_LAUNCH_CHECK("fa2_attn::dkdv_kernel");
          if constexpr (!kAtomic) {
            if (Tq > 0 && H > 0) {
              constexpr size_t qsmem = fa::dq_smem<HD>();
              set_smem(fa::dq_kernel<LT, HD>, qsmem);
              const dim3 qgrid(unsigned((Tq + fa::kBwdRows - 1) / fa::kBwdRows), unsigned(H), unsigned(B));
              fa::dq_kernel<LT, HD><<<qgrid, fa::kThreads, qsmem, cuda_rt::stream()>>>(p);
              LB_CUDA_LAUNCH_CHECK("fa2_attn::dq_kernel");
            }
          }
        };
        using I64 = std::integral_constant<int, 64>;
        using I128 = std::integral_constant<int, 128>;
        if (fa2_det) {
          if (hd == 64) launch(I64{}, std::false_type{});
          else launch(I128{}, std::false_type{});
          return;  // dq written in bf16 by dq_kernel
        }
        if (hd == 64) launch(I64{}, std::true_type{});
        else launch(I128{}, std::true_type{});
        if (dq.numel() > 0) {
          f32_to_kernel<bf16><<<grid_for(dq.numel(), 256), 256, 0, cuda_rt::stream()>>>(ptr<float>(dq_acc),
                                                                                       ptr<bf16>(dq), dq.numel());
          LB_CUDA_LAUNCH_CHECK("f32_to_kernel");
        }
        return;
      }
    }
    BwdParams<T, LT> p{ptr<T>(q),  ptr<T>(k),  ptr<T>(v),  ptr<T>(dout), ptr<LT>(lse), ptr<float>(D),
                       ptr<float>(dq_acc), ptr<T>(dk), ptr<T>(dv), Tq, Tk, H, KVH, hd, H / KVH,
                       float(scale), float(scale) * kLog2e, vec};
    bool done = false;
    if constexpr (std::is_same_v<T, bf16>) {
      if (wmma_path) {
        auto launch_w = [&](auto hd_tag) {
          constexpr int HD = decltype(hd_tag)::value;
          constexpr size_t smem = wmma_attn::bwd_smem<HD>();
          set_smem(wmma_attn::bwd_kernel<LT, HD>, smem);
          const dim3 grid(unsigned((Tk + wmma_attn::kTile - 1) / wmma_attn::kTile), unsigned(KVH), unsigned(B));
          wmma_attn::bwd_kernel<LT, HD><<<grid, wmma_attn::kThreadsW, smem, cuda_rt::stream()>>>(p);
          LB_CUDA_LAUNCH_CHECK("wmma_attn::bwd_kernel");
        };
        if (hd == 64) launch_w(std::integral_constant<int, 64>{});
        else launch_w(std::integral_constant<int, 128>{});
        done = true;
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      if (wmma_path) {  // f32 with TF32 allowed
        auto launch_t = [&](auto hd_tag) {
          constexpr int HD = decltype(hd_tag)::value;
          namespace wt = wmma_tf32_attn;
          constexpr size_t smem = wt::bwd_smem<HD>();
          set_smem(wt::bwd_kernel<LT, HD>, smem);
          const dim3 grid(unsigned((Tk + wt::kTile - 1) / wt::kTile), unsigned(KVH), unsigned(B));
          wt::bwd_kernel<LT, HD><<<grid, wt::kBwdThreads, smem, cuda_rt::stream()>>>(p);
          LB_CUDA_LAUNCH_CHECK("wmma_tf32_attn::bwd_kernel");
        };
        if (hd == 64) launch_t(std::integral_constant<int, 64>{});
        else launch_t(std::integral_constant<int, 128>{});
        done = true;
      }
    }
    auto launch = [&](auto hdp_tag) {
      constexpr int HDP = decltype(hdp_tag)::value;
      constexpr size_t smem = bwd_smem_bytes<HDP>();
      set_smem(attn_bwd_kernel<T, LT, HDP>, smem);
      const dim3 grid(unsigned((Tk + kBwdBK<HDP> - 1) / kBwdBK<HDP>), unsigned(KVH), unsigned(B));
      attn_bwd_kernel<T, LT, HDP><<<grid, kThreads, smem, cuda_rt::stream()>>>(p);
      LB_CUDA_LAUNCH_CHECK("attn_bwd_kernel");
    };
    if (!done) {
      if (hdp == 64) launch(std::integral_constant<int, 64>{});
      else launch(std::integral_constant<int, 128>{});
    }
    if (!direct && dq.numel() > 0) {
      f32_to_kernel<T><<<grid_for(dq.numel(), 256), 256, 0, cuda_rt::stream()>>>(ptr<float>(dq_acc), ptr<T>(dq),
                                                                                  dq.numel());
      LB_CUDA_LAUNCH_CHECK("f32_to_kernel");
    }
  });
}

}  // namespace lowbit::ops::cuda
