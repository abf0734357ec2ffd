// The continuous-batching scheduler without HTTP: greedy results of requests decoded together
// equal the same requests run alone; stop strings, max_tokens, seeds, streaming, cancellation,
// shutdown and rejected submissions.
#include <gtest/gtest.h>

#include <algorithm>
#include <condition_variable>
#include <limits>
#include <random>
#include <future>
#include <map>
#include <mutex>

#include "common/small_model.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"
#include "lowbit/runtime/scheduler.h"

using namespace lowbit;

namespace {
// Token i reads as a short word, so stop strings and streaming have text to work on.
class WordTokenizer : public Tokenizer {
 public:
  explicit WordTokenizer(int v) : v_(v) {}
  int vocab_size() const override { return v_; }
  std::vector<int> encode(std::string_view, bool) const override { return {}; }
  std::string decode(const std::vector<int>& ids) const override {
    std::string s;
    for (size_t i = 0; i < ids.size(); ++i) s += decode_piece(i ? ids[i - 1] : 1, ids[i]);
    return s;
  }
  std::string decode_piece(int, int id) const override {
    static const char* w[] = {"a", "b", " c", "dd", "e ", "f", "gg", " h", "i", "j"};
    return w[id % 10];
  }
  std::string token_text(int id) const override { return decode_piece(0, id); }
  int bos_id() const override { return 1; }
  int eos_id() const override { return 2; }
  std::string kind() const override { return "test"; }

 private:
  int v_;
};

struct Outcome {
  CompletionResult result;
  std::string streamed;
};

// Submits all requests to one scheduler at once and waits for every result.
std::vector<Outcome> run_all(Scheduler& s, const std::vector<CompletionRequest>& reqs) {
  std::vector<Outcome> out(reqs.size());
  std::vector<std::promise<void>> done(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    CompletionRequest r = reqs[i];
    r.on_text = [&out, i](const std::string& t) { out[i].streamed += t; };
    r.on_done = [&out, &done, i](const CompletionResult& res) {
      out[i].result = res;
      done[i].set_value();
    };
    s.submit(std::move(r));
  }
  for (auto& d : done) d.get_future().wait();
  return out;
}

std::vector<CompletionRequest> greedy_requests(int n, int V) {
  std::vector<CompletionRequest> reqs;
  for (int i = 0; i < n; ++i) {
    CompletionRequest r;
    for (int t = 0; t < 1 + (i * 7) % 11; ++t) r.prompt.push_back(3 + (i * 13 + t * 5) % (V - 3));
    r.max_tokens = 4 + (i * 3) % 9;
    r.sampler.temperature = 0;
    r.stop_at_eos = false;
    reqs.push_back(r);
  }
  return reqs;
}

LlamaModel small_model(bool packed) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  c.max_seq_len = 64;
  LlamaModel m(c, random_weights(c, 11, 0.2), false);
  if (packed)
    for (int i = 0; i < m.n_layers(); ++i)
      for (auto& [name, slot] : m.block(i).linears())
        *slot = std::make_shared<QuantLinear>(quantize((*slot)->effective_weight(), parse_quant_format("q4_0")));
  return m;
}
}  // namespace

SchedulerOptions options(int parallel, int64_t ctx, int64_t chunk = 0, int64_t batch = 0) {
  SchedulerOptions o;
  o.parallel = parallel;
  o.ctx = ctx;
  if (chunk != 0) o.prefill_chunk = chunk;
  if (batch != 0) o.batch_tokens = batch;
  return o;
}

