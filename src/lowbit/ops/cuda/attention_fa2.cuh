// FlashAttention-2-class bf16 attention, head_dim 64 or 128 (included by attention.cu).
//
// Same mathematics as the other kernels of attention.cu (causal, GQA, Tq <= Tk with query i at
// position Tk - Tq + i, scores in base 2), written for the tensor cores with raw
// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` and `ldmatrix` (Dao 2023, FlashAttention-2).
// Unlike attention_wmma.cuh, the score tile S, the probabilities P and dS never leave registers:
// the m16n8k16 accumulator layout of S is the A-operand layout of P (two adjacent 16x8 accumulator
// tiles form one 16x16 A tile), so P = exp(S - m) is packed to bf16 pairs in place.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16", bf16): lane = 4 g + t.
//   A 16x16 row-major, 4 regs of 2 bf16: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
//     a3 = (g+8, 2t+8..).
//   B 16x8 (k x n), 2 regs: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g).
//   C 16x8 f32, 4 regs: c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1).
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i and
// register i of lane l receives (row l/4, columns 2(l%4), 2(l%4)+1) of matrix i, or with .trans
// (rows 2(l%4), 2(l%4)+1, column l/4). So, with memory rows of 8 contiguous elements:
//   A from a row-major tile:  matrix i = rows 8(i&1).., columns 8(i>>1)..          (no .trans)
//   B = X^T from X [n][k]:    matrix i = rows (n) 8(i>>1).., columns (k) 8(i&1).. -> b0, b1 of the
//                             n-tile 2j (regs 0, 1) and of the n-tile 2j+1 (regs 2, 3) (no .trans)
//   B = X from X [k][n]:      matrix i = rows (k) 8(i&1).., columns (n) 8(i>>1).. (.trans)
//   A = X^T from X [k][m]:    matrix i = rows (k) 8(i>>1).., columns (m) 8(i&1).. (.trans)
// Shared-memory tiles are [rows][HD + 8] bf16: the 16-byte pad makes the row stride 144 or 272
// bytes (16 mod 128), so the eight row addresses of one 8x8 matrix hit eight different 16-byte
// bank groups (ldmatrix conflict-free), and 16-byte cp.async writes of 8 lanes cover 128
// contiguous bytes. Global -> shared copies are cp.async (16 bytes, zero-filled past the last
// row), overlapped with the tensor-core work.
//
//  * Forward: block = 64 queries (4 warps x 16 rows) of one (head, batch); warp w keeps its Q
//    fragments in registers; per 64-key tile S = Q K^T (16 x 64 in registers), causal/ragged
//    mask, online softmax (row max and sum across the 4 lanes of a quad; the row sum is reduced
//    once at the end), O += P V with the O accumulator (16 x HD) in registers. The V tile loads
//    while S is computed and the next K tile while P V is; O is staged through the warp's own
//    rows of the Q tile for 16-byte stores. lse (natural log) is written for the backward.
//  * Backward, deterministic (default): D = rowsum(dO * O) (attention.cu), then
//    - dK/dV kernel: block = 64 keys of one kv head (4 warps x 16 keys), over the heads of its
//      group and the query tiles that see its keys (BQ = 64 for HD 64, 32 for HD 128; double
//      buffered Q / dO tiles, their rows' lse and D in the same cp.async group): S^T = K Q^T and dP^T = V dO^T in registers, P^T = exp2(S^T - lse),
//      dS^T = P^T (dP^T - D), dV += P^T dO and dK += dS^T Q accumulated in registers.
//    - dQ kernel: block = 64 queries of one head (4 warps x 16 rows), Q and dO fragments in
//      registers, over the key tiles it sees (BK = 64 / 32, double buffered K / V): S, dP, P, dS
//      as above (row-wise lse and D), dQ += dS K in registers; written once, in bf16.
//    Every sum runs in a fixed order: the backward is bit-reproducible run to run. The price is
//    recomputing S and dP in the dQ kernel (2 of the 5 products again); on an H100 (7B block,
//    seq 2048 / 4096) that was no slower than the atomic variant below (docs/results/gpu-block-7b.md).
//  * Backward, atomic (LOWBIT_ATTENTION=fa2-atomic, for timing the cost of determinism): the
//    dK/dV kernel also stages dS^T in shared memory and adds dQ += dS K of each tile to an fp32
//    buffer with atomicAdd (order varies between runs), converted to bf16 afterwards.
#pragma once
#include <cstdint>
#include <type_traits>

