// Tensor-parallel decoding (model/tensor_parallel.h, issue 20): the pieces of every linear layer kind
// add up to the layer, packed weights are cut on their groups (every format), and a model split
// over 2 and 3 ranks (forked processes, CPU backend) gives the 1-rank logits within reduction-order
// rounding and the same greedy tokens: a random GQA model dense and packed (int4g32, q4_0), and
// stories260K (../shared) through generate() with its tokenizer. Then what cannot be split is a
// named error, and the CLI's `generate --tp` / `bench --tp`.
//
// The bound: a piece computes the same products as the whole model except that o_proj and
// down_proj sum their input columns in W partial sums (added in rank order by the CPU backend), so
// the logits differ by f32 rounding, amplified through the layers (printed by the tests, as a
// share of the largest |logit|: about 1e-6 with an f32 KV cache, asserted 1e-4; up to 3e-4 with the
// f16 cache, whose rounding of a key can flip, asserted 1e-3). On the packed int8-activation path a
// rounding difference can move an int8 activation code by one: the logits then move by up to the
// int8 path's own error (asserted: 2 ranks are as close to the f32-activation logits as 1 rank).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <mutex>

#include "comm/fork_ranks.h"
#include "common/test_util.h"
#include "lowbit/comm/comm.h"
#include "lowbit/comm/launch.h"
#include "lowbit/core/threads.h"
#include "lowbit/io/checkpoint.h"
#include "lowbit/io/gguf.h"
#include "lowbit/io/hf.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/io/tensor_parallel_load.h"
#include "lowbit/model/tensor_parallel.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"
#include "lowbit/runtime/generate.h"
#include "lowbit/runtime/scheduler.h"
#include "lowbit/runtime/sampler.h"
#include "lowbit/tokenizer/tokenizer.h"

namespace fs = std::filesystem;
using namespace lowbit;
using lowbit::test::CliResult;
using lowbit::test::env_for;
using lowbit::test::run_cli;
using lowbit::test::run_forked;

namespace {

// A communicator that only has a shape: sharding and its errors need no peers.
class ShapeOnlyComm : public comm::Communicator {
 public:
  ShapeOnlyComm(int rank, int world) : Communicator(rank, world, rank) {}
  using Communicator::all_reduce_sum;
  std::string backend() const override { return "shape-only"; }
  void all_reduce_sum(Tensor&) override { throw_error("shape-only communicator"); }
  void all_gather(const Tensor&, Tensor&) override { throw_error("shape-only communicator"); }
  void reduce_scatter_sum(const Tensor&, Tensor&) override { throw_error("shape-only communicator"); }
  void broadcast(Tensor&, int) override { throw_error("shape-only communicator"); }
  void barrier() override {}
};

Tensor ids(const std::vector<int32_t>& v) { return Tensor::from_vector(v, {int64_t(v.size())}); }

// GQA (12 query heads over 6 KV heads of 16 channels), untied head: 2 and 3 ranks split heads,
// KV-head groups and the SwiGLU width (12 groups of 32) evenly.
LlamaConfig gqa_config() {
  LlamaConfig c;
  c.dim = 192;
  c.hidden_dim = 384;
  c.n_layers = 2;
  c.n_heads = 12;
  c.n_kv_heads = 6;
  c.vocab_size = 256;
  c.max_seq_len = 64;
  c.rope_style = RopeStyle::Half;
  c.tied_embeddings = false;
  return c;
}

// The model with every block linear rounded to nearest in `fmt` (packed QuantLinear), or dense.
std::unique_ptr<LlamaModel> make_model(const LlamaConfig& c, const LlamaWeights& w, const char* fmt) {
  auto m = std::make_unique<LlamaModel>(c, w, false);
  if (!fmt) return m;
  const QuantFormat& f = parse_quant_format(fmt);
  for (int i = 0; i < m->n_layers(); ++i)
    for (auto& [name, slot] : m->block(i).linears())
      *slot = std::make_shared<QuantLinear>(quantize((*slot)->effective_weight(), f), (*slot)->bias());
  return m;
}

// What a decode produces: the logits of every step in order, and the greedy tokens.
struct Trace {
  std::vector<float> logits;
  std::vector<int32_t> tokens;
};

void append(std::vector<float>& v, const Tensor& t) {
  const Tensor c = t.contiguous();
  v.insert(v.end(), c.data<float>(), c.data<float>() + c.numel());
}

// Prefill of a prompt (logits of every position), `steps` greedy decode steps (rank 0's choice on
// every rank: follow_root), then one serving step (forward_mixed) of that sequence's next token
// together with a new 5-token prompt.
// With `force`, step s feeds force[s] instead of the greedy choice (teacher forcing: both runs see
// the same context however their choices differ).
Trace decode(const LlamaModel& m, KVCacheType kv, int steps, const std::vector<int32_t>* force = nullptr) {
  NoGradGuard ng;
  const int V = m.config().vocab_size;
  const std::vector<int32_t> prompt = {1, 17, 42, 99, 5, 200 % V, 31};
  KVCache cache = m.make_cache(int64_t(prompt.size()) + steps + 1, kv);
  Trace t;
  const Tensor lp = m.forward_cached(ids(prompt), cache).value().contiguous();
  append(t.logits, lp);
  int tok = follow_root(m, argmax_first(lp.data<float>() + (lp.size(0) - 1) * V, V));
  for (int s = 0; s < steps; ++s) {
    t.tokens.push_back(tok);
    if (force) tok = force->at(size_t(s));
    const Tensor l = m.forward_cached(ids({tok}), cache).value().contiguous();
    append(t.logits, l);
    tok = follow_root(m, argmax_first(l.data<float>(), V));
  }
  t.tokens.push_back(tok);
  KVCache other = m.make_cache(16, kv);
  append(t.logits, m.forward_mixed(ids({tok, 3, 4, 5, 6, 7}), {&cache, &other}, {1, 5}, {true, true}).value());
  return t;
}

void write_trace(const fs::path& p, const Trace& t) {
  std::ofstream f(p, std::ios::binary);
  const int64_t n = int64_t(t.logits.size()), k = int64_t(t.tokens.size());
  f.write(reinterpret_cast<const char*>(&n), 8);
  f.write(reinterpret_cast<const char*>(&k), 8);
  f.write(reinterpret_cast<const char*>(t.logits.data()), std::streamsize(n * 4));
  f.write(reinterpret_cast<const char*>(t.tokens.data()), std::streamsize(k * 4));
  if (!f) throw_error("cannot write ", p.string());
}

Trace read_trace(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  int64_t n = 0, k = 0;
  f.read(reinterpret_cast<char*>(&n), 8);
  f.read(reinterpret_cast<char*>(&k), 8);
  Trace t;
  t.logits.resize(size_t(n));
  t.tokens.resize(size_t(k));
  f.read(reinterpret_cast<char*>(t.logits.data()), std::streamsize(n * 4));
  f.read(reinterpret_cast<char*>(t.tokens.data()), std::streamsize(k * 4));
  return t;
}

// Forked ranks inherit the parent's memory but not its threads: the tests run with one thread (no
// pool workers, no OpenMP team exists when they fork), and the models are built before the fork.
struct OneThread {
  OneThread() { set_num_threads(1); }
  ~OneThread() { set_num_threads(0); }
};

// Runs `body` on full's piece on each of W forked ranks (CPU backend); each rank writes what body
// returns to dir/rank<r>.bin. Expects every rank to succeed.
void on_ranks(int W, const fs::path& dir, const LlamaModel& full, const std::function<Trace(const LlamaModel&)>& body) {
  const int port = comm::free_local_port();
  const auto st = run_forked(W, [&](int r) {
    auto c = comm::make_cpu_communicator(env_for(r, W, port), 30, 120);
    const auto piece = full.tensor_parallel_shard(*c);
    CHECK_OR_THROW(piece->config().n_heads == full.config().n_heads / W, "heads per rank");
    write_trace(dir / ("rank" + std::to_string(r) + ".bin"), body(*piece));
  }, 240);
  for (int r = 0; r < W; ++r) ASSERT_EQ(st[size_t(r)], 0) << "rank " << r << " of " << W;
}

// max |a - b| / max(1, max |a|) over the logits.
double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0, m = 1;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    d = std::max(d, double(std::fabs(a[i] - b[i])));
    m = std::max(m, double(std::fabs(a[i])));
  }
  return d / m;
}

