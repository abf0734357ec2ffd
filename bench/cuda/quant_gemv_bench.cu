// Decode GEMV on packed lowbit weights (int4g128 and int2g64, asymmetric: w = (q - z) * s, codes
// little-endian per row as in quant/format.h) on the GPU, against the card's copy bandwidth and a
// bf16 cuBLAS GEMV of the same shape, at Llama-7B shapes; plus prefill as dequantize-to-bf16 +
// cuBLAS. Self-contained (CUDA runtime + cuBLAS), C++17. Every kernel result is first checked
// against a CPU reference (f64) on the same packed data.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -I src bench/cuda/quant_gemv_bench.cu -lcublas -o quant_gemv_bench
//   ./quant_gemv_bench            # prints a markdown table
//
// Timing: each measurement rotates over enough copies of the weights to exceed the L2 cache
// (50 MB on H100), so every call reads its weights from HBM; mean over many calls (CUDA events).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "lowbit/core/format_traits.h"

#define CK(x)                                                                               \
  do {                                                                                      \
    cudaError_t e_ = (x);                                                                   \
    if (e_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)
#define CB(x)                                                                      \
  do {                                                                             \
    cublasStatus_t s_ = (x);                                                       \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                             \
      std::fprintf(stderr, "%s:%d: %s: cuBLAS status %d\n", __FILE__, __LINE__, #x, int(s_)); \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

namespace {

// One warp per output row; each lane reads 16 bytes of codes at a time (32 int4 or 64 int2 codes,
// always inside one group since 32 | 128 and 64 | 64), and M activation rows.
template <int Bits, int M>
__global__ void gemv_kernel(const uint8_t* __restrict__ codes, const __half* __restrict__ scales,
                            const __half* __restrict__ zeros, const float* __restrict__ x, float* __restrict__ y,
                            int N, int K, int G) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (row >= N) return;
  constexpr int kCodes = 128 / Bits, kPerWord = 32 / Bits;
  const int64_t rb = int64_t(K) * Bits / 8;
  const uint4* wr = reinterpret_cast<const uint4*>(codes + int64_t(row) * rb);
  const int nvec = int(rb / 16), ng = K / G;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
#pragma unroll 4
  for (int v = lane; v < nvec; v += 32) {
    uint4 p;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(p.x), "=r"(p.y), "=r"(p.z), "=r"(p.w)
                 : "l"(wr + v));
    const int c0 = v * kCodes, g = c0 / G;
    const float s = __half2float(scales[int64_t(row) * ng + g]), z = __half2float(zeros[int64_t(row) * ng + g]);
    const uint32_t words[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float4* xv = reinterpret_cast<const float4*>(x + int64_t(m) * K + c0);
      float qx = 0.f, sx = 0.f;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const uint32_t u = words[w];
#pragma unroll
        for (int j4 = 0; j4 < kPerWord / 4; ++j4) {
          const float4 xa = xv[w * (kPerWord / 4) + j4];
          const int b = j4 * 4 * Bits;
          constexpr uint32_t mask = (1u << Bits) - 1;
          qx += float((u >> b) & mask) * xa.x + float((u >> (b + Bits)) & mask) * xa.y +
                float((u >> (b + 2 * Bits)) & mask) * xa.z + float((u >> (b + 3 * Bits)) & mask) * xa.w;
          sx += (xa.x + xa.y) + (xa.z + xa.w);
        }
      }
      acc[m] += s * (qx - z * sx);
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float a = acc[m];
    for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
    if (lane == 0) y[int64_t(m) * N + row] = a;
  }
}

// Prefill: W -> bf16 [N, K] (then cuBLAS). One thread per 8 codes.
template <int Bits>
__global__ void dequant_bf16_kernel(const uint8_t* __restrict__ codes, const __half* __restrict__ scales,
                                    const __half* __restrict__ zeros, __nv_bfloat16* __restrict__ w, int N, int K,
                                    int G) {
  const int64_t i8 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_row = K / 8;
  if (i8 >= int64_t(N) * per_row) return;
  const int64_t row = i8 / per_row, c0 = (i8 % per_row) * 8;
  const int64_t rb = int64_t(K) * Bits / 8;
  const uint8_t* rp = codes + row * rb;
  const int g = int(c0 / G), ng = K / G;
  const float s = __half2float(scales[row * ng + g]), z = __half2float(zeros[row * ng + g]);
  for (int j = 0; j < 8; ++j)
    w[row * K + c0 + j] = __float2bfloat16((float(lowbit::unpack_code(Bits, rp, c0 + j)) - z) * s);
}

struct Packed {
  int bits, G;
  std::vector<uint8_t> codes;
  std::vector<uint16_t> scales, zeros;
};

Packed make_packed(int bits, int G, int N, int K, uint64_t seed) {
  Packed p{bits, G, {}, {}, {}};
  std::mt19937_64 r(seed);
  p.codes.resize(size_t(N) * K * bits / 8);
  for (auto& b : p.codes) b = uint8_t(r());
  const size_t ng = size_t(N) * (K / G);
  p.scales.resize(ng);
  p.zeros.resize(ng);
  std::uniform_real_distribution<float> us(0.001f, 0.02f);
  for (size_t i = 0; i < ng; ++i) {
    p.scales[i] = lowbit::fmt_f32_to_f16(us(r));
    p.zeros[i] = lowbit::fmt_f32_to_f16(float(r() % (1u << bits)));
  }
  return p;
}

template <int Bits, int M>
void launch_gemv(const uint8_t* c, const __half* s, const __half* z, const float* x, float* y, int N, int K, int G) {
  constexpr int kWarps = 8;
  gemv_kernel<Bits, M><<<(N + kWarps - 1) / kWarps, kWarps * 32>>>(c, s, z, x, y, N, K, G);
}

void gemv(int bits, int M, const uint8_t* c, const __half* s, const __half* z, const float* x, float* y, int N, int K,
          int G) {
#define CASE(B, MM) \
  if (bits == B && M == MM) return launch_gemv<B, MM>(c, s, z, x, y, N, K, G);
  CASE(4, 1) CASE(4, 4) CASE(4, 8) CASE(2, 1) CASE(2, 4) CASE(2, 8)
#undef CASE
  std::fprintf(stderr, "unsupported bits/M\n");
  std::exit(1);
}

template <class F>
float time_ms(int iters, F&& f) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f(i);
  CK(cudaEventRecord(a));
  for (int i = 0; i < iters; ++i) f(i);
  CK(cudaEventRecord(b));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  CK(cudaGetLastError());
  return ms / float(iters);
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  cublasHandle_t h;
  CB(cublasCreate(&h));
  // Copy bandwidth: device-to-device memcpy of 1 GiB (read + write bytes / time).
  const size_t cp = size_t(1) << 30;
  void *src = nullptr, *dst = nullptr;
  CK(cudaMalloc(&src, cp));
  CK(cudaMalloc(&dst, cp));
  CK(cudaMemset(src, 1, cp));
  const float cp_ms = time_ms(10, [&](int) { CK(cudaMemcpyAsync(dst, src, cp, cudaMemcpyDeviceToDevice)); });
  const double copy_gbs = 2.0 * double(cp) / (cp_ms * 1e-3) / 1e9;
  CK(cudaFree(src));
  CK(cudaFree(dst));
  std::printf("device: %s; copy bandwidth (D2D memcpy, 1 GiB): %.0f GB/s\n\n", prop.name, copy_gbs);
  std::printf("| format | shape N x K | M | max rel err | us/call | GB/s | of copy BW | bf16 cuBLAS us | speedup |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");

  const int shapes[3][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
  const int fmts[2][2] = {{4, 128}, {2, 64}};
  bool ok = true;
  for (auto& fm : fmts)
    for (auto& sh : shapes) {
      const int bits = fm[0], G = fm[1], N = sh[0], K = sh[1];
      const Packed p = make_packed(bits, G, N, K, 42);
      const size_t wbytes = p.codes.size() + 2 * p.scales.size() * 2;
      const int copies = int(std::max<size_t>(2, (size_t(160) << 20) / wbytes + 1));
      uint8_t* dc;
      __half *ds, *dz;
      CK(cudaMalloc(&dc, p.codes.size() * copies));
      CK(cudaMalloc(&ds, p.scales.size() * 2 * copies));
      CK(cudaMalloc(&dz, p.zeros.size() * 2 * copies));
      for (int c = 0; c < copies; ++c) {
        CK(cudaMemcpy(dc + p.codes.size() * c, p.codes.data(), p.codes.size(), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(ds + p.scales.size() * c, p.scales.data(), p.scales.size() * 2, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dz + p.zeros.size() * c, p.zeros.data(), p.zeros.size() * 2, cudaMemcpyHostToDevice));
      }
      // bf16 dense weights for cuBLAS (same values), rotated copies too.
      const size_t dbytes = size_t(N) * K * 2;
      const int dcopies = int(std::max<size_t>(2, (size_t(160) << 20) / dbytes + 1));
      __nv_bfloat16* dw;
      CK(cudaMalloc(&dw, dbytes * dcopies));
      {
        const int64_t n8 = int64_t(N) * K / 8;
        for (int c = 0; c < dcopies; ++c) {
          if (bits == 4)
            dequant_bf16_kernel<4><<<int((n8 + 255) / 256), 256>>>(dc, ds, dz, dw + size_t(N) * K * c, N, K, G);
          else
            dequant_bf16_kernel<2><<<int((n8 + 255) / 256), 256>>>(dc, ds, dz, dw + size_t(N) * K * c, N, K, G);
        }
        CK(cudaDeviceSynchronize());
      }
      for (int M : {1, 4, 8}) {
        std::vector<float> hx(size_t(M) * K);
        std::mt19937 r(7);
        std::normal_distribution<float> nd;
        for (auto& v : hx) v = nd(r);
        float *dx, *dy;
        __nv_bfloat16* dxb;
        CK(cudaMalloc(&dx, hx.size() * 4));
        CK(cudaMalloc(&dxb, hx.size() * 2));
        CK(cudaMalloc(&dy, size_t(M) * N * 4));
        CK(cudaMemcpy(dx, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice));
        std::vector<__nv_bfloat16> hxb(hx.size());
        for (size_t i = 0; i < hx.size(); ++i) hxb[i] = __float2bfloat16(hx[i]);
        CK(cudaMemcpy(dxb, hxb.data(), hx.size() * 2, cudaMemcpyHostToDevice));
        // Correctness: copy 0 against the CPU reference (f64).
        gemv(bits, M, dc, ds, dz, dx, dy, N, K, G);
        CK(cudaDeviceSynchronize());
        std::vector<float> hy(size_t(M) * N);
        CK(cudaMemcpy(hy.data(), dy, hy.size() * 4, cudaMemcpyDeviceToHost));
        double maxerr = 0, maxref = 0;
        const int64_t rb = int64_t(K) * bits / 8;
        for (int n = 0; n < N; n += 7)
          for (int m = 0; m < M; ++m) {
            double ref = 0;
            for (int k = 0; k < K; ++k) {
              const size_t gi = size_t(n) * (K / G) + k / G;
              const double w = (double(lowbit::unpack_code(bits, p.codes.data() + n * rb, k)) -
                                lowbit::fmt_f16_to_f32(p.zeros[gi])) * lowbit::fmt_f16_to_f32(p.scales[gi]);
              ref += w * hx[size_t(m) * K + k];
            }
            maxerr = std::max(maxerr, std::fabs(ref - hy[size_t(m) * N + n]));
            maxref = std::max(maxref, std::fabs(ref));
          }
        const double rel = maxerr / maxref;
        ok = ok && rel < 1e-4;
        const float us = 1e3f * time_ms(200, [&](int i) {
          const int c = i % copies;
          gemv(bits, M, dc + p.codes.size() * c, ds + p.scales.size() * c, dz + p.zeros.size() * c, dx, dy, N, K, G);
        });
        const float alpha = 1.f, beta = 0.f;
        const float cu = 1e3f * time_ms(200, [&](int i) {
          const int c = i % dcopies;
          CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, dw + size_t(N) * K * c, CUDA_R_16BF, K, dxb,
                          CUDA_R_16BF, K, &beta, dy, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        });
        const double bytes = double(wbytes) + double(M) * K * 4 + double(M) * N * 4;
        const double gbs = bytes / (us * 1e-6) / 1e9;
        std::printf("| int%dg%d | %d x %d | %d | %.1e | %.1f | %.0f | %.0f %% | %.1f | %.2fx |\n", bits, G, N, K, M, rel, us,
                    gbs, 100.0 * gbs / copy_gbs, cu, cu / us);
        CK(cudaFree(dx));
        CK(cudaFree(dxb));
        CK(cudaFree(dy));
      }
      // Prefill (M = 512): dequantize to bf16 + cuBLAS vs cuBLAS on bf16 weights alone.
      {
        const int M = 512;
        __nv_bfloat16 *dxb, *tmp;
        float* dy;
        CK(cudaMalloc(&dxb, size_t(M) * K * 2));
        CK(cudaMemset(dxb, 0, size_t(M) * K * 2));
        CK(cudaMalloc(&dy, size_t(M) * N * 4));
        CK(cudaMalloc(&tmp, dbytes));
        const float alpha = 1.f, beta = 0.f;
        const int64_t n8 = int64_t(N) * K / 8;
        const float deq = 1e3f * time_ms(50, [&](int i) {
          const int c = i % copies;
          if (bits == 4)
            dequant_bf16_kernel<4><<<int((n8 + 255) / 256), 256>>>(dc + p.codes.size() * c, ds + p.scales.size() * c,
                                                                    dz + p.zeros.size() * c, tmp, N, K, G);
          else
            dequant_bf16_kernel<2><<<int((n8 + 255) / 256), 256>>>(dc + p.codes.size() * c, ds + p.scales.size() * c,
                                                                    dz + p.zeros.size() * c, tmp, N, K, G);
          CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, tmp, CUDA_R_16BF, K, dxb, CUDA_R_16BF, K, &beta, dy,
                          CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        });
        const float dense = 1e3f * time_ms(50, [&](int i) {
          const int c = i % dcopies;
          CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, dw + size_t(N) * K * c, CUDA_R_16BF, K, dxb,
                          CUDA_R_16BF, K, &beta, dy, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        });
        std::printf("| int%dg%d prefill (dequant bf16 + cuBLAS) | %d x %d | %d | - | %.1f | - | - | %.1f | %.2fx |\n", bits,
                    G, N, K, M, deq, dense, dense / deq);
        CK(cudaFree(dxb));
        CK(cudaFree(dy));
        CK(cudaFree(tmp));
      }
      CK(cudaFree(dc));
      CK(cudaFree(ds));
      CK(cudaFree(dz));
      CK(cudaFree(dw));
    }
  std::printf("\ncorrectness vs CPU reference (max rel err < 1e-4): %s\n", ok ? "PASS" : "FAIL");
  cublasDestroy(h);
  return ok ? 0 : 1;
}
