// The Llama forward pass against llama2.c's run.c on the real stories260K checkpoint.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>

#include "lowbit/eval/perplexity.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/model/llama.h"
#include "lowbit/runtime/generate.h"
#include "lowbit/tokenizer/llama2c_tokenizer.h"
#include "common/test_util.h"

using namespace lowbit;

namespace {
// ../shared/models/stories260K/reference-logits.bin: "LBREF001", int32 n, int32 V,
// int32 tokens[n+1], f32 logits[n][V] (logits[i] = output after tokens[0..i]).
struct Reference {
  std::vector<int32_t> tokens;
  std::vector<float> logits;
  int n = 0, V = 0;
};

Reference read_reference(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  char magic[8];
  f.read(magic, 8);
  EXPECT_EQ(std::string(magic, 8), "LBREF001");
  Reference r;
  f.read(reinterpret_cast<char*>(&r.n), 4);
  f.read(reinterpret_cast<char*>(&r.V), 4);
  r.tokens.resize(size_t(r.n + 1));
  r.logits.resize(size_t(r.n) * size_t(r.V));
  f.read(reinterpret_cast<char*>(r.tokens.data()), std::streamsize(r.tokens.size() * 4));
  f.read(reinterpret_cast<char*>(r.logits.data()), std::streamsize(r.logits.size() * 4));
  EXPECT_TRUE(f.good());
  return r;
}

struct Stories : ::testing::Test {
  void SetUp() override {
    model_path = test::shared_file("models/stories260K/stories260K.bin");
    ref_path = test::shared_file("models/stories260K/reference-logits.bin");
    if (model_path.empty() || ref_path.empty()) GTEST_SKIP() << "stories260K not found under " << test::shared_root();
  }
  std::string model_path, ref_path;
};
}  // namespace

TEST_F(Stories, BatchedForwardMatchesRunC) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel model(ck.config, ck.weights);
  Reference ref = read_reference(ref_path);
  ASSERT_EQ(ref.V, model.config().vocab_size);
  NoGradGuard ng;
  std::vector<int32_t> in(ref.tokens.begin(), ref.tokens.end() - 1);
  Tensor logits = model.forward(Tensor::from_vector(in, {1, ref.n})).value();
  Tensor expect = Tensor::from_vector(ref.logits, {ref.n, ref.V});
  EXPECT_LE(max_abs_diff(logits, expect), 1e-4);
}

TEST_F(Stories, KvCacheDecodeMatchesRunC) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel model(ck.config, ck.weights);
  Reference ref = read_reference(ref_path);
  NoGradGuard ng;
  // Decode one token at a time against run.c's f32 logits, with each cache storage type:
  // f32 reproduces run.c; f16 and q8 stay within the stated logit and NLL tolerances (measured:
  // f16 max |dlogit| 0.039, NLL -0.004 %; q8 1.48, NLL -0.42 % on this model of head_dim 8, whose
  // logits span about +-20: tolerances 0.1 / 0.1 % and 2.5 / 1 %).
  struct Row {
    KVCacheType type;
    double max_logit_diff, max_nll_rel;
  };
  for (const Row& row : {Row{KVCacheType::F32, 1e-4, 1e-5}, Row{KVCacheType::F16, 0.1, 1e-3}, Row{KVCacheType::Q8, 2.5, 1e-2}}) {
    KVCache cache = model.make_cache(ref.n, row.type);
    EXPECT_EQ(cache.type, row.type);
    double worst = 0, nll = 0;
    for (int i = 0; i < ref.n; ++i) {
      Tensor l = model.forward_cached(Tensor::from_vector(std::vector<int32_t>{ref.tokens[size_t(i)]}, {1}), cache).value();
      Tensor e = Tensor::from_vector(std::vector<float>(ref.logits.begin() + int64_t(i) * ref.V,
                                                        ref.logits.begin() + int64_t(i + 1) * ref.V),
                                     {1, ref.V});
      worst = std::max(worst, max_abs_diff(l, e));
      double mx = -1e300, z = 0;
      for (int64_t j = 0; j < ref.V; ++j) mx = std::max(mx, l.item(j));
      for (int64_t j = 0; j < ref.V; ++j) z += std::exp(l.item(j) - mx);
      nll += mx + std::log(z) - l.item(ref.tokens[size_t(i) + 1]);
    }
    nll /= ref.n;
    EXPECT_LE(worst, row.max_logit_diff) << kv_cache_type_name(row.type);
    EXPECT_LE(std::abs(nll / 1.252159 - 1), row.max_nll_rel) << kv_cache_type_name(row.type) << " nll " << nll;
    std::printf("kv cache %s: max |dlogit| vs run.c %.3g, NLL %.6f (run.c 1.252159)\n", kv_cache_type_name(row.type), worst, nll);
  }
  // The default (Auto) cache of an f32 model on the CPU is f16.
  EXPECT_EQ(model.make_cache(4).type, KVCacheType::F16);
  EXPECT_EQ(model.make_cache(4).bytes(), int64_t(2 * 4) * model.n_layers() * model.config().n_kv_heads *
                                             model.config().resolved_head_dim() * 2);
  // Prefill of several tokens at once then one more, same logits as one by one.
  KVCache c2 = model.make_cache(ref.n, KVCacheType::F32);
  std::vector<int32_t> first(ref.tokens.begin(), ref.tokens.begin() + 10);
  Tensor l10 = model.forward_cached(Tensor::from_vector(first, {10}), c2).value();
  Tensor e9 = Tensor::from_vector(std::vector<float>(ref.logits.begin() + 9 * ref.V, ref.logits.begin() + 10 * ref.V), {1, ref.V});
  EXPECT_LE(max_abs_diff(l10.slice(0, 9, 10), e9), 1e-4);
  EXPECT_THROW(model.forward_cached(Tensor::from_vector(std::vector<int32_t>(size_t(ref.n), 1), {ref.n}), c2), Error);
  EXPECT_THROW(parse_kv_cache_type("f8"), Error);
}