// The W ranks' traces against the 1-rank one: every rank's logits equal rank 0's bit for bit (the
// all-reduce gives each the same residual stream), rank 0's within `tol` of one process, the same
// greedy tokens.
void expect_matches(const Trace& one, int W, const fs::path& dir, double tol, const std::string& what) {
  const Trace r0 = read_trace(dir / "rank0.bin");
  for (int r = 1; r < W; ++r) {
    const Trace rr = read_trace(dir / ("rank" + std::to_string(r) + ".bin"));
    EXPECT_EQ(rel_diff(rr.logits, r0.logits), 0.0) << what << ": rank " << r << " differs from rank 0";
    EXPECT_EQ(rr.tokens, r0.tokens) << what << ": rank " << r;
  }
  const double d = rel_diff(r0.logits, one.logits);
  std::printf("[ tp ] %s, %d ranks: max |logit diff| / max |logit| = %.3g\n", what.c_str(), W, d);
  EXPECT_LE(d, tol) << what << ", " << W << " ranks";
  EXPECT_EQ(r0.tokens, one.tokens) << what << ", " << W << " ranks: greedy tokens";
}

}  // namespace

// ---- the pieces of one layer ------------------------------------------------------------------

// Every format's column and row slices decode to the same values as the slices of the decoded
// tensor; ptq161 refuses column cuts; a cut off the groups is an error naming the format.
TEST(TensorParallel, QuantizedTensorSlicesAreExact) {
  const int64_t out = 6, in = 1024;  // 4 blocks of 256, 32 groups of 32
  const Tensor w = Tensor::randn({out, in}, 11, 0.05);
  int tried = 0;
  for (const QuantFormat& f : all_quant_formats()) {
    SCOPED_TRACE(f.name);
    QuantizedTensor q;
    try {
      q = quantize(w, f);
    } catch (const Error&) {
      continue;  // formats lowbit cannot round to nearest (a few ggml types)
    }
    ++tried;
    const Tensor full = q.dequantize();
    const Tensor rows = q.slice_rows(2, 5).dequantize();
    EXPECT_EQ(rows.shape(), (Shape{3, in}));
    for (int64_t i = 0; i < rows.numel(); ++i) ASSERT_EQ(rows.item(i), full.slice(0, 2, 5).contiguous().item(i));
    const int64_t u = q.column_shard_unit();
    if (f.has_column_mask()) {
      EXPECT_EQ(u, 0);
      EXPECT_THROW(q.slice_cols(0, in / 2), Error);
      continue;
    }
    ASSERT_GT(u, 0);
    ASSERT_EQ(in % (2 * u), 0) << "unit " << u;
    for (auto [c0, c1] : {std::pair<int64_t, int64_t>{0, u}, {u, 2 * u}, {in / 2, in}}) {
      const Tensor part = q.slice_cols(c0, c1).dequantize();
      const Tensor want = full.slice(1, c0, c1).contiguous();
      ASSERT_EQ(part.shape(), want.shape());
      for (int64_t i = 0; i < part.numel(); ++i) ASSERT_EQ(part.item(i), want.item(i)) << "[" << c0 << ", " << c1 << ")";
    }
    if (u > 1) {
      try {
        q.slice_cols(u / 2, u);
        ADD_FAILURE() << "a cut inside a group was accepted";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("do not fall on its groups of " + std::to_string(u)), std::string::npos) << e.what();
      }
    }
  }
  EXPECT_GE(tried, 20);
}

