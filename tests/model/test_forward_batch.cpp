// Batched decoding (LlamaModel::forward_batch): B sequences of different lengths, one new token
// each, give the logits of B separate forward_cached calls — dense f32 weights, GQA, Qwen3's q/k
// norms, and packed int4/q4_0 linears (the quant_matmul path with M = B rows).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>

#include "common/small_model.h"
#include "lowbit/ops/ops.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"

using namespace lowbit;

namespace {
double batch_max_diff(const Tensor& a, const Tensor& b) {
  double d = 0;
  for (int64_t i = 0; i < a.numel(); ++i) d = std::max(d, std::abs(a.item(i) - b.item(i)));
  return d;
}

Tensor ids(const std::vector<int32_t>& v) { return Tensor::from_vector(v, {int64_t(v.size())}); }

// Prefills sequences of lengths `lens` into two sets of caches, then decodes `steps` tokens:
// one set with forward_batch, the other one sequence at a time; compares logits at each step.
void check_batched_equals_separate(const LlamaModel& m, const std::vector<int>& lens, int steps, double tol) {
  NoGradGuard ng;
  const int V = m.config().vocab_size;
  const size_t B = lens.size();
  std::vector<KVCache> batched, single;
  std::vector<int32_t> next(B);
  for (size_t s = 0; s < B; ++s) {
    std::vector<int32_t> prompt;
    for (int t = 0; t < lens[s]; ++t) prompt.push_back(int32_t((s * 13 + size_t(t) * 7 + 3) % size_t(V)));
    batched.push_back(m.make_cache(lens[s] + steps));
    single.push_back(m.make_cache(lens[s] + steps));
    m.forward_cached(ids(prompt), batched.back());
    m.forward_cached(ids(prompt), single.back());
    next[s] = int32_t((s * 5 + 1) % size_t(V));
  }
  for (int step = 0; step < steps; ++step) {
    std::vector<KVCache*> ptrs;
    for (auto& c : batched) ptrs.push_back(&c);
    const Tensor lb = m.forward_batch(ids(next), ptrs).value().contiguous();
    ASSERT_EQ(lb.shape(), (Shape{int64_t(B), V}));
    for (size_t s = 0; s < B; ++s) {
      const Tensor ls = m.forward_cached(ids({next[s]}), single[s]).value().contiguous();
      const Tensor row = lb.slice(0, int64_t(s), int64_t(s) + 1).contiguous();
      EXPECT_LT(batch_max_diff(row, ls), tol) << "step " << step << " sequence " << s;
      EXPECT_EQ(batched[s].length, single[s].length);
      next[s] = int32_t((next[s] * 17 + step + 2) % V);
    }
  }
}
// `steps` batched decode steps of the sequences `lens` (prompts prefilled one by one) against the
// same decodes run alone: every layer's K and V cache rows equal bit for bit (`what` names the case).
void expect_batched_caches_equal_separate(const LlamaModel& m, const std::vector<int>& lens, int steps,
                                          const std::string& what) {
  NoGradGuard ng;
  std::vector<KVCache> batched, single;
  for (size_t s = 0; s < lens.size(); ++s) {
    std::vector<int32_t> prompt;
    for (int t = 0; t < lens[s]; ++t) prompt.push_back(int32_t((s * 7 + size_t(t) * 5 + 1) % 50));
    batched.push_back(m.make_cache(lens[s] + steps));
    single.push_back(m.make_cache(lens[s] + steps));
    m.forward_cached(ids(prompt), batched.back());
    m.forward_cached(ids(prompt), single.back());
  }
  for (int step = 0; step < steps; ++step) {
    std::vector<int32_t> next;
    std::vector<KVCache*> ptrs;
    for (size_t s = 0; s < lens.size(); ++s) next.push_back(int32_t((s * 3 + size_t(step) * 11 + 2) % 50));
    for (auto& cc : batched) ptrs.push_back(&cc);
    m.forward_batch(ids(next), ptrs);
    for (size_t s = 0; s < lens.size(); ++s) m.forward_cached(ids({next[s]}), single[s]);
  }
  for (size_t s = 0; s < lens.size(); ++s)
    for (int i = 0; i < m.n_layers(); ++i)
      for (int kv = 0; kv < 2; ++kv) {
        const Tensor& a = (kv ? batched[s].v : batched[s].k)[size_t(i)];
        const Tensor& b = (kv ? single[s].v : single[s].k)[size_t(i)];
        const int64_t n = (lens[s] + steps) * a.numel() / a.size(0);
        ASSERT_EQ(std::memcmp(a.raw_data(), b.raw_data(), size_t(n) * dtype_size(a.dtype())), 0)
            << what << " sequence " << s << " layer " << i << (kv ? " v" : " k");
      }
}
}  // namespace

