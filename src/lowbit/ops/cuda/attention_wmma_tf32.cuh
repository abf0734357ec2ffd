// Tensor-core attention for f32 inputs when TF32 is allowed (cuda_rt::allow_tf32()), head_dim 64
// or 128 (included by attention.cu).
//
// Same algorithm as the bf16 kernels in attention_wmma.cuh (and the fp32 ones in attention.cu): f32
// inputs and outputs, f32 softmax, f32 accumulation, the same out / lse layout; the five matrix
// products run on tensor cores through WMMA in TF32 (m16n16k8, fp32 accumulation). TF32 keeps 10
// explicit mantissa bits (unit roundoff 2^-11), as cuBLAS's TF32 GEMMs do (gemm.cu).
//
// TF32 rounding. WMMA's TF32 operands are f32 values that have been through wmma::__float_to_tf32
// (cvt.rna.tf32.f32, round to nearest). Every shared-memory tile that feeds a product is rounded
// in shared memory before the barrier that publishes it (Q, K, V, dO right after they land; P and
// dS as they are formed), so the fragments loaded from it hold exactly the values the per-element
// conversion loop of the CUDA docs would produce. Doing it once per block instead of after every
// fragment load avoids 4-8x repeated conversions (each warp loads every K / V / Q / dO tile; the
// conversion is 3 instructions per element on sm_90). The softmax statistics, D = rowsum(dO O),
// the row sums l (of the rounded P, which is what the P V product uses) and all accumulators stay
// f32.
//
// Shared memory is f32, rows padded by 4 floats (ldm = HD + 4 or 64 + 4, a multiple of 4 as TF32
// WMMA requires; the padding spreads the rows of a fragment over banks). Every fragment pointer is
// a multiple of 8 floats (32 bytes) from the start of dynamic shared memory.
//
//  * Forward, 128 threads = 4 warps per (64 queries, head, batch); warp w owns query rows
//    16w..16w+15. Q is loaded once into TF32 A fragments (registers: HD / 8 fragments) and O stays
//    in fp32 accumulator fragments (HD / 16) for the whole key loop; the Q tile's shared memory then
//    holds each warp's S / P rows [16][68]. Per 64-key tile: S = Q K^T, stored; online softmax on
//    it in place (two lanes per row, interleaved columns), P TF32-rounded; O's elements are
//    rescaled by their row's 2^(m_old - m_new) (the row of each accumulator element is read off
//    once, see erow below); O += P V. K and V tiles arrive by cp.async, each one phase ahead
//    (K(t+1) during the softmax and P V of tile t, V(t+1) during S of tile t+1). Shared memory:
//    sQ/S + sK + sV [64][HD + 4] + one float per row
//      HD 128: 101,632 B (99.25 KB: two blocks per H100 SM);  HD 64: 52,480 B (51.25 KB: three).
//  * Backward, 256 threads = 8 warps per (64 keys, kv head, batch), looping over the heads of the
//    group and the 64-query tiles that see the keys. Warp w = (kr, dh) with kr = w % 4, dh = w / 4:
//    S^T = K Q^T and dP^T = V dO^T for keys 16kr.. x queries 32dh..32dh+31; P^T = exp(S - lse) and
//    dS^T = P^T (dP^T - D) formed in place in those tiles (lanes across queries, no reductions);
//    dV += P^T dO and dK += dS^T Q for keys 16kr.. x head-dim columns (HD/2) dh.. in accumulator
//    fragments held for the whole block (HD / 16 fragments per warp); dQ = dS K for queries
//    16kr.. x columns (HD/2) dh.., staged in shared memory over the S / dP tiles and added to the
//    fp32 dq buffer with atomics, exactly as the bf16 path does. The next tile's Q, dO, lse and D
//    arrive by cp.async during the dQ product and atomics. Shared memory: sK, sV, sQ, sdO
//    [64][HD + 4] + S^T, dP^T [64][68] + lse, D [64]:
//      HD 128: 170,496 B (166.5 KB: one block = 8 warps per SM);  HD 64: 104,960 B (102.5 KB: two).
//    Eight warps rather than the bf16 kernel's four keep eight warps per SM at HD 128, where the
//    f32 tiles allow only one block.
// Measured on an H100 (B 1, T 2048, 32 heads, head_dim 128, bench_gpu_block --tf32 --profile):
// forward 1.56 -> 0.83 ms, backward 4.25 -> 1.81 ms against the fp32 CUDA-core kernels; ncu
// shows about 25% tensor-pipe activity, the rest mostly the shared-memory fragment loads and their
// address arithmetic that WMMA's m16n16k8 TF32 shape implies (raw mma.sync m16n8k8 with
// register-resident S / P would be the next step).
#pragma once
#include <mma.h>