// Packed weights run twice: on the default path (int8 activations for the batched steps, their
// prompt pieces up to 64 tokens included) and with `--matmul exact` (f32 activations for every
// product; since issue 10 each row of a batched step also gets the numbers it gets alone there).
TEST(Scheduler, BatchedGreedyEqualsRunAlone) {
  struct Restore {
    ~Restore() { ops::set_quant_matmul_default(ops::QuantMatmulPath::Auto); }
  } restore;
  for (int variant : {0, 1, 2}) {
    const bool packed = variant > 0;
    ops::set_quant_matmul_default(variant == 2 ? ops::QuantMatmulPath::Exact : ops::QuantMatmulPath::Auto);
    LlamaModel m = small_model(packed);
    WordTokenizer tok(m.config().vocab_size);
    const auto reqs = greedy_requests(16, m.config().vocab_size);
    // Whole prompts in one piece (the default), and prompts of up to 11 tokens read in pieces of 3
    // with 8 tokens per step (several pieces, of several prompts, next to the decoding slots).
    for (auto [chunk, batch] : {std::pair<int64_t, int64_t>{0, 0}, {3, 8}}) {
      std::vector<Outcome> alone;
      {
        Scheduler one(m, tok, options(1, 32, chunk, batch));
        for (const auto& r : reqs) alone.push_back(run_all(one, {r})[0]);
      }
      for (int parallel : {4, 16}) {
        Scheduler s(m, tok, options(parallel, 32, chunk, batch));
        const auto together = run_all(s, reqs);
        for (size_t i = 0; i < reqs.size(); ++i) {
          EXPECT_EQ(together[i].result.tokens, alone[i].result.tokens)
              << "request " << i << " parallel " << parallel << " chunk " << chunk << " variant " << variant;
          EXPECT_EQ(together[i].result.text, alone[i].result.text);
          EXPECT_EQ(together[i].streamed, together[i].result.text);
          EXPECT_EQ(together[i].result.prompt_tokens, int(reqs[i].prompt.size()));
          EXPECT_EQ(together[i].result.completion_tokens, int(together[i].result.tokens.size()));
        }
        const SchedulerStats st = s.stats();
        EXPECT_EQ(st.requests_finished, reqs.size());
        EXPECT_GT(st.decode_rows, st.decode_steps) << "sequences should have decoded together";
        if (chunk == 3) {
          EXPECT_GT(st.prefill_chunks, reqs.size()) << "prompts longer than 3 tokens come in pieces";
        }
      }
    }
  }
}

// A long prompt arriving while others decode is read in pieces, one per step, and the decoding
// requests get a token at every one of those steps (before chunked prefill they waited for the
// whole prompt); every answer equals the same request run alone.
TEST(Scheduler, LongPromptDoesNotStallDecodingSlots) {
  for (bool packed : {false, true}) {
    LlamaModel m = small_model(packed);
    const int V = m.config().vocab_size;
    WordTokenizer tok(V);
    const SchedulerOptions opt = options(4, 64, 4, 8);  // 40-token prompt: 10 pieces of 4
    // Two decoding requests that run their 50 tokens alone (the random model ends some early with
    // BOS), and a long prompt.
    std::vector<CompletionRequest> reqs;
    std::vector<Outcome> alone;
    {
      Scheduler one(m, tok, opt);
      for (int seed = 0; seed < 200 && reqs.size() < 3; ++seed) {
        CompletionRequest r;
        r.sampler.temperature = 0;
        r.stop_at_eos = false;
        const bool long_prompt = reqs.size() == 2;
        for (int t = 0; t < (long_prompt ? 40 : 3); ++t) r.prompt.push_back(3 + (seed * 17 + t * 5) % (V - 3));
        r.max_tokens = long_prompt ? 5 : 50;
        const Outcome o = run_all(one, {r})[0];
        if (!long_prompt && o.result.completion_tokens < r.max_tokens) continue;
        reqs.push_back(r);
        alone.push_back(o);
      }
    }
    ASSERT_EQ(reqs.size(), 3u);
    Scheduler s(m, tok, opt);
    // Each request is submitted from the previous one's text callback (the scheduler's thread), so
    // the order of events does not depend on thread timing: decoder 1 joins at decoder 0's first
    // token, the long prompt at decoder 1's second token, while both decode.
    int pieces[2] = {0, 0};            // text callbacks of the two decoding requests
    int before[2] = {-1, -1};          // ... when the long prompt was submitted
    int at_first_token[2] = {-1, -1};  // ... when its first token came
    std::vector<Outcome> out(3);
    std::vector<std::promise<void>> done(3);
    std::vector<CompletionRequest> subs(3);
    for (size_t i = 0; i < 3; ++i) {
      subs[i] = reqs[i];
      subs[i].on_text = [&, i](const std::string& t) {
        out[i].streamed += t;
        if (i == 2) {
          if (at_first_token[0] < 0) std::copy(pieces, pieces + 2, at_first_token);
          return;
        }
        ++pieces[i];
        if (i == 0 && pieces[0] == 1) s.submit(subs[1]);
        if (i == 1 && pieces[1] == 2) {
          std::copy(pieces, pieces + 2, before);
          s.submit(subs[2]);
        }
      };
      subs[i].on_done = [&, i](const CompletionResult& res) {
        out[i].result = res;
        done[i].set_value();
      };
    }
    s.submit(subs[0]);
    for (auto& d : done) d.get_future().wait();
    for (int j = 0; j < 2; ++j) {
      EXPECT_GE(at_first_token[j] - before[j], 9)
          << "decoding request " << j << " stalled while the long prompt was read (packed " << packed << ")";
      EXPECT_LT(at_first_token[j], reqs[size_t(j)].max_tokens) << "it should still have been decoding";
    }
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(out[i].result.tokens, alone[i].result.tokens) << "request " << i << " packed " << packed;
      EXPECT_EQ(out[i].streamed, alone[i].result.text);
    }
    EXPECT_GE(s.stats().prefill_chunks, 10u + 2u);
  }
}

