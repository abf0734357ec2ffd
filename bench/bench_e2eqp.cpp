// EfficientQAT's E2E-QP step (Chen et al. 2024, arXiv 2407.11062, §3.3) at the Llama-2-7B shape
// (issue 14): the integer codes of every block linear frozen, only the per-group step sizes trained
// end to end, on the LM loss, and the same with --distill (LLM-QAT's KL(teacher || student) to the
// full-precision model's logits, the teacher forward included in the step).
//
// Model: a random Llama-2-7B-shaped stack of --layers blocks (dim 4096, hidden 11008, 32 heads,
// vocab 32000, untied head, Hugging Face RoPE layout), weights uniform with std 0.02, norms 1. The
// student is what `lowbit qat --method efficientqat` trains after Block-AP: every block linear an
// LsqTrainLinear in FrozenCodes mode (quant/lsq_linear.h; here from a round-to-nearest --format
// encoding of the weights instead of Block-AP's, which has the same layout and cost), embeddings,
// norms and head frozen; the teacher is the full-precision model. Batch --batch x --seq tokens of a
// random token stream, windows drawn as the trainer draws them.
//
// One step is the loop body of train_end_to_end (train/qat.cpp) on one rank: e2e_objective (the
// method's objective), the loss read on the host (the method checks it is finite), backward,
// clip_grad_norm at 1, AdamW (lr 1e-4, weight decay 0, warmup + cosine scale), zero_grad. Timed
// over --steps steps after --warmup steps (GPU work finished at both ends). Prints ms/step, the loss
// at the first and last step, and the peak memory held by tensors during the timed steps
// (cuda_peak_bytes, comparable to torch.cuda.max_memory_allocated). --bf16 runs the step under
// AutocastBf16Guard (bf16 products, f32 parameters, as torch.autocast), --tf32 lets the remaining
// f32 products use TF32 tensor cores.
//
//   bench_e2eqp [--device cuda|cpu] [--layers 2] [--dim 4096] [--hidden 11008] [--heads 32] [--vocab 32000]
//               [--batch 1] [--seq 4096] [--format int2g64] [--steps 8] [--warmup 3] [--mode lm|distill|both]
//               [--tf32] [--bf16] [--profile] [--dump FILE] [--lr 1e-4] [--fixed-batch] [--expect-decrease]
//
// --fixed-batch trains every step on the first step's batch; --expect-decrease exits 1 when a mode's
// loss at the last step is not below its first (the CPU test: bench/CMakeLists.txt).
// --dump FILE writes the model (FP weights, the student's codes q, frozen zero points z and steps s
// with w = (q - z) s), the first step's batch and the first step's LM and distillation losses as
// safetensors, for bench/torch_e2eqp_ref.py --init FILE (the PyTorch reference of the same step),
// which recomputes both losses from it; with --fixed-batch also the last step's losses and the run's
// settings, so that the reference can train the same trajectory and compare where it ends. Without a GPU (or --device cpu) the bench runs on the CPU
// (a tiny shape for tests: tests register one in bench/CMakeLists.txt).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "bench_util.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/optim.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/model/llama.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/quant/lsq.h"
#include "lowbit/quant/lsq_linear.h"
#include "lowbit/quant/quantize.h"
#include "lowbit/train/qat.h"
#include "lowbit/train/trainer.h"

using namespace lowbit;
using lowbit::bench::fast_random;
using lowbit::bench::random_mha_layer;