TEST(ForwardBatch, EqualsSeparateDecodesDense) {
  for (RopeStyle style : {RopeStyle::Interleaved, RopeStyle::Half}) {
    LlamaConfig c = test::small_config(style);
    LlamaModel m(c, random_weights(c, 3, 0.1), false);
    check_batched_equals_separate(m, {1, 5, 12, 3}, 4, 1e-5);
    check_batched_equals_separate(m, {7}, 3, 1e-5);
  }
}

TEST(ForwardBatch, EqualsSeparateDecodesQkNormAndBias) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  c.qk_norm = true;
  c.attn_bias = true;
  LlamaModel m(c, random_weights(c, 4, 0.1), false);
  check_batched_equals_separate(m, {2, 9, 4}, 3, 1e-5);
}

TEST(ForwardBatch, EqualsSeparateDecodesPackedLinears) {
  for (const char* fmt : {"int4g32", "q4_0"}) {
    LlamaConfig c = test::small_config(RopeStyle::Half);
    LlamaModel m(c, random_weights(c, 6, 0.1), false);
    const QuantFormat& f = parse_quant_format(fmt);
    for (int i = 0; i < m.n_layers(); ++i)
      for (auto& [name, slot] : m.block(i).linears())
        *slot = std::make_shared<QuantLinear>(quantize((*slot)->effective_weight(), f));
    check_batched_equals_separate(m, {3, 1, 10, 6, 2, 8}, 3, 1e-5);
    // More rows than the int8 decode body takes at once (ops::kQuantDecodeMaxRows).
    check_batched_equals_separate(m, {3, 1, 10, 6, 2, 8, 4, 4, 5, 1, 2, 3}, 2, 1e-5);
  }
}

// The batched step's decode rows over an f16 cache (the default cache of an f32 model on the CPU)
// take a Tensor-free path (RoPE into per-thread rows, the f16 store straight into the cache, the
// fused one-row attention straight into the step's output). With packed linears (the int8 body:
// each row computed as alone) the caches it writes equal forward_cached's (the Tensor ops) bit
// for bit — every layer after the first reads the attention output of the one before —, with the
// fused kernel on and off (ops::set_kv_direct), for head_dim 16 and 64 (GQA groups 2 and 3); the
// logits (the dense head takes all rows at once) agree to 1e-5, and on and off agree to 1e-4.
TEST(ForwardBatch, F16CacheDecodeRowsEqualSeparateDecodesBitForBit) {
  for (int64_t hd : {16, 64}) {
    LlamaConfig c = test::small_config(RopeStyle::Half);
    if (hd == 64) {
      c.dim = 192;
      c.n_heads = 3;
      c.n_kv_heads = 1;
    }
    LlamaModel m(c, random_weights(c, 11, 0.1), false);
    for (int i = 0; i < m.n_layers(); ++i)
      for (auto& [name, slot] : m.block(i).linears())
        *slot = std::make_shared<QuantLinear>(quantize((*slot)->effective_weight(), parse_quant_format("q4_0")));
    ASSERT_EQ(m.make_cache(4).type, KVCacheType::F16);
    std::vector<Tensor> last;
    for (bool direct : {true, false}) {
      const bool was = ops::set_kv_direct(direct);
      check_batched_equals_separate(m, {1, 5, 12, 3}, 4, 1e-5);
      expect_batched_caches_equal_separate(m, {1, 5, 12, 3}, 3,
                                           "head_dim " + std::to_string(hd) + " direct " + std::to_string(direct));
      NoGradGuard ng;
      KVCache cache = m.make_cache(8);
      m.forward_cached(ids({1, 2, 3}), cache);
      std::vector<KVCache*> one = {&cache};
      last.push_back(m.forward_batch(ids({4}), one).value().contiguous());
      ops::set_kv_direct(was);
    }
    EXPECT_LT(batch_max_diff(last[0], last[1]), 1e-4) << "head_dim " << hd;
  }
}

