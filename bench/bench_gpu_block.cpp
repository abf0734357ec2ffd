// Forward + backward of one Llama-2-7B-shaped decoder block on the GPU, built from the autograd ops
// (rmsnorm, linear, rope, attention, swiglu, add), timed as a whole training step of the block:
//   h = rmsnorm(x); q, k, v = h Wq, h Wk, h Wv; rope(q, k); a = attention(q, k, v); x2 = x + a Wo;
//   y = x2 + (silu(rmsnorm(x2) W1) * rmsnorm(x2) W3) W2;  backward from a random dy.
// Prints the median step time, achieved TFLOP/s, the peak GPU memory held by tensors (comparable to
// torch.cuda.max_memory_allocated, see bench/torch_block_ref.py) and, with --profile, the GPU time
// per op measured with CUDA events.
//
//   bench_gpu_block [--dtype f32|bf16] [--tf32] [--seq 2048] [--iters 10] [--profile]
//                   [--precision bf16|fp8 [--lp-gemm native|emulated]]
// --precision (issue 18, f32 activations): the seven linears run as `lowbit train --precision` runs
// them (autograd/lp_linear.h: bf16 or fp8 operands, delayed scaling, f32 master weights; native
// GEMMs — bf16 tensor cores, cuBLASLt FP8 — or emulated f32 GEMMs on dequantized values).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench_util.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/lp_linear.h"
#include "lowbit/ops/device_init.h"

using namespace lowbit;

namespace {

struct Config {
  int64_t dim = 4096, heads = 32, kv_heads = 32, hidden = 11008, seq = 2048, batch = 1;
  int iters = 10, warmup = 3;
  DType dtype = DType::F32;
  bool tf32 = false, profile = false;
  bool lp = false;  // --precision given
  LpRecipe recipe = [] {
    LpRecipe r;
    r.native_gemm = true;  // --lp-gemm native unless told otherwise
    return r;
  }();
  std::vector<std::shared_ptr<LpLinearState>> states = std::vector<std::shared_ptr<LpLinearState>>(7);
};

// One of the block's seven linears (slot: its amax-history state under --precision).
Var block_linear(const Var& x, const Var& w, Config& c, int slot) {
  if (!c.lp) return linear(x, w);
  if (!c.states[size_t(slot)]) c.states[size_t(slot)] = std::make_shared<LpLinearState>();
  return lp_linear(x, w, c.recipe, c.states[size_t(slot)], 0x5eedull + uint64_t(slot));
}

struct BlockWeights {
  Var attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3;
  std::vector<Var*> all() { return {&attn_norm, &wq, &wk, &wv, &wo, &ffn_norm, &w1, &w2, &w3}; }
};

// Uniform values with standard deviation `std` from a fast generator (202M weights: mt19937 normal
// sampling would take longer than the benchmark), then converted and moved to the GPU.
Tensor random_gpu(const Shape& s, uint64_t seed, double std, double mean, DType dt) {
  std::vector<float> v(size_t(shape_numel(s)));
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  const double a = std * std::sqrt(3.0);
  for (auto& e : v) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    e = float(mean + a * (double(x >> 11) * (2.0 / 9007199254740992.0) - 1.0));
  }
  return Tensor::from_vector(v, s).to(dt).to(Device::CUDA);
}

