// LLM-QAT (train/llm_qat.h): the symmetric MinMax weight quantizer against its written-out formula
// and its straight-through gradient by f64 finite differences of the defined surrogate; the
// self-generated data (the paper's rule, determinism, resume, reuse, refusal of other settings);
// the method reducing its KL on stories260K in a few steps, resuming to the same model, and
// recording its activation quantization in the result.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include "common/stories_fixture.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/core/dtype.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"
#include "lowbit/train/llm_qat.h"

using namespace lowbit;
namespace fs = std::filesystem;

namespace {

Tensor random_tensor(Shape s, uint64_t seed, DType dt = DType::F32, double scale = 1.0) {
  Tensor t = Tensor::empty(s, DType::F64);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n(0.0, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = n(rng);
  return t.to(dt);
}

// The paper's eq. 1 written out: per group alpha = max|w| / (2^(b-1) - 1) (stored as f16),
// q = clamp(round(w / alpha), -(2^(b-1) - 1), 2^(b-1) - 1), result q alpha (alpha rounded up to f16).
Tensor minmax_reference(const Tensor& w, int bits, int64_t group) {
  const int64_t out = w.size(0), in = w.size(1), G = group > 0 ? group : in;
  const double qmax = std::ldexp(1.0, bits - 1) - 1;
  Tensor r = Tensor::empty(w.shape(), DType::F64);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t g0 = 0; g0 < in; g0 += G) {
      const int64_t g1 = std::min(in, g0 + G);
      double mx = 0;
      for (int64_t i = g0; i < g1; ++i) mx = std::max(mx, std::fabs(double(w.data<float>()[o * in + i])));
      // The smallest f16 >= max|w| / qmax (lowbit's scale storage rounds up, so max|w| never clips).
      const float want = float(mx / qmax);
      uint16_t h = f32_to_f16(want);
      if (f16_to_f32(h) < want) ++h;
      const double alpha = double(f16_to_f32(h));
      for (int64_t i = g0; i < g1; ++i) {
        const double q = alpha > 0 ? std::clamp(std::nearbyint(double(w.data<float>()[o * in + i]) / alpha), -qmax, qmax) : 0;
        r.data<double>()[o * in + i] = q * alpha;
      }
    }
  return r;
}

}  // namespace

TEST(LlmQatQuantizer, ForwardIsThePapersSymmetricMinMax) {
  for (auto [name, bits, group] : {std::tuple{"int4g64s", 4, 64}, {"int4pcs", 4, 0}, {"int2g64s", 2, 64}, {"int3g64s", 3, 64},
                                   {"int8pc", 8, 0}}) {
    SCOPED_TRACE(name);
    const QuantFormat& f = parse_quant_format(name);
    const Tensor w = random_tensor({6, 128}, 7, DType::F32, 0.05);
    const Tensor ref = minmax_reference(w, bits, group);
    const Tensor got = minmax_fake_quant(Var(w, true), f).value().to(DType::F64);
    for (int64_t i = 0; i < w.numel(); ++i)
      ASSERT_NEAR(got.data<double>()[i], ref.data<double>()[i], 1e-7) << "element " << i;
    // The packed encoding is exactly the trained weight.
    MinMaxQatLinear l(w, Tensor(), f);
    const Tensor packed = l.encode().dequantize().to(DType::F64);
    for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(packed.data<double>()[i], got.data<double>()[i]) << "element " << i;
  }
  EXPECT_THROW(minmax_fake_quant(Var(random_tensor({2, 64}, 1), true), parse_quant_format("int4g64")), Error);
  EXPECT_FALSE(llm_qat_supports(parse_quant_format("q4_0")));
}

