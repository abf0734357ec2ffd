// ApiQ block-wise calibration (Liao et al. 2024, arXiv 2402.05147, §3 "ApiQ-bw") of one
// Llama-2-7B-shaped decoder block on the GPU: dim 4096, 32 heads, hidden 11008, random weights,
// 128 x 2048 calibration tokens of random hidden states as the block inputs, the FP block's outputs
// as targets. Every linear is a QuantTrainLinear (quant/train_linear.h): y = x (Q(W; gamma, beta) +
// s B A)^T with OmniQuant's learnable weight clipping Q (Shao et al. 2024, eq. 2) at int2g64 and
// LoRA rank 64 (alpha 16); loss = MSE to the FP block outputs; AdamW with ApiQ's two groups (LoRA
// lr 5e-4, clipping lr 5e-3, weight decay 0.1); batch 1 window (2048 tokens) per step.
//
// Loop mode (always): the training step exactly as ApiqMethod's Trainer runs it (methods/apiq.cpp),
// timed over --steps steps after --warmup steps (GPU work finished at both ends; no host sync in
// between, as in the method). Prints ms/step, the extrapolated per-block time for --epochs epochs
// of --samples steps (ApiQ: 20 x 128), the peak GPU memory held by tensors (cuda_peak_bytes,
// comparable to torch.cuda.max_memory_allocated) and, with --profile, GPU time per op.
// --method-epochs E additionally runs the real ApiqMethod::quantize_block for E epochs (training,
// encoding of the trained layers, error report) and prints its per-epoch times and the time of each
// stage after training (ApiqMethod::last_block_times: finalize, install, report).
//
//   bench_apiq_block [--tf32] [--bf16] [--f32-cache] [--samples 128] [--seq 2048] [--steps 32] [--warmup 3] [--epochs 20]
//                    [--format int2g64] [--rank 64] [--profile] [--method-epochs 0]
//
// PyTorch reference of the same step: bench/torch_apiq_block_ref.py.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/optim.h"
#include "bench_util.h"
#include "lowbit/methods/apiq.h"
#include "lowbit/model/llama.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/ops/ops.h"
#include "lowbit/quant/train_linear.h"

using namespace lowbit;
using lowbit::bench::fast_random;
using lowbit::bench::random_mha_layer;

