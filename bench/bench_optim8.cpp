// One AdamW update (autograd/optim.h AdamW::step, as `lowbit train` runs it: matrices with weight
// decay, norms without) over the parameters of a Llama model, f32 state against block-wise 8-bit
// state (--optimizer-bits 8; the token embedding and tensors under 4096 elements keep f32 state),
// CPU. Shapes: stories260K (dim 64, 5 layers, vocab 512) and stories15M (dim 288, 6 layers,
// hidden 768, vocab 32000). Counters: state bytes and parameters per second.
//
//   build-rel/bench/bench_optim8 --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include "lowbit/autograd/optim.h"
#include "lowbit/model/llama.h"
#include "lowbit/train/trainer.h"

using namespace lowbit;

namespace {
LlamaConfig shape(int which) {
  LlamaConfig c;
  if (which == 0) {
    c.dim = 64, c.hidden_dim = 172, c.n_layers = 5, c.n_heads = 8, c.n_kv_heads = 4, c.vocab_size = 512;
  } else {
    c.dim = 288, c.hidden_dim = 768, c.n_layers = 6, c.n_heads = 6, c.n_kv_heads = 6, c.vocab_size = 32000;
  }
  c.max_seq_len = 256;
  return c;
}

void BM_AdamWStep(benchmark::State& st) {
  const int bits = int(st.range(0));
  const LlamaConfig c = shape(int(st.range(1)));
  LlamaModel model(c, init_weights(c, 1), true);
  std::vector<Var> params = model.parameters();
  ParamGroup decay{{}, {1e-3, 0.9, 0.95, 1e-8, 0.1}}, no_decay{{}, {1e-3, 0.9, 0.95, 1e-8, 0.0}};
  int64_t n = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    params[i].grad() = Tensor::randn(params[i].shape(), 100 + i, 1e-2);
    (params[i].value().dim() >= 2 ? decay : no_decay).params.push_back(params[i]);
    n += params[i].numel();
  }
  AdamWStateOptions so;
  so.bits = bits;
  so.keep_32bit = {model.token_embedding()};
  AdamW opt({decay, no_decay}, so);
  for (auto _ : st) opt.step();
  st.counters["state_bytes"] = double(opt.state_bytes());
  st.counters["params"] = double(n);
  st.counters["params_per_s"] = benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate);
}
}  // namespace

BENCHMARK(BM_AdamWStep)
    ->ArgNames({"bits", "shape15M"})
    ->Args({32, 0})
    ->Args({8, 0})
    ->Args({32, 1})
    ->Args({8, 1})
    ->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();
