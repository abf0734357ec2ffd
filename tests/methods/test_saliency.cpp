// Saliency maps (Fisher, |g w|, |x| |w|), their file format, the saliency regularizer, and SAPR
// (ApiQ + saliency-aware regularization, arXiv 2504.13932) against ApiQ on stories260K.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>

#include "common/stories_fixture.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/eval/perplexity.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/methods/apiq.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/saliency.h"
#include "lowbit/model/weights.h"
#include "lowbit/ops/device_init.h"
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
  {  // A caller under NoGradGuard (an inference scope) gets the same saliency: the pass enables grad.
    NoGradGuard ng;
    o.kind = SaliencyKind::Fisher;
    const SaliencyMap again = compute_saliency(c, w, tokens, o);
    for (const auto& [name, s] : fisher.scores) EXPECT_EQ(max_abs_diff(s, again.at(name)), 0.0) << name;
  }
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

// --saliency-norm none: the raw Fisher is the SUM over sequences of the squared per-sequence
// gradients of the mean token cross-entropy (the reference's SqueezeLLM-style gradients), computed
// here directly; the layer-normalised map is the raw one divided by its per-layer mean.
TEST(Saliency, RawFisherIsSumOfSquaredPerSequenceGradients) {
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 5);
  const int64_t N = 3, L = 16;
  const Tensor tokens = tiny_tokens(N, L, c.vocab_size);
  SaliencyOptions o;
  o.norm = SaliencyNorm::None;
  const SaliencyMap raw = compute_saliency(c, w, tokens, o);
  EXPECT_EQ(raw.norm, SaliencyNorm::None);
  o.norm = SaliencyNorm::Layer;
  const SaliencyMap layer = compute_saliency(c, w, tokens, o);
  EXPECT_EQ(layer.norm, SaliencyNorm::Layer);

  LlamaModel model(c, w, true);
  std::map<std::string, std::vector<double>> ref;
  for (int64_t n = 0; n < N; ++n) {
    const Tensor seq = tokens.slice(0, n, n + 1).contiguous();
    std::vector<int32_t> tg;
    for (int64_t t = 0; t < L; ++t) tg.push_back(t + 1 < L ? seq.data<int32_t>()[t + 1] : -1);
    backward(cross_entropy(model.forward(seq), Tensor::from_vector(tg, {L})));
    for (int i = 0; i < model.n_layers(); ++i)
      for (auto& [name, slot] : model.block(i).linears()) {
        const Tensor g = dynamic_cast<DenseLinear*>(slot->get())->weight_var().grad().to(DType::F32).contiguous();
        auto& r = ref["model.layers." + std::to_string(i) + "." + name];
        r.resize(size_t(g.numel()), 0.0);
        for (int64_t k = 0; k < g.numel(); ++k) r[size_t(k)] += std::pow(double(g.data<float>()[k]), 2);
      }
    for (auto& p : model.parameters()) p.zero_grad();
  }
  ASSERT_EQ(ref.size(), raw.scores.size());
  const SaliencyMap renorm = normalise_saliency_per_layer(raw);
  EXPECT_EQ(renorm.norm, SaliencyNorm::Layer);
  for (const auto& [name, r] : ref) {
    const Tensor& s = raw.at(name);
    ASSERT_EQ(s.numel(), int64_t(r.size())) << name;
    double max_ref = 0, max_err = 0;
    for (size_t k = 0; k < r.size(); ++k) {
      max_ref = std::max(max_ref, r[k]);
      max_err = std::max(max_err, std::fabs(s.item(int64_t(k)) - r[k]));
    }
    ASSERT_GT(max_ref, 0.0) << name;
    EXPECT_LT(max_err, 1e-5 * max_ref) << name;
    // layer = raw / mean(raw), per layer.
    const double m = mean_of(s);
    for (int64_t k = 0; k < s.numel(); ++k) {
      ASSERT_NEAR(layer.at(name).item(k) * m, s.item(k), 1e-4 * max_ref) << name << " " << k;
      ASSERT_NEAR(renorm.at(name).item(k), layer.at(name).item(k), 1e-4 * (1 + layer.at(name).item(k))) << name;
    }
  }
  // grad-weight with norm none: sum over sequences of |g w| (one batch: |g w| of that batch).
  o.norm = SaliencyNorm::None;
  o.kind = SaliencyKind::GradWeight;
  o.batch = N;
  const SaliencyMap gw = compute_saliency(c, w, tokens, o);
  o.kind = SaliencyKind::Fisher;
  const SaliencyMap f1 = compute_saliency(c, w, tokens, o);  // one batch: g^2
  for (int i = 0; i < model.n_layers(); ++i)
    for (auto& [name, slot] : model.block(i).linears()) {
      const std::string m = "model.layers." + std::to_string(i) + "." + name;
      const Tensor wt = (*slot)->effective_weight();
      for (int64_t k = 0; k < wt.numel(); ++k)
        ASSERT_NEAR(std::pow(gw.at(m).item(k), 2), f1.at(m).item(k) * std::pow(wt.item(k), 2),
                    1e-4 * (std::pow(gw.at(m).item(k), 2) + 1e-12)) << m << " " << k;
    }
}

