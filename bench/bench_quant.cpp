// Quantizer benchmarks (CPU reference code): GPTQ and RTN on an LLM-sized linear layer, and the
// throughput of packing / unpacking / dequantizing codes.
//   build: cmake -DLOWBIT_BENCH=ON ... && ninja bench_quant
//   run:   ./bench/bench_quant --benchmark_filter=Gptq
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "lowbit/methods/gptq.h"
#include "lowbit/methods/rtn.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/quantize.h"

using namespace lowbit;

// GPTQ on an [n, n] layer in int4g128. The Hessian comes from 1024 random calibration rows (rank
// deficient for n > 1024; the 1 % dampening makes it positive definite, as in practice).
static void BM_Gptq_Int4G128(benchmark::State& state) {
  const int64_t n = state.range(0);
  const bool act_order = state.range(1) != 0;
  Tensor w = Tensor::randn({n, n}, 1, 0.02);
  HessianAccumulator acc(n);
  acc.add(Tensor::randn({1024, n}, 2));
  Tensor h = acc.hessian();
  GptqOptions opt;
  opt.act_order = act_order;
  for (auto _ : state) {
    GptqResult r = gptq_quantize(w, h, parse_quant_format("int4g128"), opt);
    benchmark::DoNotOptimize(r.loss);
  }
  state.counters["weights/s"] = benchmark::Counter(double(n * n), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Gptq_Int4G128)->Args({1024, 0})->Args({4096, 0})->Args({4096, 1})->Unit(benchmark::kSecond)->Iterations(1);

static void BM_HessianAccumulate(benchmark::State& state) {
  const int64_t n = state.range(0);
  Tensor x = Tensor::randn({512, n}, 3);
  HessianAccumulator acc(n);
  for (auto _ : state) acc.add(x);
  state.counters["rows/s"] = benchmark::Counter(512.0, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_HessianAccumulate)->Arg(4096)->Unit(benchmark::kMillisecond);

static const char* const kRtnFormats[] = {"int4g128", "int3g128", "int2g64", "int8pc", "ternary", "mxfp4", "nvfp4"};

static void BM_Rtn(benchmark::State& state) {
  const QuantFormat& f = parse_quant_format(kRtnFormats[state.range(0)]);
  state.SetLabel(f.name);
  const int64_t n = 4096;
  Tensor w = Tensor::randn({n, n}, 4, 0.02);
  for (auto _ : state) benchmark::DoNotOptimize(rtn_quantize(w, f));
  state.counters["weights/s"] = benchmark::Counter(double(n * n), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Rtn)->DenseRange(0, 6)->Unit(benchmark::kMillisecond);

static void BM_Dequantize(benchmark::State& state) {
  const QuantFormat& f = parse_quant_format(kRtnFormats[state.range(0)]);
  state.SetLabel(f.name);
  QuantizedTensor q = quantize(Tensor::randn({4096, 4096}, 5, 0.02), f);
  for (auto _ : state) benchmark::DoNotOptimize(q.dequantize());
  state.counters["weights/s"] = benchmark::Counter(4096.0 * 4096.0, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Dequantize)->DenseRange(0, 6)->Unit(benchmark::kMillisecond);

static std::vector<uint8_t> random_codes(int bits, int64_t n) {
  std::mt19937 rng(6);
  std::vector<uint8_t> c(static_cast<size_t>(n));
  for (auto& v : c) v = uint8_t(rng() & ((1u << bits) - 1));
  return c;
}

static void BM_Pack(benchmark::State& state) {
  const int bits = int(state.range(0));
  const int64_t n = 1 << 22;
  std::vector<uint8_t> codes = random_codes(bits, n), packed(static_cast<size_t>(packed_bytes(bits, n)));
  for (auto _ : state) {
    pack_codes(bits, codes.data(), n, packed.data());
    benchmark::ClobberMemory();
  }
  state.counters["codes/s"] = benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Pack)->Arg(2)->Arg(3)->Arg(4)->Arg(8);

static void BM_Unpack(benchmark::State& state) {
  const int bits = int(state.range(0));
  const int64_t n = 1 << 22;
  std::vector<uint8_t> codes = random_codes(bits, n), packed(static_cast<size_t>(packed_bytes(bits, n)));
  pack_codes(bits, codes.data(), n, packed.data());
  for (auto _ : state) {
    unpack_codes(bits, packed.data(), n, codes.data());
    benchmark::ClobberMemory();
  }
  state.counters["codes/s"] = benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Unpack)->Arg(2)->Arg(3)->Arg(4)->Arg(8);

BENCHMARK_MAIN();