namespace lowbit::ops::cuda::fa2_attn {

using detail::bf16;

constexpr int kWarps = 4, kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Tile sizes. Forward: 64 queries x 64 keys. Backward: 64 keys (dK/dV) or 64 queries (dQ) per
// block against tiles of the other side of 64 (HD 64) or 32 (HD 128) rows, which keeps the
// accumulators (dK + dV or dQ, 2 x 64 registers at HD 128) and the score tiles within 255 registers.
constexpr int kFwdBQ = 64, kFwdBK = 64;
constexpr int kBwdRows = 64;  // keys per dK/dV block, queries per dQ block
template <int HD>
constexpr int kBwdCols = HD == 128 ? 32 : 64;  // the other side's tile

// ---- PTX wrappers ----------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared; with valid false the destination is zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(n) : "memory");
}
// 4 bytes global -> shared (cp.async.ca: the 16-byte .cg form has no smaller sizes); zero-fill as above.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  const int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
// c += a b, m16n8k16, bf16 inputs, f32 accumulation.
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Two floats to a bf16 pair: lo in the low half (the lower column index of a fragment register).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Byte offset of this lane's ldmatrix row address inside a [rows][LD] bf16 tile for the 16 x 16
// block at (r0, c0), matrices ordered as "A from row-major" (rows 8(i&1), columns 8(i>>1)).
template <int LD>
__device__ __forceinline__ uint32_t off_a(int r0, int c0, int lane) {
  const int i = lane >> 3, r = lane & 7;
  return uint32_t(((r0 + r + 8 * (i & 1)) * LD + c0 + 8 * (i >> 1)) * 2);
}
// Matrices ordered rows 8(i>>1), columns 8(i&1): "B = X^T from X [n][k]" and "A = X^T from X [k][m]".
template <int LD>
__device__ __forceinline__ uint32_t off_b(int r0, int c0, int lane) {
  const int i = lane >> 3, r = lane & 7;
  return uint32_t(((r0 + r + 8 * (i >> 1)) * LD + c0 + 8 * (i & 1)) * 2);
}

// R rows x HD bf16 (row r at src + r * rs) into a [R][HD + 8] tile with cp.async; rows r0 + r >=
// nrows are zero-filled (their source address is clamped to row 0, which exists: nrows >= 1).
template <int R, int HD>
__device__ __forceinline__ void load_async(bf16* dst, const bf16* src, int64_t rs, int r0, int nrows) {
  constexpr int V = HD / 8, LD = HD + 8;
#pragma unroll
  for (int idx = threadIdx.x; idx < R * V; idx += kThreads) {
    const int r = idx / V, c = (idx % V) * 8, row = r0 + r;
    const bool ok = row < nrows;
    cp_async16(dst + r * LD + c, src + int64_t(ok ? row : 0) * rs + c, ok);
  }
}

// A warp's 16 x HD f32 accumulator (C fragments, one per 8 columns), times the row factors,
// to bf16 in its own 16 rows of a [.][HD + 8] shared tile, then to global rows (16-byte stores):
// row r of the 16 goes to dst + (row0 + r) * rs if row0 + r < nrows.
template <int HD>
__device__ __forceinline__ void store_rows(const float (&acc)[HD / 8][4], float f_lo, float f_hi, bf16* stile,
                                           bf16* dst, int64_t rs, int row0, int nrows, int lane) {
  constexpr int LD = HD + 8;
  const int g = lane >> 2, t = lane & 3;
  // The tile rows were read by this warp's ldmatrix (other lanes' addresses): order those reads before
  // these writes. The mma.sync / shfl.sync in between converge the warp but order no memory;
  // compute-sanitizer racecheck reported the pair as a hazard (2026-12-07, H100) without this.
  __syncwarp();
#pragma unroll
  for (int j = 0; j < HD / 8; ++j) {
    *reinterpret_cast<uint32_t*>(stile + g * LD + 8 * j + 2 * t) = pack_bf16(acc[j][0] * f_lo, acc[j][1] * f_lo);
    *reinterpret_cast<uint32_t*>(stile + (g + 8) * LD + 8 * j + 2 * t) = pack_bf16(acc[j][2] * f_hi, acc[j][3] * f_hi);
  }
  __syncwarp();
  constexpr int V = HD / 8;
#pragma unroll
  for (int idx = lane; idx < 16 * V; idx += 32) {
    const int r = idx / V, c = (idx % V) * 8;
    if (row0 + r < nrows)
      *reinterpret_cast<uint4*>(dst + int64_t(row0 + r) * rs + c) = *reinterpret_cast<const uint4*>(stile + r * LD + c);
  }
}

