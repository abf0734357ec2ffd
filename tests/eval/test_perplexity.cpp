// evaluate_perplexity on a small random model: the default protocol (every token of a window but
// the first) and llama-perplexity's (`score_second_half`: positions ctx/2 .. ctx-2), both against
// a log-softmax over the model's own logits computed here.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "common/small_model.h"
#include "lowbit/core/error.h"
#include "lowbit/eval/perplexity.h"
#include "lowbit/model/weights.h"

using namespace lowbit;

namespace {

// Mean NLL of the predictions of positions [first, ctx-1) of non-overlapping windows, by hand.
double reference_nll(const LlamaModel& m, const std::vector<int32_t>& stream, int64_t ctx, int64_t windows,
                     int64_t first, int64_t* count) {
  double total = 0;
  *count = 0;
  const int V = m.config().vocab_size;
  for (int64_t w = 0; w < windows; ++w) {
    Tensor tokens = Tensor::empty({1, ctx}, DType::I32);
    for (int64_t t = 0; t < ctx; ++t) tokens.data<int32_t>()[t] = stream[size_t(w * ctx + t)];
    Tensor logits = test::logits_of(m, tokens).to(DType::F32);
    const float* l = logits.data<float>();
    for (int64_t t = first; t + 1 < ctx; ++t) {
      const float* row = l + t * V;
      double mx = row[0];
      for (int v = 1; v < V; ++v) mx = std::max(mx, double(row[v]));
      double s = 0;
      for (int v = 0; v < V; ++v) s += std::exp(double(row[v]) - mx);
      total += mx + std::log(s) - double(row[stream[size_t(w * ctx + t + 1)]]);
      ++*count;
    }
  }
  return total / double(*count);
}

}  // namespace

TEST(Perplexity, AllTokensAndSecondHalfMatchAHandComputation) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaModel m(c, random_weights(c, 7, 0.2));
  std::mt19937 rng(3);
  std::vector<int32_t> stream(16 * 3 + 5);
  for (auto& t : stream) t = int32_t(rng() % uint32_t(c.vocab_size));
  for (bool second_half : {false, true}) {
    PerplexityOptions o;
    o.ctx = 16;
    o.batch = 2;
    o.progress = false;
    o.score_second_half = second_half;
    PerplexityResult r = evaluate_perplexity(m, stream, o);
    int64_t n = 0;
    const double ref = reference_nll(m, stream, 16, 3, second_half ? 8 : 0, &n);
    EXPECT_EQ(r.windows, 3);
    EXPECT_EQ(r.tokens, n);
    EXPECT_EQ(r.tokens, second_half ? 3 * 7 : 3 * 15);
    EXPECT_NEAR(r.nll, ref, 1e-5) << "second_half=" << second_half;
    EXPECT_NEAR(r.ppl, std::exp(ref), 1e-4 * std::exp(ref));
  }
  PerplexityOptions bad;
  bad.ctx = 3;
  bad.score_second_half = true;
  EXPECT_THROW(evaluate_perplexity(m, stream, bad), Error);
}

// on_logits (what `lowbit eval ppl --logits-out` writes): every window's logits, in window order,
// equal to a single-window forward of that window; refused with the KV-cache path.
TEST(Perplexity, OnLogitsHandsOutEveryWindowsLogits) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaModel m(c, random_weights(c, 7, 0.2));
  std::mt19937 rng(5);
  std::vector<int32_t> stream(8 * 5 + 3);
  for (auto& t : stream) t = int32_t(rng() % uint32_t(c.vocab_size));
  const int V = c.vocab_size;
  PerplexityOptions o;
  o.ctx = 8;
  o.batch = 2;  // 5 windows: batches of 2, 2, 1
  o.progress = false;
  std::vector<float> got;
  std::vector<int64_t> firsts;
  o.on_logits = [&](int64_t first, const Tensor& l) {
    firsts.push_back(first);
    ASSERT_EQ(l.dtype(), DType::F32);
    ASSERT_EQ(l.shape().size(), 2u);
    ASSERT_EQ(l.shape()[1], V);
    got.insert(got.end(), l.data<float>(), l.data<float>() + l.numel());
  };
  evaluate_perplexity(m, stream, o);
  EXPECT_EQ(firsts, (std::vector<int64_t>{0, 2, 4}));
  ASSERT_EQ(got.size(), size_t(5 * 8 * V));
  double max_diff = 0;
  for (int64_t w = 0; w < 5; ++w) {
    Tensor tokens = Tensor::empty({1, 8}, DType::I32);
    for (int64_t t = 0; t < 8; ++t) tokens.data<int32_t>()[t] = stream[size_t(w * 8 + t)];
    Tensor ref = test::logits_of(m, tokens).to(DType::F32);
    for (int64_t i = 0; i < 8 * V; ++i)
      max_diff = std::max(max_diff, double(std::fabs(ref.data<float>()[i] - got[size_t(w * 8 * V + i)])));
  }
  EXPECT_LT(max_diff, 1e-4);
  o.use_cache = true;
  EXPECT_THROW(evaluate_perplexity(m, stream, o), Error);
}
