// Device kernels of quant_matmul on packed weights (C++17, CUDA only; included by quant_matmul.cu
// and by the standalone bench/cuda/quant_gemv_bench.cu, so it needs nothing but the CUDA headers).
//
// Device layout of a packed weight (ops::DevicePackedWeight, built once on the host by
// ops::upload_packed_weight): codes U8 [N, row_bytes], K/32 blocks of 32 values per row, a block
// being 8 (2-bit), 16 (4-bit) or 32 (8-bit) bytes; params half2 [N, n_groups] per group of G
// columns (G a multiple of 32, or K): (s, z) with w = (q - z) s, or (d, m) with w = d q + m
// ("offset" form, ggml q4_1). 8-bit codes are signed (lowbit's unsigned int8 codes are stored as
// q - 128 with z - 128). Within a block the codes unpack in "kernel order" (position p of the
// block is the low/high nibble or the 2-bit field the dp4a lanes see, see unpack_block):
//   4-bit: byte j holds positions j (low nibble) and j + 16 (high nibble);
//   2-bit: byte j holds positions j, j + 8, j + 16, j + 24 (bits 0-1, 2-3, 4-5, 6-7);
//   8-bit: byte j holds position j.
// Which value of the row sits at position p is the weight's "element order" (`order`): ggml's
// q4 blocks are already in kernel order (order 8 = natural), lowbit's little-endian packed rows
// are not (order 4 / 2: the permutation of ops/quant_matmul_kernels.h's block_source_index). The
// codes are used as stored; instead the activations are quantized in the same order.
//
// Decode (M <= 8 tokens): activations quantized per block of 32 to int8 (d = amax / 127, rounding
// to nearest even: bit for bit the CPU Int8 body's operand), stored in kernel order with (d, d *
// sum q) per block. GEMV: a warp owns R output rows; each lane walks blocks lane, lane + 32, ...
// of those rows with 16-byte (2×16 for 8-bit) non-caching loads of the codes, one half2 load of
// the group parameters per block and row, and computes the 32-value integer dot product with 8
// dp4a per activation row; the activation block (int8, L1-resident) is loaded once per lane and
// reused for the R rows; the M token rows share every weight load. f32 accumulation, one warp
// reduction per output at the end, no atomics, no shared memory.
//
// Two GEMV kernels (Variant; quant_matmul picks with QuantMatmulOptions::cuda_gemv or
// LOWBIT_CUDA_GEMV, quant_gemv_bench measures all three in one run):
//   V1     gemv_kernel: the loop above, `#pragma unroll 2` over a lane's blocks (the first kernel
//          measured on the H100: 31-59 % of copy bandwidth at batch 1, a fixed ~7 us per call).
//   V2     gemv2_kernel: the same arithmetic and layout, but each lane first issues the 16-byte
//          code loads (and the half2 parameter loads) of a whole chunk of U blocks x R rows
//          (128 bytes of codes per lane in flight: U = 8 / R for int4, 16 / R int2, 4 / R int8),
//          then reads activations and computes; chunks of 32 U blocks per row follow in a loop.
//   V2Pdl  V2 with programmatic dependent launch (Hopper, sm_90): the activation quantization
//          kernel lets the GEMV launch at once (griddepcontrol.launch_dependents), the GEMV
//          prefetches its first chunk of weights (read-only, written by no kernel) and only then
//          waits for the activations (griddepcontrol.wait): the GEMV's launch and the first HBM
//          round trip overlap the quantization kernel instead of following it. Without the launch
//          attribute (V1 / V2, other GPUs) the two instructions are no-ops.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lowbit/ops/cuda/quant_gemv_layout.h"