// The Fisher pass on the GPU sums g^2 on the device (f32) and folds it into the f64 accumulator
// once; it must give the CPU's scores (both raw and layer-normalised) to f32 rounding.
TEST(Saliency, FisherOnTheGpuMatchesTheCpu) {
  if (!init_cuda()) GTEST_SKIP() << "no CUDA device (or a CPU-only build)";
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 11);
  const Tensor tokens = tiny_tokens(6, 16, c.vocab_size);
  for (SaliencyNorm norm : {SaliencyNorm::None, SaliencyNorm::Layer}) {
    SaliencyOptions o;
    o.norm = norm;
    o.batch = 2;  // three batches: the device sum really accumulates
    const SaliencyMap cpu = compute_saliency(c, w, tokens, o);
    const SaliencyMap gpu = compute_saliency(c, weights_to(w, Device::CUDA), tokens, o);
    ASSERT_EQ(cpu.scores.size(), gpu.scores.size());
    for (const auto& [name, sc] : cpu.scores) {
      const Tensor sg = gpu.at(name).to(Device::CPU);
      ASSERT_EQ(sg.numel(), sc.numel()) << name;
      double max_ref = 0, max_err = 0;
      for (int64_t k = 0; k < sc.numel(); ++k) {
        max_ref = std::max(max_ref, std::fabs(sc.item(k)));
        max_err = std::max(max_err, std::fabs(sg.item(k) - sc.item(k)));
      }
      ASSERT_GT(max_ref, 0.0) << name;
      EXPECT_LT(max_err, 1e-3 * max_ref) << name << " (norm " << saliency_norm_name(norm) << ")";
    }
  }
}

TEST(Saliency, SumReductionIsNumelTimesMean) {
  const Tensor w = Tensor::randn({5, 7}, 1, 1.0, DType::F64), s = Tensor::uniform({5, 7}, 2, 0.0, 2.0, DType::F64);
  const Tensor wh = Tensor::randn({5, 7}, 3, 1.0, DType::F64);
  const double mean = saliency_regularizer(Var(wh), w, s).value().item();
  const double sum = saliency_regularizer(Var(wh), w, s, SaprReduction::Sum).value().item();
  EXPECT_NEAR(sum, 35.0 * mean, 1e-12 * std::fabs(sum));
  double ref = 0;
  for (int64_t i = 0; i < w.numel(); ++i) ref += s.item(i) * std::pow(wh.item(i) - w.item(i), 2);
  EXPECT_NEAR(sum, ref, 1e-12 * ref);
  test::grad_check([&](const std::vector<Var>& v) { return saliency_regularizer(v[0], w, s, SaprReduction::Sum); },
                   {Tensor::randn({5, 7}, 4, 1.0, DType::F64)});
  EXPECT_EQ(parse_sapr_reduction("sum"), SaprReduction::Sum);
  EXPECT_EQ(std::string(sapr_reduction_name(SaprReduction::Mean)), "mean");
  EXPECT_THROW(parse_sapr_reduction("avg"), Error);
  EXPECT_THROW(parse_saliency_norm("max"), Error);
}