Var block_forward(BlockWeights& w, const Var& x, Config& c) {
  const int64_t hd = c.dim / c.heads;
  Var h = rmsnorm(x, w.attn_norm, 1e-5);
  Var q = rope(block_linear(h, w.wq, c, 0), c.batch, c.seq, c.heads, hd, 0, 10000.0, RopeStyle::Half);
  Var k = rope(block_linear(h, w.wk, c, 1), c.batch, c.seq, c.kv_heads, hd, 0, 10000.0, RopeStyle::Half);
  Var v = block_linear(h, w.wv, c, 2);
  Var a = attention(q, k, v, c.batch, c.seq, c.seq, c.heads, c.kv_heads, hd);
  Var x2 = add(x, block_linear(a, w.wo, c, 3));
  Var h2 = rmsnorm(x2, w.ffn_norm, 1e-5);
  return add(x2, block_linear(swiglu(block_linear(h2, w.w1, c, 4), block_linear(h2, w.w3, c, 5)), w.w2, c, 6));
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  Config c;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return lowbit::bench::option_value(i, argc, argv); };
    if (a == "--dtype") c.dtype = parse_dtype(next());
    else if (a == "--tf32") c.tf32 = true;
    else if (a == "--seq") c.seq = std::stoll(next());
    else if (a == "--iters") c.iters = std::stoi(next());
    else if (a == "--profile") c.profile = true;
    else if (a == "--precision") c.lp = true, c.recipe.precision = parse_lp_precision(next());
    else if (a == "--lp-gemm") c.recipe.native_gemm = next() == "native";
    else {
      std::fprintf(stderr, "usage: %s [--dtype f32|bf16] [--tf32] [--seq T] [--iters N] [--profile] "
                   "[--precision bf16|fp8 [--lp-gemm native|emulated]]\n", argv[0]);
      return 2;
    }
  }
  try {
    if (!init_cuda()) {
      std::printf("bench_gpu_block: no CUDA device (or a CPU-only build); nothing to measure\n");
      return 0;
    }
    if (c.lp && c.dtype != DType::F32) throw_error("--precision takes f32 activations (--dtype f32)");
    cuda_set_allow_tf32(c.tf32);
    const int64_t D = c.dim, hd = D / c.heads, KV = c.kv_heads * hd, F = c.hidden, M = c.batch * c.seq;
    BlockWeights w;
    uint64_t seed = 1;
    const double ws = 0.02;
    w.attn_norm = Var(random_gpu({D}, seed++, 0.1, 1.0, c.dtype), true);
    w.ffn_norm = Var(random_gpu({D}, seed++, 0.1, 1.0, c.dtype), true);
    w.wq = Var(random_gpu({D, D}, seed++, ws, 0, c.dtype), true);
    w.wk = Var(random_gpu({KV, D}, seed++, ws, 0, c.dtype), true);
    w.wv = Var(random_gpu({KV, D}, seed++, ws, 0, c.dtype), true);
    w.wo = Var(random_gpu({D, D}, seed++, ws, 0, c.dtype), true);
    w.w1 = Var(random_gpu({F, D}, seed++, ws, 0, c.dtype), true);
    w.w3 = Var(random_gpu({F, D}, seed++, ws, 0, c.dtype), true);
    w.w2 = Var(random_gpu({D, F}, seed++, ws, 0, c.dtype), true);
    Tensor x0 = random_gpu({M, D}, seed++, 1.0, 0, c.dtype), dy = random_gpu({M, D}, seed++, 1.0, 0, c.dtype);

    auto step = [&]() {
      for (Var* p : w.all()) p->zero_grad();
      Var x(x0, true);
      Var y = block_forward(w, x, c);
      backward(y, dy);
    };
    for (int i = 0; i < c.warmup; ++i) step();
    cuda_synchronize();
    cuda_reset_peak();
    const int64_t base_bytes = cuda_in_use_bytes();
    std::vector<double> times;
    for (int i = 0; i < c.iters; ++i) {
      cuda_synchronize();
      const double t0 = now_ms();
      step();
      cuda_synchronize();
      times.push_back(now_ms() - t0);
    }
    std::sort(times.begin(), times.end());
    const double med = times[times.size() / 2];
    const double peak_gib = double(cuda_peak_bytes()) / double(1ull << 30);

    // Matrix FLOPs: 7 weight matrices x (forward + 2 backward products) + causal attention
    // (QK^T and PV forward; recompute QK^T, dP, dV, dK, dQ backward: about half of full T x T each).
    const double lin = 2.0 * double(M) * (2.0 * D * D + 2.0 * KV * D + 3.0 * F * D) * 3.0;
    const double att = 2.0 * double(c.batch) * c.heads * double(c.seq) * double(c.seq) * hd * (2.0 + 5.0) / 2.0;
    // The bf16 attention kernels are chosen by LOWBIT_ATTENTION (fa2 by default, fa2-atomic, wmma).
    const char* attn_env = std::getenv("LOWBIT_ATTENTION");
    std::printf("lowbit block fwd+bwd on %s: dim %lld heads %lld hidden %lld seq %lld batch %lld, %s, tf32 %s, "
                "LOWBIT_ATTENTION=%s\n",
                cuda_device_name().c_str(), (long long)D, (long long)c.heads, (long long)F, (long long)c.seq,
                (long long)c.batch, dtype_name(c.dtype), c.tf32 ? "on" : "off", attn_env ? attn_env : "(unset: fa2)");
    std::printf("  median %.2f ms (min %.2f, max %.2f, %d iters), %.1f TFLOP/s, peak %.3f GiB (%.3f GiB held before the step)\n",
                med, times.front(), times.back(), c.iters, (lin + att) / (med * 1e-3) / 1e12, peak_gib,
                double(base_bytes) / double(1ull << 30));
    if (c.lp) std::printf("  linears: --precision %s, %s GEMMs\n", lp_precision_name(c.recipe.precision),
                          c.recipe.native_gemm ? "native" : "emulated");
    std::printf("RESULT lowbit %s tf32=%s median_ms=%.3f peak_gib=%.3f\n", dtype_name(c.dtype), c.tf32 ? "on" : "off",
                med, peak_gib);

    if (c.profile) {
      lowbit::bench::print_gpu_profile(step);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu_block: %s\n", e.what());
    return 1;
  }
  return 0;
}
