// Tokenizer throughput on real English technical prose (Linux kernel docs), reported as MB/s
// of UTF-8 input. Each benchmark encodes the same prefix line by line (as an evaluation or
// data-preparation loop would), without special tokens.
//
//   LOWBIT_SHARED=/path/to/shared ./bench_tokenizer [--benchmark_filter=llama3]
// LOWBIT_BENCH_BYTES sets the prefix size (default 4 MB).
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/tokenizer/tokenizer.h"

namespace {

std::filesystem::path shared_root() {
  if (const char* e = std::getenv("LOWBIT_SHARED")) return e;
  return std::filesystem::path(LOWBIT_SOURCE_DIR).parent_path() / "shared";
}

const std::vector<std::string>& corpus_lines() {
  static const std::vector<std::string> lines = [] {
    size_t budget = 4u << 20;
    if (const char* e = std::getenv("LOWBIT_BENCH_BYTES")) budget = std::strtoull(e, nullptr, 10);
    std::vector<std::string> v;
    std::ifstream f(shared_root() / "data/linux-docs/train.txt");
    std::string line;
    size_t total = 0;
    while (total < budget && std::getline(f, line)) {
      total += line.size();
      v.push_back(std::move(line));
    }
    return v;
  }();
  return lines;
}

void bench_encode(benchmark::State& state, const char* rel) {
  const auto path = shared_root() / rel;
  if (!std::filesystem::exists(path) || corpus_lines().empty()) {
    state.SkipWithError(("missing " + path.string() + " or linux-docs/train.txt").c_str());
    return;
  }
  const auto tok = lowbit::load_tokenizer(path.string());
  size_t bytes = 0, tokens = 0;
  for (const auto& l : corpus_lines()) bytes += l.size();
  for (auto _ : state) {
    tokens = 0;
    for (const auto& l : corpus_lines()) {
      auto ids = tok->encode(l, false);
      tokens += ids.size();
      benchmark::DoNotOptimize(ids.data());
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
  state.counters["bytes/token"] = static_cast<double>(bytes) / static_cast<double>(tokens);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens),
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

void bench_decode(benchmark::State& state, const char* rel) {
  const auto path = shared_root() / rel;
  if (!std::filesystem::exists(path) || corpus_lines().empty()) {
    state.SkipWithError(("missing " + path.string()).c_str());
    return;
  }
  const auto tok = lowbit::load_tokenizer(path.string());
  std::vector<std::vector<int>> ids;
  size_t bytes = 0;
  for (const auto& l : corpus_lines()) {
    ids.push_back(tok->encode(l, false));
    bytes += l.size();
  }
  for (auto _ : state) {
    for (const auto& v : ids) benchmark::DoNotOptimize(tok->decode(v));
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
}

}  // namespace

BENCHMARK_CAPTURE(bench_encode, llama3_json, "tokenizers/llama3/tokenizer.json")
    ->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK_CAPTURE(bench_encode, qwen3_json, "tokenizers/qwen3/tokenizer.json")
    ->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK_CAPTURE(bench_encode, llama2_json, "tokenizers/llama2/tokenizer.json")
    ->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK_CAPTURE(bench_encode, llama2_sentencepiece, "tokenizers/llama2/tokenizer.model")
    ->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK_CAPTURE(bench_encode, llama2_llama2c_bin, "tokenizers/llama2/tokenizer.bin")
    ->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK_CAPTURE(bench_decode, llama3_json, "tokenizers/llama3/tokenizer.json")
    ->Unit(benchmark::kMillisecond)->MinTime(2.0);

BENCHMARK_MAIN();