namespace lowbit::qgemv {

enum class Variant : int { V1 = 1, V2 = 2, V2Pdl = 3 };
inline const char* variant_name(Variant v) { return v == Variant::V1 ? "v1" : v == Variant::V2 ? "v2" : "v2pdl"; }

// Programmatic dependent launch (PTX griddepcontrol, sm_90+; no-ops when the kernel was launched
// without cudaLaunchAttributeProgrammaticStreamSerialization).
__device__ __forceinline__ void griddep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

struct Weight {
  const uint8_t* codes = nullptr;  // [N, row_bytes]
  const __half2* params = nullptr; // [N, n_groups]
  int64_t row_bytes = 0;
  int N = 0, K = 0, G = 0, n_groups = 0;
  int bits = 4;      // 2, 4 or 8
  int order = 8;     // element order of a block: 8 natural, 4 / 2 lowbit's bit order (see above)
  bool offset = false;  // params are (d, m): w = d q + m; else (s, z): w = (q - z) s
};

// ---- activation quantization: one warp per block of 32, x f32 [M, K] -> q int8 [M, K], ds [M, K/32]
__global__ void quantize_acts_kernel(const float* __restrict__ x, int M, int K, int order, int8_t* __restrict__ q,
                                     float2* __restrict__ ds) {
  griddep_launch_dependents();  // the GEMV may launch and prefetch weights now (V2Pdl)
  griddep_wait();               // x comes from the previous kernel
  const int nb = K / 32;
  const int64_t blk = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (blk >= int64_t(M) * nb) return;
  const int64_t m = blk / nb, b = blk % nb;
  const float v = x[m * K + b * 32 + block_source(order, lane)];
  float amax = fabsf(v);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float d = amax / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
  int qi = __float2int_rn(__fmul_rn(v, inv));
  qi = qi < -127 ? -127 : (qi > 127 ? 127 : qi);
  q[m * K + b * 32 + lane] = int8_t(qi);
  int s = qi;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) ds[m * nb + b] = make_float2(d, d * float(s));
}

// ---- GEMV -----------------------------------------------------------------------------------
template <int Bits>
struct BlockCodes;  // the codes of one 32-value block, as loaded
template <>
struct BlockCodes<4> { uint4 v; };
template <>
struct BlockCodes<2> { uint2 v; };
template <>
struct BlockCodes<8> { uint4 a, b; };

__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}
__device__ __forceinline__ uint2 ld_stream8(const void* p) {
  uint2 r;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
  return r;
}

template <int Bits>
__device__ __forceinline__ BlockCodes<Bits> load_block(const uint8_t* row, int b) {
  BlockCodes<Bits> c;
  if constexpr (Bits == 4) c.v = ld_stream16(row + int64_t(b) * 16);
  else if constexpr (Bits == 2) c.v = ld_stream8(row + int64_t(b) * 8);
  else {
    c.a = ld_stream16(row + int64_t(b) * 32);
    c.b = ld_stream16(row + int64_t(b) * 32 + 16);
  }
  return c;
}

// The 8 words whose bytes are the codes of positions 4i .. 4i+3 (i = 0..7).
template <int Bits>
__device__ __forceinline__ void unpack_block(const BlockCodes<Bits>& c, int (&a)[8]) {
  if constexpr (Bits == 4) {
    const uint32_t u[4] = {c.v.x, c.v.y, c.v.z, c.v.w};
    unpack_words<4>(u, a);
  } else if constexpr (Bits == 2) {
    const uint32_t u[2] = {c.v.x, c.v.y};
    unpack_words<2>(u, a);
  } else {
    const uint32_t u[8] = {c.a.x, c.a.y, c.a.z, c.a.w, c.b.x, c.b.y, c.b.z, c.b.w};
    unpack_words<8>(u, a);
  }
}

// One block b of the warp's R rows (codes unpacked in a, scale s and offset o per row) against the
// Mrt <= MT activation rows (q int8 [Mrt, K], ds [Mrt, K/32]), added to acc (v1 and v2 share it).
template <int MT, int R>
__device__ __forceinline__ void gemv_block_dot(const int (&a)[R][8], const float (&s)[R], const float (&o)[R],
                                               const int8_t* __restrict__ xq, const float2* __restrict__ xds,
                                               int K, int nb, int b, int Mrt, float (&acc)[R][MT]) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m < Mrt) {
      const int4* xp = reinterpret_cast<const int4*>(xq + int64_t(m) * K + int64_t(b) * 32);
      const int4 x0 = __ldg(xp), x1 = __ldg(xp + 1);
      const float2 dsv = __ldg(xds + int64_t(m) * nb + b);
      const int xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
      for (int r = 0; r < R; ++r) {
        int dot = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot = __dp4a(a[r][i], xv[i], dot);
        acc[r][m] += block_term(s[r], o[r], dsv.x, dsv.y, dot);
      }
    }
  }
}

// The warp's sums of acc; lane 0 writes the rows below N.
template <int MT, int R>
__device__ __forceinline__ void gemv_reduce_store(float (&acc)[R][MT], int lane, int Mrt, int row0, int N,
                                                  float* __restrict__ y) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[r][m] = v;
    }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < Mrt && row0 + r < N) y[int64_t(m) * N + row0 + r] = acc[r][m];
  }
}