namespace {

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
double gib(int64_t b) { return double(b) / double(1ull << 30); }

struct Args {
  std::string device = "cuda", format = "int2g64", mode = "both", dump;
  int layers = 2, dim = 4096, hidden = 11008, heads = 32, vocab = 32000;
  int64_t batch = 1, seq = 4096, steps = 8, warmup = 3;
  double lr = 1e-4;
  bool tf32 = false, bf16 = false, profile = false, fixed_batch = false, expect_decrease = false;
};

[[noreturn]] void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--device cuda|cpu] [--layers N] [--dim D] [--hidden F] [--heads H] [--vocab V] [--batch B] "
               "[--seq T] [--format F] [--steps S] [--warmup W] [--mode lm|distill|both] [--tf32] [--bf16] [--profile] "
               "[--dump FILE] [--lr LR] [--fixed-batch] [--expect-decrease]\n",
               argv0);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&] { return lowbit::bench::option_value(i, argc, argv); };
    if (k == "--device") a.device = next();
    else if (k == "--format") a.format = next();
    else if (k == "--mode") a.mode = next();
    else if (k == "--dump") a.dump = next();
    else if (k == "--layers") a.layers = std::stoi(next());
    else if (k == "--dim") a.dim = std::stoi(next());
    else if (k == "--hidden") a.hidden = std::stoi(next());
    else if (k == "--heads") a.heads = std::stoi(next());
    else if (k == "--vocab") a.vocab = std::stoi(next());
    else if (k == "--batch") a.batch = std::stoll(next());
    else if (k == "--seq") a.seq = std::stoll(next());
    else if (k == "--steps") a.steps = std::stoll(next());
    else if (k == "--warmup") a.warmup = std::stoll(next());
    else if (k == "--tf32") a.tf32 = true;
    else if (k == "--bf16") a.bf16 = true;
    else if (k == "--profile") a.profile = true;
    else if (k == "--lr") a.lr = std::stod(next());
    else if (k == "--fixed-batch") a.fixed_batch = true;
    else if (k == "--expect-decrease") a.expect_decrease = true;
    else usage(argv[0]);
  }
  if ((a.device != "cuda" && a.device != "cpu") || (a.mode != "lm" && a.mode != "distill" && a.mode != "both") ||
      a.layers < 1 || a.steps < 1 || a.warmup < 0 || a.batch < 1 || a.seq < 2 || a.heads < 1 || a.dim % a.heads != 0)
    usage(argv[0]);
  try {
    Device dev = Device::CPU;
    if (a.device == "cuda") {
      if (init_cuda()) {
        dev = Device::CUDA;
        cuda_set_allow_tf32(a.tf32);
      } else {
        std::printf("bench_e2eqp: no CUDA device (or a CPU-only build); running on the CPU\n");
      }
    }
    const bool gpu = dev == Device::CUDA;
    if (!gpu) a.bf16 = a.tf32 = false;  // GPU precision modes
    const QuantFormat& f = parse_quant_format(a.format);
    LlamaConfig c;
    c.dim = a.dim;
    c.hidden_dim = a.hidden;
    c.n_layers = a.layers;
    c.n_heads = c.n_kv_heads = a.heads;
    c.vocab_size = a.vocab;
    c.max_seq_len = int(a.seq);
    c.tied_embeddings = false;       // Llama-2
    c.rope_style = RopeStyle::Half;  // Hugging Face layout, as the PyTorch reference
    const int64_t D = c.dim, F = c.hidden_dim, V = c.vocab_size, B = a.batch, T = a.seq;
    const double t_init = now_s();
    // ---- FP weights (host), the teacher on the device ----
    LlamaWeights w;
    {
      uint64_t seed = 1;
      auto rnd = [&](Shape s) { return fast_random(s, seed++, 0.02); };
      auto ones = [&](int64_t n) { return Tensor::full({n}, 1.0); };
      w.tok_embeddings = rnd({V, D});
      w.output = rnd({V, D});
      w.final_norm = ones(D);
      for (int i = 0; i < a.layers; ++i) w.layers.push_back(random_mha_layer(D, F, seed, Device::CPU));
    }
    // The teacher and the student share the device copies of the embeddings, norms and head (as
    // efficientqat's E2E-QP after an in-memory Block-AP, and the PyTorch reference).
    const LlamaWeights wdev = weights_to(w, dev);
    LlamaModel teacher(c, wdev, false);
    // ---- the student: frozen codes, trainable steps (efficientqat's E2E-QP layers) ----
    LlamaModel student(c, wdev, false);
    std::vector<Var> steps;
    std::vector<std::pair<std::string, Tensor>> dump;
    for (int i = 0; i < a.layers; ++i)
      for (auto& [name, slot] : student.block(i).linears()) {
        const Tensor wcpu = (*slot)->effective_weight().to(Device::CPU).to(DType::F32).contiguous();
        const QuantizedTensor q = quantize(wcpu, f);
        auto t = std::make_shared<LsqTrainLinear>(q, Tensor(), dev);
        for (auto& p : t->quant_parameters()) steps.push_back(p);
        *slot = t;
        if (!a.dump.empty()) {
          // q = c + z with c = q - z the frozen codes; symmetric formats store c + 2^(bits-1).
          const FrozenCodes fc = frozen_codes(q);
          const int64_t out = fc.codes.size(0), in = fc.codes.size(1), G = fc.step.size(1);
          Tensor zero = f.kind == QuantKind::IntAsym ? fc.zero : Tensor::full({out, G}, double(1 << (f.bits - 1)));
          Tensor qq = Tensor::empty({out, in}, DType::U8);
          for (int64_t r = 0; r < out; ++r)
            for (int64_t j = 0; j < in; ++j)
              qq.data<uint8_t>()[r * in + j] = uint8_t(
                  std::lround(fc.codes.data<float>()[r * in + j] + zero.data<float>()[r * G + f.group_of_column(j)]));
          const std::string p = "student.layers." + std::to_string(i) + "." + name;
          dump.emplace_back(p + ".q", qq);
          dump.emplace_back(p + ".zero", zero);
          dump.emplace_back(p + ".step", fc.step);
        }
      }
    if (gpu) cuda_synchronize();
    const double setup_s = now_s() - t_init;
    // ---- data: a random token stream, windows as the trainer draws them ----
    const int64_t n = std::max<int64_t>(4 * B * (T + 1), 1 << 16);
    std::vector<int32_t> stream(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      uint64_t z = (uint64_t(i) + 0x9E3779B97F4A7C15ull) * 0xBF58476D1CE4E5B9ull;
      z ^= z >> 31;
      stream[size_t(i)] = int32_t(z % uint64_t(V));
    }
    const uint64_t seed = 0;
    std::printf("bench_e2eqp on %s: %d blocks of dim %lld hidden %lld heads %d, vocab %lld, %s, batch %lld x %lld "
                "tokens, %s (TF32 %s, bf16 autocast %s); setup %.1f s (%d host threads)\n",
                gpu ? cuda_device_name().c_str() : "the CPU", a.layers, (long long)D, (long long)F, c.n_heads,
                (long long)V, f.name, (long long)B, (long long)T, gpu ? "f32" : "f32 (CPU)", a.tf32 ? "on" : "off",
                a.bf16 ? "on" : "off", setup_s, omp_get_max_threads());
    int64_t n_steps = 0;
    for (const auto& s : steps) n_steps += s.value().numel();

    std::vector<std::string> modes;
    if (a.mode != "distill") modes.push_back("lm");
    if (a.mode != "lm") modes.push_back("distill");
    // Losses of the first step's batch, at the initial steps (for --dump).
    Tensor in0, tgt0;
    make_lm_windows(stream, train_window_starts(seed, 0, 0, B, T, n), T, in0, tgt0);
    std::vector<std::pair<std::string, std::string>> meta;
    bool failed = false;
    for (const std::string& mode : modes) {
      // Fresh steps and optimizer per mode: every mode starts from the same model.
      std::vector<Tensor> init;
      for (const auto& s : steps) init.push_back(s.value().clone());
      E2eOptions o;
      o.distill = mode == "distill";
      o.lm_weight = 0;
      if (!a.dump.empty()) {
        NoGradGuard ng;
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.9g", e2e_objective(student, &teacher, in0, tgt0, o).value().item());
        meta.emplace_back("loss_" + mode + "_step0", buf);
      }
      const int64_t total = a.warmup + a.steps;
      AdamW opt(std::vector<ParamGroup>{{steps, AdamWOptions{a.lr, 0.9, 0.999, 1e-8, 0.0}}});
      std::vector<double> losses;
      int64_t step_no = 0;
      auto step = [&]() {
        Tensor in, tgt;
        make_lm_windows(stream, train_window_starts(seed, a.fixed_batch ? 0 : step_no, 0, B, T, n), T, in, tgt);
        AutocastBf16Guard autocast(a.bf16);
        Var loss = e2e_objective(student, &teacher, in, tgt, o);
        const double lv = loss.value().item();  // as train_end_to_end: the finiteness check and the progress line
        if (!std::isfinite(lv)) throw_error("loss is ", lv, " at step ", step_no + 1);
        losses.push_back(lv);
        backward(loss);
        clip_grad_norm(steps, 1.0);
        opt.step(warmup_cosine(step_no, 0, total, 0.1));
        opt.zero_grad();
        ++step_no;
      };
      for (int64_t i = 0; i < a.warmup; ++i) step();
      if (gpu) {
        cuda_synchronize();
        cuda_reset_peak();
      }
      const int64_t held = gpu ? cuda_in_use_bytes() : 0;
      const double t0 = now_s();
      for (int64_t i = 0; i < a.steps; ++i) step();
      if (gpu) cuda_synchronize();
      const double ms = (now_s() - t0) * 1e3 / double(a.steps);
      const int64_t peak = gpu ? cuda_peak_bytes() : 0;
      std::printf("  %s: %.2f ms/step (mean of %lld steps after %lld warm-up), loss %.4f (step 1) -> %.4f (step %lld), "
                  "%lld trained steps; peak GPU memory %.2f GiB (%.2f GiB held before the steps)\n",
                  mode.c_str(), ms, (long long)a.steps, (long long)a.warmup, losses.front(), losses.back(),
                  (long long)losses.size(), (long long)n_steps, gib(peak), gib(held));
      std::printf("RESULT lowbit step=%s layers=%d batch=%lld seq=%lld tf32=%s bf16=%s ms_per_step=%.3f peak_gib=%.3f "
                  "held_gib=%.3f loss_first=%.6f loss_last=%.6f\n",
                  mode.c_str(), a.layers, (long long)B, (long long)T, a.tf32 ? "on" : "off", a.bf16 ? "on" : "off", ms,
                  gib(peak), gib(held), losses.front(), losses.back());
      std::fflush(stdout);
      if (a.expect_decrease && !(losses.back() < losses.front())) {
        std::fprintf(stderr, "bench_e2eqp: the %s loss did not decrease (%.9g -> %.9g)\n", mode.c_str(), losses.front(),
                     losses.back());
        failed = true;
      }
      if (a.profile && gpu) lowbit::bench::print_gpu_profile(step);
      if (a.fixed_batch) {  // the whole trajectory is reproducible: the reference compares its last loss too
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.9g", losses.back());
        meta.emplace_back("loss_" + mode + "_last", buf);
      }
      for (size_t i = 0; i < steps.size(); ++i) steps[i].mutable_value().copy_(init[i]);
    }
    if (!a.dump.empty()) {
      for_each_weight(w, [&](const std::string& name, const Tensor& t) { dump.emplace_back("fp." + name, t); });
      dump.emplace_back("batch.in", in0);
      dump.emplace_back("batch.tgt", tgt0);
      char run[96];
      std::snprintf(run, sizeof run, "%lld %lld %.9g %d", (long long)a.warmup, (long long)a.steps, a.lr, a.fixed_batch ? 1 : 0);
      meta.emplace_back("run", run);  // warm-up, timed steps, lr, fixed batch
      meta.emplace_back("config", std::to_string(a.layers) + " " + std::to_string(D) + " " + std::to_string(F) + " " +
                                      std::to_string(c.n_heads) + " " + std::to_string(V) + " " + f.name);
      save_safetensors(a.dump, dump, {meta.begin(), meta.end()});
      std::printf("wrote %s\n", a.dump.c_str());
    }
    if (failed) return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_e2eqp: %s\n", e.what());
    return 1;
  }
  return 0;
}
