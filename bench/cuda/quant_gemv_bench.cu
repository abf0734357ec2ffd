// Decode GEMV on packed lowbit weights (int4g128, int2g64 and the ternary format's per-row form, asymmetric: w = (q - z) * s, codes
// little-endian per row as in quant/format.h) on the GPU, against the card's copy bandwidth and a
// bf16 cuBLAS GEMV of the same shape, at Llama-7B shapes; plus prefill as dequantize-to-bf16 +
// cuBLAS. Self-contained (CUDA runtime + cuBLAS), C++17. The kernels are the ones quant_matmul's
// CUDA body runs (src/lowbit/ops/cuda/quant_gemv.cuh: int8 activations per block of 32, dp4a,
// R rows per warp; the timing includes the activation quantization kernel), each GEMV variant
// (v1, v2, v2pdl: quant_gemv.cuh's Variant, LOWBIT_CUDA_GEMV in the library) in the same run.
// Every result is first checked against CPU references (f64) on the same packed data: with the same
// int8 activations (exact up to f32 rounding) and with the f32 activations (shows the int8
// activation rounding).
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -I src bench/cuda/quant_gemv_bench.cu -lcublas -o quant_gemv_bench
//   ./quant_gemv_bench [--variant v1|v2|v2pdl]... [--no-prefill]   # prints markdown tables
//
// Timing: each measurement rotates over enough copies of the weights to exceed the L2 cache
// (50 MB on H100), so every call reads its weights from HBM; mean over many calls (CUDA events),
// twice: launched back to back from the host ("stream"; what the 2026-12-06 table measured, then
// on the legacy stream, now on a non-blocking one like the library's) and
// as 100 calls captured in one CUDA graph ("graph": no host launch cost; PDL edges kept). R is
// the best of 1, 2, 4 by the graph time. GB/s counts the packed codes + group parameters + f32
// activations in + f32 outputs, over the graph time; "of copy BW" divides it by the D2D copy.
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

// The whole decode op: activation quantization + GEMV (R rows per warp), with the kernels and
// launches of quant_matmul's CUDA body (quant_gemv.cuh).
cudaError_t gemv(const qg::Weight& w, qg::Variant v, int R, const float* x, int8_t* xq, float2* xds, int M, float* y,
                 cudaStream_t st = nullptr) {
  const cudaError_t e = qg::launch_quantize(w, x, M, xq, xds, v, st);
  if (e != cudaSuccess) return e;
#define CASE(B, MT, RR) \
  if (w.bits == B && M <= MT && R == RR) return qg::launch_gemv<B, MT, RR>(w, xq, xds, M, y, v, st);
#define RS(B, MT) CASE(B, MT, 1) CASE(B, MT, 2) CASE(B, MT, 4)
  RS(4, 1) RS(4, 4) RS(4, 8) RS(2, 1) RS(2, 4) RS(2, 8)
#undef RS
#undef CASE
  std::fprintf(stderr, "unsupported bits/M/R\n");
  std::exit(1);
}

// The stream the decode timings run on, launched and captured (created in main; non-blocking like
// the library's stream: programmatic dependent launch as quant_matmul gets it). Every use ends
// with a host synchronization, so the legacy stream's work (checks, prefill) never overlaps it.
cudaStream_t g_capture = nullptr;

// Mean ms per call of f(i, stream) -> cudaError_t, i < iters, captured into one CUDA graph and
// replayed 5 times: the host's launch cost is out of the measurement, as in a captured decode step
// (the stream timing of time_ms can be bound by the host at a few us per launch). -1 when the
// capture fails (message on stderr).
template <class F>
float time_graph_ms(int iters, F&& f) {
  cudaGraph_t g = nullptr;
  cudaGraphExec_t ge = nullptr;
  CK(cudaStreamBeginCapture(g_capture, cudaStreamCaptureModeThreadLocal));
  cudaError_t err = cudaSuccess;
  for (int i = 0; i < iters && err == cudaSuccess; ++i) err = f(i, g_capture);
  const cudaError_t end = cudaStreamEndCapture(g_capture, &g);
  if (err == cudaSuccess) err = end;
  if (err == cudaSuccess) err = cudaGraphInstantiate(&ge, g, 0);
  if (err != cudaSuccess) {
    std::fprintf(stderr, "quant_gemv_bench: graph capture failed: %s\n", cudaGetErrorString(err));
    (void)cudaGetLastError();
    if (g) cudaGraphDestroy(g);
    return -1.f;
  }
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  CK(cudaGraphLaunch(ge, g_capture));  // warm-up
  CK(cudaEventRecord(a, g_capture));
  for (int r = 0; r < 5; ++r) CK(cudaGraphLaunch(ge, g_capture));
  CK(cudaEventRecord(b, g_capture));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  return ms / float(5 * iters);
}