// y[m, n] for n in the warp's R rows, m < Mrt <= MT. x: q int8 [Mrt, K] and ds [Mrt, K/32].
template <int Bits, int MT, int R>
__global__ void __launch_bounds__(128) gemv_kernel(Weight w, const int8_t* __restrict__ xq,
                                                    const float2* __restrict__ xds, int Mrt, float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * R;
  if (row0 >= w.N) return;
  const int nb = w.K / 32;
  const int bpg = w.n_groups == 1 ? nb : w.G / 32;  // blocks per group
  const uint8_t* rows[R];
  const __half2* prm[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = min(row0 + r, w.N - 1);  // past the end: recompute the last row, not written
    rows[r] = w.codes + int64_t(row) * w.row_bytes;
    prm[r] = w.params + int64_t(row) * w.n_groups;
  }
  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

#pragma unroll 2
  for (int b = lane; b < nb; b += 32) {
    BlockCodes<Bits> c[R];
#pragma unroll
    for (int r = 0; r < R; ++r) c[r] = load_block<Bits>(rows[r], b);
    const int g = b / bpg;
    float s[R], o[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float2 p = __half22float2(prm[r][g]);
      s[r] = p.x;
      o[r] = w.offset ? p.y : -p.x * p.y;
    }
    int a[R][8];
#pragma unroll
    for (int r = 0; r < R; ++r) unpack_block<Bits>(c[r], a[r]);
    gemv_block_dot<MT, R>(a, s, o, xq, xds, w.K, nb, b, Mrt, acc);
  }
  gemv_reduce_store<MT, R>(acc, lane, Mrt, row0, w.N, y);
}

// V2: y[m, n] as gemv_kernel, with each lane's loads of a chunk of U blocks x R rows issued before
// the chunk's arithmetic, and the first chunk's before the wait for the activations (see the top).
template <int Bits>
__host__ __device__ constexpr int chunk_blocks(int R) {  // U: 128 bytes of codes per lane and chunk
  const int u = (Bits == 2 ? 16 : Bits == 4 ? 8 : 4) / R;
  return u > 0 ? u : 1;
}

template <int Bits, int MT, int R>
__global__ void __launch_bounds__(128) gemv2_kernel(Weight w, const int8_t* __restrict__ xq,
                                                     const float2* __restrict__ xds, int Mrt, float* __restrict__ y) {
  constexpr int U = chunk_blocks<Bits>(R);
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * R;
  if (row0 >= w.N) return;  // writes nothing: need not wait
  const int nb = w.K / 32;
  const int bpg = w.n_groups == 1 ? nb : w.G / 32;  // blocks per group
  const uint8_t* rows[R];
  const __half2* prm[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = min(row0 + r, w.N - 1);  // past the end: recompute the last row, not written
    rows[r] = w.codes + int64_t(row) * w.row_bytes;
    prm[r] = w.params + int64_t(row) * w.n_groups;
  }
  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

  BlockCodes<Bits> c[U][R];
  __half2 p[U][R];
  auto load_chunk = [&](int j0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int b = j0 + 32 * u;
      if (b < nb) {
#pragma unroll
        for (int r = 0; r < R; ++r) c[u][r] = load_block<Bits>(rows[r], b);
#pragma unroll
        for (int r = 0; r < R; ++r) p[u][r] = __ldg(prm[r] + b / bpg);
      }
    }
  };
  load_chunk(lane);
  griddep_wait();  // the activations (xq, xds) come from the quantization kernel
  for (int j0 = lane; j0 < nb; j0 += 32 * U) {
    if (j0 != lane) load_chunk(j0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int b = j0 + 32 * u;
      if (b < nb) {
        float s[R], o[R];
        int a[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float2 pf = __half22float2(p[u][r]);
          s[r] = pf.x;
          o[r] = w.offset ? pf.y : -pf.x * pf.y;
          unpack_block<Bits>(c[u][r], a[r]);
        }
        gemv_block_dot<MT, R>(a, s, o, xq, xds, w.K, nb, b, Mrt, acc);
      }
    }
  }
  gemv_reduce_store<MT, R>(acc, lane, Mrt, row0, w.N, y);
}

// ---- launches (shared by quant_matmul.cu and bench/cuda/quant_gemv_bench.cu) ----------------
constexpr int kGemvWarps = 4;  // warps (of R rows each) per block of 128 threads

// Programmatic dependent launch needs compute capability 9.0 (the current device, asked once).
inline bool pdl_supported() {
  static const bool ok = [] {
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return major >= 9;
  }();
  return ok;
}