namespace lowbit::ops::cuda::wmma_tf32_attn {

using namespace nvcuda;

constexpr int kTile = 64;
constexpr int kFwdThreads = 128;  // 4 warps
constexpr int kBwdThreads = 256;  // 8 warps
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragAT = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

__device__ __forceinline__ float tf32(float x) { return wmma::__float_to_tf32(x); }

// Fragment loads / stores in the shared state space. They are the PTX instructions that
// wmma::load_matrix_sync / store_matrix_sync issue (same shapes, layouts and fragment element
// mapping), with `.shared` and a 32-bit address: the API's generic-address forms compile to generic
// loads (LD.E, 64-bit address arithmetic, waited on like global loads), which ncu showed dominating
// the stalls of these kernels. LDM counts elements, as in the API; as an immediate it lets ptxas
// fold the per-element offsets into the load instructions. `volatile` + "memory" keep them
// ordered with the plain shared-memory accesses and barriers around them.
__device__ __forceinline__ unsigned saddr(const float* p) { return unsigned(__cvta_generic_to_shared(p)); }
#define LB_WMMA_TF32_LOAD_AB(NAME, FRAG, OP)                                                              \
  template <int LDM>                                                                                      \
  __device__ __forceinline__ void NAME(FRAG& f, const float* p) {                                         \
    unsigned r0, r1, r2, r3;                                                                              \
    asm volatile("wmma.load." OP ".m16n16k8.shared.tf32 {%0, %1, %2, %3}, [%4], %5;"                      \
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)                                                 \
                 : "r"(saddr(p)), "n"(LDM)                                                                \
                 : "memory");                                                                             \
    f.x[0] = __uint_as_float(r0);                                                                         \
    f.x[1] = __uint_as_float(r1);                                                                         \
    f.x[2] = __uint_as_float(r2);                                                                         \
    f.x[3] = __uint_as_float(r3);                                                                         \
  }
LB_WMMA_TF32_LOAD_AB(load_a, FragA, "a.sync.aligned.row")
LB_WMMA_TF32_LOAD_AB(load_a, FragAT, "a.sync.aligned.col")
LB_WMMA_TF32_LOAD_AB(load_b, FragB, "b.sync.aligned.row")
LB_WMMA_TF32_LOAD_AB(load_b, FragBT, "b.sync.aligned.col")
#undef LB_WMMA_TF32_LOAD_AB
template <int LDM>
__device__ __forceinline__ void load_c(FragC& f, const float* p) {  // row-major
  asm volatile(
      "wmma.load.c.sync.aligned.row.m16n16k8.shared.f32 {%0, %1, %2, %3, %4, %5, %6, %7}, [%8], %9;"
      : "=f"(f.x[0]), "=f"(f.x[1]), "=f"(f.x[2]), "=f"(f.x[3]), "=f"(f.x[4]), "=f"(f.x[5]), "=f"(f.x[6]), "=f"(f.x[7])
      : "r"(saddr(p)), "n"(LDM)
      : "memory");
}
template <int LDM>
__device__ __forceinline__ void store_c(float* p, const FragC& f) {  // row-major
  asm volatile(
      "wmma.store.d.sync.aligned.row.m16n16k8.shared.f32 [%0], {%1, %2, %3, %4, %5, %6, %7, %8}, %9;"
      :
      : "r"(saddr(p)), "f"(f.x[0]), "f"(f.x[1]), "f"(f.x[2]), "f"(f.x[3]), "f"(f.x[4]), "f"(f.x[5]), "f"(f.x[6]),
        "f"(f.x[7]), "n"(LDM)
      : "memory");
}
static_assert(sizeof(FragA::x) == 4 * sizeof(float) && sizeof(FragAT::x) == 4 * sizeof(float) &&
                  sizeof(FragB::x) == 4 * sizeof(float) && sizeof(FragBT::x) == 4 * sizeof(float) &&
                  sizeof(FragC::x) == 8 * sizeof(float),
              "TF32 m16n16k8 fragments: 4 registers for A / B, 8 for the accumulator");