TEST(Scheduler, MaxTokensAndContextEndWithLength) {
  LlamaModel m = small_model(false);
  WordTokenizer tok(m.config().vocab_size);
  Scheduler s(m, tok, {2, 8});
  CompletionRequest r;
  r.prompt = {5, 6, 7};
  r.sampler.temperature = 0;
  r.stop_at_eos = false;
  r.max_tokens = 3;
  auto o = run_all(s, {r})[0].result;
  if (o.finish == FinishReason::Length) {
    EXPECT_EQ(o.completion_tokens, 3);
  }
  r.max_tokens = 100;  // the context (8) ends it: 8 - 3 + 1 tokens at most
  o = run_all(s, {r})[0].result;
  if (o.finish == FinishReason::Length) {
    EXPECT_EQ(o.completion_tokens, 6);
  }
  EXPECT_LE(o.completion_tokens, 6);
}

TEST(Scheduler, StopStringsCutTheTextAndStreamNothingPastThem) {
  LlamaModel m = small_model(false);
  WordTokenizer tok(m.config().vocab_size);
  Scheduler s(m, tok, {4, 32});
  CompletionRequest r;
  r.prompt = {4, 9, 12};
  r.sampler.temperature = 0;
  r.stop_at_eos = false;
  r.max_tokens = 20;
  const Outcome full = run_all(s, {r})[0];
  ASSERT_GE(full.result.text.size(), 6u) << "the random model ended early: '" << full.result.text << "'";
  for (size_t at : {size_t(0), size_t(2), full.result.text.size() - 3}) {
    CompletionRequest rs = r;
    const std::string stop = full.result.text.substr(at, 3);
    rs.stop = {"never-there", stop};
    const Outcome o = run_all(s, {rs})[0];
    EXPECT_EQ(o.result.finish, FinishReason::Stop);
    EXPECT_EQ(o.result.text, full.result.text.substr(0, full.result.text.find(stop))) << "stop '" << stop << "'";
    EXPECT_EQ(o.streamed, o.result.text);
  }
  // A stop string that never completes: everything held back is sent at the end.
  CompletionRequest rn = r;
  rn.stop = {full.result.text.substr(full.result.text.size() - 2) + "\x01"};
  const Outcome o = run_all(s, {rn})[0];
  EXPECT_EQ(o.result.text, full.result.text);
  EXPECT_EQ(o.streamed, full.result.text);
}

TEST(Scheduler, SeedsReproduceAlsoWhenBatchedWithOthers) {
  LlamaModel m = small_model(false);
  WordTokenizer tok(m.config().vocab_size);
  Scheduler s(m, tok, {4, 32});
  CompletionRequest r;
  r.prompt = {7, 8};
  r.sampler = {1.0, 0.9, 1234};
  r.stop_at_eos = false;
  r.max_tokens = 12;
  const auto a = run_all(s, {r})[0].result.tokens;
  auto batch = greedy_requests(5, m.config().vocab_size);
  batch.push_back(r);
  const auto b = run_all(s, batch).back().result.tokens;
  EXPECT_EQ(a, b);
  r.sampler.seed = 99;
  const auto c = run_all(s, {r})[0].result.tokens;
  EXPECT_NE(a, c);
}

TEST(Scheduler, CancelAndStop) {
  LlamaModel m = small_model(false);
  WordTokenizer tok(m.config().vocab_size);
  auto s = std::make_unique<Scheduler>(m, tok, SchedulerOptions{1, 64});
  std::mutex mu;
  std::condition_variable cv;
  std::map<uint64_t, FinishReason> finished;
  auto req = [&] {
    CompletionRequest r;
    r.prompt = {5};
    r.sampler.temperature = 0;
    r.stop_at_eos = false;
    r.max_tokens = 60;
    r.on_done = [&](const CompletionResult& res) {
      std::lock_guard<std::mutex> lk(mu);
      finished[res.id] = res.finish;
      cv.notify_all();
    };
    return r;
  };
  const uint64_t a = s->submit(req()), b = s->submit(req());  // b waits: one slot
  s->cancel(b);
  s->cancel(a);
  {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return finished.size() == 2; });
  }
  EXPECT_EQ(finished[b], FinishReason::Cancelled);
  EXPECT_TRUE(finished[a] == FinishReason::Cancelled || finished[a] == FinishReason::Stop);
  s->cancel(12345);  // unknown: ignored
  const uint64_t c = s->submit(req()), d = s->submit(req());
  s->stop(false);
  EXPECT_EQ(finished.size(), 4u);
  EXPECT_TRUE(finished.count(c) && finished.count(d));
  EXPECT_THROW(s->submit(req()), Error);
  s.reset();
}