// ---- forward ---------------------------------------------------------------------------------------
template <int HD>
constexpr size_t fwd_smem() {
  return size_t((kFwdBQ + 2 * kFwdBK) * (HD + 8)) * 2;
}

template <class LT, int HD>
__global__ void __launch_bounds__(kThreads) fwd_kernel(attn_detail::FwdParams<bf16, LT> p) {
  constexpr int BQ = kFwdBQ, BK = kFwdBK, LD = HD + 8, NK = BK / 8, ND = HD / 8;
  extern __shared__ float4 smem4[];
  bf16* sQ = reinterpret_cast<bf16*>(smem4);
  bf16* sK = sQ + BQ * LD;
  bf16* sV = sK + BK * LD;
  const uint32_t aQ = smem_u32(sQ), aK = smem_u32(sK), aV = smem_u32(sV);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;  // heaviest (latest) query tiles first
  const int h = blockIdx.y, b = blockIdx.z, kh = h / p.group;
  const int off = p.Tk - p.Tq;
  const int64_t qs = int64_t(p.H) * HD, ks = int64_t(p.KVH) * HD;
  const bf16* qb = p.q + (int64_t(b) * p.Tq * p.H + h) * HD;
  const bf16* kb = p.k + (int64_t(b) * p.Tk * p.KVH + kh) * HD;
  const bf16* vb = p.v + (int64_t(b) * p.Tk * p.KVH + kh) * HD;
  const int kend = min(p.Tk, off + q0 + BQ);  // keys past the tile's last query position are masked
  const int ntiles = (kend + BK - 1) / BK;
  const float sl2 = p.scale_log2;
  // Positions of this lane's two rows (g and g + 8 of the warp's 16).
  const int pos_lo = off + q0 + 16 * warp + g, pos_hi = pos_lo + 8;

  load_async<BQ, HD>(sQ, qb, qs, q0, p.Tq);
  load_async<BK, HD>(sK, kb, ks, 0, p.Tk);
  cp_async_commit();

  uint32_t qf[HD / 16][4];
  float o[ND][4];
#pragma unroll
  for (int j = 0; j < ND; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;  // m: raw score units

  for (int it = 0; it < ntiles; ++it) {
    const int k0 = it * BK;
    cp_async_wait_all();
    __syncthreads();  // K tile `it` (and Q) landed; every warp is done with the previous V tile
    if (it == 0) {
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) ldsm_x4(qf[kk], aQ + off_a<LD>(16 * warp, 16 * kk, lane));
    }
    load_async<BK, HD>(sV, vb, ks, k0, p.Tk);
    cp_async_commit();

    // S = Q K^T, 16 x BK for this warp.
    float s[NK][4];
#pragma unroll
    for (int j = 0; j < NK; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
#pragma unroll
      for (int j2 = 0; j2 < NK / 2; ++j2) {
        uint32_t kf[4];
        ldsm_x4(kf, aK + off_b<LD>(16 * j2, 16 * kk, lane));
        mma16816(s[2 * j2], qf[kk], kf[0], kf[1]);
        mma16816(s[2 * j2 + 1], qf[kk], kf[2], kf[3]);
      }

    // Mask (causal and the ragged last key tile) where the tile reaches past a row's position.
    if (k0 + BK - 1 > off + q0 + 16 * warp || k0 + BK > p.Tk) {
#pragma unroll
      for (int j = 0; j < NK; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = k0 + 8 * j + 2 * t + e;
          if (key > pos_lo || key >= p.Tk) s[j][e] = -INFINITY;
          if (key > pos_hi || key >= p.Tk) s[j][2 + e] = -INFINITY;
        }
    }
    // Online softmax: row max across the quad, rescale by 2^(sl2 (m_old - m_new)).
    float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
    for (int j = 0; j < NK; ++j) {
      mx_lo = fmaxf(mx_lo, fmaxf(s[j][0], s[j][1]));
      mx_hi = fmaxf(mx_hi, fmaxf(s[j][2], s[j][3]));
    }
#pragma unroll
    for (int o2 = 1; o2 <= 2; o2 <<= 1) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, o2));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, o2));
    }
    // A row with no visible key so far keeps base 0 (avoids -inf - -inf); its P is exp2(-inf) = 0.
    const float base_lo = mx_lo == -INFINITY ? 0.f : mx_lo * sl2;
    const float base_hi = mx_hi == -INFINITY ? 0.f : mx_hi * sl2;
    const float alpha_lo = exp2f(m_lo * sl2 - base_lo), alpha_hi = exp2f(m_hi * sl2 - base_hi);
    m_lo = mx_lo;
    m_hi = mx_hi;
    float rs_lo = 0.f, rs_hi = 0.f;
