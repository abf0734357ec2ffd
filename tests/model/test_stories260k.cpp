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
  KVCache cache = model.make_cache(ref.n);
  double worst = 0;
  for (int i = 0; i < ref.n; ++i) {
    Tensor l = model.forward_cached(Tensor::from_vector(std::vector<int32_t>{ref.tokens[size_t(i)]}, {1}), cache).value();
    Tensor e = Tensor::from_vector(std::vector<float>(ref.logits.begin() + int64_t(i) * ref.V,
                                                      ref.logits.begin() + int64_t(i + 1) * ref.V),
                                   {1, ref.V});
    worst = std::max(worst, max_abs_diff(l, e));
  }
  EXPECT_LE(worst, 1e-4);
  // Prefill of several tokens at once then one more, same logits as one by one.
  KVCache c2 = model.make_cache(ref.n);
  std::vector<int32_t> first(ref.tokens.begin(), ref.tokens.begin() + 10);
  Tensor l10 = model.forward_cached(Tensor::from_vector(first, {10}), c2).value();
  Tensor e9 = Tensor::from_vector(std::vector<float>(ref.logits.begin() + 9 * ref.V, ref.logits.begin() + 10 * ref.V), {1, ref.V});
  EXPECT_LE(max_abs_diff(l10.slice(0, 9, 10), e9), 1e-4);
  EXPECT_THROW(model.forward_cached(Tensor::from_vector(std::vector<int32_t>(size_t(ref.n), 1), {ref.n}), c2), Error);
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