// ApiqOptions::reduction reaches the block-wise training: sum with S equals mean with S * numel
// (per layer), and the regularizer logged in a weight-preservation epoch agrees.
TEST(Saliency, ApiqSumReductionEqualsMeanWithScaledSaliency) {
  LlamaConfig c = tiny_config();
  c.hidden_dim = 64;
  const LlamaWeights w = random_weights(c, 6);
  const Tensor tokens = tiny_tokens(4, 16, c.vocab_size);
  SaliencyOptions so;
  so.norm = SaliencyNorm::None;
  SaliencyMap raw = compute_saliency(c, w, tokens, so);
  SaliencyMap scaled = raw;
  for (auto& [name, t] : scaled.scores) {
    Tensor u = t.clone();
    for (int64_t k = 0; k < u.numel(); ++k) u.data<float>()[k] *= float(u.numel());
    t = u;
  }
  const QuantFormat& f = parse_quant_format("int2g32");
  ApiqOptions o;
  o.layer.rank = 2;
  o.layer.lora_alpha = 2;
  o.epochs = 3;
  o.weight_epochs = 2;
  o.output_epochs = 1;
  o.batch = 2;
  o.lambda = 1e3;
  o.reg_with_lora = false;
  ApiqOptions a = o, b = o;
  a.saliency = &raw;
  a.reduction = SaprReduction::Sum;
  b.saliency = &scaled;
  b.reduction = SaprReduction::Mean;
  ApiqMethod ma(f, a), mb(f, b);
  EXPECT_NE(ma.options_key(), mb.options_key());  // the reduction is part of the resume key
  ApiqOptions a2 = a;
  a2.reduction = SaprReduction::Mean;
  EXPECT_NE(ApiqMethod(f, a2).options_key(), ma.options_key());
  PipelineOptions po;
  po.progress = false;
  LlamaModel qa(c, w), qb(c, w);
  run_blockwise(qa, tokens, ma, f, po);
  run_blockwise(qb, tokens, mb, f, po);
  ASSERT_EQ(ma.log().size(), mb.log().size());
  for (size_t i = 0; i < ma.log().size(); ++i) {
    EXPECT_NEAR(ma.log()[i].reg, mb.log()[i].reg, 1e-4 * (std::fabs(mb.log()[i].reg) + 1e-12)) << i;
    EXPECT_NEAR(ma.log()[i].loss, mb.log()[i].loss, 1e-4 * (std::fabs(mb.log()[i].loss) + 1e-12)) << i;
    if (ma.log()[i].epoch < 2) EXPECT_GT(ma.log()[i].reg, 0.0) << i;
    else EXPECT_EQ(ma.log()[i].reg, 0.0) << i;  // output preservation: ApiQ loss only
  }
  for (int i = 0; i < qa.n_layers(); ++i) {
    auto la = qa.block(i).linears(), lb = qb.block(i).linears();
    for (size_t k = 0; k < la.size(); ++k)
      EXPECT_LT(max_abs_diff((*la[k].second)->effective_weight(), (*lb[k].second)->effective_weight()), 1e-3)
          << i << " " << la[k].first;
  }
}