// Row pieces of a layer concatenate to its output, column pieces sum to it (dense with bias; packed
// with bias and LoRA adapters; int8 and exact bodies).
TEST(TensorParallel, LinearPiecesAddUpToTheLayer) {
  NoGradGuard ng;
  const int64_t out = 48, in = 512;
  const Tensor w = Tensor::randn({out, in}, 3, 0.05), b = Tensor::randn({out}, 4, 0.1);
  const Tensor A = Tensor::randn({4, in}, 5, 0.05), B = Tensor::randn({out, 4}, 6, 0.05);
  std::vector<std::pair<std::string, std::shared_ptr<Linear>>> layers = {{"dense", std::make_shared<DenseLinear>(w, b, false)}};
  for (const char* fmt : {"int4g32", "int4g128", "q4_0", "q8_0", "int8pc", "tp2g128", "ternary"})
    layers.emplace_back(fmt, std::make_shared<QuantLinear>(quantize(w, parse_quant_format(fmt)), b));
  layers.emplace_back("int4g32+lora", std::make_shared<QuantLinear>(quantize(w, parse_quant_format("int4g32")), b, Device::CPU, A, B));
  for (int64_t M : {3, 20}) {  // decode rows (int8 body) and a prefill (exact body)
    const Tensor x = Tensor::randn({M, in}, 7, 1.0);
    for (const auto& [name, l] : layers) {
      SCOPED_TRACE(name + ", " + std::to_string(M) + " rows");
      const Tensor y = l->forward(Var(x)).value().contiguous();
      const Tensor top = l->shard(ShardAxis::Rows, 0, 20, Device::CPU)->forward(Var(x)).value().contiguous();
      const Tensor bottom = l->shard(ShardAxis::Rows, 20, out, Device::CPU)->forward(Var(x)).value().contiguous();
      double dr = 0;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t o = 0; o < out; ++o) {
          const float got = o < 20 ? top.data<float>()[m * 20 + o] : bottom.data<float>()[m * (out - 20) + o - 20];
          dr = std::max(dr, double(std::fabs(got - y.data<float>()[m * out + o])));
        }
      EXPECT_LE(dr, 1e-5);
      const int64_t u = l->column_shard_unit(), cut = (in / 2 + u - 1) / u * u;
      ASSERT_GT(u, 0);
      ASSERT_LT(cut, in);
      auto left = l->shard(ShardAxis::Cols, 0, cut, Device::CPU), right = l->shard(ShardAxis::Cols, cut, in, Device::CPU);
      EXPECT_TRUE(left->bias().defined());
      EXPECT_FALSE(right->bias().defined());
      const Tensor y0 = left->forward(Var(x.slice(1, 0, cut).contiguous())).value().contiguous();
      const Tensor y1 = right->forward(Var(x.slice(1, cut, in).contiguous())).value().contiguous();
      double dc = 0, ym = 0;
      for (int64_t i = 0; i < y.numel(); ++i) {
        dc = std::max(dc, double(std::fabs(y0.data<float>()[i] + y1.data<float>()[i] - y.data<float>()[i])));
        ym = std::max(ym, double(std::fabs(y.data<float>()[i])));
      }
      EXPECT_LE(dc, 1e-5 * std::max(1.0, ym));
    }
  }
  try {
    layers[1].second->shard(ShardAxis::Cols, 16, in, Device::CPU);
    ADD_FAILURE() << "a cut inside int4g32's groups was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[int4g32] input columns [16, 512) do not fall on its groups of 32"), std::string::npos)
        << e.what();
  }
}

// ---- whole models over 1, 2 and 3 ranks --------------------------------------------------------

// One rank: the piece is the model (the all-reduce seam adds nothing), bit for bit.
TEST(TensorParallel, OneRankPieceIsTheModel) {
  const LlamaConfig c = gqa_config();
  const LlamaWeights w = random_weights(c, 21, 0.1);
  auto c1 = comm::make_single_communicator();
  for (const char* fmt : {static_cast<const char*>(nullptr), "int4g32"}) {
    auto m = make_model(c, w, fmt);
    const Trace a = decode(*m, KVCacheType::F32, 6), b = decode(*m->tensor_parallel_shard(*c1), KVCacheType::F32, 6);
    EXPECT_EQ(rel_diff(a.logits, b.logits), 0.0) << (fmt ? fmt : "dense");
    EXPECT_EQ(a.tokens, b.tokens);
  }
}

TEST(TensorParallel, RandomGqaModelOverTwoAndThreeRanks) {
  const OneThread one_thread;
  const LlamaConfig c = gqa_config();
  const LlamaWeights w = random_weights(c, 21, 0.1);
  const fs::path dir = lowbit::test::temp_dir("tp-gqa");
  struct Case {
    const char* fmt;
    KVCacheType kv;
    double tol;
  };
  for (const Case& k : {Case{nullptr, KVCacheType::F32, 1e-4}, Case{nullptr, KVCacheType::Auto, 1e-3},
                        Case{"int4g32", KVCacheType::F32, 2e-3}, Case{"q4_0", KVCacheType::Auto, 2e-3}}) {
    const std::string what = std::string("random GQA ") + (k.fmt ? k.fmt : "dense") + ", KV cache " +
                             kv_cache_type_name(k.kv);
    const auto full = make_model(c, w, k.fmt);
    const Trace one = decode(*full, k.kv, 12);
    for (int W : {2, 3}) {
      on_ranks(W, dir, *full, [&](const LlamaModel& m) { return decode(m, k.kv, 12); });
      expect_matches(one, W, dir, k.tol, what);
    }
  }
  fs::remove_all(dir);
}