TEST_F(Stories, TeacherForcedPerplexity) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel model(ck.config, ck.weights);
  Reference ref = read_reference(ref_path);
  PerplexityOptions o;
  o.ctx = ref.n + 1;  // one window: token 0 (BOS) is context, tokens 1..n are scored
  o.progress = false;
  PerplexityResult r = evaluate_perplexity(model, ref.tokens, o);
  EXPECT_EQ(r.tokens, ref.n);
  EXPECT_NEAR(r.nll, 1.252159, 5e-5);
  EXPECT_NEAR(r.ppl, 3.4979, 5e-4);
  // Through the KV cache (eval ppl --kv-cache): an f32 cache gives the batched forward's NLL, in
  // one call or in chunks (7 tokens, 1 = decoding); f16 and q8 move it by at most 0.05 % / 1 %.
  struct Row {
    KVCacheType type;
    int64_t chunk;
    double tol;
  };
  for (const Row& row : {Row{KVCacheType::F32, 0, 1e-6}, Row{KVCacheType::F32, 7, 1e-5}, Row{KVCacheType::F32, 1, 1e-5},
                         Row{KVCacheType::F16, 0, 5e-4}, Row{KVCacheType::F16, 1, 5e-4}, Row{KVCacheType::Q8, 0, 1e-2}}) {
    PerplexityOptions oc = o;
    oc.use_cache = true;
    oc.kv_cache = row.type;
    oc.cache_chunk = row.chunk;
    const PerplexityResult rc = evaluate_perplexity(model, ref.tokens, oc);
    EXPECT_EQ(rc.tokens, ref.n);
    EXPECT_NEAR(rc.nll / r.nll, 1.0, row.tol) << kv_cache_type_name(row.type) << " chunk " << row.chunk;
  }
}

TEST_F(Stories, GreedyGenerationMatchesRunCText) {
  LOWBIT_REQUIRE_SHARED(tok_path, "models/stories260K/tok512.bin");
  LOWBIT_REQUIRE_SHARED(golden_path, "models/stories260K/run-c-greedy-n200.txt");
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel model(ck.config, ck.weights);
  Llama2cTokenizer tok(tok_path, 512);
  GenerateOptions o;
  o.steps = 200;
  o.sampler.temperature = 0;
  std::string text;
  generate(model, tok, "", o, [&](const std::string& p) { text += p; });
  text += "\n";
  std::ifstream f(golden_path, std::ios::binary);
  std::string golden((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, golden);
}
