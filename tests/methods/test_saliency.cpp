// Saliency maps (Fisher, |g w|, |x| |w|), their file format, the saliency regularizer, and SAPR
// (ApiQ + saliency-aware regularization, arXiv 2504.13932) against ApiQ on stories260K.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include "common/stories_fixture.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/eval/perplexity.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/methods/apiq.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/saliency.h"
#include "lowbit/quant/quant_linear.h"
#include "ops/grad_check.h"

using namespace lowbit;

namespace {

LlamaConfig tiny_config() {
  LlamaConfig c;
  c.dim = 32;
  c.hidden_dim = 48;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 40;
  c.max_seq_len = 32;
  return c;
}

Tensor tiny_tokens(int64_t n, int64_t len, int vocab) {
  std::vector<int32_t> v;
  for (int64_t i = 0; i < n * len; ++i) v.push_back(int32_t((i * 7 + i / 5) % vocab));
  return Tensor::from_vector(v, {n, len});
}

double mean_of(const Tensor& t) {
  double s = 0;
  for (int64_t i = 0; i < t.numel(); ++i) s += t.item(i);
  return s / double(t.numel());
}


}  // namespace

TEST(Saliency, KindsAreConsistentAndNormalised) {
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 3);
  const Tensor tokens = tiny_tokens(4, 16, c.vocab_size);
  SaliencyOptions o;
  o.batch = 4;  // one batch: Fisher = g^2 and grad-weight = |g w| of the same gradient g
  SaliencyMap fisher = compute_saliency(c, w, tokens, o);
  o.kind = SaliencyKind::GradWeight;
  SaliencyMap gw = compute_saliency(c, w, tokens, o);
  o.kind = SaliencyKind::ActWeight;
  SaliencyMap act = compute_saliency(c, w, tokens, o);
  ASSERT_EQ(fisher.scores.size(), 14u);
  LlamaModel model(c, w);
  for (const auto& [name, s] : fisher.scores) {
    EXPECT_NEAR(mean_of(s), 1.0, 1e-4) << name;
    EXPECT_NEAR(mean_of(gw.at(name)), 1.0, 1e-4) << name;
    EXPECT_NEAR(mean_of(act.at(name)), 1.0, 1e-4) << name;
  }
  check_saliency_matches(fisher, model, "test");
  // fisher_ij ∝ (|g_ij w_ij| / |w_ij|)^2 = g_ij^2: the ratio is one constant per layer.
  // act_ij / |w_ij| = rms(x_j) * const: equal along a column.
  int li = 0;
  for (auto& [name, slot] : model.block(1).linears()) {
    const std::string m = "model.layers.1." + name;
    const Tensor wt = (*slot)->effective_weight();
    const Tensor &f = fisher.at(m), &g = gw.at(m), &a = act.at(m);
    double ratio0 = 0;
    const int64_t in = wt.size(1);
    for (int64_t i = 0; i < wt.numel(); ++i) {
      const double wi = std::fabs(wt.item(i));
      if (wi < 1e-3 || f.item(i) < 1e-6) continue;
      const double ratio = std::pow(g.item(i) / wi, 2) / f.item(i);
      if (ratio0 == 0) ratio0 = ratio;
      ASSERT_NEAR(ratio, ratio0, 1e-3 * ratio0) << m << " element " << i;
      const int64_t col = i % in;
      ASSERT_NEAR(a.item(i) / wi, a.item(col) / std::fabs(wt.item(col)), 1e-3 * a.item(i) / wi) << m << " element " << i;
    }
    ++li;
  }
  EXPECT_EQ(li, 7);
}

TEST(Saliency, FileRoundTripAndMismatchErrors) {
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 4);
  SaliencyOptions o;
  o.batch = 2;
  SaliencyMap s = compute_saliency(c, w, tiny_tokens(4, 16, c.vocab_size), o);
  auto dir = test::temp_dir("saliency");
  const std::string path = (dir / "sal.safetensors").string();
  save_saliency(path, s);
  SaliencyMap back = load_saliency(path);
  EXPECT_EQ(back.kind, SaliencyKind::Fisher);
  EXPECT_EQ(back.nsamples, 4);
  EXPECT_EQ(back.seqlen, 16);
  ASSERT_EQ(back.scores.size(), s.scores.size());
  for (const auto& [name, t] : s.scores) EXPECT_EQ(max_abs_diff(t, back.at(name)), 0.0) << name;
  // Deterministic.
  SaliencyMap again = compute_saliency(c, w, tiny_tokens(4, 16, c.vocab_size), o);
  for (const auto& [name, t] : s.scores) EXPECT_EQ(max_abs_diff(t, again.at(name)), 0.0) << name;
  // Another model shape, another q/k layout, a missing module, a non-saliency file.
  LlamaConfig c2 = c;
  c2.hidden_dim = 64;
  EXPECT_THROW(check_saliency_matches(s, LlamaModel(c2, random_weights(c2, 1)), path), Error);
  LlamaConfig c3 = c;
  c3.rope_style = RopeStyle::Half;
  EXPECT_THROW(check_saliency_matches(s, LlamaModel(c3, w), path), Error);
  SaliencyMap partial = s;
  partial.scores.erase(partial.scores.begin());
  EXPECT_THROW(check_saliency_matches(partial, LlamaModel(c, w), path), Error);
  EXPECT_THROW(partial.at(s.scores.begin()->first), Error);
  save_safetensors((dir / "other.safetensors").string(), {{"x", Tensor::zeros({2, 2})}});
  EXPECT_THROW(load_saliency((dir / "other.safetensors").string()), Error);
  EXPECT_THROW(parse_saliency_kind("hessian"), Error);
}