// Qwen2's q/k/v biases and Qwen3's per-head q/k norms go with the heads.
TEST(TensorParallel, BiasesAndQkNormsFollowTheHeads) {
  const OneThread one_thread;
  LlamaConfig c = gqa_config();
  c.attn_bias = true;
  c.qk_norm = true;
  const LlamaWeights w = random_weights(c, 22, 0.1);
  const fs::path dir = lowbit::test::temp_dir("tp-qwen");
  const auto full = make_model(c, w, nullptr);
  const Trace one = decode(*full, KVCacheType::F32, 8);
  on_ranks(2, dir, *full, [&](const LlamaModel& m) { return decode(m, KVCacheType::F32, 8); });
  expect_matches(one, 2, dir, 1e-4, "q/k/v bias + q/k norm");
  fs::remove_all(dir);
}

// stories260K (8 heads, 4 KV heads, SwiGLU 172 = 5 groups of 32 + 12 for int4g32: ranks get 96
// and 76 columns): generate()'s greedy text with its tokenizer equals one process's, and so do the
// logits, dense (f16 KV cache) and packed with f32 activations (--matmul exact).
TEST(TensorParallel, Stories260KGreedyTextOverTwoRanks) {
  const OneThread one_thread;
  LOWBIT_REQUIRE_SHARED(model_path, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(tok_path, "models/stories260K/tok512.bin");
  const Checkpoint ck = load_llama2c(model_path);
  const auto tok = open_tokenizer_file(tok_path);
  const fs::path dir = lowbit::test::temp_dir("tp-stories");
  GenerateOptions o;
  o.steps = 160;
  o.sampler.temperature = 0;
  // The text as a trace: the token ids; plus the logits of decode().
  auto text = [&](KVCacheType kv) {
    return [&, kv](const LlamaModel& m) {
      Trace t = decode(m, kv, 20);
      GenerateOptions g = o;
      g.kv_cache = kv;
      const GenerateResult r = generate(m, *tok, "Once upon a time", g, nullptr);
      t.tokens.insert(t.tokens.end(), r.tokens.begin(), r.tokens.end());
      return t;
    };
  };
  {
    const auto dense = make_model(ck.config, ck.weights, nullptr);
    const Trace one = text(KVCacheType::Auto)(*dense);
    EXPECT_GT(one.tokens.size(), 100u);
    for (int W : {2, 4}) {  // 4 ranks: 2 heads, 1 KV head, 43 SwiGLU channels each
      on_ranks(W, dir, *dense, text(KVCacheType::Auto));
      expect_matches(one, W, dir, 1e-3, "stories260K dense, f16 KV cache");
    }
  }
  const auto packed = make_model(ck.config, ck.weights, "int4g32");
  ops::set_quant_matmul_default(ops::QuantMatmulPath::Exact);
  const Trace one = text(KVCacheType::F32)(*packed);
  on_ranks(2, dir, *packed, text(KVCacheType::F32));
  ops::set_quant_matmul_default(ops::QuantMatmulPath::Auto);
  expect_matches(one, 2, dir, 1e-4, "stories260K int4g32, f32 activations");
  fs::remove_all(dir);
}

// Packed weights on the int8-activation path (the default for decoding): a rounding difference of
// the split sums can move an int8 activation code by one, which moves the logits by much more than
// f32 rounding (stories260K: up to ~0.1 at some steps), so greedy texts may part at a near-tie. What
// holds is that 2 ranks add no error of their own: along the same tokens (teacher forcing), their
// logits are as close to the f32-activation logits as one process's are.
TEST(TensorParallel, Int8PathAddsNoErrorOfItsOwn) {
  const OneThread one_thread;
  LOWBIT_REQUIRE_SHARED(model_path, "models/stories260K/stories260K.bin");
  const Checkpoint ck = load_llama2c(model_path);
  const fs::path dir = lowbit::test::temp_dir("tp-int8");
  const auto packed = make_model(ck.config, ck.weights, "int4g32");
  const int steps = 150;
  const Trace one = decode(*packed, KVCacheType::F32, steps);  // the int8 path
  ops::set_quant_matmul_default(ops::QuantMatmulPath::Exact);
  const Trace exact = decode(*packed, KVCacheType::F32, steps, &one.tokens);
  ops::set_quant_matmul_default(ops::QuantMatmulPath::Auto);
  on_ranks(2, dir, *packed, [&](const LlamaModel& m) { return decode(m, KVCacheType::F32, steps, &one.tokens); });
  const Trace two = read_trace(dir / "rank0.bin");
  const double own = rel_diff(one.logits, exact.logits), tp = rel_diff(two.logits, exact.logits),
               apart = rel_diff(two.logits, one.logits);
  std::printf("[ tp ] stories260K int4g32, int8 activations, %d steps: |1 rank - f32| %.3g, |2 ranks - f32| %.3g, "
              "|2 ranks - 1 rank| %.3g (of the largest |logit|)\n", steps, own, tp, apart);
  EXPECT_LE(tp, 1.5 * own);
  EXPECT_LE(apart, 2 * own);
  fs::remove_all(dir);
}

// lowbit serve's path: rank 0's scheduler (2 slots, prompts read in pieces of 4 tokens next to the
// decoding slot, a third request waiting for a slot) and rank 1 following its steps complete the
// requests with the tokens of one process's scheduler.
TEST(TensorParallel, ServingStepsFollowRankZero) {
  const OneThread one_thread;
  LOWBIT_REQUIRE_SHARED(model_path, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(tok_path, "models/stories260K/tok512.bin");
  const Checkpoint ck = load_llama2c(model_path);
  const auto tok = open_tokenizer_file(tok_path);
  SchedulerOptions opt;
  opt.parallel = 2;
  opt.ctx = 128;
  opt.prefill_chunk = 4;
  opt.batch_tokens = 8;
  auto serve = [&](const LlamaModel& m) {
    Trace t;
    if (!is_root(m)) {
      follow_scheduler_steps(m, opt);
      return t;
    }
    std::mutex mu;
    std::vector<std::vector<int>> out(3);
    {
      Scheduler s(m, *tok, opt);
      const char* prompts[] = {"Once upon a time there was a little girl", "The dog", "Tim and Sue went to the park to play"};
      for (int k = 0; k < 3; ++k) {
        CompletionRequest r;
        r.prompt = tok->encode(prompts[k], true);
        r.max_tokens = 24 + 8 * k;
        r.sampler.temperature = 0;
        r.stop_at_eos = false;
        r.on_done = [&, k](const CompletionResult& c) {
          std::lock_guard<std::mutex> lk(mu);
          out[size_t(k)] = c.tokens;
        };
        s.submit(std::move(r));
      }
      s.stop(true);
    }
    for (const auto& o : out) {
      t.tokens.insert(t.tokens.end(), o.begin(), o.end());
      t.tokens.push_back(-1);
    }
    return t;
  };
  const fs::path dir = lowbit::test::temp_dir("tp-serve");
  for (const char* fmt : {static_cast<const char*>(nullptr), "int4g32"}) {
    const auto full = make_model(ck.config, ck.weights, fmt);
    const Trace one = serve(*full);
    EXPECT_GT(one.tokens.size(), 80u);
    on_ranks(2, dir, *full, serve);
    EXPECT_EQ(read_trace(dir / "rank0.bin").tokens, one.tokens) << (fmt ? fmt : "dense");
  }
  fs::remove_all(dir);
}

// ---- what cannot be split -----------------------------------------------------------------------

TEST(TensorParallel, RefusesWhatDoesNotSplit) {
  const LlamaConfig c = gqa_config();
  const LlamaWeights w = random_weights(c, 23, 0.1);
  auto expect_error = [](const LlamaModel& m, int W, const std::string& want) {
    ShapeOnlyComm comm(0, W);
    try {
      m.tensor_parallel_shard(comm);
      ADD_FAILURE() << "no error for " << W << " ranks, expected: " << want;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
  };
  const auto dense = make_model(c, w, nullptr);
  expect_error(*dense, 5, "tensor parallelism over 5 ranks: 5 does not divide n_heads = 12");
  expect_error(*dense, 4, "tensor parallelism over 4 ranks: 4 does not divide n_kv_heads = 6");
  // o_proj in groups of 128: 2 ranks would cut it after 6 heads = 96 columns.
  expect_error(*make_model(c, w, "int4g128"), 2,
               "layer 0 self_attn.o_proj (int4g128): a rank's 6 heads are 96 input columns, not a whole number of its "
               "groups of 128");
  // down_proj: 384 columns = 3 groups of 128 for 2 ranks (o_proj's 8 heads of 16 = 128 are fine).
  LlamaConfig c16 = c;
  c16.dim = 256;
  c16.n_heads = 16;
  c16.n_kv_heads = 8;
  expect_error(*make_model(c16, random_weights(c16, 24, 0.1), "int4g128"), 2,
               "mlp.down_proj's 384 input columns are 3 groups of 128 (int4g128), which 2 ranks do not divide");
  LlamaConfig codd = c;
  codd.hidden_dim = 380;
  expect_error(*make_model(codd, random_weights(codd, 25, 0.1), nullptr), 3, "3 does not divide hidden_dim = 380");
  expect_error(*make_model(c, w, "ptq161"), 2, "layer 0 self_attn.o_proj (ptq161) cannot be cut by input columns");
  // Transforms whose groups span whole rows, and a piece split again.
  auto rotated = make_model(c, w, nullptr);
  ModelTransforms t;
  t.kv_token_bits = 8;
  rotated->set_transforms(t);
  expect_error(*rotated, 2, "rotation and activation / KV-cache quantization");
  ShapeOnlyComm two(1, 2);
  const auto piece = dense->tensor_parallel_shard(two);
  EXPECT_EQ(piece->config().n_heads, 6);
  EXPECT_EQ(piece->config().n_kv_heads, 3);
  EXPECT_EQ(piece->config().hidden_dim, 192);
  EXPECT_EQ(piece->config().head_dim, 16);
  expect_error(*piece, 2, "the model is already a tensor-parallel piece");
  EXPECT_THROW(piece->set_transforms(t), Error);
}

// ---- rank-local loading (io/tensor_parallel_load.h) --------------------------------------------

namespace {
// The whole model as load_model builds it for inference (packed formats stay packed).
std::unique_ptr<LlamaModel> load_whole(const std::string& path) {
  if (is_lowbit_quantized_dir(path)) return make_quantized_model(load_quantized_model(path, false));
  if (gguf_has_packed_linears(path)) return make_quantized_model(load_gguf_quantized(path, false));
  const Checkpoint ck = load_checkpoint(path);
  return std::make_unique<LlamaModel>(ck.config, ck.weights, false);
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  if (a.defined() != b.defined()) return false;
  if (!a.defined()) return true;
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  const Tensor ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.raw_data(), cb.raw_data(), ca.nbytes()) == 0;
}

// Rank r's piece read rank-locally against the whole model cut in memory: the same config, the
// same kinds, bit-identical weights (packed: codes, scales and zeros byte for byte), biases, norms
// and embeddings.
// chunk_bytes: the column cuts' reads (small: many chunks, the last one short).
void expect_same_piece(const LlamaModel& whole, const std::string& path, int r, int W, const std::string& what,
                       int64_t chunk_bytes) {
  ShapeOnlyComm comm(r, W);
  const auto ref = whole.tensor_parallel_shard(comm);
  QuantizedCheckpoint q = load_tensor_parallel_piece(path, r, W, chunk_bytes);
  auto local = make_quantized_model(q);
  local->join_tensor_parallel(comm);
  const std::string at = what + ", rank " + std::to_string(r) + " of " + std::to_string(W) + ", chunks of " +
                         std::to_string(chunk_bytes) + " bytes";
  const LlamaConfig &a = ref->config(), &b = local->config();
  EXPECT_EQ(a.n_heads, b.n_heads) << at;
  EXPECT_EQ(a.n_kv_heads, b.n_kv_heads) << at;
  EXPECT_EQ(a.head_dim, b.head_dim) << at;
  EXPECT_EQ(a.hidden_dim, b.hidden_dim) << at;
  EXPECT_EQ(a.rope_style, b.rope_style) << at;
  EXPECT_EQ(local->tensor_parallel(), &comm) << at;
  EXPECT_EQ(a.n_heads, whole.config().n_heads / W) << at;
  for (int i = 0; i < ref->n_layers(); ++i) {
    auto la = ref->block(i).linears(), lb = local->block(i).linears();
    for (size_t j = 0; j < la.size(); ++j) {
      const std::string name = at + ", layer " + std::to_string(i) + " " + la[j].first;
      EXPECT_EQ(dynamic_cast<const RowParallelLinear*>(la[j].second->get()) != nullptr,
                dynamic_cast<const RowParallelLinear*>(lb[j].second->get()) != nullptr) << name;
      const Linear &x = computing_layer(**la[j].second), &y = computing_layer(**lb[j].second);
      ASSERT_EQ(x.kind(), y.kind()) << name;
      EXPECT_EQ(x.in_features(), y.in_features()) << name;
      EXPECT_EQ(x.out_features(), y.out_features()) << name;
      EXPECT_TRUE(same_bytes(x.bias(), y.bias())) << name << ": bias";
      const auto *qx = dynamic_cast<const QuantLinear*>(&x), *qy = dynamic_cast<const QuantLinear*>(&y);
      ASSERT_EQ(qx != nullptr, qy != nullptr) << name;
      if (qx) {
        const QuantizedTensor &u = qx->quantized(), &v = qy->quantized();
        EXPECT_EQ(u.format, v.format) << name;
        EXPECT_EQ(u.shape, v.shape) << name;
        EXPECT_TRUE(same_bytes(u.codes, v.codes)) << name << ": codes";
        EXPECT_TRUE(same_bytes(u.scales, v.scales)) << name << ": scales";
        EXPECT_TRUE(same_bytes(u.zeros, v.zeros)) << name << ": zeros";
        EXPECT_TRUE(same_bytes(u.tensor_scale, v.tensor_scale)) << name << ": tensor scale";
      } else {
        EXPECT_TRUE(same_bytes(x.effective_weight(), y.effective_weight())) << name << ": weight";
      }
    }
  }
  // Everything else (norms, q/k norms, embedding, head) and the pieces' effective weights.
  const LlamaWeights wa = ref->weights(), wb = local->weights();
  std::map<std::string, Tensor> tb;
  for_each_weight(wb, [&](const std::string& n, const Tensor& t) { tb[n] = t; });
  for_each_weight(wa, [&](const std::string& n, const Tensor& t) { EXPECT_TRUE(same_bytes(t, tb[n])) << at << ": " << n; });
}
}  // namespace

// Every checkpoint format the rank-local loader reads gives each rank of 2 and 3 exactly the piece
// that loading the whole model and cutting it in memory gives: llama2.c; Hugging Face directories
// (bf16; Qwen2-style with q/k/v biases; Qwen3-style with q/k norms, in several shards); GGUF dense
// (f16; q4_0 blocks in a file read dequantized) and packed (q4_0, llama's q/k rows permuted); lowbit's own directories (int4g32; int3g32,
// whose codes cross bytes; q4_0; a mixed plan); and SmolLM2's real Q4_1 GGUF (Q8_0 vocabulary;
// 9 heads over 3 KV heads: 3 ranks). And a lowbit directory's vocabulary packed while it is read
// equals pack_vocab's.
TEST(TensorParallelLoad, RankLocalPiecesEqualTheCutWholeModel) {
  const LlamaConfig c = gqa_config();
  const LlamaWeights w = random_weights(c, 24, 0.1);
  const fs::path dir = lowbit::test::temp_dir("tp-load");
  fs::create_directories(dir);
  struct Row {
    std::string what, path;
    std::vector<int> ranks;
  };
  std::vector<Row> rows;
  const std::string bin = (dir / "m.bin").string();
  save_llama2c(bin, c, w);
  rows.push_back({"llama2.c", bin, {2, 3}});
  HfSaveOptions hf;
  hf.dtype = DType::BF16;
  save_hf_dir((dir / "hf").string(), c, w, hf);
  rows.push_back({"hf bf16", (dir / "hf").string(), {2, 3}});
  LlamaConfig cb = c;
  cb.arch = "qwen2";
  cb.attn_bias = true;
  const LlamaWeights wb = random_weights(cb, 25, 0.1);
  save_hf_dir((dir / "hf-bias").string(), cb, wb);
  rows.push_back({"hf qwen2 biases", (dir / "hf-bias").string(), {2, 3}});
  LlamaConfig cn = c;
  cn.arch = "qwen3";
  cn.qk_norm = true;
  HfSaveOptions shards;  // several safetensors files and an index
  shards.max_shard_bytes = 200000;
  save_hf_dir((dir / "hf-qwen3").string(), cn, random_weights(cn, 27, 0.1), shards);
  rows.push_back({"hf qwen3 q/k norms, sharded", (dir / "hf-qwen3").string(), {2, 3}});
  GgufSaveOptions g;
  g.dtype = DType::F16;
  save_gguf((dir / "m-f16.gguf").string(), c, w, g);
  rows.push_back({"gguf f16", (dir / "m-f16.gguf").string(), {2, 3}});
  for (const char* fmt : {"int4g32", "int3g32", "q4_0"}) {
    const std::string q = (dir / (std::string("q-") + fmt)).string();
    save_quantized_model(q, *make_model(c, w, fmt), "rtn", parse_quant_format(fmt));
    rows.push_back({std::string("lowbit ") + fmt, q, {2, 3}});
  }
  const std::string packed = (dir / "m-q4_0.gguf").string();
  save_gguf_quantized(packed, load_quantized_model((dir / "q-q4_0").string()), nullptr, "{}");
  rows.push_back({"gguf q4_0", packed, {2, 3}});
  // q4_0 attention and gate/up with an f32 down_proj: not a packed GGUF (load_model's test looks at
  // ffn_down), so its blocks are dequantized row by row, as load_gguf dequantizes them whole.
  {
    QuantizedCheckpoint q = load_quantized_model((dir / "q-q4_0").string());
    for (int i = 0; i < c.n_layers; ++i) q.quantized.erase("model.layers." + std::to_string(i) + ".mlp.down_proj");
    const std::string mixed = (dir / "m-q4_0-f32down.gguf").string();
    save_gguf_quantized(mixed, q, nullptr, "{}");
    ASSERT_FALSE(gguf_has_packed_linears(mixed));
    rows.push_back({"gguf q4_0 blocks dequantized", mixed, {2, 3}});
  }
  // A mixed plan: q4_0 blocks with some layers in int4g32 (quantization_config.layer_formats).
  {
    auto m = make_model(c, w, "q4_0");
    *m->block(1).linears()[3].second = std::make_shared<QuantLinear>(
        quantize(m->block(1).wo->effective_weight(), parse_quant_format("int4g32")), Tensor());
    save_quantized_model((dir / "q-mixed").string(), *m, "rtn", parse_quant_format("q4_0"));
    rows.push_back({"lowbit mixed", (dir / "q-mixed").string(), {2, 3}});
  }
  const std::string smol = lowbit::test::shared_file("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!smol.empty()) rows.push_back({"SmolLM2 Q4_1", smol, {3}});
  else std::printf("[ tp ] SmolLM2 is not under %s: its row is skipped\n", lowbit::test::shared_root().string().c_str());
  // A CPU inference load packs a lowbit directory's f32 vocabulary into q8_0 (pack_vocab); the
  // rank-local loader packs it as it reads it, a chunk of rows at a time: the same blocks.
  for (const char* fmt : {"int4g32", "q4_0"}) {
    const std::string q = (dir / (std::string("q-") + fmt)).string();
    QuantizedCheckpoint whole = load_quantized_model(q, false);
    ASSERT_GT(pack_vocab(whole), 0);
    for (int64_t chunk : {kTensorParallelChunkBytes, int64_t(7) * 4 * 192}) {
      const LazyCheckpoint lazy = open_quantized_dir_lazily(q, true, chunk);
      for (const char* m : {"model.embed_tokens", "lm_head"}) {
        ASSERT_TRUE(lazy.rest.quantized.count(m)) << fmt << " " << m;
        EXPECT_TRUE(same_bytes(lazy.rest.quantized.at(m).codes, whole.quantized.at(m).codes)) << fmt << " " << m;
        EXPECT_EQ(lazy.rest.quantized.at(m).format, whole.quantized.at(m).format) << fmt << " " << m;
      }
      EXPECT_EQ(lazy.rest.dense.weights.tok_embeddings.shape(), whole.dense.weights.tok_embeddings.shape());
    }
  }
  for (const Row& row : rows) {
    const auto whole = load_whole(row.path);
    for (int W : row.ranks)
      for (int r = 0; r < W; ++r)
        for (int64_t chunk : {kTensorParallelChunkBytes, int64_t(7) * 4 * 1536})  // one read; 7 rows (of SmolLM2's down_proj)
          expect_same_piece(*whole, row.path, r, W, row.what, chunk);
  }
  fs::remove_all(dir);
}

// The loader refuses what the in-memory cut refuses, with the same message, before reading pieces.
TEST(TensorParallelLoad, RefusesWhatDoesNotSplit) {
  const LlamaConfig c = gqa_config();
  const LlamaWeights w = random_weights(c, 26, 0.1);
  const fs::path dir = lowbit::test::temp_dir("tp-load-bad");
  fs::create_directories(dir);
  save_hf_dir((dir / "hf").string(), c, w);
  save_quantized_model((dir / "q").string(), *make_model(c, w, "int4g128"), "rtn", parse_quant_format("int4g128"));
  auto error_of = [](const std::function<void()>& fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_NE(error_of([&] { load_tensor_parallel_piece((dir / "hf").string(), 0, 5); })
                .find("tensor parallelism over 5 ranks: 5 does not divide n_heads = 12"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_tensor_parallel_piece((dir / "q").string(), 1, 2); })
                .find("layer 0 self_attn.o_proj (int4g128): a rank's 6 heads are 96 input columns, not a whole number of "
                      "its groups of 128"),
            std::string::npos);
  fs::remove_all(dir);
}

// ---- the CLI ------------------------------------------------------------------------------------

// Each rank of `generate --tp 2` on a dense f32 model whose weights are nearly all block linears
// (random, 8 blocks of width 512, vocabulary 512) holds about half of them: its peak RSS is well
// under that of a rank that reads the whole checkpoint and cuts it (LOWBIT_TP_LOAD=whole), and the
// text is the same. /usr/bin/time's max RSS of the launcher is that of its largest rank.
TEST(TensorParallelCli, RankLocalLoadHoldsAboutHalf) {
  if (!fs::exists(lowbit::test::cli_path())) GTEST_SKIP() << "no " << lowbit::test::cli_path();
  if (!fs::exists("/usr/bin/time")) GTEST_SKIP() << "no /usr/bin/time";
  LOWBIT_REQUIRE_SHARED(tok, "models/stories260K/tok512.bin");
  const fs::path dir = lowbit::test::temp_dir("tp-rss");
  LlamaConfig c = gqa_config();
  c.dim = 512;
  c.hidden_dim = 1536;
  c.n_layers = 8;
  c.n_heads = 8;
  c.n_kv_heads = 4;
  c.vocab_size = 512;
  RandomModelOptions o;
  o.dtype = DType::F32;
  const std::string model = (dir / "m").string();
  write_random_hf_model(model, c, o);
  const double linears_mib = 4.0 * c.n_layers * (2.0 * 512 * 512 + 2.0 * 512 * 256 + 3.0 * 512 * 1536) / (1 << 20);
  auto run = [&](const std::string& mode, std::string* text) {
    const std::string rss = (dir / ("rss-" + mode)).string();
    const CliResult r = run_cli("generate -m " + model + " --tokenizer " + tok + " -t 0 -n 8 -p Lily --threads 1 --tp 2",
                                dir, "LOWBIT_TP_LOAD=" + mode + " /usr/bin/time -f %M -o " + rss);
    EXPECT_EQ(r.status, 0) << r.err;
    *text = r.out;
    std::ifstream f(rss);
    std::string line, last;
    while (std::getline(f, line))
      if (!line.empty()) last = line;
    return last.empty() ? 0.0 : std::stod(last) / 1024;  // MiB
  };
  std::string t_whole, t_local;
  const double whole = run("whole", &t_whole), local = run("local", &t_local);
  std::printf("[ tp ] generate --tp 2, block linears %.0f MiB in f32: max RSS per rank %.0f MiB whole-then-cut, %.0f "
              "MiB rank-local\n", linears_mib, whole, local);
  EXPECT_EQ(t_local, t_whole);
  EXPECT_GT(whole - local, 0.35 * linears_mib) << "a rank-local rank should hold about half of the block linears less";
  fs::remove_all(dir);
}

// `generate --tp 2` prints the text of one process (greedy), dense and from a packed checkpoint;
// `bench --tp 2` runs and says so; the refusals reach the user as errors.
TEST(TensorParallelCli, GenerateAndBench) {
  if (!fs::exists(lowbit::test::cli_path())) GTEST_SKIP() << "no " << lowbit::test::cli_path();
  LOWBIT_REQUIRE_SHARED(model, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(tok, "models/stories260K/tok512.bin");
  const fs::path dir = lowbit::test::temp_dir("tp-cli");
  const CliResult q = run_cli("quantize -m " + model + " --method rtn --format int4g32 -o " + (dir / "q").string(), dir);
  ASSERT_EQ(q.status, 0) << q.err;
  // The packed checkpoint with f32 activations (on the int8 path texts may part at a near-tie:
  // TensorParallel.Int8PathAddsNoErrorOfItsOwn).
  for (const std::string& m : {model, (dir / "q").string() + " --matmul exact --kv-cache f32"}) {
    const std::string gen = "generate -m " + m + " --tokenizer " + tok + " -t 0 -n 150 -p \"Lily\"";
    const CliResult one = run_cli(gen, dir);
    ASSERT_EQ(one.status, 0) << one.err;
    EXPECT_GT(one.out.size(), 100u);
    const CliResult two = run_cli(gen + " --tp 2", dir);
    ASSERT_EQ(two.status, 0) << two.err;
    EXPECT_EQ(two.out, one.out) << m;
    // Each rank read only its piece (the default); reading the whole checkpoint and cutting it
    // (LOWBIT_TP_LOAD=whole) gives the same weights, hence the same text.
    const CliResult whole = run_cli(gen + " --tp 2", dir, "LOWBIT_TP_LOAD=whole");
    ASSERT_EQ(whole.status, 0) << whole.err;
    EXPECT_EQ(whole.out, two.out) << m;
    const CliResult js = run_cli(gen + " --tp 2 --json", dir);
    ASSERT_EQ(js.status, 0) << js.err;
    EXPECT_NE(js.out.find("\"tp\":2"), std::string::npos) << js.out;
  }
  const CliResult i8 = run_cli("generate -m " + (dir / "q").string() + " --tokenizer " + tok + " -t 0 -n 60 --tp 2", dir);
  ASSERT_EQ(i8.status, 0) << i8.err;
  EXPECT_GT(i8.out.size(), 40u);
  const CliResult b = run_cli("bench -m " + model + " -p 16 -n 8 -r 1 --tp 2 --json", dir);
  ASSERT_EQ(b.status, 0) << b.err;
  EXPECT_NE(b.out.find("\"tp\":2"), std::string::npos) << b.out;
  EXPECT_NE(b.out.find("\"tg_tokens_per_s\""), std::string::npos) << b.out;
  const CliResult bad = run_cli("generate -m " + model + " --tokenizer " + tok + " -n 8 --tp 3", dir);
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.err.find("lowbit: error: tensor parallelism over 3 ranks: 3 does not divide n_heads = 8"), std::string::npos)
      << bad.err;
  const CliResult mode = run_cli("generate -m " + model + " --tokenizer " + tok + " -n 8 --tp 2", dir, "LOWBIT_TP_LOAD=half");
  EXPECT_EQ(mode.status, 1);
  EXPECT_NE(mode.err.find("lowbit: error: LOWBIT_TP_LOAD must be 'whole' or 'local' (the default), got 'half'"), std::string::npos)
      << mode.err;
  const CliResult env = run_cli("generate -m " + model + " --tokenizer " + tok + " -n 8 --tp 3", dir, "WORLD_SIZE=2 RANK=0");
  EXPECT_EQ(env.status, 1);
  EXPECT_NE(env.err.find("--tp 3 but the launcher's WORLD_SIZE is 2 (drop --tp under an external launcher)"), std::string::npos)
      << env.err;
  fs::remove_all(dir);
}