TEST(Saliency, FileKeepsNormalisationAndReadsOldFiles) {
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 7);
  SaliencyOptions o;
  o.norm = SaliencyNorm::None;
  SaliencyMap s = compute_saliency(c, w, tiny_tokens(2, 16, c.vocab_size), o);
  auto dir = test::temp_dir("saliency-norm");
  const std::string path = (dir / "raw.safetensors").string();
  save_saliency(path, s);
  EXPECT_EQ(SafetensorsFile::open(path).metadata().at("normalization"), "none");
  SaliencyMap back = load_saliency(path);
  EXPECT_EQ(back.norm, SaliencyNorm::None);
  for (const auto& [name, t] : s.scores) EXPECT_EQ(max_abs_diff(t, back.at(name)), 0.0) << name;
  // Old files (no "normalization" key) are layer-normalised; a bad value names the file.
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& [m, t] : s.scores) ts.emplace_back(m, t);
  std::map<std::string, std::string> md{{"format", "lowbit-saliency"}, {"version", "1"}, {"kind", "fisher"},
                                        {"rope_style", "interleaved"}, {"nsamples", "2"}, {"seqlen", "16"}};
  const std::string old_path = (dir / "old.safetensors").string(), bad_path = (dir / "bad.safetensors").string();
  save_safetensors(old_path, ts, md);
  EXPECT_EQ(load_saliency(old_path).norm, SaliencyNorm::Layer);
  md["normalization"] = "per-tensor";
  save_safetensors(bad_path, ts, md);
  try {
    load_saliency(bad_path);
    ADD_FAILURE() << "malformed normalization accepted";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(bad_path), std::string::npos) << msg;
    EXPECT_NE(msg.find("per-tensor"), std::string::npos) << msg;
  }
}

// Per-layer means survive normalisation and the file; layer_weight is their ratio to the mean;
// the saliency source is recorded.
TEST(Saliency, LayerMeansAndSourceRoundTrip) {
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 7);
  SaliencyOptions o;
  o.norm = SaliencyNorm::None;
  const SaliencyMap raw = compute_saliency(c, w, tiny_tokens(2, 16, c.vocab_size), o);
  EXPECT_TRUE(raw.layer_mean.empty());
  EXPECT_THROW(raw.layer_weight("model.layers.0.self_attn.q_proj"), Error);
  const SaliencyMap norm = normalise_saliency_per_layer(raw);
  ASSERT_EQ(norm.layer_mean.size(), raw.scores.size());
  double total = 0;
  for (const auto& [m, t] : raw.scores) {
    EXPECT_NEAR(norm.layer_mean.at(m), mean_of(t), 1e-9 * mean_of(t)) << m;
    total += mean_of(t);
  }
  const std::string q = "model.layers.1.mlp.down_proj";
  EXPECT_NEAR(norm.layer_weight(q), mean_of(raw.at(q)) / (total / double(raw.scores.size())), 1e-9);
  // Computed layer-normalised directly: the same means (up to the number of batches: ratios equal).
  SaliencyOptions lo;
  const SaliencyMap direct = compute_saliency(c, w, tiny_tokens(2, 16, c.vocab_size), lo);
  EXPECT_NEAR(direct.layer_weight(q), norm.layer_weight(q), 1e-6);
  // Uniform: ones everywhere, every layer weight 1, no pass over the data.
  SaliencyOptions uo;
  uo.kind = SaliencyKind::Uniform;
  const SaliencyMap uni = compute_saliency(c, w, tiny_tokens(2, 16, c.vocab_size), uo);
  ASSERT_EQ(uni.scores.size(), raw.scores.size());
  for (const auto& [m, t] : uni.scores) {
    EXPECT_EQ(t.shape(), raw.at(m).shape()) << m;
    EXPECT_EQ(mean_of(t), 1.0) << m;
    EXPECT_EQ(uni.layer_weight(m), 1.0) << m;
  }
  SaliencyMap tagged = norm;
  tagged.source = "rtn:int2g64";
  auto dir = test::temp_dir("saliency-means");
  const std::string path = (dir / "s.safetensors").string();
  save_saliency(path, tagged);
  const SaliencyMap back = load_saliency(path);
  EXPECT_EQ(back.source, "rtn:int2g64");
  EXPECT_EQ(back.layer_mean, norm.layer_mean);
}