namespace {

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
double gib(int64_t b) { return double(b) / double(1ull << 30); }

struct Args {
  bool tf32 = false, profile = false, bf16 = false, f32_cache = false;
  int64_t samples = 128, seq = 2048, steps = 32, warmup = 3, rank = 64;
  int epochs = 20, method_epochs = 0;
  std::string format = "int2g64";
};

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&] { return lowbit::bench::option_value(i, argc, argv); };
    if (k == "--tf32") a.tf32 = true;
    else if (k == "--bf16") a.bf16 = true;
    else if (k == "--f32-cache") a.f32_cache = true;
    else if (k == "--profile") a.profile = true;
    else if (k == "--samples") a.samples = std::stoll(next());
    else if (k == "--seq") a.seq = std::stoll(next());
    else if (k == "--steps") a.steps = std::stoll(next());
    else if (k == "--warmup") a.warmup = std::stoll(next());
    else if (k == "--rank") a.rank = std::stoll(next());
    else if (k == "--epochs") a.epochs = std::stoi(next());
    else if (k == "--method-epochs") a.method_epochs = std::stoi(next());
    else if (k == "--format") a.format = next();
    else {
      std::fprintf(stderr,
                   "usage: %s [--tf32] [--bf16] [--f32-cache] [--samples N] [--seq T] [--steps S] [--warmup W] [--epochs E] [--format F] "
                   "[--rank R] [--profile] [--method-epochs E]\n",
                   argv[0]);
      return 2;
    }
  }
  try {
    if (!init_cuda()) {
      std::printf("bench_apiq_block: no CUDA device (or a CPU-only build); nothing to measure\n");
      return 0;
    }
    cuda_set_allow_tf32(a.tf32);
    const Device dev = Device::CUDA;
    const QuantFormat& f = parse_quant_format(a.format);
    LlamaConfig c;
    c.dim = 4096;
    c.hidden_dim = 11008;
    c.n_layers = 1;
    c.n_heads = c.n_kv_heads = 32;
    c.vocab_size = 256;  // the embedding is never used (the block inputs are given)
    c.max_seq_len = 4096;
    c.rope_style = RopeStyle::Half;  // Hugging Face layout, as the PyTorch reference
    const int64_t D = c.dim, F = c.hidden_dim, N = a.samples, L = a.seq;
    const double t_init = now_s();
    LlamaModel model = [&] {
      LlamaWeights w;
      uint64_t seed = 1;
      auto rnd = [&](Shape s) { return fast_random(s, seed++, 0.02).to(dev); };
      auto ones = [&](int64_t n) { return Tensor::full({n}, 1.0).to(dev); };
      w.tok_embeddings = rnd({c.vocab_size, D});
      w.final_norm = ones(D);
      w.layers.push_back(random_mha_layer(D, F, seed, dev));
      return LlamaModel(c, w, false);
    }();
    // Calibration inputs (random hidden states, std 1) and the FP block's outputs, both on the GPU.
    Tensor X = fast_random({N * L, D}, 1000, 1.0).to(dev);
    const Tensor none;
    Tensor Y = BlockContext{model, 0, N, L, X, none, 1}.run_block(X);
    // --bf16 keeps the calibration windows in bf16, as ApiQ keeps its cached block inputs in fp16
    // (each step converts its window to f32): the loop below, and the method, as the pipeline does for
    // `lowbit quantize --bf16` (PipelineOptions::cache_dtype, --calib-dtype auto). --f32-cache gives
    // the method the f32 tensors instead (the pipeline before bf16 caches; the f32 and the bf16 copies
    // are then both held: the "before" of the memory comparison).
    Tensor Xl = a.bf16 ? to_bf16(X) : X, Yl = a.bf16 ? to_bf16(Y) : Y;
    const bool method_f32 = !a.bf16 || a.f32_cache;
    if (a.bf16 && !(a.method_epochs > 0 && a.f32_cache)) X = Y = Tensor();  // only the bf16 copies are held
    cuda_synchronize();
    std::printf("bench_apiq_block on %s: dim %lld hidden %lld heads %d, %lld x %lld calibration tokens, %s rank %lld, "
                "f32 (TF32 %s, bf16 autocast %s), batch 1, calibration cache %s; setup %.1f s (%d host threads)\n",
                cuda_device_name().c_str(), (long long)D, (long long)F, c.n_heads, (long long)N, (long long)L, f.name,
                (long long)a.rank, a.tf32 ? "on" : "off", a.bf16 ? "on" : "off", a.bf16 && !a.f32_cache ? "bf16" : "f32",
                now_s() - t_init, omp_get_max_threads());

    ApiqOptions ao;
    ao.layer.rank = a.rank;
    ao.bf16 = a.bf16;  // the method's Trainer takes the same autocast as the loop
    LlamaBlock& blk = model.block(0);
    {  // ---- loop mode: Trainer's step, timed ----
      std::vector<std::shared_ptr<Linear>*> slots;
      std::vector<std::shared_ptr<Linear>> originals;
      std::vector<Var> clip, lora;
      uint64_t seed = 7;
      for (auto& [name, slot] : blk.linears()) {
        QuantTrainOptions lo = ao.layer;
        lo.seed = seed++;
        lo.share_weight = true;  // as ApiqMethod's block-wise mode: the replaced layer's weight, not a copy
        auto t = std::make_shared<QuantTrainLinear>((*slot)->effective_weight(), (*slot)->bias(), f, lo);
        for (auto& p : t->clip_parameters()) clip.push_back(p);
        for (auto& p : t->lora_parameters()) lora.push_back(p);
        slots.push_back(slot);
        originals.push_back(*slot);
        *slot = t;
      }
      std::vector<ParamGroup> groups{{clip, AdamWOptions{ao.clip_lr, 0.9, 0.999, 1e-8, ao.clip_wd}},
                                     {lora, AdamWOptions{ao.lora_lr, 0.9, 0.999, 1e-8, ao.lora_wd}}};
      AdamW opt(std::move(groups));
      std::vector<int64_t> perm(static_cast<size_t>(N), 0);
      for (int64_t i = 0; i < N; ++i) perm[size_t(i)] = (i * 37 + 11) % N;  // a fixed shuffle (37 coprime to N unless N % 37 == 0)
      Tensor loss_sum = Tensor::zeros({}, DType::F32, dev);
      int64_t step_no = 0;
      auto step = [&]() {
        const int64_t k = perm[size_t(step_no++ % N)];
        AutocastBf16Guard autocast(a.bf16);
        auto window = [&](const Tensor& t) {
          const Tensor w = t.slice(0, k * L, (k + 1) * L);
          if (!a.bf16) return w;
          Tensor f = Tensor::empty(w.shape(), DType::F32, dev);
          ops::cast(w, f);  // on the device (Tensor::to(dtype) would stage through the host)
          return f;
        };
        Var out = model.block_forward(0, Var(window(Xl)), 1, L);
        Var loss = mse(out, Var(window(Yl)));
        ops::axpy(1.0, loss.value(), loss_sum);
        backward(loss);
        opt.step();
        opt.zero_grad();
      };
      for (int64_t i = 0; i < a.warmup; ++i) step();
      cuda_synchronize();
      const double first_loss = loss_sum.item() / double(std::max<int64_t>(a.warmup, 1));
      loss_sum.fill_(0.0);
      cuda_reset_peak();
      const int64_t held = cuda_in_use_bytes();
      const double t0 = now_s();
      for (int64_t i = 0; i < a.steps; ++i) step();
      cuda_synchronize();
      const double ms = (now_s() - t0) * 1e3 / double(a.steps);
      const double last_loss = loss_sum.item() / double(a.steps);
      const int64_t peak = cuda_peak_bytes();
      const double block_s = ms * 1e-3 * double(N) * a.epochs;
      std::printf("  loop: %.2f ms/step (mean of %lld steps after %lld warm-up), loss %.4e (warm-up) -> %.4e (timed)\n",
                  ms, (long long)a.steps, (long long)a.warmup, first_loss, last_loss);
      std::printf("  per block: %d epochs x %lld steps = %.1f s; peak GPU memory %.2f GiB (%.2f GiB held before the "
                  "steps: model, calibration inputs and targets, trainable state)\n",
                  a.epochs, (long long)N, block_s, gib(peak), gib(held));
      std::printf("RESULT lowbit tf32=%s bf16=%s ms_per_step=%.3f block_seconds_%dep=%.1f peak_gib=%.3f held_gib=%.3f\n",
                  a.tf32 ? "on" : "off", a.bf16 ? "on" : "off", ms, a.epochs, block_s, gib(peak), gib(held));
      if (a.profile) {
        lowbit::bench::print_gpu_profile(step);
      }
      for (size_t i = 0; i < slots.size(); ++i) *slots[i] = originals[i];
    }
    if (a.method_epochs > 0) {  // ---- the real method: training, encoding, report ----
      ao.epochs = a.method_epochs;
      ApiqMethod m(f, ao);
      BlockContext ctx{model, 0, N, L, method_f32 ? X : Xl, method_f32 ? Y : Yl, 1};
      std::vector<LinearReport> reps;
      cuda_synchronize();
      cuda_reset_peak();
      const int64_t method_held = cuda_in_use_bytes();
      const double t0 = now_s();
      m.quantize_block(ctx, reps);
      cuda_synchronize();
      const double total = now_s() - t0;
      const int64_t method_peak = cuda_peak_bytes();
      double train = 0;
      for (const auto& l : m.log()) {
        train += l.seconds;
        std::printf("  ApiqMethod epoch %d: %.2f s (%.2f ms/step), mean loss %.4e\n", l.epoch, l.seconds,
                    l.seconds * 1e3 / double(N), l.loss);
      }
      double err = 0;
      for (const auto& r : reps) err += r.rel_error / double(reps.size());
      const ApiqBlockTimes& bt = m.last_block_times();
      std::printf("  ApiqMethod::quantize_block: %.1f s total (%.1f s training, %.1f s encoding + report), peak %.2f "
                  "GiB, mean relative output error %.4f, %.3f bits/weight (with adapters)\n",
                  total, train, total - train, gib(method_peak), err, reps.empty() ? 0.0 : reps[0].bits_per_weight);
      std::printf("  stages: train %.2f s (epochs and setup), finalize %.2f s (encoding), install %.2f s (QuantLinear: "
                  "dequantize + upload), report %.2f s (input capture + output errors)\n",
                  bt.train, bt.finalize, bt.install, bt.report);
      std::printf("RESULT lowbit-method tf32=%s bf16=%s cache=%s epochs=%d train_s=%.2f total_s=%.2f finalize_s=%.2f "
                  "install_s=%.2f report_s=%.2f peak_gib=%.3f held_gib=%.3f loss_last=%.4e err=%.4f\n",
                  a.tf32 ? "on" : "off", a.bf16 ? "on" : "off", method_f32 ? "f32" : "bf16", a.method_epochs, train, total,
                  bt.finalize, bt.install, bt.report, gib(method_peak), gib(method_held),
                  m.log().empty() ? 0.0 : m.log().back().loss, err);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_apiq_block: %s\n", e.what());
    return 1;
  }
  return 0;
}