// `--matmul exact` (f32 activations for every packed product, ops::set_quant_matmul_default): a
// batched step of 12 sequences (12 rows: the Exact body's tiled prefill form, more rows than its
// decode form takes) writes the KV caches that 12 separate decodes (1 row each) write, bit for bit:
// every output of the Exact body is summed in one order whatever the row count (issue 10; before,
// the tiled form's sgemm summed in a row-count-dependent order). int4g32 and q4_0 linears.
TEST(ForwardBatch, ExactPathDecodeRowsEqualSeparateDecodesBitForBit) {
  struct Restore {
    ~Restore() { ops::set_quant_matmul_default(ops::QuantMatmulPath::Auto); }
  } restore;
  ops::set_quant_matmul_default(ops::QuantMatmulPath::Exact);
  for (const char* fmt : {"int4g32", "q4_0"}) {
    LlamaConfig c = test::small_config(RopeStyle::Half);
    LlamaModel m(c, random_weights(c, 12, 0.1), false);
    for (int i = 0; i < m.n_layers(); ++i)
      for (auto& [name, slot] : m.block(i).linears())
        *slot = std::make_shared<QuantLinear>(quantize((*slot)->effective_weight(), parse_quant_format(fmt)));
    expect_batched_caches_equal_separate(m, {1, 5, 12, 3, 2, 7, 1, 4, 9, 2, 6, 3}, 3, fmt);
  }
}

namespace {
// One mixed step (forward_mixed): prompt pieces of several tokens next to single decode tokens, in
// any order, equal each sequence run alone through forward_cached with the same tokens; only the
// sequences that want logits get a row, in order. Run for a few steps with shifting counts.
void check_mixed_equals_separate(const LlamaModel& m, double tol) {
  NoGradGuard ng;
  const int V = m.config().vocab_size;
  // (70 tokens: a piece longer than the int8 path takes, run alone on the f32 path.)
  const std::vector<std::vector<int64_t>> steps = {{3, 1, 5, 1}, {1, 1, 1, 2}, {4, 70, 1, 1}, {1, 2, 1, 9}};
  const size_t S = steps[0].size();
  std::vector<KVCache> mixed, single;
  for (size_t s = 0; s < S; ++s) {
    mixed.push_back(m.make_cache(96));
    single.push_back(m.make_cache(96));
  }
  for (size_t step = 0; step < steps.size(); ++step) {
    std::vector<int32_t> toks;
    std::vector<KVCache*> ptrs;
    std::vector<bool> want;
    for (size_t s = 0; s < S; ++s) {
      for (int64_t t = 0; t < steps[step][s]; ++t) toks.push_back(int32_t((s * 11 + step * 7 + size_t(t) * 3 + 1) % size_t(V)));
      ptrs.push_back(&mixed[s]);
      want.push_back((s + step) % 3 != 0);
    }
    const Tensor lm = m.forward_mixed(ids(toks), ptrs, steps[step], want).value().contiguous();
    int64_t row = 0, at = 0;
    for (size_t s = 0; s < S; ++s) {
      const int64_t n = steps[step][s];
      std::vector<int32_t> mine(toks.begin() + at, toks.begin() + at + n);
      at += n;
      // Pieces of up to 64 tokens run on the int8 path in a mixed step (packed layers).
      ops::QuantInt8RowsScope int8_rows(n <= 64 ? 64 : ops::kQuantDecodeMaxRows);
      const Tensor ls = m.forward_cached(ids(mine), single[s]).value().contiguous();
      EXPECT_EQ(mixed[s].length, single[s].length);
      if (!want[s]) continue;
      const Tensor a = lm.slice(0, row, row + 1).contiguous(), b = ls.slice(0, n - 1, n).contiguous();
      EXPECT_LE(batch_max_diff(a, b), tol) << "step " << step << " sequence " << s;
      ++row;
    }
    EXPECT_EQ(lm.size(0), row);
  }
}
}  // namespace

