// lowbit bench: model size in memory, prefill and decode speed, like llama-bench.
//   prefill (pp): one forward of -p tokens into an empty KV cache (logits of every token computed).
//   decode (tg):  -n forwards of one token each after an empty cache (or -d tokens of untimed
//                 context), logits computed each time. With -b N (N >= 1): N sequences decode
//                 together, each step one LlamaModel::forward_batch of N tokens (lowbit serve's
//                 continuous-batching path); tokens/s counts the tokens of all N sequences, and the
//                 CPU time per step (all threads) is reported next to it.
// Token ids are fixed pseudo-random ids (the speed does not depend on them). One untimed warm-up
// of each before the -r timed runs; mean ± sd over the runs.
#include <chrono>
#include <cmath>
#include <ctime>
#include <cstdio>
#include <numeric>

#include "lowbit/autograd/variable.h"
#include "lowbit/core/threads.h"
#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/cli/dist.h"
#include "lowbit/model/tensor_parallel.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/runtime/generate.h"

namespace lowbit::cli {

namespace {

struct BenchArgs {
  std::string model, device = "cpu";
  int pp = 512, tg = 128, reps = 3, depth = 0, batch = 0;
  bool json = false, dequantize = false, f32_vocab = false;
  KVCacheType kv_cache = KVCacheType::Auto;
  TransformArgs tr;
  DistArgs dist;  // --tp
};

int64_t tensor_bytes(const Tensor& t) { return t.defined() ? int64_t(t.nbytes()) : 0; }

// Bytes of every weight the model holds: packed linears count their codes + scales + zeros (and
// adapters, bias); dense tensors their own size.
int64_t model_bytes(const LoadedModel& m) {
  const LlamaWeights& w = m.checkpoint.weights;
  int64_t n = tensor_bytes(w.tok_embeddings) + tensor_bytes(w.final_norm) + tensor_bytes(w.output);
  for (const auto& l : w.layers)
    n += tensor_bytes(l.attn_norm) + tensor_bytes(l.ffn_norm) + tensor_bytes(l.q_norm) + tensor_bytes(l.k_norm);
  n += m.packed_vocab_bytes;  // packed token_embd (+ output when untied)
  for (int i = 0; i < m.model->n_layers(); ++i)
    for (auto& [name, slot] : m.model->block(i).linears()) {
      const Linear* lin = &computing_layer(**slot);  // a tensor-parallel piece's own weights
      n += tensor_bytes(lin->bias());
      if (auto* q = dynamic_cast<const QuantLinear*>(lin))
        n += q->packed().nbytes() + tensor_bytes(q->lora_A()) + tensor_bytes(q->lora_B());
      else
        n += tensor_bytes(lin->effective_weight());
    }
  return n;
}

struct Stat {
  double mean = 0, sd = 0;
};
Stat stat(const std::vector<double>& v) {
  Stat s;
  if (v.empty()) return s;
  s.mean = std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
  for (double x : v) s.sd += (x - s.mean) * (x - s.mean);
  s.sd = v.size() > 1 ? std::sqrt(s.sd / double(v.size() - 1)) : 0.0;
  return s;
}

Tensor token_ids(int64_t n, int64_t vocab, uint64_t seed) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  uint64_t x = seed;
  for (auto& id : ids) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    id = int32_t((x >> 33) % uint64_t(vocab));
  }
  return Tensor::from_vector(ids, {n});
}