template <class F>
float time_ms(int iters, F&& f, cudaStream_t st = nullptr) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f(i);
  CK(cudaEventRecord(a, st));
  for (int i = 0; i < iters; ++i) f(i);
  CK(cudaEventRecord(b, st));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  CK(cudaGetLastError());
  return ms / float(iters);
}

}  // namespace

int main(int argc, char** argv) {
  // --variant v1|v2|v2pdl (repeatable; default all three): the GEMV kernels to measure.
  std::vector<qg::Variant> variants;
  bool prefill = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--variant" && i + 1 < argc) {
      const std::string v = argv[++i];
      if (v == "v1") variants.push_back(qg::Variant::V1);
      else if (v == "v2") variants.push_back(qg::Variant::V2);
      else if (v == "v2pdl") variants.push_back(qg::Variant::V2Pdl);
      else {
        std::fprintf(stderr, "quant_gemv_bench: error: --variant %s: expected v1, v2 or v2pdl\n", v.c_str());
        return 2;
      }
    } else if (a == "--no-prefill") {
      prefill = false;
    } else {
      std::fprintf(stderr, "usage: quant_gemv_bench [--variant v1|v2|v2pdl]... [--no-prefill]\n");
      return 2;
    }
  }
  if (variants.empty()) variants = {qg::Variant::V1, qg::Variant::V2, qg::Variant::V2Pdl};
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  cublasHandle_t h;
  CB(cublasCreate(&h));
  CK(cudaStreamCreateWithFlags(&g_capture, cudaStreamNonBlocking));
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
  // One row per format, shape, M and GEMV variant: the best R (rows per warp) of 1, 2, 4 by the
  // graph timing (the stream timing when capture failed). "stream": back-to-back launches from the
  // host, as the 2026-12-06 table; "graph": 100 calls captured in one CUDA graph.
  std::printf("| format | shape N x K | M | kernel | rel err vs int8-act ref | rel err vs f32 acts | us/call stream | "
              "us/call graph | R | GB/s (graph) | of copy BW | bf16 cuBLAS us stream / graph | speedup stream | "
              "speedup graph | graph us R=1/2/4 |\n");
  std::printf("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");

  const int shapes[3][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
  // {bits, G}; G 0: one group per row (the ternary format's GPU form: 2-bit codes, (gamma, 1) per row)
  const int fmts[3][2] = {{4, 128}, {2, 64}, {2, 0}};
  bool ok = true;
  std::vector<std::string> prefill_rows;
  for (auto& fm : fmts)
    for (auto& sh : shapes) {
      const int bits = fm[0], N = sh[0], K = sh[1], G = fm[1] ? fm[1] : K;
      char fname[32];
      if (fm[1]) std::snprintf(fname, sizeof fname, "int%dg%d", bits, G);
      else std::snprintf(fname, sizeof fname, "ternary (int%dpc)", bits);
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
        const float alpha = 1.f, beta = 0.f;
        auto cublas_call = [&](int i) {
          const int c = i % dcopies;
          return cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, dw + size_t(N) * K * c, CUDA_R_16BF, K, dxb,
                              CUDA_R_16BF, K, &beta, dy, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        };
        CB(cublasSetStream(h, g_capture));
        const float cu = 1e3f * time_ms(200, [&](int i) { CB(cublas_call(i)); }, g_capture);
        const float cug = 1e3f * time_graph_ms(100, [&](int i, cudaStream_t) {
          return cublas_call(i) == CUBLAS_STATUS_SUCCESS ? cudaSuccess : cudaErrorUnknown;
        });
        CB(cublasSetStream(h, nullptr));
        const double bytes = double(wbytes) + double(M) * K * 4 + double(M) * N * 4;
        // CPU references (f64) of the sampled outputs (every row of the first and last 64, every
        // 7th between): with the int8 activations and with the f32 activations.
        struct Ref {
          int n, m;
          double q, f;
        };
        std::vector<Ref> refs;
        const int64_t rb = int64_t(K) * bits / 8;
        for (int n = 0; n < N; n += (n < 64 || n >= N - 64 ? 1 : 7))
          for (int m = 0; m < M; ++m) {
            double ref = 0, ref32 = 0;
            for (int k = 0; k < K; ++k) {
              const size_t gi = size_t(n) * (K / G) + k / G;
              const double w = (double(lowbit::unpack_code(bits, p.codes.data() + n * rb, k)) -
                                lowbit::fmt_f16_to_f32(p.zeros[gi])) * lowbit::fmt_f16_to_f32(p.scales[gi]);
              ref += w * hq[size_t(m) * K + k];
              ref32 += w * hx[size_t(m) * K + k];
            }
            refs.push_back({n, m, ref, ref32});
          }
        for (const qg::Variant v : variants) {
          float best = 1e30f, best_stream = 0;
          int best_r = 0;
          bool graph = cug > 0;  // graph timings exist (capture worked for cuBLAS and every R)
          double rel = 0, rel32 = 0;
          char sweep[128] = "";
          for (int R : {1, 2, 4}) {
            // Correctness: copy 0 against the CPU references (f64): the same int8 activations (the
            // kernel's exact arithmetic up to f32 rounding) and the f32 activations (int8 rounding).
            CK(cudaMemset(dy, 0xff, size_t(M) * N * 4));
            CK(gemv(weight(0), v, R, dx, dxq, dxds, M, dy));
            CK(cudaDeviceSynchronize());
            std::vector<float> hy(size_t(M) * N);
            CK(cudaMemcpy(hy.data(), dy, hy.size() * 4, cudaMemcpyDeviceToHost));
            double maxerr = 0, maxerr32 = 0, maxref = 0;
            for (const Ref& r : refs) {
              const double got = hy[size_t(r.m) * N + r.n];
              maxerr = std::max(maxerr, std::fabs(r.q - got));
              maxerr32 = std::max(maxerr32, std::fabs(r.f - got));
              maxref = std::max(maxref, std::fabs(r.f));
            }
            rel = std::max(rel, maxerr / maxref);
            rel32 = std::max(rel32, maxerr32 / maxref);
            ok = ok && maxerr / maxref < 1e-5 && maxerr32 / maxref < 2e-2;
            const float us = 1e3f * time_ms(
                200, [&](int i) { CK(gemv(weight(i % copies), v, R, dx, dxq, dxds, M, dy, g_capture)); }, g_capture);
            const float usg = 1e3f * time_graph_ms(100, [&](int i, cudaStream_t st) {
              return gemv(weight(i % copies), v, R, dx, dxq, dxds, M, dy, st);
            });
            graph = graph && usg > 0;
            const float key = usg > 0 ? usg : us;
            std::snprintf(sweep + std::strlen(sweep), sizeof sweep - std::strlen(sweep), "%s%.1f", R == 1 ? "" : " / ",
                          key);
            if (key < best) {
              best = key;
              best_stream = us;
              best_r = R;
            }
          }
          const double gbs = bytes / (best * 1e-6) / 1e9;
          char g_us[32] = "-", g_cu[32] = "-", g_sp[32] = "-";
          if (graph) {
            std::snprintf(g_us, sizeof g_us, "%.1f", best);
            std::snprintf(g_cu, sizeof g_cu, "%.1f", cug);
            std::snprintf(g_sp, sizeof g_sp, "%.2fx", cug / best);
          }
          std::printf("| %s | %d x %d | %d | %s | %.1e | %.1e | %.1f | %s | %d | %.0f | %.0f %% | %.1f / %s | "
                      "%.2fx | %s | %s |\n",
                      fname, N, K, M, qg::variant_name(v), rel, rel32, best_stream, g_us, best_r, gbs,
                      100.0 * gbs / copy_gbs, cu, g_cu, cu / best_stream, g_sp, sweep);
        }
        CK(cudaFree(dx));
        CK(cudaFree(dxq));
        CK(cudaFree(dxds));
        CK(cudaFree(dxb));
        CK(cudaFree(dy));
      }
      // Prefill (M = 512): dequantize to bf16 + cuBLAS vs cuBLAS on bf16 weights alone.
      if (prefill) {
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
        std::snprintf(line, sizeof line, "| %s | %d x %d | %d | %.1f | %.1f | %.2fx |", fname, N, K, M, deq, dense,
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
  if (prefill) {
    std::printf("\nPrefill: dequantize to bf16 + cuBLAS bf16 GEMM vs the bf16 GEMM alone\n\n");
    std::printf("| format | shape N x K | M | dequant + GEMM us | bf16 GEMM us | ratio |\n|---|---|---:|---:|---:|---:|\n");
    for (auto& l : prefill_rows) std::printf("%s\n", l.c_str());
  }
  std::printf("\ncorrectness vs CPU references (int8-act ref < 1e-5, f32-act ref < 2e-2): %s\n", ok ? "PASS" : "FAIL");
  cublasDestroy(h);
  return ok ? 0 : 1;
}
