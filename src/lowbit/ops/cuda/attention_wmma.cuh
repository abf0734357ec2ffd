// Tensor-core attention for bf16, head_dim 64 or 128 (included by attention.cu).
//
// Same algorithm as the fp32 kernels in attention.cu, with the five matrix products on tensor
// cores through WMMA (bf16 m16n16k16, fp32 accumulation). 128 threads = 4 warps; warp w owns rows
// 16w..16w+15 of every 64-row tile, so the softmax / dS steps between products need only warp
// synchronisation. WMMA fragments have an unspecified element layout, so element-wise work
// (masking, online softmax, P and dS) goes through fp32 tiles in shared memory; P and dS are
// rounded to bf16 for the following products, as in FlashAttention-2.
//  * Forward: per block 64 queries; per key tile S = Q K^T (fp32, smem), online softmax by two
//    lanes per row, O (fp32, smem) rescaled by the row's 2^(m_old - m_new), then O += P V
//    accumulated by loading O as the accumulator fragment.
//  * Backward: per block 64 keys of one kv head; dK and dV stay in accumulator fragments (no
//    rescaling is needed there); per query tile S^T = K Q^T and dP^T = V dO^T, P^T and dS^T to
//    bf16, dV += P^T dO, dK += dS^T Q, and dQ = dS K staged in smem and added with fp32 atomics.
// Shared-memory rows of bf16 tiles are padded by 8 elements (16 bytes), fp32 tiles by 4: this
// keeps each fragment pointer 32-byte aligned as WMMA requires and spreads rows over banks.
#pragma once
#include <mma.h>

namespace lowbit::ops::cuda::wmma_attn {

using namespace nvcuda;
using detail::bf16;

constexpr int kWarps = 4, kThreadsW = 128, kTile = 64;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragAT = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// 64 rows of hd = HD bf16 values (row r at src + r * rs) into smem [64][HD + 8]; rows >= nrows -> 0.
template <int HD>
__device__ __forceinline__ void load_rows(bf16* dst, const bf16* src, int64_t rs, int r0, int nrows) {
  constexpr int V = HD / 8, LD = HD + 8;  // 16-byte vectors per row
  for (int idx = threadIdx.x; idx < kTile * V; idx += kThreadsW) {
    const int r = idx / V, c = (idx % V) * 8, row = r0 + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row < nrows) v = *reinterpret_cast<const uint4*>(src + int64_t(row) * rs + c);
    *reinterpret_cast<uint4*>(dst + r * LD + c) = v;
  }
}

template <int HD>
constexpr size_t fwd_smem() {
  return size_t(3 * kTile * (HD + 8)) * 2 + size_t(kTile * (kTile + 4)) * 4 + size_t(kTile * (kTile + 8)) * 2 +
         size_t(kTile * (HD + 4)) * 4;
}