const char* matmul_name() {
  switch (ops::quant_matmul_default()) {
    case ops::QuantMatmulPath::Int8: return "int8";
    case ops::QuantMatmulPath::Exact: return "exact";
    case ops::QuantMatmulPath::Reference: return "reference";
    default: return "auto";
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Process CPU time (every thread), seconds: on a shared machine, CPU time per token is the
// steadier measure of the work a run does (wall time also counts the time other processes ran).
double cpu_seconds() { return double(std::clock()) / CLOCKS_PER_SEC; }
// CPU time of the calling thread alone, seconds: with -b, the main thread is the step's critical
// path (pool workers wait for it between parallel regions), so its CPU time per step approximates
// the step's wall time on an idle machine.
double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Waits for the device: copies the logits to the host (a rank without logits: one cached row).
void wait_for(const Var& logits, const KVCache& cache) {
  (logits.defined() ? logits.value() : cache.k.at(0).slice(0, 0, 1)).to(Device::CPU);
}

double run_pp(const LlamaModel& model, const Tensor& tokens, KVCacheType kv, double* cpu = nullptr) {
  KVCache cache = model.make_cache(tokens.numel(), kv);
  const double c0 = cpu_seconds();
  const auto t0 = std::chrono::steady_clock::now();
  // Tensor-parallel ranks other than 0 skip the output head, as in generate.
  const Var logits = model.forward_cached(tokens, cache, is_root(model));
  wait_for(logits, cache);  // waits for the device
  const double tps = double(tokens.numel()) / seconds_since(t0);
  if (cpu) *cpu += cpu_seconds() - c0;
  return tps;
}

double run_tg(const LlamaModel& model, const Tensor& tokens, KVCacheType kv, int64_t context, double* cpu = nullptr) {
  const int64_t n = tokens.numel();
  KVCache cache = model.make_cache(context + n, kv);
  if (context > 0) {  // a prompt already in the cache (untimed): decode attends over context + i keys
    model.forward_cached(token_ids(context, model.config().vocab_size, 5), cache);
  }
  const double c0 = cpu_seconds();
  const auto t0 = std::chrono::steady_clock::now();
  const int32_t* ids = tokens.data<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    const Var logits = model.forward_cached(Tensor::from_vector(std::vector<int32_t>{ids[i]}, {1}), cache, is_root(model));
    if (i == n - 1) wait_for(logits, cache);  // waits for the device
  }
  const double tps = double(n) / seconds_since(t0);
  if (cpu) *cpu += cpu_seconds() - c0;
  return tps;
}

// -b N: N sequences (each with `context` untimed tokens already in its cache) decode `tokens` steps
// together, one forward_batch per step. Returns tokens/s over all sequences.
double run_tg_batch(const LlamaModel& model, const Tensor& tokens, KVCacheType kv, int64_t context, int batch,
                    double* cpu = nullptr, double* main_cpu = nullptr) {
  const int64_t n = tokens.numel(), vocab = model.config().vocab_size;
  std::vector<KVCache> caches;
  caches.reserve(size_t(batch));
  std::vector<KVCache*> ptrs;
  for (int s = 0; s < batch; ++s) {
    caches.push_back(model.make_cache(context + n, kv));
    ptrs.push_back(&caches.back());
  }
  if (context > 0)  // every prompt in one mixed forward, as lowbit serve reads short prompts (untimed)
    model.forward_mixed(token_ids(context * batch, vocab, 5), ptrs, std::vector<int64_t>(size_t(batch), context),
                        std::vector<bool>(size_t(batch), false));
  const double c0 = cpu_seconds(), m0 = thread_cpu_seconds();
  const auto t0 = std::chrono::steady_clock::now();
  const int32_t* ids = tokens.data<int32_t>();
  std::vector<int32_t> step(static_cast<size_t>(batch));
  for (int64_t i = 0; i < n; ++i) {
    for (int s = 0; s < batch; ++s) step[size_t(s)] = ids[(i + s) % n];
    Tensor logits = model.forward_batch(Tensor::from_vector(step, {int64_t(batch)}), ptrs).value();
    if (i == n - 1) logits.to(Device::CPU);  // waits for the device
  }
  const double tps = double(n * batch) / seconds_since(t0);
  if (cpu) *cpu += cpu_seconds() - c0;
  if (main_cpu) *main_cpu += thread_cpu_seconds() - m0;
  return tps;
}

void run_bench(const BenchArgs& a) {
  const int threads = num_threads();  // --threads (add_threads_option) has set the program's one pool
  check_kv_cache_device(a.kv_cache, a.device);
  // --tp N: every rank runs the same tests on its piece of the model (the same token ids: nothing to
  // broadcast); rank 0 prints. Sizes are rank 0's piece.
  const std::unique_ptr<comm::Communicator> comm = start_ranks(a.dist, a.device == "cuda", "--tp");
  const Device dev = parse_device(a.device);
  NoGradGuard no_grad;
  LoadedModel m = a.dequantize ? load_model(a.model, tensor_parallel_load_device(a.model, dev, *comm), true, !a.f32_vocab)
                                : load_model_for_ranks(a.model, dev, *comm, !a.f32_vocab, !a.tr.any_given());
  apply_rotation(m, a.tr);
  apply_kv_calibration(m, a.tr, "", a.model, a.json);
  apply_quant_transforms(*m.model, a.tr, a.kv_cache);
  shard_for_tensor_parallel(m, *comm, dev);
  const int tp = comm->world_size();
  const LlamaModel& model = *m.model;
  const int64_t vocab = model.config().vocab_size;
  const int64_t bytes = model_bytes(m);
  std::vector<double> pp, tg;
  double pp_cpu = 0, tg_cpu = 0, tg_main_cpu = 0;
  if (a.pp > 0) {
    const Tensor toks = token_ids(a.pp, vocab, 1);
    run_pp(model, token_ids(std::min(a.pp, 16), vocab, 2), a.kv_cache);  // warm-up
    for (int r = 0; r < a.reps; ++r) pp.push_back(run_pp(model, toks, a.kv_cache, &pp_cpu));
  }
  if (a.tg > 0) {
    const Tensor toks = token_ids(a.tg, vocab, 3);
    if (a.batch > 0) {
      run_tg_batch(model, token_ids(std::min(a.tg, 4), vocab, 4), a.kv_cache, 0, a.batch);  // warm-up
      for (int r = 0; r < a.reps; ++r) tg.push_back(run_tg_batch(model, toks, a.kv_cache, a.depth, a.batch, &tg_cpu, &tg_main_cpu));
    } else {
      run_tg(model, token_ids(std::min(a.tg, 4), vocab, 4), a.kv_cache, 0);  // warm-up
      for (int r = 0; r < a.reps; ++r) tg.push_back(run_tg(model, toks, a.kv_cache, a.depth, &tg_cpu));
    }
  }
  const Stat sp = stat(pp), st = stat(tg);
  if (comm->rank() != 0) return;
  if (a.json) {
    nlohmann::json j = {{"model", a.model},
                        {"model_bytes", bytes},
                        {"threads", threads},
                        {"device", a.device},
                        {"tp", tp},
                        {"isa", ops::quant_isa_name(ops::quant_isa_best())},
                        {"reps", a.reps},
                        {"pp_tokens", a.pp},
                        {"tg_tokens", a.tg},
                        {"depth", a.depth},
                        {"batch", a.batch},
                        {"kv_cache", kv_cache_type_name(model.make_cache(0, a.kv_cache).type)},
                        {"kv_cache_bytes", model.make_cache(a.depth + std::max(a.pp, a.tg), a.kv_cache).bytes()},
                        {"matmul", matmul_name()}};
    if (!pp.empty()) {
      j["pp_tokens_per_s"] = sp.mean;
      j["pp_tokens_per_s_sd"] = sp.sd;
      j["pp_cpu_ms_per_token"] = 1e3 * pp_cpu / double(a.reps * a.pp);
    }
    if (!tg.empty()) {
      j["tg_tokens_per_s"] = st.mean;
      j["tg_tokens_per_s_sd"] = st.sd;
      j["tg_cpu_ms_per_token"] = 1e3 * tg_cpu / double(a.reps * a.tg * std::max(a.batch, 1));
      j["tg_cpu_ms_per_step"] = 1e3 * tg_cpu / double(a.reps * a.tg);
      if (a.batch > 0) j["tg_main_thread_cpu_ms_per_step"] = 1e3 * tg_main_cpu / double(a.reps * a.tg);
    }
    print_json(j);
    return;
  }
  const std::string kv = kv_cache_type_name(model.make_cache(0, a.kv_cache).type);
  print_stdout("| model | size | device | threads | kv | matmul | test | t/s |\n|---|---:|---|---:|---|---|---|---:|\n");
  const double mib = double(bytes) / (1024.0 * 1024.0);
  const std::string device = tp > 1 ? a.device + " tp" + std::to_string(tp) : a.device;
  if (!pp.empty())
    print_stdout("| %s | %.2f MiB | %s | %d | %s | %s | pp%d | %.2f ± %.2f |\n", a.model.c_str(), mib, device.c_str(),
                 threads, kv.c_str(), matmul_name(), a.pp, sp.mean, sp.sd);
  if (!tg.empty()) {
    std::string test = a.depth > 0 ? "tg" + std::to_string(a.tg) + " @ d" + std::to_string(a.depth) : "tg" + std::to_string(a.tg);
    if (a.batch > 0) {
      char buf[128];
      std::snprintf(buf, sizeof buf, " x b%d (cpu %.2f ms/step, main thread %.2f)", a.batch, 1e3 * tg_cpu / double(a.reps * a.tg),
                    1e3 * tg_main_cpu / double(a.reps * a.tg));
      test += buf;
    }
    print_stdout("| %s | %.2f MiB | %s | %d | %s | %s | %s | %.2f ± %.2f |\n", a.model.c_str(), mib, device.c_str(),
                 threads, kv.c_str(), matmul_name(), test.c_str(), st.mean, st.sd);
  }
}

}  // namespace

