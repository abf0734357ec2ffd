// Decode GEMV on packed lowbit weights (int4g128 and int2g64, asymmetric: w = (q - z) * s, codes
// little-endian per row as in quant/format.h) on the GPU, against the card's copy bandwidth and a
// bf16 cuBLAS GEMV of the same shape, at Llama-7B shapes; plus prefill as dequantize-to-bf16 +
// cuBLAS. Self-contained (CUDA runtime + cuBLAS), C++17. The kernels are the ones quant_matmul's
// CUDA body runs (src/lowbit/ops/cuda/quant_gemv.cuh: int8 activations per block of 32, dp4a,
// R rows per warp; the timing includes the activation quantization kernel). Every result is first
// checked against CPU references (f64) on the same packed data: with the same int8 activations
// (exact up to f32 rounding) and with the f32 activations (shows the int8 activation rounding).
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -I src bench/cuda/quant_gemv_bench.cu -lcublas -o quant_gemv_bench
//   ./quant_gemv_bench            # prints markdown tables
//
// Timing: each measurement rotates over enough copies of the weights to exceed the L2 cache
// (50 MB on H100), so every call reads its weights from HBM; mean over many calls (CUDA events).
// GB/s counts the packed codes + group parameters + f32 activations in + f32 outputs.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <cstring>
#include <vector>

#include "lowbit/core/format_traits.h"
#include "lowbit/ops/cuda/quant_gemv.cuh"

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

namespace qg = lowbit::qgemv;

// Prefill: W -> bf16 [N, K] (then cuBLAS), one thread per 32-value block.
void dequant_bf16(const qg::Weight& w, __nv_bfloat16* out) {
  const int64_t n = int64_t(w.N) * (w.K / 32);
  qg::dequant_rows_kernel<__nv_bfloat16><<<unsigned((n + 255) / 256), 256>>>(w, 0, w.N, nullptr, out, nullptr);
}

struct Packed {
  int bits, G;
  std::vector<uint8_t> codes;             // lowbit layout (format.h): little-endian packed rows
  std::vector<uint16_t> scales, zeros;    // f16 [N, K/G]
  std::vector<__half2> params;            // the device form: (s, z) per group
};

Packed make_packed(int bits, int G, int N, int K, uint64_t seed) {
  Packed p{bits, G, {}, {}, {}, {}};
  std::mt19937_64 r(seed);
  p.codes.resize(size_t(N) * K * bits / 8);
  for (auto& b : p.codes) b = uint8_t(r());
  const size_t ng = size_t(N) * (K / G);
  p.scales.resize(ng);
  p.zeros.resize(ng);
  p.params.resize(ng);
  std::uniform_real_distribution<float> us(0.001f, 0.02f);
  for (size_t i = 0; i < ng; ++i) {
    p.scales[i] = lowbit::fmt_f32_to_f16(us(r));
    p.zeros[i] = lowbit::fmt_f32_to_f16(float(r() % (1u << bits)));
    p.params[i] = __floats2half2_rn(lowbit::fmt_f16_to_f32(p.scales[i]), lowbit::fmt_f16_to_f32(p.zeros[i]));
  }
  return p;
}

// The CPU's int8 activation operand (quant_matmul.cpp quantize_acts), natural order: values
// d * q for each activation, to compute the exact reference of the int8 path.
std::vector<double> int8_acts(const std::vector<float>& x, int M, int K) {
  std::vector<double> out(x.size());
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < K / 32; ++b) {
      const float* xb = x.data() + size_t(m) * K + b * 32;
      float amax = 0;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float d = amax / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
      for (int i = 0; i < 32; ++i) {
        const int q = std::clamp(int(std::nearbyint(xb[i] * inv)), -127, 127);
        out[size_t(m) * K + b * 32 + i] = double(d) * q;
      }
    }
  return out;
}

template <int Bits, int MT, int R>
void launch_gemv(const qg::Weight& w, const int8_t* xq, const float2* xds, int M, float* y) {
  constexpr int kWarps = 4;
  const int rows_per_block = kWarps * R;
  qg::gemv_kernel<Bits, MT, R><<<(w.N + rows_per_block - 1) / rows_per_block, kWarps * 32>>>(w, xq, xds, M, y);
}

