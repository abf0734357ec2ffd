// CPU benchmarks of the core: GEMM throughput (GFLOP/s) and full forward passes (tokens/s).
//   cmake -B build -DLOWBIT_BENCH=ON && ninja -C build bench_core && build/bench/bench_core
#include <benchmark/benchmark.h>

#include <algorithm>
#include <filesystem>
#include <random>
#include <vector>

#include "lowbit/autograd/functions.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/model/llama.h"
#include "lowbit/ops/ops.h"
#include "lowbit/runtime/sampler.h"

using namespace lowbit;

static void BM_Gemm(benchmark::State& st) {
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2);
  Tensor a = Tensor::randn({M, K}, 1), b = Tensor::randn({N, K}, 2), c = Tensor::empty({M, N});
  for (auto _ : st) ops::gemm(a, false, b, true, c);
  st.counters["GFLOP/s"] = benchmark::Counter(2.0 * double(M * N * K), benchmark::Counter::kIsIterationInvariantRate,
                                              benchmark::Counter::kIs1000);
}
// x W^T shapes: square, and a batch of tokens through a 4096-wide projection.
BENCHMARK(BM_Gemm)->Args({512, 512, 512})->Args({1024, 1024, 1024})->Args({128, 4096, 4096})->Args({1, 4096, 4096})
    ->Unit(benchmark::kMillisecond);

// Greedy sampling over SmolLM2's 49152 logits (one per decoding sequence and step, on the serving
// thread): std::max_element (arg 0) vs lowbit::argmax_first (arg 1), the same index.
static void BM_GreedyArgmax(benchmark::State& st) {
  std::vector<float> x(49152);
  std::mt19937 rng(1);
  std::normal_distribution<float> g(0.0f, 3.0f);
  for (float& v : x) v = g(rng);
  for (auto _ : st) {
    const int i = st.range(0) ? argmax_first(x.data(), int(x.size())) : int(std::max_element(x.begin(), x.end()) - x.begin());
    benchmark::DoNotOptimize(i);
  }
}
BENCHMARK(BM_GreedyArgmax)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

static LlamaConfig stories15m_shape() {
  LlamaConfig c;
  c.dim = 288;
  c.hidden_dim = 768;
  c.n_layers = 6;
  c.n_heads = 6;
  c.n_kv_heads = 6;
  c.vocab_size = 32000;
  c.max_seq_len = 256;
  return c;
}

static void forward_bench(benchmark::State& st, const LlamaModel& m, int64_t B, int64_t T) {
  std::vector<int32_t> ids(size_t(B * T));
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t((i * 7919) % size_t(m.config().vocab_size));
  Tensor tokens = Tensor::from_vector(ids, {B, T});
  NoGradGuard ng;
  for (auto _ : st) benchmark::DoNotOptimize(m.forward(tokens).value().raw_data());
  st.counters["tokens/s"] = benchmark::Counter(double(B * T), benchmark::Counter::kIsIterationInvariantRate);
}

static void BM_ForwardStories15MShape(benchmark::State& st) {
  LlamaConfig c = stories15m_shape();
  LlamaModel m(c, random_weights(c, 1));
  forward_bench(st, m, 1, st.range(0));
}
BENCHMARK(BM_ForwardStories15MShape)->Arg(256)->Unit(benchmark::kMillisecond);

static void BM_TrainStepStories15MShape(benchmark::State& st) {
  LlamaConfig c = stories15m_shape();
  LlamaModel m(c, random_weights(c, 1), true);
  const int64_t B = 4, T = 256;
  std::vector<int32_t> ids(size_t(B * T));
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t((i * 7919) % 32000);
  Tensor tokens = Tensor::from_vector(ids, {B, T}), targets = tokens.view({-1});
  for (auto _ : st) {
    Var loss = cross_entropy(m.forward(tokens), targets);
    backward(loss);
  }
  st.counters["tokens/s"] = benchmark::Counter(double(B * T), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_TrainStepStories15MShape)->Unit(benchmark::kMillisecond);

static void BM_ForwardStories260K(benchmark::State& st) {
  const std::string path = std::string(LOWBIT_SOURCE_DIR) + "/../shared/models/stories260K/stories260K.bin";
  if (!std::filesystem::exists(path)) {
    st.SkipWithError("shared/models/stories260K not found");
    return;
  }
  Checkpoint ck = load_llama2c(path);
  LlamaModel m(ck.config, ck.weights);
  forward_bench(st, m, 8, 256);
}
BENCHMARK(BM_ForwardStories260K)->Unit(benchmark::kMillisecond);

static void BM_DecodeStories260K(benchmark::State& st) {
  const std::string path = std::string(LOWBIT_SOURCE_DIR) + "/../shared/models/stories260K/stories260K.bin";
  if (!std::filesystem::exists(path)) {
    st.SkipWithError("shared/models/stories260K not found");
    return;
  }
  Checkpoint ck = load_llama2c(path);
  LlamaModel m(ck.config, ck.weights);
  NoGradGuard ng;
  for (auto _ : st) {
    KVCache cache = m.make_cache(256);
    for (int i = 0; i < 256; ++i) m.forward_cached(Tensor::from_vector(std::vector<int32_t>{i % 512}, {1}), cache);
  }
  st.counters["tokens/s"] = benchmark::Counter(256.0, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_DecodeStories260K)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