TEST(ForwardBatch, MixedPiecesAndDecodesEqualSeparateRuns) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  c.qk_norm = true;
  LlamaModel dense(c, random_weights(c, 8, 0.1), false);
  check_mixed_equals_separate(dense, 1e-5);
  for (const char* fmt : {"int4g32", "q4_0"}) {
    LlamaModel m(c, random_weights(c, 9, 0.1), false);
    for (int i = 0; i < m.n_layers(); ++i)
      for (auto& [name, slot] : m.block(i).linears())
        *slot = std::make_shared<QuantLinear>(quantize((*slot)->effective_weight(), parse_quant_format(fmt)));
    check_mixed_equals_separate(m, 1e-5);
  }
}

TEST(ForwardBatch, MixedRejectsBadArguments) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaModel m(c, random_weights(c, 3, 0.1), false);
  NoGradGuard ng;
  KVCache a = m.make_cache(4), b = m.make_cache(4);
  EXPECT_THROW(m.forward_mixed(ids({1, 2, 3}), {&a, &b}, {1, 1}, {true, true}), Error);       // counts sum
  EXPECT_THROW(m.forward_mixed(ids({1, 2}), {&a, &b}, {2, 0}, {true, true}), Error);          // a count of 0
  EXPECT_THROW(m.forward_mixed(ids({1, 2}), {&a, &b}, {1, 1}, {true}), Error);                // flags
  EXPECT_THROW(m.forward_mixed(ids({1, 2, 3, 4, 5}), {&a, &b}, {5, 0}, {true, true}), Error);  // over capacity
  const Tensor none = m.forward_mixed(ids({1, 2, 3}), {&a, &b}, {2, 1}, {false, false}).value();
  EXPECT_EQ(none.size(0), 0);
  EXPECT_EQ(a.length, 2);
  EXPECT_EQ(b.length, 1);
  EXPECT_THROW(m.forward_mixed(ids({1, 2, 3}), {&a, &b}, {3, 0}, {true, true}), Error);
  EXPECT_THROW(m.forward_mixed(ids({1, 2, 3, 4}), {&a, &b}, {3, 1}, {true, true}), Error);  // a: 2 + 3 > 4
  EXPECT_NO_THROW(m.forward_mixed(ids({1, 2, 3}), {&a, &b}, {2, 1}, {true, true}));  // exactly full
}

TEST(ForwardBatch, RejectsBadArguments) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaModel m(c, random_weights(c, 3, 0.1), false);
  NoGradGuard ng;
  KVCache a = m.make_cache(2), b = m.make_cache(2);
  EXPECT_THROW(m.forward_batch(ids({1, 2}), {&a}), Error);
  EXPECT_THROW(m.forward_batch(ids({1, 2}), {&a, &a}), Error);
  EXPECT_THROW(m.forward_batch(ids({1, 2}), {&a, nullptr}), Error);
  m.forward_batch(ids({1, 2}), {&a, &b});
  m.forward_batch(ids({1, 2}), {&a, &b});
  EXPECT_THROW(m.forward_batch(ids({1, 2}), {&a, &b}), Error);  // full
}