template <class LT, int HD>
__global__ void __launch_bounds__(kThreadsW) fwd_kernel(attn_detail::FwdParams<bf16, LT> p) {
  constexpr int LDH = HD + 8, LDS = kTile + 4, LDP = kTile + 8, LDO = HD + 4;
  extern __shared__ float4 smem4[];
  bf16* sQ = reinterpret_cast<bf16*>(smem4);
  bf16* sK = sQ + kTile * LDH;
  bf16* sV = sK + kTile * LDH;
  float* sS = reinterpret_cast<float*>(sV + kTile * LDH);
  bf16* sP = reinterpret_cast<bf16*>(sS + kTile * LDS);
  float* sO = reinterpret_cast<float*>(sP + kTile * LDP);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kTile;
  const int h = blockIdx.y, b = blockIdx.z, kh = h / p.group;
  const int off = p.Tk - p.Tq;
  const int64_t qs = int64_t(p.H) * HD, ks = int64_t(p.KVH) * HD;
  const bf16* kb = p.k + (int64_t(b) * p.Tk * p.KVH + kh) * HD;
  const bf16* vb = p.v + (int64_t(b) * p.Tk * p.KVH + kh) * HD;
  load_rows<HD>(sQ, p.q + (int64_t(b) * p.Tq * p.H + h) * HD, qs, q0, p.Tq);
  for (int i = threadIdx.x; i < kTile * LDO; i += kThreadsW) sO[i] = 0.f;
  // Two lanes per row: row 16 warp + lane / 2, columns (lane & 1) * 32 .. + 32 of S / of O.
  const int lrow = 16 * warp + (lane >> 1), half = lane & 1;
  const int qpos = off + q0 + lrow;
  float m = -INFINITY, l = 0.f;
  const int kend = min(p.Tk, off + q0 + kTile);
  for (int k0 = 0; k0 < kend; k0 += kTile) {
    __syncthreads();
    load_rows<HD>(sK, kb, ks, k0, p.Tk);
    load_rows<HD>(sV, vb, ks, k0, p.Tk);
    __syncthreads();
    // S (16 x 64 per warp) = Q K^T.
#pragma unroll
    for (int j = 0; j < kTile / 16; ++j) {
      FragC acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int k = 0; k < HD / 16; ++k) {
        FragA a;
        FragBT bt;
        wmma::load_matrix_sync(a, sQ + 16 * warp * LDH + 16 * k, LDH);
        wmma::load_matrix_sync(bt, sK + 16 * j * LDH + 16 * k, LDH);
        wmma::mma_sync(acc, a, bt, acc);
      }
      wmma::store_matrix_sync(sS + 16 * warp * LDS + 16 * j, acc, LDS, wmma::mem_row_major);
    }
    __syncwarp();
    // Online softmax on this lane's 32 scores of its row.
    float* srow = sS + lrow * LDS + half * 32;
    float mx = -INFINITY;
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const int key = k0 + half * 32 + c;
      const float s = (key < p.Tk && key <= qpos) ? srow[c] * p.scale_log2 : -INFINITY;
      srow[c] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float mnew = fmaxf(m, mx);
    const float base = mnew == -INFINITY ? 0.f : mnew;
    const float alpha = exp2f(m - base);
    float rs = 0.f;
    bf16* prow = sP + lrow * LDP + half * 32;
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const float e = exp2f(srow[c] - base);
      const bf16 eb = __float2bfloat16_rn(e);
      prow[c] = eb;
      rs += __bfloat162float(eb);  // normalise by what the P V product actually uses
    }
    rs += __shfl_xor_sync(0xffffffffu, rs, 1);
    l = l * alpha + rs;
    m = mnew;
    float* orow = sO + lrow * LDO + half * (HD / 2);
#pragma unroll 8
    for (int c = 0; c < HD / 2; ++c) orow[c] *= alpha;
    __syncwarp();
    // O (16 x HD per warp) += P V.
#pragma unroll
    for (int d = 0; d < HD / 16; ++d) {
      FragC acc;
      wmma::load_matrix_sync(acc, sO + 16 * warp * LDO + 16 * d, LDO, wmma::mem_row_major);
#pragma unroll
      for (int k = 0; k < kTile / 16; ++k) {
        FragA a;
        FragB bv;
        wmma::load_matrix_sync(a, sP + 16 * warp * LDP + 16 * k, LDP);
        wmma::load_matrix_sync(bv, sV + 16 * k * LDH + 16 * d, LDH);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(sO + 16 * warp * LDO + 16 * d, acc, LDO, wmma::mem_row_major);
    }
    __syncwarp();
  }
  const int row = q0 + lrow;
  if (row < p.Tq) {
    const float inv = l > 0.f ? 1.f / l : 0.f;
    bf16* dst = p.out + ((int64_t(b) * p.Tq + row) * p.H + h) * HD + half * (HD / 2);
    const float* orow = sO + lrow * LDO + half * (HD / 2);
    for (int c = 0; c < HD / 2; ++c) dst[c] = __float2bfloat16_rn(orow[c] * inv);
    if (half == 0) p.lse[(int64_t(b) * p.H + h) * p.Tq + row] = detail::from_f<LT>((m + log2f(l)) * attn_detail::kLn2);
  }
}

template <int HD>
constexpr size_t bwd_smem() {
  // sK, sV, sQ, sdO (bf16) + sS, sdP (fp32, later reused for dQ / dK / dV staging) + P^T, dS^T
  // (bf16) + lse, D.
  return size_t(4 * kTile * (HD + 8)) * 2 + size_t(2 * kTile * (kTile + 4)) * 4 + size_t(2 * kTile * (kTile + 8)) * 2 +
         size_t(2 * kTile) * 4;
}