#pragma unroll
    for (int j = 0; j < NK; ++j) {
      s[j][0] = exp2f(fmaf(s[j][0], sl2, -base_lo));
      s[j][1] = exp2f(fmaf(s[j][1], sl2, -base_lo));
      s[j][2] = exp2f(fmaf(s[j][2], sl2, -base_hi));
      s[j][3] = exp2f(fmaf(s[j][3], sl2, -base_hi));
      rs_lo += s[j][0] + s[j][1];
      rs_hi += s[j][2] + s[j][3];
    }
    l_lo = l_lo * alpha_lo + rs_lo;  // this lane's partial row sums; reduced over the quad at the end
    l_hi = l_hi * alpha_hi + rs_hi;
#pragma unroll
    for (int j = 0; j < ND; ++j) {
      o[j][0] *= alpha_lo;
      o[j][1] *= alpha_lo;
      o[j][2] *= alpha_hi;
      o[j][3] *= alpha_hi;
    }
    // P as A fragments: keys 16 kk.. = accumulator tiles 2 kk and 2 kk + 1.
    uint32_t pf[BK / 16][4];
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      pf[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      pf[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      pf[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pf[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }

    cp_async_wait_all();
    __syncthreads();  // V tile landed; every warp is done reading this K tile
    if (it + 1 < ntiles) load_async<BK, HD>(sK, kb, ks, k0 + BK, p.Tk);
    cp_async_commit();

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
#pragma unroll
      for (int d2 = 0; d2 < HD / 16; ++d2) {
        uint32_t vf[4];
        ldsm_x4_t(vf, aV + off_a<LD>(16 * kk, 16 * d2, lane));
        mma16816(o[2 * d2], pf[kk], vf[0], vf[1]);
        mma16816(o[2 * d2 + 1], pf[kk], vf[2], vf[3]);
      }
  }
  cp_async_wait_all();

#pragma unroll
  for (int o2 = 1; o2 <= 2; o2 <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, o2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, o2);
  }
  const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f, inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
  // The warp's own Q rows are free (its Q fragments are in registers; no other warp reads them).
  const int row0 = q0 + 16 * warp;
  store_rows<HD>(o, inv_lo, inv_hi, sQ + 16 * warp * LD, p.out + (int64_t(b) * p.Tq * p.H + h) * HD, qs, row0, p.Tq,
                 lane);
  if (t == 0) {
    LT* lse = p.lse + (int64_t(b) * p.H + h) * p.Tq;
    if (row0 + g < p.Tq) lse[row0 + g] = detail::from_f<LT>((m_lo * sl2 + log2f(l_lo)) * kLn2);
    if (row0 + g + 8 < p.Tq) lse[row0 + g + 8] = detail::from_f<LT>((m_hi * sl2 + log2f(l_hi)) * kLn2);
  }
}

// ---- backward --------------------------------------------------------------------------------------
template <class LT>
struct BwdParams {
  const bf16 *q, *k, *v, *dout;
  const LT* lse;
  const float* D;     // rowsum(dO * O), [B, H, Tq]
  bf16* dq;           // deterministic path: written by dq_kernel
  float* dq_acc;      // atomic path: fp32 [B, Tq, H, HD], zeroed
  bf16 *dk, *dv;
  int Tq, Tk, H, KVH, group;
  float scale, scale_log2;
};

template <int HD, bool kAtomicDq>
constexpr size_t dkdv_smem() {
  constexpr int BK = kBwdRows, BQ = kBwdCols<HD>, LD = HD + 8;
  return size_t(2 * BK * LD + 2 * 2 * BQ * LD) * 2 + size_t(2 * 2 * BQ) * 4 + (kAtomicDq ? size_t(BK * (BQ + 8)) * 2 : 0);
}