void register_bench(CLI::App& app) {
  auto* b = app.add_subcommand("bench", "Measure model size in memory, prefill and decode tokens/s (like llama-bench)");
  auto a = std::make_shared<BenchArgs>();
  b->add_option("-m,--model", a->model, "model: a lowbit quantized directory or any checkpoint lowbit reads")->required();
  b->add_option("-p,--n-prompt", a->pp, "prefill test: tokens in one forward (0 = skip)")->capture_default_str()->check(at_least(0));
  b->add_option("-n,--n-gen", a->tg, "decode test: tokens generated one at a time (0 = skip)")->capture_default_str()->check(at_least(0));
  b->add_option("-r,--repetitions", a->reps, "timed runs of each test")->capture_default_str()->check(at_least(1));
  b->add_option("-d,--depth", a->depth, "decode test: tokens already in the KV cache before it (untimed prefill), like llama-bench -d")
      ->capture_default_str()
      ->check(at_least(0));
  b->add_option("-b,--batch", a->batch,
                "decode test: N sequences decode together, one batched forward per step (lowbit serve's path; "
                "tokens/s counts all N; 0 = one sequence on generate's path)")
      ->capture_default_str()
      ->check(at_least(0));
  add_kv_cache_option(b, &a->kv_cache);
  add_matmul_option(b);
  add_transform_options(b, &a->tr);
  add_f32_vocab_option(b, &a->f32_vocab);
  add_threads_option(b);
  b->add_option("--device", a->device, "cpu or cuda")->capture_default_str();
  add_tp_options(b, &a->dist);
  b->add_flag("--dequantize", a->dequantize, "run a quantized model dequantized to f32 (the reference path)");
  b->add_flag("--json", a->json, "one JSON object: model_bytes, pp_tokens_per_s, tg_tokens_per_s, threads, device");
  b->callback([a] { run_bench(*a); });
}

}  // namespace lowbit::cli