// The straight-through estimator: the gradient is that of the surrogate
// S(W) = W + stopgrad(Q(W) - W), whose derivative is the identity. The layer's analytic gradients
// (f64) against central finite differences of the surrogate loss sum(C * (X Q~(W)^T)) at W0, and
// of the true loss in X (the quantized weight does not depend on X).
TEST(LlmQatQuantizer, StraightThroughGradientMatchesFiniteDifferencesOfTheSurrogate) {
  const QuantFormat& f = parse_quant_format("int4g32s");
  const int64_t M = 3, N = 5, K = 64;
  const Tensor w0 = random_tensor({N, K}, 11, DType::F64, 0.1);
  const Tensor x0 = random_tensor({M, K}, 12, DType::F64);
  const Tensor c = random_tensor({M, N}, 13, DType::F64);
  Var W(w0.clone(), true), X(x0.clone(), true);
  Var y = linear(X, minmax_fake_quant(W, f));
  backward(sum(mul(y, Var(c, false))));
  const Tensor q0 = minmax_fake_quant(Var(w0, false), f).value().to(DType::F64);  // Q(W0), fixed
  auto surrogate = [&](const Tensor& w, const Tensor& x) {  // sum C (x (Q(W0) + w - W0)^T)
    double s = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double acc = 0;
        for (int64_t k = 0; k < K; ++k)
          acc += x.data<double>()[m * K + k] *
                 (q0.data<double>()[n * K + k] + w.data<double>()[n * K + k] - w0.data<double>()[n * K + k]);
        s += c.data<double>()[m * N + n] * acc;
      }
    return s;
  };
  const double h = 1e-6;
  for (int64_t i = 0; i < w0.numel(); i += 7) {
    Tensor wp = w0.clone(), wm = w0.clone();
    wp.data<double>()[i] += h;
    wm.data<double>()[i] -= h;
    const double fd = (surrogate(wp, x0) - surrogate(wm, x0)) / (2 * h);
    ASSERT_NEAR(W.grad().data<double>()[i], fd, 1e-6) << "dW element " << i;
  }
  for (int64_t i = 0; i < x0.numel(); i += 5) {
    Tensor xp = x0.clone(), xm = x0.clone();
    xp.data<double>()[i] += h;
    xm.data<double>()[i] -= h;
    const double fd = (surrogate(w0, xp) - surrogate(w0, xm)) / (2 * h);
    ASSERT_NEAR(X.grad().data<double>()[i], fd, 1e-6) << "dX element " << i;
  }
}

namespace {
struct LlmQatStories : test::StoriesPtq {
  QatConfig small(const char* format = "int4g64s") const {
    QatConfig c;
    c.format = &parse_quant_format(format);
    c.steps = 24;  // MinMax moves few codes in fewer steps at lr 1e-4
    c.batch = 2;
    c.seqlen = 64;
    c.progress = false;
    return c;
  }
  SelfGenOptions gen(int64_t n) const {
    SelfGenOptions o;
    o.sequences = n;
    o.length = 24;
    o.seed = 5;
    o.model_id = "stories260K";
    o.progress = false;
    o.checkpoint_seconds = 0;
    return o;
  }
};
}  // namespace

// LLM-QAT's KV quantization in the model (ModelTransforms::kv_token_bits): k_proj / v_proj outputs
// per (token, head), symmetric MinMax, before RoPE. The full forward and token-by-token decoding give
// the same logits (each token's keys depend on it alone), it changes the function, and gradients
// pass straight through to the k/v weights.
TEST_F(LlmQatStories, PerTokenKvQuantizationInEveryForwardPath) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights), m(ck.config, ck.weights, true);
  ModelTransforms t;
  t.kv_token_bits = 4;
  m.set_transforms(t);
  const int64_t T = 12, V = ck.config.vocab_size;
  Tensor tok = Tensor::empty({1, T}, DType::I32);
  for (int64_t i = 0; i < T; ++i) tok.data<int32_t>()[i] = calib_stream[size_t(i)];
  Var full = m.forward(tok);
  KVCache cache = m.make_cache(T, KVCacheType::F32);
  double max_diff = 0, fp_diff = 0;
  const Tensor ref = fp.forward(tok).value();
  for (int64_t i = 0; i < T; ++i) {
    Tensor one = Tensor::empty({1}, DType::I32);
    one.data<int32_t>()[0] = tok.data<int32_t>()[i];
    NoGradGuard ng;
    const Tensor step = m.forward_cached(one, cache).value();
    for (int64_t j = 0; j < V; ++j) {
      max_diff = std::max(max_diff, std::fabs(double(step.data<float>()[j]) - full.value().data<float>()[i * V + j]));
      fp_diff = std::max(fp_diff, std::fabs(double(ref.data<float>()[i * V + j]) - full.value().data<float>()[i * V + j]));
    }
  }
  EXPECT_LT(max_diff, 1e-4);
  EXPECT_GT(fp_diff, 1e-3);  // 4-bit keys/values change the logits
  backward(sum(full));
  EXPECT_TRUE(m.block(0).wk->parameters()[0].grad().defined());
  t.kv.bits = 4;  // not together with KIVI
  EXPECT_THROW(m.set_transforms(t), Error);
  t.kv.bits = 0;
  t.kv_token_bits = 3;
  EXPECT_THROW(m.set_transforms(t), Error);
  EXPECT_EQ(parse_kv_token_bits("int8"), 8);
  EXPECT_THROW(parse_kv_token_bits("int3"), Error);
}

