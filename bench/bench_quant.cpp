// Quantizer benchmarks (CPU reference code): GPTQ and RTN on an LLM-sized linear layer, and the
// throughput of packing / unpacking / dequantizing codes. BM_QuantMatmulInt8: the packed int8
// matmul (ops::quant_matmul's Int8 body) of M activation rows, as `lowbit serve` steps M sequences.
//   build: cmake -DLOWBIT_BENCH=ON ... && ninja bench_quant
//   run:   ./bench/bench_quant --benchmark_filter=Gptq
#include <benchmark/benchmark.h>

#include <random>
#include <string>
#include <vector>

#include "lowbit/core/blas.h"
#include "lowbit/core/threads.h"
#include "lowbit/methods/gptq.h"
#include "lowbit/methods/rtn.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/ops/quant_matmul_kernels.h"
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

// y[M, out] = x[M, in] . W^T on SmolLM2-135M's shapes, one thread (the machine is shared):
//   format 0: q4_1 [1536 x 576] (ffn gate / up), 1: q4_1 [576 x 1536] (ffn down),
//   2: q8_0 [49152 x 576] (the tied head), 3: q4_0 [1536 x 576], 4: int4g128 [1536 x 576].
// Arguments: panels (1: the panel (GEMM) kernel; 0: the four-row kernels only, the body before it),
// format, M. On a shared machine compare the two within one run, interleaved, best of several:
//   ./build-bench/bench/bench_quant --benchmark_filter=QuantMatmulInt8 --benchmark_min_time=0.1
//     --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true --benchmark_format=json
//     | python3 bench/qmm_table.py      (one command line)
static void BM_QuantMatmulInt8(benchmark::State& state) {
  struct Case {
    const char* fmt;
    int64_t out, in;
  };
  static const Case cases[] = {{"q4_1", 1536, 576}, {"q4_1", 576, 1536}, {"q8_0", 49152, 576},
                               {"q4_0", 1536, 576}, {"int4g128", 1536, 576}};
  const bool panels = state.range(0) != 0;
  const Case& c = cases[state.range(1)];
  const int64_t M = state.range(2);
  set_num_threads(1);
  const QuantizedTensor q = quantize(Tensor::randn({c.out, c.in}, 1, 0.05), parse_quant_format(c.fmt));
  const ops::PackedWeight v = q.packed_view();
  const Tensor x = Tensor::randn({M, c.in}, 2);
  Tensor y = Tensor::empty({M, c.out});
  const ops::QuantMatmulOptions opt{ops::QuantMatmulPath::Int8, ops::QuantIsa::Auto, panels};
  for (auto _ : state) {
    ops::quant_matmul(x, v, y, opt);
    benchmark::ClobberMemory();
  }
  state.SetLabel(std::string(c.fmt) + " [" + std::to_string(c.out) + "x" + std::to_string(c.in) + "] " +
                 ops::quant_isa_name(ops::quant_isa_best()) + (panels ? " panels" : " quad"));
  state.counters["rows/s"] = benchmark::Counter(double(M), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_QuantMatmulInt8)
    ->ArgsProduct({{0, 1}, {0, 1, 2, 3, 4}, {1, 4, 8, 16, 32, 64}})
    ->Unit(benchmark::kMicrosecond);

// The ternary format's Int8 body: the plain 2-bit code kernel (kernel 0) against the lookup-table
// kernel (kernel 1: bitnet.cpp TL1 / T-MAC style, the weight's index form built once before timing)
// on SmolLM2-135M's shapes and two larger ones, M activation rows, 1 or 2 threads (wall time: the
// products are split over the pool). Arguments: kernel, shape, M, threads. One command line:
//   ./build-rel/bench/bench_quant --benchmark_filter=TernaryMatmul --benchmark_min_time=0.2
//     --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true --benchmark_format=json
//     | python3 bench/qmm_table.py --ternary
static void BM_TernaryMatmul(benchmark::State& state) {
  struct Shape {
    int64_t out, in;
  };
  // q/k/v/o [576 x 576], gate/up [1536 x 576], down [576 x 1536]; [2048 x 2048], [4096 x 4096].
  static const Shape shapes[] = {{576, 576}, {1536, 576}, {576, 1536}, {2048, 2048}, {4096, 4096}};
  const bool lut = state.range(0) != 0;
  const Shape& sh = shapes[state.range(1)];
  const int64_t M = state.range(2);
  const int threads = int(state.range(3));
  set_num_threads(threads);
  QuantizedTensor q = quantize(Tensor::randn({sh.out, sh.in}, 1, 0.05), parse_quant_format("ternary"));
  if (lut && !q.to_tl_layout()) state.SkipWithError("no lookup-table layout");
  const ops::PackedWeight v = q.packed_view();
  const Tensor x = Tensor::randn({M, sh.in}, 2);
  Tensor y = Tensor::empty({M, sh.out});
  const ops::QuantMatmulOptions opt{ops::QuantMatmulPath::Int8, ops::QuantIsa::Auto, true, ops::CudaGemv::Auto,
                                    lut ? ops::TernaryBody::Lut : ops::TernaryBody::Plain};
  for (auto _ : state) {
    ops::quant_matmul(x, v, y, opt);
    benchmark::ClobberMemory();
  }
  state.SetLabel("ternary [" + std::to_string(sh.out) + "x" + std::to_string(sh.in) + "] " +
                 ops::quant_isa_name(ops::quant_isa_best()) + (lut ? " lut" : " plain"));
  state.counters["weights/s"] =
      benchmark::Counter(double(M * sh.out * sh.in), benchmark::Counter::kIsIterationInvariantRate);
  set_num_threads(1);
}
BENCHMARK(BM_TernaryMatmul)
    ->ArgsProduct({{0, 1}, {0, 1, 2, 3, 4}, {1, 4, 8}, {1, 2}})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

// The Exact body's f32 product on one decoded panel of weight rows, one thread: OpenBLAS's sgemm
// (kernel 0: the body before issue 10's fix, whose summation order depends on M) against
// qmm::F32DotRows (kernel 1: one order per output whatever M; the best x86 copy here, else the
// portable one). Panels of SmolLM2-135M's widths as the tiled body makes them (at most 2^16
// floats: 112 rows of 576, 32 of 1536) and M activation rows (1 decode, 8, 64, 512 prefill).
// Arguments: kernel, shape, M. One command line:
//   ./build-rel/bench/bench_quant --benchmark_filter=ExactPanel --benchmark_min_time=0.2
//     --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true --benchmark_format=json
//     | python3 bench/qmm_table.py --exact
static void BM_ExactPanel(benchmark::State& state) {
  struct Shape {
    int64_t rows, in;
  };
  static const Shape shapes[] = {{112, 576}, {32, 1536}};
  const bool fixed = state.range(0) != 0;
  const Shape& sh = shapes[state.range(1)];
  const int64_t M = state.range(2);
  set_num_threads(1);
  const Tensor w = Tensor::randn({sh.rows, sh.in}, 1, 0.05), x = Tensor::randn({M, sh.in}, 2);
  Tensor y = Tensor::empty({M, sh.rows});
  const ops::qmm::F32DotRows dot = ops::quant_isa_best() == ops::QuantIsa::Portable
                                       ? &ops::qmm::portable_f32_dot_rows
#if defined(__x86_64__) || defined(__i386__)
                                       : ops::qmm::x86_f32_dot_rows(true);
#else
                                       : &ops::qmm::portable_f32_dot_rows;
#endif
  for (auto _ : state) {
    if (fixed)
      dot(x.data<float>(), sh.in, M, w.data<float>(), sh.in, sh.rows, sh.in, y.data<float>(), sh.rows);
    else
      blas::gemm(false, true, M, sh.rows, sh.in, 1.0f, x.data<float>(), sh.in, w.data<float>(), sh.in, 0.0f,
                 y.data<float>(), sh.rows);
    benchmark::ClobberMemory();
  }
  std::string label = "[";  // (appended piecewise: GCC 12 warns -Wrestrict on "[" + std::to_string(...))
  label += std::to_string(sh.rows);
  label += "x";
  label += std::to_string(sh.in);
  label += fixed ? "] f32dot" : "] sgemm";
  state.SetLabel(label);
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * double(M * sh.rows * sh.in), benchmark::Counter::kIsIterationInvariantRate,
                         benchmark::Counter::kIs1000);
}
BENCHMARK(BM_ExactPanel)->ArgsProduct({{0, 1}, {0, 1}, {1, 8, 64, 512}})->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
