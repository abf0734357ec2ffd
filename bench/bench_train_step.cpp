// One whole training step of a Llama 110M model (llama2.c's stories110M shape: dim 768, 12 layers,
// 12 heads, hidden 2048, vocab 32000, tied embeddings) on the GPU, as `lowbit train` runs it
// (src/lowbit/train/trainer.cpp, run_training): forward, f32 cross-entropy, backward, global
// gradient clipping to 1.0 and AdamW (decay on matrices only), with the loss read back to the host.
// --bf16 is `lowbit train --bf16`: bf16 copies of the f32 masters (MixedPrecisionModel), bf16
// activations and GEMMs, f32 gradients for the update and f32 AdamW state.
// Prints the median step time, tokens/s, and the peak GPU memory held by tensors over the timed
// steps (comparable to torch.cuda.max_memory_allocated, see bench/torch_train_step_ref.py).
//
//   bench_train_step [--bf16] [--tf32] [--batch 16] [--seq 1024] [--iters 10] [--profile]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_util.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/optim.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/train/trainer.h"

using namespace lowbit;

int main(int argc, char** argv) {
  int64_t B = 16, T = 1024;
  int iters = 10, warmup = 3;
  bool bf16 = false, tf32 = false, profile = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return lowbit::bench::option_value(i, argc, argv); };
    if (a == "--bf16") bf16 = true;
    else if (a == "--tf32") tf32 = true;
    else if (a == "--batch") B = std::stoll(next());
    else if (a == "--seq") T = std::stoll(next());
    else if (a == "--iters") iters = std::stoi(next());
    else if (a == "--profile") profile = true;
    else {
      std::fprintf(stderr, "usage: %s [--bf16] [--tf32] [--batch B] [--seq T] [--iters N] [--profile]\n", argv[0]);
      return 2;
    }
  }
  try {
    if (!init_cuda()) {
      std::printf("bench_train_step: no CUDA device (or a CPU-only build); nothing to measure\n");
      return 0;
    }
    cuda_set_allow_tf32(tf32);
    LlamaConfig c;
    c.dim = 768;
    c.hidden_dim = 2048;
    c.n_layers = 12;
    c.n_heads = 12;
    c.n_kv_heads = 12;
    c.vocab_size = 32000;
    c.max_seq_len = int(T);
    c.tied_embeddings = true;
    LlamaWeights w = init_weights(c, 1);
    for_each_weight(w, [](const std::string&, Tensor& t) { t = t.to(Device::CUDA); });
    LlamaModel model(c, w, true);
    w = LlamaWeights();
    std::unique_ptr<MixedPrecisionModel> mixed;
    if (bf16) mixed = std::make_unique<MixedPrecisionModel>(model);
    // Parameter groups as run_training: weight decay on matrices, none on the norms.
    ParamGroup decay{{}, {5e-4, 0.9, 0.95, 1e-8, 0.1}}, no_decay{{}, {5e-4, 0.9, 0.95, 1e-8, 0.0}};
    for (auto& p : model.parameters()) (p.value().dim() >= 2 ? decay : no_decay).params.push_back(p);
    std::vector<Var> ordered = decay.params;
    ordered.insert(ordered.end(), no_decay.params.begin(), no_decay.params.end());
    AdamW opt({decay, no_decay});
    int64_t n_params = 0;
    for (auto& p : ordered) n_params += p.numel();

    // Random token windows (uniform ids), fresh ones every step as the trainer's data loader.
    std::mt19937_64 rng(7);
    std::uniform_int_distribution<int32_t> tok(0, int32_t(c.vocab_size) - 1);
    auto batch = [&](Tensor& in, Tensor& tgt) {
      in = Tensor::empty({B, T}, DType::I32);
      tgt = Tensor::empty({B * T}, DType::I32);
      for (int64_t i = 0; i < B * T; ++i) {
        in.data<int32_t>()[i] = tok(rng);
        tgt.data<int32_t>()[i] = tok(rng);
      }
    };
    double last_loss = 0;
    auto step = [&]() {
      Tensor in, tgt;
      batch(in, tgt);
      opt.zero_grad();
      if (mixed) mixed->refresh();
      Var logits = mixed ? mixed->forward(in) : model.forward(in);
      Var loss = cross_entropy(logits, tgt.to(Device::CUDA));
      last_loss = loss.value().item();
      backward(loss);
      if (mixed) mixed->collect_grads();
      clip_grad_norm(ordered, 1.0);
      opt.step(1.0);
    };
    auto now_ms = [] {
      return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
    };
    for (int i = 0; i < warmup; ++i) step();
    cuda_synchronize();
    cuda_reset_peak();
    const int64_t base = cuda_in_use_bytes();
    std::vector<double> times;
    for (int i = 0; i < iters; ++i) {
      cuda_synchronize();
      const double t0 = now_ms();
      step();
      cuda_synchronize();
      times.push_back(now_ms() - t0);
    }
    std::sort(times.begin(), times.end());
    const double med = times[times.size() / 2];
    const double peak = double(cuda_peak_bytes()) / double(1ull << 30);
    // Model FLOPs: 6 N per token for the matrices (N counts the tied table once as the head) plus
    // causal attention (forward QK^T and PV; backward about 2.5x that), as in the block benchmark.
    const double matrix = 6.0 * double(n_params) * double(B * T);
    const double att = 2.0 * double(B) * c.n_heads * double(T) * double(T) * (c.dim / c.n_heads) * 7.0 / 2.0 * c.n_layers;
    const char* mode = bf16 ? "bf16" : (tf32 ? "f32-tf32" : "f32");
    std::printf("lowbit 110M train step on %s: %s, batch %lld x seq %lld, %.1fM params\n", cuda_device_name().c_str(),
                mode, (long long)B, (long long)T, double(n_params) / 1e6);
    std::printf("  median %.2f ms (min %.2f, max %.2f, %d iters), %.0f tokens/s, %.1f TFLOP/s, peak %.3f GiB "
                "(%.3f GiB held between steps), last loss %.4f\n",
                med, times.front(), times.back(), iters, double(B * T) / (med * 1e-3), (matrix + att) / (med * 1e-3) / 1e12,
                peak, double(base) / double(1ull << 30), last_loss);
    std::printf("RESULT lowbit %s median_ms=%.3f tokens_per_s=%.0f peak_gib=%.3f\n", mode, med,
                double(B * T) / (med * 1e-3), peak);
    if (profile) {
      lowbit::bench::print_gpu_profile(step);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_train_step: %s\n", e.what());
    return 1;
  }
  return 0;
}