TEST_F(LlmQatStories, SelfGenerationFollowsTheRuleAndIsDeterministic) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  const auto dir = test::temp_dir("llmqat-gen");
  SelfGenOptions o = gen(5);
  o.batch = 2;
  const auto a = self_generate(fp, o, (dir / "a.i32").string());
  ASSERT_EQ(a.size(), size_t(5 * 24));
  EXPECT_TRUE(fs::exists(dir / "a.i32.json"));
  EXPECT_FALSE(fs::exists(dir / "a.i32.partial"));
  // Another batch size: the same tokens.
  o.batch = 3;
  EXPECT_EQ(self_generate(fp, o, (dir / "b.i32").string()), a);
  // The rule: BOS, a random token, greedy (top-1 of the FP model) to a prefix of 3 + i % 3.
  int64_t sampled_diff = 0;
  for (int64_t i = 0; i < 5; ++i) {
    const int32_t* s = a.data() + i * 24;
    EXPECT_EQ(s[0], ck.config.bos_id);
    Tensor tok = Tensor::empty({1, 24}, DType::I32);
    for (int64_t t = 0; t < 24; ++t) tok.data<int32_t>()[t] = s[t];
    NoGradGuard ng;
    const Tensor logits = fp.forward(tok).value().contiguous();
    const int64_t V = ck.config.vocab_size;
    for (int64_t t = 1; t + 1 < 24; ++t) {  // token t + 1 from the logits at t
      const float* row = logits.data<float>() + t * V;
      int64_t best = 0;
      for (int64_t j = 1; j < V; ++j)
        if (row[j] > row[best]) best = j;
      if (t + 1 <= 1 + self_gen_greedy_tokens(i)) EXPECT_EQ(s[t + 1], best) << "sequence " << i << " token " << t + 1;
      else sampled_diff += s[t + 1] != best;
    }
  }
  EXPECT_GT(sampled_diff, 0);  // the rest is sampled, not greedy
  // Another seed: other data.
  SelfGenOptions other = gen(5);
  other.seed = 6;
  EXPECT_NE(self_generate(fp, other, (dir / "c.i32").string()), a);
  fs::remove_all(dir);
}

TEST_F(LlmQatStories, SelfGenerationResumesReusesAndRefusesOtherSettings) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  const auto dir = test::temp_dir("llmqat-gen-resume");
  const std::string whole = (dir / "whole.i32").string(), part = (dir / "part.i32").string();
  const auto a = self_generate(fp, gen(7), whole);
  SelfGenOptions o = gen(7);
  o.batch = 2;
  o.stop_after = 3;
  bool complete = true;
  const auto first = self_generate(fp, o, part, &complete);
  EXPECT_FALSE(complete);
  EXPECT_EQ(first.size(), size_t(3 * 24));
  EXPECT_FALSE(fs::exists(part));
  ASSERT_TRUE(fs::exists(part + ".partial"));
  o.stop_after = 0;
  EXPECT_EQ(self_generate(fp, o, part, &complete), a);  // resumed from 3 sequences
  EXPECT_TRUE(complete);
  EXPECT_FALSE(fs::exists(part + ".partial"));
  // A finished file is reused as is (a changed token proves it is read, not regenerated).
  {
    std::fstream fh(whole, std::ios::in | std::ios::out | std::ios::binary);
    const int32_t one = 1;
    fh.seekp(4 * 5);
    fh.write(reinterpret_cast<const char*>(&one), 4);
  }
  auto b = self_generate(fp, gen(7), whole);
  EXPECT_EQ(b[5], 1);
  // Other settings, a file without its record, a truncated file: refused.
  EXPECT_THROW(self_generate(fp, gen(8), whole), Error);
  fs::copy_file(whole, (dir / "bare.i32"));
  EXPECT_THROW(self_generate(fp, gen(7), (dir / "bare.i32").string()), Error);
  fs::resize_file(whole, 4 * 10);
  EXPECT_THROW(self_generate(fp, gen(7), whole), Error);
  SelfGenOptions bad = gen(0);
  EXPECT_THROW(self_generate(fp, bad, (dir / "zero.i32").string()), Error);
  bad = gen(2);
  bad.length = 100000;
  EXPECT_THROW(self_generate(fp, bad, (dir / "long.i32").string()), Error);
  fs::remove_all(dir);
}