TEST(Scheduler, StopWithFinishCompletesInFlightRequests) {
  LlamaModel m = small_model(false);
  WordTokenizer tok(m.config().vocab_size);
  Scheduler s(m, tok, {2, 64});
  std::atomic<int> done{0};
  for (int i = 0; i < 3; ++i) {
    CompletionRequest r;
    r.prompt = {5, 6};
    r.sampler.temperature = 0;
    r.max_tokens = 10;
    r.on_done = [&](const CompletionResult& res) {
      EXPECT_NE(res.finish, FinishReason::Cancelled);
      ++done;
    };
    s.submit(r);
  }
  s.stop(true);
  EXPECT_EQ(done.load(), 3);
}

TEST(Scheduler, RejectsBadRequests) {
  LlamaModel m = small_model(false);
  WordTokenizer tok(m.config().vocab_size);
  Scheduler s(m, tok, {1, 8});
  CompletionRequest r;
  EXPECT_THROW(s.submit(r), Error);  // empty prompt
  r.prompt = std::vector<int>(9, 3);
  try {
    s.submit(r);
    ADD_FAILURE() << "a prompt longer than the context was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("9 tokens"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("8 tokens"), std::string::npos) << e.what();
  }
  r.prompt = {3, 1000};
  EXPECT_THROW(s.submit(r), Error);
  r.prompt = {3};
  r.max_tokens = 0;
  EXPECT_THROW(s.submit(r), Error);
  r.max_tokens = 1;
  r.sampler.top_p = 0;
  EXPECT_THROW(s.submit(r), Error);
  r.sampler.top_p = 1;
  r.stop = {""};
  EXPECT_THROW(s.submit(r), Error);
  EXPECT_THROW(Scheduler(m, tok, {0, 8}), Error);
}

TEST(Scheduler, RejectsBadChunkOptions) {
  LlamaModel m = small_model(false);
  WordTokenizer tok(m.config().vocab_size);
  EXPECT_THROW(Scheduler(m, tok, options(1, 8, -1, 8)), Error);  // prefill_chunk < 1
  EXPECT_THROW(Scheduler(m, tok, options(1, 8, 16, 8)), Error);  // batch_tokens < prefill_chunk
  EXPECT_NO_THROW(Scheduler(m, tok, options(1, 8, 8, 8)));
}

// Greedy sampling's vectorised argmax gives std::max_element's index on every kind of input: ties
// (first wins), NaNs anywhere (skipped; a NaN first element wins), +-0, infinities, all equal, short
// and odd lengths (tails of the 64-value chunks and of the vector lanes).
TEST(Sampler, ArgmaxFirstEqualsMaxElement) {
  std::mt19937 rng(7);
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  int cases = 0;
  for (int n : {1, 2, 3, 15, 16, 17, 63, 64, 65, 127, 128, 129, 1000, 49152}) {
    for (int kind = 0; kind < 9; ++kind) {
      std::vector<float> x(static_cast<size_t>(n));
      std::uniform_int_distribution<int> small(-3, 3);
      std::normal_distribution<float> g(0.0f, 5.0f);
      for (float& v : x) v = kind == 1 ? float(small(rng)) : kind == 2 ? 1.0f : g(rng);
      std::uniform_int_distribution<int> at(0, n - 1);
      if (kind == 3) x[size_t(at(rng))] = nan, x[size_t(at(rng))] = nan;
      if (kind == 4) x[0] = nan;
      if (kind == 5) std::fill(x.begin(), x.end(), nan);
      if (kind == 6) std::fill(x.begin(), x.end(), -inf), x[size_t(at(rng))] = nan;
      if (kind == 7) x[size_t(at(rng))] = inf, x[size_t(at(rng))] = inf;
      if (kind == 8) {
        for (float& v : x) v = small(rng) < 0 ? -0.0f : 0.0f;
        if (n > 1) x[size_t(at(rng))] = -1.0f;
      }
      const int want = int(std::max_element(x.begin(), x.end()) - x.begin());
      EXPECT_EQ(argmax_first(x.data(), n), want) << "n " << n << " kind " << kind;
      ++cases;
    }
  }
  EXPECT_EQ(argmax_first(nullptr, 0), 0);
  EXPECT_EQ(cases, 14 * 9);
}