// A kernel launch with or without the programmatic-dependent-launch attribute (without it on GPUs
// older than sm_90).
template <class... KArgs, class... Args>
inline cudaError_t launch_kernel(void (*kernel)(KArgs...), unsigned grid, unsigned block, bool pdl, cudaStream_t st,
                                 Args... args) {
  if (!pdl || !pdl_supported()) {
    kernel<<<grid, block, 0, st>>>(KArgs(args)...);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(block);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, KArgs(args)...);
}

// x f32 [M, K] -> xq int8 [M, K], xds [M, K/32] in the weight's element order.
inline cudaError_t launch_quantize(const Weight& w, const float* x, int M, int8_t* xq, float2* xds, Variant v,
                                   cudaStream_t st) {
  const int64_t nblk = int64_t(M) * (w.K / 32);
  return launch_kernel(quantize_acts_kernel, unsigned((nblk + 7) / 8), 256u, v == Variant::V2Pdl, st, x, M, w.K,
                       w.order, xq, xds);
}

// The GEMV of Mrt <= MT token rows, R rows per warp.
template <int Bits, int MT, int R>
inline cudaError_t launch_gemv(const Weight& w, const int8_t* xq, const float2* xds, int Mrt, float* y, Variant v,
                               cudaStream_t st) {
  const unsigned blocks = unsigned((w.N + kGemvWarps * R - 1) / (kGemvWarps * R));
  if (v == Variant::V1)
    return launch_kernel(gemv_kernel<Bits, MT, R>, blocks, 32u * kGemvWarps, false, st, w, xq, xds, Mrt, y);
  return launch_kernel(gemv2_kernel<Bits, MT, R>, blocks, 32u * kGemvWarps, v == Variant::V2Pdl, st, w, xq, xds, Mrt,
                       y);
}

// Rows per warp for M token rows (bench/cuda/quant_gemv_bench.cu's sweep on the H100): 2 up to
// M = 2, 4 above.
template <int Bits>
inline cudaError_t launch_gemv_m(const Weight& w, const int8_t* xq, const float2* xds, int M, float* y, Variant v,
                                 cudaStream_t st) {
  if (M <= 1) return launch_gemv<Bits, 1, 2>(w, xq, xds, M, y, v, st);
  if (M <= 2) return launch_gemv<Bits, 2, 2>(w, xq, xds, M, y, v, st);
  if (M <= 4) return launch_gemv<Bits, 4, 4>(w, xq, xds, M, y, v, st);
  return launch_gemv<Bits, 8, 4>(w, xq, xds, M, y, v, st);
}
inline cudaError_t launch_gemv_m(const Weight& w, const int8_t* xq, const float2* xds, int M, float* y, Variant v,
                                 cudaStream_t st) {
  switch (w.bits) {
    case 2: return launch_gemv_m<2>(w, xq, xds, M, y, v, st);
    case 4: return launch_gemv_m<4>(w, xq, xds, M, y, v, st);
    default: return launch_gemv_m<8>(w, xq, xds, M, y, v, st);
  }
}

// ---- dequantization of rows [r0, r0 + n) into f32 [n, K] (prefill tiles, embedding rows) ------
// One thread per 32-value block. rows: optional list of row indices (embedding lookups); when null
// the rows are r0 .. r0 + n - 1. bad: set to 1 when a listed row is outside [0, N) (row written 0).
template <class Out>
__global__ void dequant_rows_kernel(Weight w, int64_t r0, int64_t n, const int32_t* __restrict__ rows,
                                    Out* __restrict__ out, int* bad) {
  const int nb = w.K / 32;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * nb) return;
  const int64_t t = i / nb;
  const int b = int(i % nb);
  int64_t row = r0 + t;
  Out* dst = out + t * w.K + int64_t(b) * 32;
  if (rows) {
    row = rows[t];
    if (row < 0 || row >= w.N) {
      if (bad) *bad = 1;
      for (int p = 0; p < 32; ++p) dst[p] = Out(0.f);
      return;
    }
  }
  const uint8_t* bp = w.codes + row * w.row_bytes + int64_t(b) * (32 * w.bits / 8);
  const int g = w.n_groups == 1 ? 0 : b * 32 / w.G;
  const float2 p = __half22float2(w.params[row * w.n_groups + g]);
  float v[32];
#pragma unroll
  for (int pos = 0; pos < 32; ++pos) {
    const float q = float(code_at_pos(w.bits, bp, pos));
    v[block_source(w.order, pos)] = w.offset ? q * p.x + p.y : (q - p.y) * p.x;
  }
#pragma unroll
  for (int e = 0; e < 32; ++e) dst[e] = Out(v[e]);
}

}  // namespace lowbit::qgemv