// The SAPR variants change training as specified: annealing lowers the regularizer of later mixed
// epochs (a lambda-0 tail equals ApiQ's loss there), layer weighting scales each layer's term.
TEST(Saliency, SaprVariantsChangeTheRegularizer) {
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 11);
  const Tensor calib = tiny_tokens(4, 16, c.vocab_size);
  const SaliencyMap sal = compute_saliency(c, w, calib, SaliencyOptions{});
  const QuantFormat& f = parse_quant_format("int2g32");
  auto run = [&](bool anneal, bool layer_w) {
    ApiqOptions o;
    o.layer.rank = 2;
    o.layer.lora_alpha = 2;
    o.epochs = 4;
    o.saliency = &sal;
    o.lambda = 5;
    o.anneal_lambda = anneal;
    o.layer_weighted = layer_w;
    LlamaModel m(c, w);
    ApiqMethod method(f, o);
    PipelineOptions po;
    po.progress = false;
    run_blockwise(m, calib, method, f, po);
    return method.log();
  };
  const auto plain = run(false, false), annealed = run(true, false), weighted = run(false, true);
  ASSERT_EQ(plain.size(), annealed.size());
  // Epoch 0 is identical (factor 1); later epochs use lambda * (4 - ep) / 4.
  EXPECT_EQ(plain[0].reg, annealed[0].reg);
  EXPECT_EQ(plain[0].loss, annealed[0].loss);
  EXPECT_LT(annealed[3].reg, plain[3].reg);
  // Layer weighting changes the regularizer from the first step on (the weights are not all 1).
  EXPECT_NE(weighted[0].reg, plain[0].reg);
}

// SAPR vs ApiQ with the same (quick) settings on stories260K at int2g64. The regularizer must do
// what it is for: lower the saliency-weighted weight error sum S (W - Ŵ)^2. Perplexity: see the
// printed numbers and the note below.
namespace {
void sapr_on_stories260k(int64_t windows, int64_t len) {
  LOWBIT_REQUIRE_SHARED(model_path, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(tokens_path, "models/stories260K/sample-tokens.i32");
  auto all = test::read_i32_file(tokens_path);
  std::vector<int32_t> calib_stream(all.begin(), all.begin() + 32 * 257), eval_stream(all.begin() + 32 * 257, all.end());
  Checkpoint ck = load_llama2c(model_path);
  const QuantFormat& f = parse_quant_format("int2g64");
  Tensor calib = sample_calibration(calib_stream, windows, len, 0);
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
  std::printf("calibration %lld x %lld; ", (long long)windows, (long long)len);
  std::printf("int2g64, rank 1, 4 epochs: ppl apiq %.3f sapr(lambda 10) %.3f; saliency-weighted weight error %.4f %.4f\n",
              p_apiq, p_sapr, e_apiq, e_sapr);
  EXPECT_LT(e_sapr, e_apiq);
  // Perplexity: on this model SAPR lands within a few percent of ApiQ either way (measured with
  // these settings: see the printed line; bench/ptq_table.sh runs the full 20-epoch comparison).
  // We do not claim SAPR <= ApiQ here; we bound how much worse it may be.
  EXPECT_LT(p_sapr, p_apiq * 1.05);
}
}  // namespace

// The suite's version: 8 calibration windows of 128 tokens.
TEST(Saliency, SaprOnStories260K) { sapr_on_stories260k(8, 128); }

// The full check (32 windows of 256 tokens): LOWBIT_LONG_TESTS=1.
TEST(Saliency, SaprOnStories260KFull) {
  LOWBIT_LONG_TEST();
  sapr_on_stories260k(32, 256);
}
