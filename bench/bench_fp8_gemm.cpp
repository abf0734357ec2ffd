// The GEMMs of low-precision training on the GPU (issue 18): for each shape y [M, N] = x [M, K] W [N, K]^T,
// the median time and TFLOP/s of
//   f32        cuBLAS f32 (FP32 cores; --tf32: TF32 tensor cores)
//   bf16       cuBLAS bf16 operands, f32 output (the bf16 tensor cores)
//   fp8        ops::fp8_gemm: cuBLASLt E4M3 x E4M3, f32 output, fast accumulation off (codes ready)
//   fp8+quant  ops::lp_quantize_fp8 of both operands (current scaling: an amax pass each, read back
//              to the host) and then fp8_gemm: what one forward GEMM of `lowbit train --precision
//              fp8 --lp-gemm native` costs
//   emulated   lp_quantize of both operands + the f32 GEMM: the emulated fp8 forward GEMM
// and the fp8 speed-up over bf16. Compare with bench/torch_fp8_gemm_ref.py (torch._scaled_mm) in the
// same device call.
//
//   bench_fp8_gemm [--tf32] [--iters 20] [--shapes MxNxK,...]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "bench_util.h"
#include "lowbit/ops/lp_quant.h"
#include "lowbit/ops/ops.h"

using namespace lowbit;

namespace {

template <class F>
double median_ms(int iters, F&& f) {
  f();  // warm-up (and cuBLASLt's algorithm choice)
  cuda_synchronize();
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    cuda_synchronize();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 20;
  bool tf32 = false;
  // Llama-2-7B's linears at 4096 tokens (q/k/v/o, gate/up, down) and a square 8192 cube.
  std::string shapes = "4096x4096x4096,4096x11008x4096,4096x4096x11008,8192x8192x8192,16384x768x288";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--iters")) iters = std::stoi(bench::option_value(i, argc, argv));
    else if (!std::strcmp(argv[i], "--tf32")) tf32 = true;
    else if (!std::strcmp(argv[i], "--shapes")) shapes = bench::option_value(i, argc, argv);
    else {
      std::fprintf(stderr, "usage: bench_fp8_gemm [--tf32] [--iters N] [--shapes MxNxK,...]\n");
      return 2;
    }
  }
  if (!init_cuda()) {
    std::printf("no CUDA device: nothing to measure\n");
    return 0;
  }
  cuda_set_allow_tf32(tf32);
  std::printf("GPU: %s, f32 GEMMs %s, median of %d\n", cuda_device_name().c_str(), tf32 ? "TF32" : "FP32", iters);
  std::printf("| M x N x K | f32 ms | bf16 ms | fp8 ms | fp8+quant ms | emulated fp8 ms | bf16 TFLOP/s | fp8 TFLOP/s | fp8 / bf16 speed-up |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  std::stringstream ss(shapes);
  std::string item;
  while (std::getline(ss, item, ',')) {
    int64_t M = 0, N = 0, K = 0;
    if (std::sscanf(item.c_str(), "%ldx%ldx%ld", &M, &N, &K) != 3 || !ops::fp8_gemm_shape_ok(M, N, K)) {
      std::fprintf(stderr, "bad shape '%s' (MxNxK, multiples of 16)\n", item.c_str());
      return 2;
    }
    const Tensor x = bench::fast_random({M, K}, 1, 1.0).to(Device::CUDA), w = bench::fast_random({N, K}, 2, 0.02).to(Device::CUDA);
    Tensor xb = Tensor::empty({M, K}, DType::BF16, Device::CUDA), wb = Tensor::empty({N, K}, DType::BF16, Device::CUDA);
    ops::cast(x, xb);
    ops::cast(w, wb);
    Tensor y = Tensor::empty({M, N}, DType::F32, Device::CUDA);
    ops::LpQuantSpec s;
    s.format = ops::LpFormat::E4M3;
    Tensor cx, cw;
    ops::LpQuantStats sx, sw;
    ops::lp_quantize_fp8(x, s, cx, &sx);
    ops::lp_quantize_fp8(w, s, cw, &sw);
    const float alpha = float(sx.tensor_scale * sw.tensor_scale);
    const double t_f32 = median_ms(iters, [&] { ops::gemm(x, false, w, true, y); });
    const double t_bf16 = median_ms(iters, [&] { ops::gemm(xb, false, wb, true, y); });
    const double t_fp8 = median_ms(iters, [&] { ops::fp8_gemm(cx, s.format, cw, s.format, alpha, y); });
    const double t_fp8q = median_ms(iters, [&] {
      Tensor a, b;
      ops::LpQuantStats qa, qb;
      ops::lp_quantize_fp8(x, s, a, &qa);
      ops::lp_quantize_fp8(w, s, b, &qb);
      ops::fp8_gemm(a, s.format, b, s.format, float(qa.tensor_scale * qb.tensor_scale), y);
    });
    const double t_emu = median_ms(iters, [&] {
      Tensor a, b;
      ops::lp_quantize(x, s, a);
      ops::lp_quantize(w, s, b);
      ops::gemm(a, false, b, true, y);
    });
    const double flop = 2.0 * double(M) * double(N) * double(K);
    std::printf("| %ldx%ldx%ld | %.3f | %.3f | %.3f | %.3f | %.3f | %.0f | %.0f | %.2f |\n", M, N, K, t_f32, t_bf16, t_fp8,
                t_fp8q, t_emu, flop / t_bf16 / 1e9, flop / t_fp8 / 1e9, t_bf16 / t_fp8);
  }
  return 0;
}