template <class LT, int HD>
__global__ void __launch_bounds__(kThreadsW) bwd_kernel(attn_detail::BwdParams<bf16, LT> p) {
  constexpr int LDH = HD + 8, LDS = kTile + 4, LDP = kTile + 8, LDO = HD + 4;
  static_assert(2 * kTile * LDS >= kTile * LDO, "staging tile must fit in the S / dP area");
  extern __shared__ float4 smem4[];
  bf16* sK = reinterpret_cast<bf16*>(smem4);
  bf16* sV = sK + kTile * LDH;
  bf16* sQ = sV + kTile * LDH;
  bf16* sO = sQ + kTile * LDH;  // dO
  float* sS = reinterpret_cast<float*>(sO + kTile * LDH);  // S^T [key][query]
  float* sdP = sS + kTile * LDS;                           // dP^T
  float* sStage = sS;                                      // [64][HD + 4] fp32, after P / dS are formed
  bf16* sPt = reinterpret_cast<bf16*>(sdP + kTile * LDS);
  bf16* sdSt = sPt + kTile * LDP;
  float* sL = reinterpret_cast<float*>(sdSt + kTile * LDP);
  float* sD = sL + kTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int k0 = blockIdx.x * kTile, kh = blockIdx.y, b = blockIdx.z;
  const int off = p.Tk - p.Tq;
  const int64_t qs = int64_t(p.H) * HD, ks = int64_t(p.KVH) * HD;
  load_rows<HD>(sK, p.k + (int64_t(b) * p.Tk * p.KVH + kh) * HD, ks, k0, p.Tk);
  load_rows<HD>(sV, p.v + (int64_t(b) * p.Tk * p.KVH + kh) * HD, ks, k0, p.Tk);
  FragC dk[HD / 16], dv[HD / 16];
#pragma unroll
  for (int d = 0; d < HD / 16; ++d) {
    wmma::fill_fragment(dk[d], 0.f);
    wmma::fill_fragment(dv[d], 0.f);
  }
  const int lrow = 16 * warp + (lane >> 1), half = lane & 1;  // element-wise work: 2 lanes per key row
  const int key = k0 + lrow;
  const int qfirst = (max(0, k0 - off) / kTile) * kTile;
  for (int hh = 0; hh < p.group; ++hh) {
    const int h = kh * p.group + hh;
    const bf16* qb = p.q + (int64_t(b) * p.Tq * p.H + h) * HD;
    const bf16* ob = p.dout + (int64_t(b) * p.Tq * p.H + h) * HD;
    const int64_t lbase = (int64_t(b) * p.H + h) * p.Tq;
    for (int q0 = qfirst; q0 < p.Tq; q0 += kTile) {
      __syncthreads();
      load_rows<HD>(sQ, qb, qs, q0, p.Tq);
      load_rows<HD>(sO, ob, qs, q0, p.Tq);
      for (int i = threadIdx.x; i < kTile; i += kThreadsW) {
        const int row = q0 + i;
        sL[i] = row < p.Tq ? detail::to_f(p.lse[lbase + row]) * attn_detail::kLog2e : 0.f;
        sD[i] = row < p.Tq ? p.D[lbase + row] : 0.f;
      }
      __syncthreads();
      // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys.
#pragma unroll
      for (int j = 0; j < kTile / 16; ++j) {
        FragC s, dp;
        wmma::fill_fragment(s, 0.f);
        wmma::fill_fragment(dp, 0.f);
#pragma unroll
        for (int k = 0; k < HD / 16; ++k) {
          FragA a;
          FragBT bt;
          wmma::load_matrix_sync(a, sK + 16 * warp * LDH + 16 * k, LDH);
          wmma::load_matrix_sync(bt, sQ + 16 * j * LDH + 16 * k, LDH);
          wmma::mma_sync(s, a, bt, s);
          wmma::load_matrix_sync(a, sV + 16 * warp * LDH + 16 * k, LDH);
          wmma::load_matrix_sync(bt, sO + 16 * j * LDH + 16 * k, LDH);
          wmma::mma_sync(dp, a, bt, dp);
        }
        wmma::store_matrix_sync(sS + 16 * warp * LDS + 16 * j, s, LDS, wmma::mem_row_major);
        wmma::store_matrix_sync(sdP + 16 * warp * LDS + 16 * j, dp, LDS, wmma::mem_row_major);
      }
      __syncwarp();
      // P^T = exp(S - lse) (masked), dS^T = P^T (dP^T - D), both to bf16.
      {
        const float* srow = sS + lrow * LDS + half * 32;
        const float* dprow = sdP + lrow * LDS + half * 32;
        bf16* prow = sPt + lrow * LDP + half * 32;
        bf16* dsrow = sdSt + lrow * LDP + half * 32;
#pragma unroll 8
        for (int c = 0; c < 32; ++c) {
          const int qc = half * 32 + c, qi = q0 + qc;
          const bool ok = key < p.Tk && qi < p.Tq && key <= off + qi;
          const float pr = ok ? exp2f(srow[c] * p.scale_log2 - sL[qc]) : 0.f;
          prow[c] = __float2bfloat16_rn(pr);
          dsrow[c] = __float2bfloat16_rn(pr * (dprow[c] - sD[qc]));
        }
      }
      __syncwarp();
      // dV += P^T dO, dK += dS^T Q.
#pragma unroll
      for (int d = 0; d < HD / 16; ++d)
#pragma unroll
        for (int k = 0; k < kTile / 16; ++k) {
          FragA a;
          FragB bm;
          wmma::load_matrix_sync(a, sPt + 16 * warp * LDP + 16 * k, LDP);
          wmma::load_matrix_sync(bm, sO + 16 * k * LDH + 16 * d, LDH);
          wmma::mma_sync(dv[d], a, bm, dv[d]);
          wmma::load_matrix_sync(a, sdSt + 16 * warp * LDP + 16 * k, LDP);
          wmma::load_matrix_sync(bm, sQ + 16 * k * LDH + 16 * d, LDH);
          wmma::mma_sync(dk[d], a, bm, dk[d]);
        }
      __syncthreads();  // every warp's dS^T rows are written; S / dP are no longer read
      // dQ rows 16 warp.. of the tile = dS K (dS read transposed from dS^T), staged, then atomics.
#pragma unroll
      for (int d = 0; d < HD / 16; ++d) {
        FragC acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int k = 0; k < kTile / 16; ++k) {
          FragAT at;
          FragB bk;
          wmma::load_matrix_sync(at, sdSt + 16 * k * LDP + 16 * warp, LDP);
          wmma::load_matrix_sync(bk, sK + 16 * k * LDH + 16 * d, LDH);
          wmma::mma_sync(acc, at, bk, acc);
        }
        wmma::store_matrix_sync(sStage + 16 * warp * LDO + 16 * d, acc, LDO, wmma::mem_row_major);
      }
      __syncwarp();
      for (int r = 0; r < 16; ++r) {
        const int qi = q0 + 16 * warp + r;
        if (qi >= p.Tq) break;
        float* dst = p.dq + ((int64_t(b) * p.Tq + qi) * p.H + h) * HD;
        const float* src = sStage + (16 * warp + r) * LDO;
        for (int c = lane; c < HD; c += 32) atomicAdd(dst + c, src[c] * p.scale);
      }
    }
  }
  // dK (scaled) and dV out through the staging tile (each warp its own 16 rows).
  __syncthreads();
  for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
    for (int d = 0; d < HD / 16; ++d)
      wmma::store_matrix_sync(sStage + 16 * warp * LDO + 16 * d, pass == 0 ? dk[d] : dv[d], LDO, wmma::mem_row_major);
    __syncwarp();
    bf16* out = pass == 0 ? p.dk : p.dv;
    const float sc = pass == 0 ? p.scale : 1.f;
    for (int r = 0; r < 16; ++r) {
      const int kr = k0 + 16 * warp + r;
      if (kr >= p.Tk) break;
      bf16* dst = out + ((int64_t(b) * p.Tk + kr) * p.KVH + kh) * HD;
      const float* src = sStage + (16 * warp + r) * LDO;
      for (int c = lane; c < HD; c += 32) dst[c] = __float2bfloat16_rn(src[c] * sc);
    }
    __syncwarp();
  }
}

}  // namespace lowbit::ops::cuda::wmma_attn