template <class LT, int HD, bool kAtomicDq>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(BwdParams<LT> p) {
  constexpr int BK = kBwdRows, BQ = kBwdCols<HD>, LD = HD + 8, NQ = BQ / 8, ND = HD / 8, LDS = BQ + 8;
  extern __shared__ float4 smem4[];
  bf16* sK = reinterpret_cast<bf16*>(smem4);
  bf16* sV = sK + BK * LD;
  bf16* sQ = sV + BK * LD;        // [2][BQ][LD]
  bf16* sO = sQ + 2 * BQ * LD;    // dO, [2][BQ][LD]
  float* sL = reinterpret_cast<float*>(sO + 2 * BQ * LD);  // [2][BQ] lse (natural log)
  float* sD = sL + 2 * BQ;                                 // [2][BQ]
  bf16* sdS = reinterpret_cast<bf16*>(sD + 2 * BQ);       // dS^T [BK][BQ + 8] (atomic path)
  const uint32_t aK = smem_u32(sK), aV = smem_u32(sV);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int k0 = blockIdx.x * BK, kh = blockIdx.y, b = blockIdx.z;
  const int off = p.Tk - p.Tq;
  const int64_t qs = int64_t(p.H) * HD, ks = int64_t(p.KVH) * HD;
  const float sl2 = p.scale_log2;
  const int key_lo = k0 + 16 * warp + g, key_hi = key_lo + 8;

  // Query tiles that can see this block's keys: from the one holding query k0 - off on.
  const int qfirst = (max(0, k0 - off) / BQ) * BQ;
  const int nq = (p.Tq - qfirst + BQ - 1) / BQ;
  const int n = nq * p.group;  // (head of the group, query tile) pairs, head-major
  auto issue = [&](int it) {
    const int buf = it & 1, h = kh * p.group + it / nq, q0 = qfirst + (it % nq) * BQ;
    const int64_t hoff = (int64_t(b) * p.Tq * p.H + h) * HD;
    load_async<BQ, HD>(sQ + buf * BQ * LD, p.q + hoff, qs, q0, p.Tq);
    load_async<BQ, HD>(sO + buf * BQ * LD, p.dout + hoff, qs, q0, p.Tq);
    // lse and D of the tile's rows (0 past the last row) ride along with the tile's cp.async group
    // (a plain load here would stall the loading warp for a global round trip every tile).
    const int64_t lrow = (int64_t(b) * p.H + h) * p.Tq;
    for (int i = threadIdx.x; i < BQ; i += kThreads) {
      const int row = q0 + i;
      const bool ok = row < p.Tq;
      const int64_t src = lrow + (ok ? row : 0);
      if constexpr (std::is_same_v<LT, float>) cp_async4(sL + buf * BQ + i, p.lse + src, ok);
      else sL[buf * BQ + i] = ok ? detail::to_f(p.lse[src]) : 0.f;
      cp_async4(sD + buf * BQ + i, p.D + src, ok);
    }
  };
  load_async<BK, HD>(sK, p.k + (int64_t(b) * p.Tk * p.KVH + kh) * HD, ks, k0, p.Tk);
  load_async<BK, HD>(sV, p.v + (int64_t(b) * p.Tk * p.KVH + kh) * HD, ks, k0, p.Tk);
  if (n > 0) issue(0);
  cp_async_commit();

  float dk[ND][4], dv[ND][4];
#pragma unroll
  for (int j = 0; j < ND; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.f;

  for (int it = 0; it < n; ++it) {
    const int buf = it & 1, h = kh * p.group + it / nq, q0 = qfirst + (it % nq) * BQ;
    cp_async_wait_all();
    __syncthreads();  // tile `it` landed (and its lse / D stores are visible); tile it - 1 fully consumed
    if (it + 1 < n) issue(it + 1);
    cp_async_commit();
    const uint32_t aQ = smem_u32(sQ + buf * BQ * LD), aO = smem_u32(sO + buf * BQ * LD);
    const float* L = sL + buf * BQ;
    const float* Dv = sD + buf * BQ;

    // S^T = K Q^T and dP^T = V dO^T: 16 keys x BQ queries for this warp.
    float s[NQ][4], dp[NQ][4];
#pragma unroll
    for (int j = 0; j < NQ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t kf[4], vf[4];
      ldsm_x4(kf, aK + off_a<LD>(16 * warp, 16 * kk, lane));
      ldsm_x4(vf, aV + off_a<LD>(16 * warp, 16 * kk, lane));
#pragma unroll
      for (int j2 = 0; j2 < NQ / 2; ++j2) {
        uint32_t qf[4], of[4];
        ldsm_x4(qf, aQ + off_b<LD>(16 * j2, 16 * kk, lane));
        ldsm_x4(of, aO + off_b<LD>(16 * j2, 16 * kk, lane));
        mma16816(s[2 * j2], kf, qf[0], qf[1]);
        mma16816(s[2 * j2 + 1], kf, qf[2], qf[3]);
        mma16816(dp[2 * j2], vf, of[0], of[1]);
        mma16816(dp[2 * j2 + 1], vf, of[2], of[3]);
      }
    }
    // P^T = exp2(sl2 S^T - lse2[query]) where the key is visible, dS^T = P^T (dP^T - D[query]).
#pragma unroll
    for (int j = 0; j < NQ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int qc = 8 * j + 2 * t + e, qi = q0 + qc;
        const bool qok = qi < p.Tq;
        const bool ok_lo = qok && key_lo < p.Tk && key_lo <= off + qi;
        const bool ok_hi = qok && key_hi < p.Tk && key_hi <= off + qi;
        const float lq = L[qc] * kLog2e, dq = Dv[qc];
        const float p_lo = ok_lo ? exp2f(fmaf(s[j][e], sl2, -lq)) : 0.f;
        const float p_hi = ok_hi ? exp2f(fmaf(s[j][2 + e], sl2, -lq)) : 0.f;
        s[j][e] = p_lo;
        s[j][2 + e] = p_hi;
        dp[j][e] = p_lo * (dp[j][e] - dq);
        dp[j][2 + e] = p_hi * (dp[j][2 + e] - dq);
      }
    // dV += P^T dO, dK += dS^T Q (A = P^T / dS^T from registers, B = dO / Q tiles with .trans).
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      uint32_t pa[4], da[4];
      pa[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      da[0] = pack_bf16(dp[2 * kk][0], dp[2 * kk][1]);
      da[1] = pack_bf16(dp[2 * kk][2], dp[2 * kk][3]);
      da[2] = pack_bf16(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      da[3] = pack_bf16(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
      if constexpr (kAtomicDq) {
        // dS^T rows of this warp's keys for the dQ product below.
        bf16* r0 = sdS + (16 * warp + g) * LDS + 16 * kk + 2 * t;
        *reinterpret_cast<uint32_t*>(r0) = da[0];
        *reinterpret_cast<uint32_t*>(r0 + 8 * LDS) = da[1];
        *reinterpret_cast<uint32_t*>(r0 + 8) = da[2];
        *reinterpret_cast<uint32_t*>(r0 + 8 * LDS + 8) = da[3];
      }
#pragma unroll
      for (int d2 = 0; d2 < HD / 16; ++d2) {
        uint32_t of[4], qf[4];
        ldsm_x4_t(of, aO + off_a<LD>(16 * kk, 16 * d2, lane));
        ldsm_x4_t(qf, aQ + off_a<LD>(16 * kk, 16 * d2, lane));
        mma16816(dv[2 * d2], pa, of[0], of[1]);
        mma16816(dv[2 * d2 + 1], pa, of[2], of[3]);
        mma16816(dk[2 * d2], da, qf[0], qf[1]);
        mma16816(dk[2 * d2 + 1], da, qf[2], qf[3]);
      }
    }
    if constexpr (kAtomicDq) {
      // dQ (BQ x HD) += dS K: warp w takes query rows 16 (w % RW).. and columns DW-th part.
      constexpr int RW = BQ / 16, DW = kWarps / RW, NDW = HD / DW / 8;
      static_assert(RW * DW == kWarps, "warps must tile the dQ block");
      __syncthreads();  // every warp's dS^T rows are in shared memory
      const int rg = warp % RW, dc0 = (warp / RW) * (HD / DW);
      const uint32_t adS = smem_u32(sdS);
      float acc[NDW][4];
#pragma unroll
      for (int j = 0; j < NDW; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        uint32_t af[4];
        ldsm_x4_t(af, adS + off_b<LDS>(16 * kk, 16 * rg, lane));  // A = (dS^T)^T
#pragma unroll
        for (int d2 = 0; d2 < NDW / 2; ++d2) {
          uint32_t kf[4];
          ldsm_x4_t(kf, aK + off_a<LD>(16 * kk, dc0 + 16 * d2, lane));
          mma16816(acc[2 * d2], af, kf[0], kf[1]);
          mma16816(acc[2 * d2 + 1], af, kf[2], kf[3]);
        }
      }
      const int qlo = q0 + 16 * rg + g, qhi = qlo + 8;
      float* dst_lo = p.dq_acc + ((int64_t(b) * p.Tq + qlo) * p.H + h) * HD + dc0;
      float* dst_hi = p.dq_acc + ((int64_t(b) * p.Tq + qhi) * p.H + h) * HD + dc0;
#pragma unroll
      for (int j = 0; j < NDW; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (qlo < p.Tq) atomicAdd(dst_lo + 8 * j + 2 * t + e, acc[j][e] * p.scale);
          if (qhi < p.Tq) atomicAdd(dst_hi + 8 * j + 2 * t + e, acc[j][2 + e] * p.scale);
        }
    }
  }
  cp_async_wait_all();

  // dK (scaled) and dV: this lane's rows key_lo / key_hi, columns 8 j + 2 t.
  bf16* dkb = p.dk + (int64_t(b) * p.Tk * p.KVH + kh) * HD;
  bf16* dvb = p.dv + (int64_t(b) * p.Tk * p.KVH + kh) * HD;
#pragma unroll
  for (int j = 0; j < ND; ++j) {
    const int c = 8 * j + 2 * t;
    if (key_lo < p.Tk) {
      *reinterpret_cast<uint32_t*>(dkb + int64_t(key_lo) * ks + c) = pack_bf16(dk[j][0] * p.scale, dk[j][1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvb + int64_t(key_lo) * ks + c) = pack_bf16(dv[j][0], dv[j][1]);
    }
    if (key_hi < p.Tk) {
      *reinterpret_cast<uint32_t*>(dkb + int64_t(key_hi) * ks + c) = pack_bf16(dk[j][2] * p.scale, dk[j][3] * p.scale);
      *reinterpret_cast<uint32_t*>(dvb + int64_t(key_hi) * ks + c) = pack_bf16(dv[j][2], dv[j][3]);
    }
  }
}

template <int HD>
constexpr size_t dq_smem() {
  constexpr int BQ = kBwdRows, BK = kBwdCols<HD>, LD = HD + 8;
  return size_t(2 * BQ * LD + 2 * 2 * BK * LD) * 2;
}

template <class LT, int HD>
__global__ void __launch_bounds__(kThreads) dq_kernel(BwdParams<LT> p) {
  constexpr int BQ = kBwdRows, BK = kBwdCols<HD>, LD = HD + 8, NK = BK / 8, ND = HD / 8;
  extern __shared__ float4 smem4[];
  bf16* sQ = reinterpret_cast<bf16*>(smem4);
  bf16* sO = sQ + BQ * LD;      // dO
  bf16* sK = sO + BQ * LD;      // [2][BK][LD]
  bf16* sV = sK + 2 * BK * LD;  // [2][BK][LD]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;  // heaviest first
  const int h = blockIdx.y, b = blockIdx.z, kh = h / p.group;
  const int off = p.Tk - p.Tq;
  const int64_t qs = int64_t(p.H) * HD, ks = int64_t(p.KVH) * HD;
  const float sl2 = p.scale_log2;
  const int64_t hoff = (int64_t(b) * p.Tq * p.H + h) * HD;
  const bf16* kb = p.k + (int64_t(b) * p.Tk * p.KVH + kh) * HD;
  const bf16* vb = p.v + (int64_t(b) * p.Tk * p.KVH + kh) * HD;
  const int kend = min(p.Tk, off + q0 + BQ);
  const int ntiles = (kend + BK - 1) / BK;
  const int row_lo = q0 + 16 * warp + g, row_hi = row_lo + 8;
  const int pos_lo = off + row_lo, pos_hi = off + row_hi;

  load_async<BQ, HD>(sQ, p.q + hoff, qs, q0, p.Tq);
  load_async<BQ, HD>(sO, p.dout + hoff, qs, q0, p.Tq);
  load_async<BK, HD>(sK, kb, ks, 0, p.Tk);
  load_async<BK, HD>(sV, vb, ks, 0, p.Tk);
  cp_async_commit();
  const int64_t lrow = (int64_t(b) * p.H + h) * p.Tq;
  const float L_lo = row_lo < p.Tq ? detail::to_f(p.lse[lrow + row_lo]) * kLog2e : 0.f;
  const float L_hi = row_hi < p.Tq ? detail::to_f(p.lse[lrow + row_hi]) * kLog2e : 0.f;
  const float D_lo = row_lo < p.Tq ? p.D[lrow + row_lo] : 0.f;
  const float D_hi = row_hi < p.Tq ? p.D[lrow + row_hi] : 0.f;

  uint32_t qf[HD / 16][4], of[HD / 16][4];
  float dq[ND][4];
#pragma unroll
  for (int j = 0; j < ND; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;

  for (int it = 0; it < ntiles; ++it) {
    const int buf = it & 1, k0 = it * BK;
    cp_async_wait_all();
    __syncthreads();  // tile `it` landed; tile it - 1 fully consumed
    if (it == 0) {
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        ldsm_x4(qf[kk], smem_u32(sQ) + off_a<LD>(16 * warp, 16 * kk, lane));
        ldsm_x4(of[kk], smem_u32(sO) + off_a<LD>(16 * warp, 16 * kk, lane));
      }
    }
    if (it + 1 < ntiles) {
      load_async<BK, HD>(sK + (buf ^ 1) * BK * LD, kb, ks, k0 + BK, p.Tk);
      load_async<BK, HD>(sV + (buf ^ 1) * BK * LD, vb, ks, k0 + BK, p.Tk);
    }
    cp_async_commit();
    const uint32_t aK = smem_u32(sK + buf * BK * LD), aV = smem_u32(sV + buf * BK * LD);

    // S = Q K^T and dP = dO V^T: 16 queries x BK keys.
    float s[NK][4], dp[NK][4];
#pragma unroll
    for (int j = 0; j < NK; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
#pragma unroll
      for (int j2 = 0; j2 < NK / 2; ++j2) {
        uint32_t kf[4], vf[4];
        ldsm_x4(kf, aK + off_b<LD>(16 * j2, 16 * kk, lane));
        ldsm_x4(vf, aV + off_b<LD>(16 * j2, 16 * kk, lane));
        mma16816(s[2 * j2], qf[kk], kf[0], kf[1]);
        mma16816(s[2 * j2 + 1], qf[kk], kf[2], kf[3]);
        mma16816(dp[2 * j2], of[kk], vf[0], vf[1]);
        mma16816(dp[2 * j2 + 1], of[kk], vf[2], vf[3]);
      }
    // P = exp2(sl2 S - lse2[row]) where visible, dS = P (dP - D[row]).
#pragma unroll
    for (int j = 0; j < NK; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = k0 + 8 * j + 2 * t + e;
        const bool kok = key < p.Tk;
        const float p_lo = kok && key <= pos_lo ? exp2f(fmaf(s[j][e], sl2, -L_lo)) : 0.f;
        const float p_hi = kok && key <= pos_hi ? exp2f(fmaf(s[j][2 + e], sl2, -L_hi)) : 0.f;
        dp[j][e] = p_lo * (dp[j][e] - D_lo);
        dp[j][2 + e] = p_hi * (dp[j][2 + e] - D_hi);
      }
    // dQ += dS K (B = K [key][d] with .trans).
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t da[4];
      da[0] = pack_bf16(dp[2 * kk][0], dp[2 * kk][1]);
      da[1] = pack_bf16(dp[2 * kk][2], dp[2 * kk][3]);
      da[2] = pack_bf16(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      da[3] = pack_bf16(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
      for (int d2 = 0; d2 < HD / 16; ++d2) {
        uint32_t kf[4];
        ldsm_x4_t(kf, aK + off_a<LD>(16 * kk, 16 * d2, lane));
        mma16816(dq[2 * d2], da, kf[0], kf[1]);
        mma16816(dq[2 * d2 + 1], da, kf[2], kf[3]);
      }
    }
  }
  cp_async_wait_all();
  // The warp's own Q rows are free (fragments in registers; no other warp reads them).
  store_rows<HD>(dq, p.scale, p.scale, sQ + 16 * warp * LD, p.dq + hoff, qs, q0 + 16 * warp, p.Tq, lane);
}

}  // namespace lowbit::ops::cuda::fa2_attn