TEST(Saliency, RegularizerGradient) {
  const Tensor w = Tensor::randn({5, 7}, 1, 1.0, DType::F64), s = Tensor::uniform({5, 7}, 2, 0.0, 2.0, DType::F64);
  test::grad_check([&](const std::vector<Var>& v) { return saliency_regularizer(v[0], w, s); },
                   {Tensor::randn({5, 7}, 3, 1.0, DType::F64)});
  // Value: mean of s (w_hat - w)^2.
  Tensor wh = Tensor::randn({5, 7}, 3, 1.0, DType::F64);
  double ref = 0;
  for (int64_t i = 0; i < w.numel(); ++i) ref += s.item(i) * std::pow(wh.item(i) - w.item(i), 2);
  EXPECT_NEAR(saliency_regularizer(Var(wh), w, s).value().item(), ref / 35.0, 1e-12);
}

// SAPR vs ApiQ with the same (quick) settings on stories260K at int2g64. The regularizer must do
// what it is for: lower the saliency-weighted weight error sum S (W - Ŵ)^2. Perplexity: see the
// printed numbers and the note below.
TEST(Saliency, SaprOnStories260K) {
  LOWBIT_REQUIRE_SHARED(model_path, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(tokens_path, "models/stories260K/sample-tokens.i32");
  auto all = test::read_i32_file(tokens_path);
  std::vector<int32_t> calib_stream(all.begin(), all.begin() + 32 * 257), eval_stream(all.begin() + 32 * 257, all.end());
  Checkpoint ck = load_llama2c(model_path);
  const QuantFormat& f = parse_quant_format("int2g64");
  Tensor calib = sample_calibration(calib_stream, 32, 256, 0);
  SaliencyMap sal = compute_saliency(ck.config, ck.weights, calib, SaliencyOptions{});
  ApiqOptions o;
  o.layer.rank = 1;
  o.layer.lora_alpha = 1;
  o.epochs = 4;
  o.batch = 4;
  o.lora_lr = 2e-3;
  o.clip_lr = 1e-2;
  ApiqOptions so = o;
  so.saliency = &sal;
  so.lambda = 10;
  auto run = [&](const ApiqOptions& opt, double* weighted_err) {
    LlamaModel m(ck.config, ck.weights);
    ApiqMethod method(f, opt);
    PipelineOptions po;
    po.progress = false;
    run_blockwise(m, calib, method, f, po);
    PerplexityOptions pp;
    pp.ctx = 257;
    pp.batch = 8;
    pp.progress = false;
    LlamaModel fp(ck.config, ck.weights);
    *weighted_err = 0;
    for (int i = 0; i < m.n_layers(); ++i) {
      auto fl = fp.block(i).linears();
      auto ql = m.block(i).linears();
      for (size_t k = 0; k < ql.size(); ++k) {
        const Tensor wq = (*ql[k].second)->effective_weight(), w = (*fl[k].second)->effective_weight();
        const Tensor& s = sal.at("model.layers." + std::to_string(i) + "." + ql[k].first);
        for (int64_t j = 0; j < w.numel(); ++j) *weighted_err += s.item(j) * std::pow(w.item(j) - wq.item(j), 2);
      }
    }
    return evaluate_perplexity(m, eval_stream, pp).ppl;
  };
  double e_apiq = 0, e_sapr = 0;
  const double p_apiq = run(o, &e_apiq), p_sapr = run(so, &e_sapr);
  std::printf("int2g64, rank 1, 4 epochs: ppl apiq %.3f sapr(lambda 10) %.3f; saliency-weighted weight error %.4f %.4f\n",
              p_apiq, p_sapr, e_apiq, e_sapr);
  EXPECT_LT(e_sapr, e_apiq);
  // Perplexity: on this model SAPR lands within a few percent of ApiQ either way (measured with
  // these settings: see the printed line; bench/ptq_table.sh runs the full 20-epoch comparison).
  // We do not claim SAPR <= ApiQ here; we bound how much worse it may be.
  EXPECT_LT(p_sapr, p_apiq * 1.05);
}