// 64 rows of HD f32 values (row r at src + r * rs, 16-byte aligned) into smem [64][HD + 4], rounded
// to TF32; rows >= nrows become 0.
template <int HD, int NT>
__device__ __forceinline__ void load_rows(float* dst, const float* src, int64_t rs, int r0, int nrows) {
  constexpr int V = HD / 4, LD = HD + 4;  // float4 vectors per row
  for (int idx = threadIdx.x; idx < kTile * V; idx += NT) {
    const int r = idx / V, c = (idx % V) * 4, row = r0 + r;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row < nrows) {
      v = *reinterpret_cast<const float4*>(src + int64_t(row) * rs + c);
      v = make_float4(tf32(v.x), tf32(v.y), tf32(v.z), tf32(v.w));
    }
    *reinterpret_cast<float4*>(dst + r * LD + c) = v;
  }
}

// The same 64 rows through cp.async (16-byte copies that bypass registers; rows >= nrows are
// zero-filled), so that a tile's load overlaps the products on the previous one. The copy cannot
// round, so once a thread's copies have landed (cp_async_wait) it rounds the very slots it copied
// (round_rows walks the same index space), then the block barrier publishes the tile.
__device__ __forceinline__ void cp_async16(float* dst, const float* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(saddr(dst)),
               "l"(__cvta_generic_to_global(src)), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async4(float* dst, const float* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(saddr(dst)), "l"(__cvta_generic_to_global(src)),
               "r"(valid ? 4 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {  // all but the N most recent groups have landed
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
template <int HD, int NT>
__device__ __forceinline__ void load_rows_async(float* dst, const float* src, int64_t rs, int r0, int nrows) {
  constexpr int V = HD / 4, LD = HD + 4;
  for (int idx = threadIdx.x; idx < kTile * V; idx += NT) {
    const int r = idx / V, c = (idx % V) * 4, row = r0 + r;
    const bool valid = row < nrows;
    cp_async16(dst + r * LD + c, valid ? src + int64_t(row) * rs + c : src, valid);
  }
}
template <int HD, int NT>
__device__ __forceinline__ void round_rows(float* dst, int r0, int nrows) {
  constexpr int V = HD / 4, LD = HD + 4;
  for (int idx = threadIdx.x; idx < kTile * V; idx += NT) {
    const int r = idx / V, c = (idx % V) * 4;
    if (r0 + r >= nrows) break;  // zero-filled (idx only grows, so do the rows)
    float4* q = reinterpret_cast<float4*>(dst + r * LD + c);
    const float4 v = *q;
    *q = make_float4(tf32(v.x), tf32(v.y), tf32(v.z), tf32(v.w));
  }
}

template <int HD>
constexpr size_t fwd_smem() {
  return size_t(3 * kTile * (HD + 4) + kTile) * sizeof(float);
}
static_assert(fwd_smem<128>() == 101632 && fwd_smem<64>() == 52480, "shared-memory sizes quoted above");

template <class LT, int HD>
__global__ void __launch_bounds__(kFwdThreads, HD == 64 ? 3 : 2) fwd_kernel(attn_detail::FwdParams<float, LT> p) {
  constexpr int LDH = HD + 4, LDS = kTile + 4, NK = HD / 8, ND = HD / 16;
  static_assert(LDS <= LDH, "the S tiles must fit in the Q tile");
  extern __shared__ float4 smem4[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* sQ = reinterpret_cast<float*>(smem4);  // Q; then S / P [64][LDS], warp w in rows 16w..
  float* sK = sQ + kTile * LDH;                  // K; at the end, the normalised O rows
  float* sV = sK + kTile * LDH;
  float* sF = sV + kTile * LDH;  // per-row factor: the rescale 2^(m_old - m_new), at the end 1 / l
  float* sSw = sQ + 16 * warp * LDS;  // this warp's S / P rows
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kTile;  // heaviest (latest) query tiles first
  const int h = blockIdx.y, b = blockIdx.z, kh = h / p.group;
  const int off = p.Tk - p.Tq;
  const int64_t qs = int64_t(p.H) * HD, ks = int64_t(p.KVH) * HD;
  const float* kb = p.k + (int64_t(b) * p.Tk * p.KVH + kh) * HD;
  const float* vb = p.v + (int64_t(b) * p.Tk * p.KVH + kh) * HD;
  const int kend = min(p.Tk, off + q0 + kTile);  // keys past the tile's last query are masked for all
  const int ntiles = kend > 0 ? (kend + kTile - 1) / kTile : 0;
  // K and V tiles stream through cp.async: K(t+1) is copied during the softmax and P V of tile t,
  // V(t+1) during the S = Q K^T of tile t+1. Two commit groups per tile (possibly empty) keep the
  // counting uniform: at each wait the two most recent groups are the tile's K / V in order.
  if (ntiles > 0) load_rows_async<HD, kFwdThreads>(sK, kb, ks, 0, p.Tk);
  cp_async_commit();
  if (ntiles > 0) load_rows_async<HD, kFwdThreads>(sV, vb, ks, 0, p.Tk);
  cp_async_commit();
  load_rows<HD, kFwdThreads>(sQ, p.q + (int64_t(b) * p.Tq * p.H + h) * HD, qs, q0, p.Tq);
  __syncthreads();
  // This warp's 16 query rows as A fragments for the whole key loop.
  FragA qf[NK];
#pragma unroll
  for (int k = 0; k < NK; ++k) load_a<LDH>(qf[k], sQ + 16 * warp * LDH + 8 * k);
  __syncthreads();  // every warp holds its Q: the Q tile becomes the S / P tiles
  // Which of the warp's 16 rows each accumulator element sits in. The element mapping of a
  // fragment is unspecified but fixed for its type (and the same for every 16 x 16 tile), so read
  // it off a matrix whose entries are their row numbers. It lets O stay in accumulator fragments:
  // the online-softmax rescale and the final 1 / l multiply element e by its row's factor.
  for (int i = lane; i < 16 * 16; i += 32) sSw[(i >> 4) * LDS + (i & 15)] = float(i >> 4);
  __syncwarp();
  int erow[FragC::num_elements];
  {
    FragC rows;
    load_c<LDS>(rows, sSw);
#pragma unroll
    for (int e = 0; e < FragC::num_elements; ++e) erow[e] = 16 * warp + int(rows.x[e]);
  }
  FragC o[ND];  // O rows 16w.. x columns 16d.. (fp32, unnormalised)
#pragma unroll
  for (int d = 0; d < ND; ++d) wmma::fill_fragment(o[d], 0.f);
  // Two lanes per row: row 16 warp + lane / 2; columns half + 2c (interleaved: 2-way bank conflicts
  // at most with the 68-float row stride, instead of 4-way for contiguous halves).
  const int lrow = 16 * warp + (lane >> 1), half = lane & 1;
  const int qpos = off + q0 + lrow;
  float m = -INFINITY, l = 0.f;
  for (int t = 0; t < ntiles; ++t) {
    const int k0 = t * kTile;
    cp_async_wait<1>();  // K(t) has landed (V(t) may still be in flight)
    round_rows<HD, kFwdThreads>(sK, k0, p.Tk);
    __syncthreads();  // K(t) rounded and visible; the previous tile's P reads are done
    // S (16 x 64 per warp) = Q K^T: four independent accumulators, K^T read as col-major B.
    {
      FragC s[kTile / 16];
#pragma unroll
      for (int j = 0; j < kTile / 16; ++j) wmma::fill_fragment(s[j], 0.f);
#pragma unroll
      for (int k = 0; k < NK; ++k)
#pragma unroll
        for (int j = 0; j < kTile / 16; ++j) {
          FragBT bt;
          load_b<LDH>(bt, sK + 16 * j * LDH + 8 * k);
          wmma::mma_sync(s[j], qf[k], bt, s[j]);
        }
      __syncthreads();  // every warp is done with K(t): copy K(t+1) behind the softmax and P V
      if (t + 1 < ntiles) load_rows_async<HD, kFwdThreads>(sK, kb, ks, k0 + kTile, p.Tk);
      cp_async_commit();
#pragma unroll
      for (int j = 0; j < kTile / 16; ++j) store_c<LDS>(sSw + 16 * j, s[j]);
    }
    __syncwarp();
    // Online softmax on this lane's 32 scores of its row; P (TF32) written in place.
    float* srow = sQ + lrow * LDS + half;
    float mx = -INFINITY;
#pragma unroll 8
    for (int c = 0; c < kTile / 2; ++c) {
      const int key = k0 + 2 * c + half;
      const float sv = (key < p.Tk && key <= qpos) ? srow[2 * c] * p.scale_log2 : -INFINITY;
      srow[2 * c] = sv;
      mx = fmaxf(mx, sv);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float mnew = fmaxf(m, mx);
    const float base = mnew == -INFINITY ? 0.f : mnew;  // fully masked so far: avoid -inf - -inf
    const float alpha = exp2f(m - base);
    float rs = 0.f;
#pragma unroll 8
    for (int c = 0; c < kTile / 2; ++c) {
      const float e = tf32(exp2f(srow[2 * c] - base));
      srow[2 * c] = e;
      rs += e;  // normalise by what the P V product actually uses
    }
    rs += __shfl_xor_sync(0xffffffffu, rs, 1);
    l = l * alpha + rs;
    m = mnew;
    if (half == 0) sF[lrow] = alpha;
    cp_async_wait<1>();  // V(t) has landed (K(t+1) may still be in flight)
    round_rows<HD, kFwdThreads>(sV, k0, p.Tk);
    __syncthreads();  // V(t) rounded and visible (and this warp's sF writes)
    // O = alpha O + P V: k outer (one P fragment at a time), all HD / 16 accumulators inner.
    {
      float ae[FragC::num_elements];
#pragma unroll
      for (int e = 0; e < FragC::num_elements; ++e) ae[e] = sF[erow[e]];
#pragma unroll
      for (int d = 0; d < ND; ++d)
#pragma unroll
        for (int e = 0; e < FragC::num_elements; ++e) o[d].x[e] *= ae[e];
    }
#pragma unroll
    for (int k = 0; k < kTile / 8; ++k) {
      FragA pf;
      load_a<LDS>(pf, sSw + 8 * k);
#pragma unroll
      for (int d = 0; d < ND; ++d) {
        FragB bv;
        load_b<LDH>(bv, sV + 8 * k * LDH + 16 * d);
        wmma::mma_sync(o[d], pf, bv, o[d]);
      }
    }
    __syncthreads();  // every warp is done with V(t): copy V(t+1) behind the next S = Q K^T
    if (t + 1 < ntiles) load_rows_async<HD, kFwdThreads>(sV, vb, ks, k0 + kTile, p.Tk);
    cp_async_commit();
  }
  cp_async_wait<0>();  // only empty groups can be left; keep the block's copy state clean
  const float inv = l > 0.f ? 1.f / l : 0.f;
  if (half == 0 && q0 + lrow < p.Tq)
    p.lse[(int64_t(b) * p.H + h) * p.Tq + q0 + lrow] = detail::from_f<LT>((m + log2f(l)) * attn_detail::kLn2);
  __syncwarp();  // this tile's reads of sF are done
  if (half == 0) sF[lrow] = inv;
  __syncwarp();
  float ie[FragC::num_elements];
#pragma unroll
  for (int e = 0; e < FragC::num_elements; ++e) ie[e] = sF[erow[e]];
  __syncthreads();  // every warp is done with K (no copy into it is pending): the O rows go there
#pragma unroll
  for (int d = 0; d < ND; ++d) {
#pragma unroll
    for (int e = 0; e < FragC::num_elements; ++e) o[d].x[e] *= ie[e];
    store_c<LDH>(sK + 16 * warp * LDH + 16 * d, o[d]);
  }
  __syncwarp();
  // Output row by row (coalesced).
  for (int r = 0; r < 16; ++r) {
    const int row = q0 + 16 * warp + r;
    if (row >= p.Tq) break;
    float* dst = p.out + ((int64_t(b) * p.Tq + row) * p.H + h) * HD;
    const float* src = sK + (16 * warp + r) * LDH;
    for (int c = lane; c < HD; c += 32) dst[c] = src[c];
  }
}

template <int HD>
constexpr size_t bwd_smem() {
  return size_t(4 * kTile * (HD + 4) + 2 * kTile * (kTile + 4) + 2 * kTile) * sizeof(float);
}
static_assert(bwd_smem<128>() == 170496 && bwd_smem<64>() == 104960, "shared-memory sizes quoted above");

template <class LT, int HD>
__global__ void __launch_bounds__(kBwdThreads, HD == 64 ? 2 : 1) bwd_kernel(attn_detail::BwdParams<float, LT> p) {
  constexpr int LDH = HD + 4, LDS = kTile + 4, HH = HD / 2, ND = HH / 16, NK = HD / 8;
  static_assert(2 * kTile * LDS >= kTile * LDH, "staging tile must fit in the S / dP area");
  static_assert(std::is_same_v<LT, float>, "f32 inputs keep lse in f32 (copied raw by cp.async)");
  extern __shared__ float4 smem4[];
  float* sK = reinterpret_cast<float*>(smem4);
  float* sV = sK + kTile * LDH;
  float* sQ = sV + kTile * LDH;
  float* sO = sQ + kTile * LDH;   // dO
  float* sS = sO + kTile * LDH;   // S^T [key][query], then P^T
  float* sdP = sS + kTile * LDS;  // dP^T, then dS^T
  float* sStage = sS;             // [64][HD + 4] fp32 over S / dP, once P / dS are consumed
  float* sL = sdP + kTile * LDS;  // lse (natural log, as stored) of the tile's queries
  float* sD = sL + kTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // kr: 16-row block (keys for S / dP / dK / dV, queries for dQ); dh: half of the queries for
  // S / dP, half of head_dim for dK / dV / dQ.
  const int kr = warp & 3, dh = warp >> 2;
  const int k0 = blockIdx.x * kTile, kh = blockIdx.y, b = blockIdx.z;
  const int off = p.Tk - p.Tq;
  const int64_t qs = int64_t(p.H) * HD, ks = int64_t(p.KVH) * HD;
  FragC dk[ND], dv[ND];
#pragma unroll
  for (int d = 0; d < ND; ++d) {
    wmma::fill_fragment(dk[d], 0.f);
    wmma::fill_fragment(dv[d], 0.f);
  }
  const int qfirst = (max(0, k0 - off) / kTile) * kTile;  // first query tile that sees key k0
  const int qc = 32 * dh + lane;                          // element-wise work: this lane's query column
  // Tiles t = (head of the group, query tile) in order; Q, dO, lse and D of tile t+1 are copied
  // with cp.async while tile t computes dQ and adds it (one commit group per tile).
  const int nq = (p.Tq - qfirst + kTile - 1) / kTile, ntiles = p.group * nq;
  auto issue = [&](int t) {
    const int h = kh * p.group + t / nq, q0 = qfirst + (t % nq) * kTile;
    const int64_t lbase = (int64_t(b) * p.H + h) * p.Tq;
    load_rows_async<HD, kBwdThreads>(sQ, p.q + (int64_t(b) * p.Tq * p.H + h) * HD, qs, q0, p.Tq);
    load_rows_async<HD, kBwdThreads>(sO, p.dout + (int64_t(b) * p.Tq * p.H + h) * HD, qs, q0, p.Tq);
    if (threadIdx.x < kTile) {
      const int row = q0 + int(threadIdx.x);
      const bool valid = row < p.Tq;
      cp_async4(sL + threadIdx.x, valid ? p.lse + lbase + row : p.lse, valid);
      cp_async4(sD + threadIdx.x, valid ? p.D + lbase + row : p.D, valid);
    }
  };
  if (ntiles > 0) issue(0);
  cp_async_commit();
  // This block's K and V (TF32-rounded), while the first tile's copies fly.
  load_rows<HD, kBwdThreads>(sK, p.k + (int64_t(b) * p.Tk * p.KVH + kh) * HD, ks, k0, p.Tk);
  load_rows<HD, kBwdThreads>(sV, p.v + (int64_t(b) * p.Tk * p.KVH + kh) * HD, ks, k0, p.Tk);
  for (int t = 0; t < ntiles; ++t) {
    {
      const int h = kh * p.group + t / nq, q0 = qfirst + (t % nq) * kTile;
      cp_async_wait<0>();  // this tile's Q, dO, lse, D have landed
      round_rows<HD, kBwdThreads>(sQ, q0, p.Tq);
      round_rows<HD, kBwdThreads>(sO, q0, p.Tq);
      __syncthreads();  // Q, dO, lse, D visible; the previous tile's staging reads are done
      // S^T = K Q^T and dP^T = V dO^T: keys 16kr.. x queries 32dh..32dh+31 (two fragments each).
      {
        FragC s[2], dp[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::fill_fragment(s[j], 0.f);
          wmma::fill_fragment(dp[j], 0.f);
        }
#pragma unroll
        for (int k = 0; k < NK; ++k) {
          FragA ak, av;
          load_a<LDH>(ak, sK + 16 * kr * LDH + 8 * k);
          load_a<LDH>(av, sV + 16 * kr * LDH + 8 * k);
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            FragBT bq, bo;
            load_b<LDH>(bq, sQ + (32 * dh + 16 * j) * LDH + 8 * k);
            wmma::mma_sync(s[j], ak, bq, s[j]);
            load_b<LDH>(bo, sO + (32 * dh + 16 * j) * LDH + 8 * k);
            wmma::mma_sync(dp[j], av, bo, dp[j]);
          }
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          store_c<LDS>(sS + 16 * kr * LDS + 32 * dh + 16 * j, s[j]);
          store_c<LDS>(sdP + 16 * kr * LDS + 32 * dh + 16 * j, dp[j]);
        }
      }
      __syncwarp();
      // P^T = exp(S - lse) (masked) and dS^T = P^T (dP^T - D), TF32-rounded, in place: this lane
      // takes query column qc of the warp's 16 key rows (a row of the warp's accesses is 32
      // consecutive floats: no bank conflicts).
      {
        const int qi = q0 + qc;
        const float lq = sL[qc] * attn_detail::kLog2e, dd = sD[qc];  // lse in base 2
#pragma unroll 4
        for (int r = 0; r < 16; ++r) {
          const int key = k0 + 16 * kr + r;
          const bool ok = key < p.Tk && qi < p.Tq && key <= off + qi;
          const int i = (16 * kr + r) * LDS + qc;
          const float pr = ok ? exp2f(sS[i] * p.scale_log2 - lq) : 0.f;
          sS[i] = tf32(pr);
          sdP[i] = tf32(pr * (sdP[i] - dd));
        }
      }
      __syncthreads();  // full rows of P^T / dS^T (both query halves) and every key's dS^T are formed
      // dV += P^T dO and dK += dS^T Q: keys 16kr.. x head-dim columns HH dh.. (queries in steps of 8).
#pragma unroll
      for (int k = 0; k < kTile / 8; ++k) {
        FragA ap, ads;
        load_a<LDS>(ap, sS + 16 * kr * LDS + 8 * k);
        load_a<LDS>(ads, sdP + 16 * kr * LDS + 8 * k);
#pragma unroll
        for (int d = 0; d < ND; ++d) {
          FragB bo, bq;
          load_b<LDH>(bo, sO + 8 * k * LDH + HH * dh + 16 * d);
          wmma::mma_sync(dv[d], ap, bo, dv[d]);
          load_b<LDH>(bq, sQ + 8 * k * LDH + HH * dh + 16 * d);
          wmma::mma_sync(dk[d], ads, bq, dk[d]);
        }
      }
      __syncthreads();  // every warp is done with Q, dO, lse, D: copy the next tile's behind dQ
      if (t + 1 < ntiles) issue(t + 1);
      cp_async_commit();
      // dQ = dS K: queries 16kr.. x head-dim columns HH dh.. (keys in steps of 8); dS is read
      // transposed from dS^T (col-major A).
      FragC dqf[ND];
#pragma unroll
      for (int d = 0; d < ND; ++d) wmma::fill_fragment(dqf[d], 0.f);
#pragma unroll
      for (int k = 0; k < kTile / 8; ++k) {
        FragAT at;
        load_a<LDS>(at, sdP + 8 * k * LDS + 16 * kr);
#pragma unroll
        for (int d = 0; d < ND; ++d) {
          FragB bk;
          load_b<LDH>(bk, sK + 8 * k * LDH + HH * dh + 16 * d);
          wmma::mma_sync(dqf[d], at, bk, dqf[d]);
        }
      }
      __syncthreads();  // P^T / dS^T are no longer read by any warp: stage dQ over them
#pragma unroll
      for (int d = 0; d < ND; ++d)
        store_c<LDH>(sStage + 16 * kr * LDH + HH * dh + 16 * d, dqf[d]);
      __syncwarp();
      for (int r = 0; r < 16; ++r) {
        const int qi = q0 + 16 * kr + r;
        if (qi >= p.Tq) break;
        float* dst = p.dq + ((int64_t(b) * p.Tq + qi) * p.H + h) * HD + HH * dh;
        const float* src = sStage + (16 * kr + r) * LDH + HH * dh;
        for (int c = lane; c < HH; c += 32) atomicAdd(dst + c, src[c] * p.scale);
      }
    }
  }
  cp_async_wait<0>();  // only an empty group can be left
  // dK (scaled) and dV out through the staging tile (each warp its own 16 rows x HD / 2 columns).
  __syncthreads();
  for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
    for (int d = 0; d < ND; ++d)
      store_c<LDH>(sStage + 16 * kr * LDH + HH * dh + 16 * d, pass == 0 ? dk[d] : dv[d]);
    __syncwarp();
    float* out = pass == 0 ? p.dk : p.dv;
    const float sc = pass == 0 ? p.scale : 1.f;
    for (int r = 0; r < 16; ++r) {
      const int key = k0 + 16 * kr + r;
      if (key >= p.Tk) break;
      float* dst = out + ((int64_t(b) * p.Tk + key) * p.KVH + kh) * HD + HH * dh;
      const float* src = sStage + (16 * kr + r) * LDH + HH * dh;
      for (int c = lane; c < HH; c += 32) dst[c] = src[c] * sc;
    }
    __syncwarp();
  }
}

}  // namespace lowbit::ops::cuda::wmma_tf32_attn