TEST_F(LlmQatStories, ReducesTheKlWithActivationAndKvQuantization) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  for (auto [fmt, act, kv] : {std::tuple{"int4g64s", 8, 8}, {"int2g64s", 0, 0}}) {
    SCOPED_TRACE(fmt);
    QatConfig c = small(fmt);
    c.act_bits = act;
    c.kv_bits = kv;
    QatResult r = make_qat_method("llm-qat", c)->run(fp, calib_stream);
    ASSERT_TRUE(r.complete);
    ASSERT_EQ(r.stages.size(), 1u);
    EXPECT_GT(r.stages[0].loss_before, 0);
    EXPECT_LT(r.stages[0].loss_after, r.stages[0].loss_before);
    ASSERT_TRUE(r.model);
    packed(*r.model);  // every linear packed
    EXPECT_EQ(r.model->transforms().act.bits, act);  // recorded with the model, as the checkpoint saves it
    EXPECT_EQ(r.model->transforms().kv_token_bits, kv);
    // The checkpoint records both; read back, the model computes what was trained.
    const auto dir = test::temp_dir("llmqat-save");
    save_quantized_model(dir.string(), *r.model, "llm-qat", *c.format);
    auto loaded = make_quantized_model(load_quantized_model(dir.string(), false));
    EXPECT_EQ(loaded->transforms().act.bits, act);
    EXPECT_EQ(loaded->transforms().kv_token_bits, kv);
    EXPECT_NEAR(ppl(*loaded), ppl(*r.model), 1e-3 * ppl(*r.model));
    fs::remove_all(dir);
    EXPECT_FALSE(r.model->transforms().act.asymmetric);
  }
  // Whole-sequence windows (self-generated data) train too.
  const auto dir = test::temp_dir("llmqat-seq");
  SelfGenOptions g = gen(6);
  g.length = 65;
  const auto data = self_generate(fp, g, (dir / "g.i32").string());
  QatConfig c = small();
  c.sequence_length = 65;
  QatResult r = make_qat_method("llm-qat", c)->run(fp, data);
  EXPECT_LT(r.stages[0].loss_after, r.stages[0].loss_before);
  c.sequence_length = 40;  // windows of 65 do not fit sequences of 40
  EXPECT_THROW(make_qat_method("llm-qat", c)->run(fp, data), Error);
  fs::remove_all(dir);
  QatConfig bad = small("int4g64");
  EXPECT_THROW(make_qat_method("llm-qat", bad), Error);  // asymmetric: not the paper's quantizer
  bad = small();
  bad.act_bits = 3;
  EXPECT_THROW(make_qat_method("llm-qat", bad), Error);
}

TEST_F(LlmQatStories, ResumeAfterStopGivesTheSameModel) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  const auto dir = test::temp_dir("llmqat-resume");
  QatConfig c = small();
  c.act_bits = 8;
  c.kv_bits = 4;
  c.state_dir = (dir / "state").string();
  c.stop_after_steps = 5;
  QatResult a = make_qat_method("llm-qat", c)->run(fp, calib_stream);
  ASSERT_FALSE(a.complete);
  ASSERT_TRUE(fs::exists(dir / "state" / "llm-qat.safetensors"));
  c.stop_after_steps = 0;
  QatResult b = make_qat_method("llm-qat", c)->run(fp, calib_stream);
  ASSERT_TRUE(b.complete);
  EXPECT_EQ(b.stages[0].resumed_from, 5);
  QatConfig u = small();
  u.act_bits = 8;
  u.kv_bits = 4;
  QatResult whole = make_qat_method("llm-qat", u)->run(fp, calib_stream);
  expect_same_packed(*b.model, *whole.model);
  EXPECT_EQ(b.stages[0].loss_after, whole.stages[0].loss_after);
  // Other activation bits: the state is refused.
  QatConfig other = c;
  other.act_bits = 4;
  other.stop_after_steps = 0;
  c.stop_after_steps = 3;
  make_qat_method("llm-qat", c)->run(fp, calib_stream);
  EXPECT_THROW(make_qat_method("llm-qat", other)->run(fp, calib_stream), Error);
  fs::remove_all(dir);
}