// The whole decode op: activation quantization + GEMV (R rows per warp).
void gemv(const qg::Weight& w, int R, const float* x, int8_t* xq, float2* xds, int M, float* y) {
  const int64_t nblk = int64_t(M) * (w.K / 32);
  qg::quantize_acts_kernel<<<unsigned((nblk + 7) / 8), 256>>>(x, M, w.K, w.order, xq, xds);
#define CASE(B, MT, RR) \
  if (w.bits == B && M <= MT && R == RR) return launch_gemv<B, MT, RR>(w, xq, xds, M, y);
#define RS(B, MT) CASE(B, MT, 1) CASE(B, MT, 2) CASE(B, MT, 4)
  RS(4, 1) RS(4, 4) RS(4, 8) RS(2, 1) RS(2, 4) RS(2, 8)
#undef RS
#undef CASE
  std::fprintf(stderr, "unsupported bits/M/R\n");
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
  std::printf("| format | shape N x K | M | rel err vs int8-act ref | rel err vs f32 acts | us/call | R | GB/s | of copy BW "
              "| bf16 cuBLAS us | speedup | us R=1/2/4 |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");

  const int shapes[3][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
  const int fmts[2][2] = {{4, 128}, {2, 64}};
  bool ok = true;
  std::vector<std::string> prefill_rows;
  for (auto& fm : fmts)
    for (auto& sh : shapes) {
      const int bits = fm[0], G = fm[1], N = sh[0], K = sh[1];
      const Packed p = make_packed(bits, G, N, K, 42);
      const size_t wbytes = p.codes.size() + p.params.size() * 4;
      const int copies = int(std::max<size_t>(2, (size_t(160) << 20) / wbytes + 1));
      uint8_t* dc;
      __half2* dp;
      CK(cudaMalloc(&dc, p.codes.size() * copies));
      CK(cudaMalloc(&dp, p.params.size() * 4 * copies));
      for (int c = 0; c < copies; ++c) {
        CK(cudaMemcpy(dc + p.codes.size() * c, p.codes.data(), p.codes.size(), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dp + p.params.size() * c, p.params.data(), p.params.size() * 4, cudaMemcpyHostToDevice));
      }
      auto weight = [&](int c) {
        qg::Weight w;
        w.codes = dc + p.codes.size() * c;
        w.params = dp + p.params.size() * c;
        w.row_bytes = int64_t(K) * bits / 8;
        w.N = N;
        w.K = K;
        w.G = G;
        w.n_groups = K / G;
        w.bits = bits;
        w.order = bits;  // lowbit's packed rows: activations permuted to match
        w.offset = false;
        return w;
      };
      // bf16 dense weights for cuBLAS (same values), rotated copies too.
      const size_t dbytes = size_t(N) * K * 2;
      const int dcopies = int(std::max<size_t>(2, (size_t(160) << 20) / dbytes + 1));
      __nv_bfloat16* dw;
      CK(cudaMalloc(&dw, dbytes * dcopies));
      for (int c = 0; c < dcopies; ++c) dequant_bf16(weight(0), dw + size_t(N) * K * c);
      CK(cudaDeviceSynchronize());
      for (int M : {1, 4, 8}) {
        std::vector<float> hx(size_t(M) * K);
        std::mt19937 r(7);
        std::normal_distribution<float> nd;
        for (auto& v : hx) v = nd(r);
        const std::vector<double> hq = int8_acts(hx, M, K);
        float *dx, *dy;
        int8_t* dxq;
        float2* dxds;
        __nv_bfloat16* dxb;
        CK(cudaMalloc(&dx, hx.size() * 4));
        CK(cudaMalloc(&dxq, hx.size()));
        CK(cudaMalloc(&dxds, hx.size() / 32 * 8));
        CK(cudaMalloc(&dxb, hx.size() * 2));
        CK(cudaMalloc(&dy, size_t(M) * N * 4));
        CK(cudaMemcpy(dx, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice));
        std::vector<__nv_bfloat16> hxb(hx.size());
        for (size_t i = 0; i < hx.size(); ++i) hxb[i] = __float2bfloat16(hx[i]);
        CK(cudaMemcpy(dxb, hxb.data(), hx.size() * 2, cudaMemcpyHostToDevice));
        float best = 1e30f;
        int best_r = 0;
        double rel = 0, rel32 = 0;
        char sweep[128] = "";
        for (int R : {1, 2, 4}) {
          // Correctness: copy 0 against the CPU references (f64): the same int8 activations (the
          // kernel's exact arithmetic up to f32 rounding) and the f32 activations (int8 rounding).
          CK(cudaMemset(dy, 0xff, size_t(M) * N * 4));
          gemv(weight(0), R, dx, dxq, dxds, M, dy);
          CK(cudaDeviceSynchronize());
          std::vector<float> hy(size_t(M) * N);
          CK(cudaMemcpy(hy.data(), dy, hy.size() * 4, cudaMemcpyDeviceToHost));
          double maxerr = 0, maxerr32 = 0, maxref = 0;
          const int64_t rb = int64_t(K) * bits / 8;
          for (int n = 0; n < N; n += (n < 64 ? 1 : 7))
            for (int m = 0; m < M; ++m) {
              double ref = 0, ref32 = 0;
              for (int k = 0; k < K; ++k) {
                const size_t gi = size_t(n) * (K / G) + k / G;
                const double w = (double(lowbit::unpack_code(bits, p.codes.data() + n * rb, k)) -
                                  lowbit::fmt_f16_to_f32(p.zeros[gi])) * lowbit::fmt_f16_to_f32(p.scales[gi]);
                ref += w * hq[size_t(m) * K + k];
                ref32 += w * hx[size_t(m) * K + k];
              }
              maxerr = std::max(maxerr, std::fabs(ref - hy[size_t(m) * N + n]));
              maxerr32 = std::max(maxerr32, std::fabs(ref32 - hy[size_t(m) * N + n]));
              maxref = std::max(maxref, std::fabs(ref32));
            }
          rel = std::max(rel, maxerr / maxref);
          rel32 = std::max(rel32, maxerr32 / maxref);
          ok = ok && maxerr / maxref < 1e-5 && maxerr32 / maxref < 2e-2;
          const float us = 1e3f * time_ms(200, [&](int i) { gemv(weight(i % copies), R, dx, dxq, dxds, M, dy); });
          std::snprintf(sweep + std::strlen(sweep), sizeof sweep - std::strlen(sweep), "%s%.1f", R == 1 ? "" : " / ", us);
          if (us < best) {
            best = us;
            best_r = R;
          }
        }
        const float alpha = 1.f, beta = 0.f;
        const float cu = 1e3f * time_ms(200, [&](int i) {
          const int c = i % dcopies;
          CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, dw + size_t(N) * K * c, CUDA_R_16BF, K, dxb,
                          CUDA_R_16BF, K, &beta, dy, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        });
        const double bytes = double(wbytes) + double(M) * K * 4 + double(M) * N * 4;
        const double gbs = bytes / (best * 1e-6) / 1e9;
        std::printf("| int%dg%d | %d x %d | %d | %.1e | %.1e | %.1f | %d | %.0f | %.0f %% | %.1f | %.2fx | %s |\n", bits, G, N,
                    K, M, rel, rel32, best, best_r, gbs, 100.0 * gbs / copy_gbs, cu, cu / best, sweep);
        CK(cudaFree(dx));
        CK(cudaFree(dxq));
        CK(cudaFree(dxds));
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
        const float deq = 1e3f * time_ms(50, [&](int i) {
          dequant_bf16(weight(i % copies), tmp);
          CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, tmp, CUDA_R_16BF, K, dxb, CUDA_R_16BF, K, &beta, dy,
                          CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        });
        const float dense = 1e3f * time_ms(50, [&](int i) {
          const int c = i % dcopies;
          CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, dw + size_t(N) * K * c, CUDA_R_16BF, K, dxb,
                          CUDA_R_16BF, K, &beta, dy, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        });
        char line[256];
        std::snprintf(line, sizeof line, "| int%dg%d | %d x %d | %d | %.1f | %.1f | %.2fx |", bits, G, N, K, M, deq, dense,
                      dense / deq);
        prefill_rows.push_back(line);
        CK(cudaFree(dxb));
        CK(cudaFree(dy));
        CK(cudaFree(tmp));
      }
      CK(cudaFree(dc));
      CK(cudaFree(dp));
      CK(cudaFree(dw));
    }
  std::printf("\nPrefill: dequantize to bf16 + cuBLAS bf16 GEMM vs the bf16 GEMM alone\n\n");
  std::printf("| format | shape N x K | M | dequant + GEMM us | bf16 GEMM us | ratio |\n|---|---|---:|---:|---:|---:|\n");
  for (auto& l : prefill_rows) std::printf("%s\n", l.c_str());
  std::printf("\ncorrectness vs CPU references (int8-act ref < 1e-5, f32-act ref < 2e-2): %s\n", ok ? "PASS" : "FAIL");
  cublasDestroy(h);
  return ok ? 0 : 1;
}
