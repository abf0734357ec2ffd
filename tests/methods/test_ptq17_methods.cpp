// The post-training methods of issue 17 (norm-tweak, ...) and the method registry: each method's
// core step on a small worked example, and a killed run resuming to the same model.
#include <gtest/gtest.h>

#include <cmath>

#include "common/small_model.h"
#include "common/stories_fixture.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/methods/cle.h"
#include "lowbit/methods/comq.h"
#include "lowbit/methods/norm_tweak.h"
#include "lowbit/core/format_traits.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/methods/registry.h"
#include "lowbit/methods/rsq.h"
#include "lowbit/model/weights.h"

using namespace lowbit;

namespace {

Tensor mat(int64_t r, int64_t c, std::initializer_list<float> v) {
  Tensor t = Tensor::empty({r, c});
  int64_t i = 0;
  for (float x : v) t.data<float>()[i++] = x;
  return t;
}


}  // namespace

// ---- registry -------------------------------------------------------------------------------------

TEST(MethodRegistry, ListsEveryMethodAndRefusesUnknownNames) {
  const std::string names = method_names();
  for (const char* m : {"rtn", "gptq", "awq", "apiq", "apiq-layer", "sapr", "norm-tweak", "rsq", "comq", "cle", "ptqtp", "ptq161", "quip"})
    EXPECT_NE(names.find(m), std::string::npos) << m;
  EXPECT_FALSE(find_method("rtn").needs_calibration);
  EXPECT_TRUE(find_method("gptq").needs_calibration);
  EXPECT_TRUE(find_method("sapr").trains_adapters);
  try {
    find_method("bogus");
    ADD_FAILURE() << "no error for an unknown method";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown --method 'bogus' (registered: rtn, gptq"), std::string::npos) << e.what();
  }
  EXPECT_THROW(register_method({"rtn", "again", false, false, [](const MethodConfig&) { return std::unique_ptr<BlockMethod>(); }}), Error);
  const QuantFormat& f = parse_quant_format("int4g128");
  MethodConfig c;
  c.format = &f;
  for (const auto& m : method_registry()) {
    if (m.name == "sapr") continue;  // needs a saliency map
    MethodConfig mc = c;
    if (!m.default_format.empty()) mc.format = &parse_quant_format(m.default_format);  // ptqtp: tp2g128 only
    auto method = make_method(m.name, mc);
    ASSERT_TRUE(method) << m.name;
  }
  EXPECT_EQ(make_method("apiq-layer", c)->name(), "apiq-layer");
  c.base = "bogus";
  EXPECT_THROW(make_method("norm-tweak", c), Error);
}

using Ptq17Stories = test::StoriesPtq;

// ---- norm-tweak -----------------------------------------------------------------------------------

// L = 1/C sum_c (mu_q - mu_f)^2 + (var_q - var_f)^2, by hand.
TEST(NormTweak, ChannelDistributionLossWorkedExample) {
  // channel 0: y {1, 3} (mean 2, var 1), target {0, 2} (mean 1, var 1): 1 + 0
  // channel 1: y {2, 6} (mean 4, var 4), target {0, 4} (mean 2, var 4): 4 + 0
  EXPECT_NEAR(channel_distribution_loss_value(mat(2, 2, {1, 2, 3, 6}), mat(2, 2, {0, 0, 2, 4})), 2.5, 1e-6);
  // One channel y {0, 2} (mean 1, var 1) against zeros: L = 1 + 1; dL/dy_i = (mu - mu_f) + 2 (var - var_f)(y_i - mu)
  Var y(mat(2, 1, {0, 2}), true);
  Var l = channel_distribution_loss(y, mat(2, 1, {0, 0}));
  EXPECT_NEAR(l.value().item(), 2.0, 1e-6);
  backward(l);
  EXPECT_NEAR(y.grad().item(0), -1.0, 1e-5);
  EXPECT_NEAR(y.grad().item(1), 3.0, 1e-5);
}

// After RTN at int3, tweaking the norms lowers each kept block's distribution loss, and some block keeps it.
TEST_F(Ptq17Stories, NormTweakLowersTheDistributionLoss) {
  calib_windows = 8;
  calib_len = 128;
  Checkpoint ck = load_llama2c(model_path);
  const QuantFormat& f = parse_quant_format("int3g32");
  LlamaModel m(ck.config, ck.weights);
  NormTweakOptions o;
  o.epochs = 2;
  NormTweakMethod nt(std::make_unique<RtnMethod>(f), o);
  quantize(m, nt, f);
  ASSERT_EQ(nt.log().size(), size_t(ck.config.n_layers));
  int kept = 0;
  for (const auto& l : nt.log()) {
    std::printf("block %d: L %.4g -> %.4g%s\n", l.layer, l.loss_before, l.loss_after, l.kept ? "" : " (reverted)");
    if (l.kept) {
      EXPECT_LT(l.loss_after, l.loss_before);
    }
    kept += l.kept;
  }
  EXPECT_GT(kept, 0);
  // The model's norms differ from the original where a tweak was kept.
  LlamaWeights w = m.weights();
  double diff = 0;
  for (int i = 0; i < ck.config.n_layers; ++i) diff += max_abs_diff(w.layers[i].attn_norm, ck.weights.layers[i].attn_norm);
  EXPECT_GT(diff, 0.0);
}

TEST_F(Ptq17Stories, NormTweakResumesToTheSameModel) {
  calib_windows = 4;
  calib_len = 64;
  expect_resume_identical(*this, [](const QuantFormat& f) {
    return std::make_unique<NormTweakMethod>(std::make_unique<GptqMethod>(f, GptqOptions{}), NormTweakOptions{});
  }, "int3g32");
}

// ---- rsq ------------------------------------------------------------------------------------------

// With q = 0 every score is 0: query i attends uniformly to keys 0..i, so key j receives
// sum_{i >= j} 1 / (i + 1) from each head: 11/6, 5/6, 1/3 for T = 3, times the 4 heads.
TEST(Rsq, AttentionConcentrationWorkedExample) {
  LlamaConfig c = test::small_config(RopeStyle::Interleaved);
  LlamaWeights w = random_weights(c, 1, 0.1);
  w.layers[0].wq = Tensor::zeros(w.layers[0].wq.shape());
  LlamaModel m(c, w);
  const int64_t T = 3;
  Tensor x = Tensor::empty({2 * T, c.dim});
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = float(std::sin(0.37 * double(i)));
  Tensor a = attention_concentration(m, 0, x, 2, T);
  const double want[] = {11.0 / 6, 5.0 / 6, 1.0 / 3};
  for (int64_t wdw = 0; wdw < 2; ++wdw)
    for (int64_t t = 0; t < T; ++t) EXPECT_NEAR(a.item(wdw * T + t), 4 * want[t], 1e-5) << wdw << " " << t;
  // With real queries each window's total is still heads x tokens (every query row sums to 1).
  LlamaModel m2(c, random_weights(c, 2, 0.5));
  Tensor a2 = attention_concentration(m2, 1, x, 2, T);
  for (int64_t wdw = 0; wdw < 2; ++wdw) {
    double total = 0;
    for (int64_t t = 0; t < T; ++t) total += a2.item(wdw * T + t);
    EXPECT_NEAR(total, 4.0 * T, 1e-4);
    EXPECT_GE(a2.item(wdw * T), 4.0 - 1e-5);  // token 0 takes all of query 0's attention
  }
}

TEST(Rsq, MinMaxTokenWeightsPerWindow) {
  Tensor a = mat(1, 6, {2, 4, 6, 5, 5, 5}).view({6});
  Tensor r = minmax_token_weights(a, 3, 1.0, 3.0);
  const float want[] = {1, 2, 3, 1, 1, 1};  // the second window is flat: every token gets the minimum
  for (int i = 0; i < 6; ++i) EXPECT_FLOAT_EQ(r.data<float>()[i], want[i]) << i;
}

// Equal token weights (min = max = 1) leave the Hessian, and so GPTQ's result, unchanged; RSQ's
// own weights change it.
TEST_F(Ptq17Stories, RsqWithFlatWeightsIsGptq) {
  calib_windows = 4;
  calib_len = 64;
  Checkpoint ck = load_llama2c(model_path);
  const QuantFormat& f = parse_quant_format("int3g32");
  LlamaModel g(ck.config, ck.weights), flat(ck.config, ck.weights), rsq(ck.config, ck.weights);
  GptqMethod gm(f, GptqOptions{});
  RsqMethod fm(f, GptqOptions{}, RsqOptions{1.0, 1.0});
  RsqMethod rm(f, GptqOptions{}, RsqOptions{});
  quantize(g, gm, f);
  quantize(flat, fm, f);
  quantize(rsq, rm, f);
  LlamaWeights a = g.weights(), b = flat.weights(), d = rsq.weights();
  double diff = 0;
  for (int i = 0; i < ck.config.n_layers; ++i) {
    EXPECT_LE(max_abs_diff(a.layers[i].wq, b.layers[i].wq), 1e-6) << i;
    EXPECT_LE(max_abs_diff(a.layers[i].w_down, b.layers[i].w_down), 1e-6) << i;
    diff += max_abs_diff(a.layers[i].w_down, d.layers[i].w_down);
  }
  EXPECT_GT(diff, 0.0);
}

TEST_F(Ptq17Stories, RsqResumesToTheSameModel) {
  calib_windows = 4;
  calib_len = 64;
  expect_resume_identical(*this, [](const QuantFormat& f) {
    return std::make_unique<RsqMethod>(f, GptqOptions{}, RsqOptions{});
  }, "int3g32");
}

// ---- comq -----------------------------------------------------------------------------------------

// w = [0, 3, 1.4] at int2 per channel: RTN grid {0, 1, 2, 3} (scale 1, zero 0), q = [0, 3, 1].
// With H coupling coordinates 1 and 2 (0.9), no single coordinate moves (targets 3.36 -> 3 clamped,
// 1.4 -> 1), and the scale update is s = 1 + v.(EH) / v'Hv = 1 + 1.48 / 15.4 (v = [0, 3, 1],
// EH = [0, 0.36, 0.4]), stored as f16: the loss drops from 0.16.
TEST(Comq, CoordinateAndScaleStepWorkedExample) {
  const QuantFormat& f = parse_quant_format("int2pc");
  Tensor w = mat(1, 3, {0.0f, 3.0f, 1.4f});
  Tensor h = mat(3, 3, {1, 0, 0, 0, 1, 0.9f, 0, 0.9f, 1});
  ComqOptions o;
  o.sweeps = 1;
  ComqResult r = comq_quantize(w, h, f, o);
  EXPECT_NEAR(r.loss_rtn, 0.16, 1e-6);
  const double s = fmt_f16_to_f32(fmt_f32_to_f16(float(1.0 + 1.48 / 15.4)));
  Tensor q = r.q.dequantize();
  EXPECT_NEAR(q.item(0), 0.0, 1e-6);
  EXPECT_NEAR(q.item(1), 3 * s, 1e-5);
  EXPECT_NEAR(q.item(2), s, 1e-5);
  const double e1 = 3 - 3 * s, e2 = 1.4 - s;
  EXPECT_NEAR(r.loss, e1 * e1 + e2 * e2 + 2 * 0.9 * e1 * e2, 1e-5);
  EXPECT_LT(r.loss, r.loss_rtn);
  // Without scale updates nothing moves: RTN's codes are already coordinate-wise optimal here.
  o.update_scales = false;
  EXPECT_NEAR(comq_quantize(w, h, f, o).loss, 0.16, 1e-6);
}

// On correlated random layers COMQ's loss is below RTN's at 2, 3 and 4 bits (asymmetric and symmetric).
TEST(Comq, NeverWorseThanRtnOnRandomLayers) {
  for (const char* fmt : {"int3g32", "int2g64", "int4g32s"}) {
    const QuantFormat& f = parse_quant_format(fmt);
    Tensor w = Tensor::empty({8, 64}), x = Tensor::empty({40, 64});
    for (int64_t i = 0; i < w.numel(); ++i) w.data<float>()[i] = float(std::sin(1.3 * double(i)) * 0.5);
    for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = float(std::cos(0.71 * double(i * i % 97)) + 0.3 * std::sin(double(i)));
    Tensor h = Tensor::zeros({64, 64});
    for (int64_t a = 0; a < 64; ++a)
      for (int64_t b = 0; b < 64; ++b) {
        double s = 0;
        for (int64_t n = 0; n < 40; ++n) s += double(x.data<float>()[n * 64 + a]) * double(x.data<float>()[n * 64 + b]);
        h.data<float>()[a * 64 + b] = float(s);
      }
    ComqResult r = comq_quantize(w, h, f);
    EXPECT_LT(r.loss, r.loss_rtn) << fmt;
    EXPECT_GT(r.loss, 0.0) << fmt;
  }
  EXPECT_THROW(comq_quantize(Tensor::zeros({2, 32}), Tensor::zeros({32, 32}), parse_quant_format("mxfp4")), Error);
  EXPECT_THROW(comq_quantize(Tensor::zeros({2, 32}), Tensor::zeros({16, 16}), parse_quant_format("int4g32")), Error);
}

TEST_F(Ptq17Stories, ComqBeatsRtnPerLayerAndResumes) {
  calib_windows = 4;
  calib_len = 64;
  Checkpoint ck = load_llama2c(model_path);
  const QuantFormat& f = parse_quant_format("int3g32");
  LlamaModel a(ck.config, ck.weights), b(ck.config, ck.weights);
  RtnMethod rtn(f);
  ComqMethod comq(f, ComqOptions{});
  PipelineReport r1 = quantize(a, rtn, f), r2 = quantize(b, comq, f);
  double e1 = 0, e2 = 0;
  for (size_t i = 0; i < r1.linears.size(); ++i) {
    e1 += r1.linears[i].rel_error;
    e2 += r2.linears[i].rel_error;
  }
  std::printf("mean rel. error: rtn %.4g comq %.4g\n", e1 / 35, e2 / 35);
  EXPECT_LT(e2, e1);
  expect_resume_identical(*this, [](const QuantFormat& fm) { return std::make_unique<ComqMethod>(fm, ComqOptions{}); },
                          "int3g32");
}

// ---- cle ------------------------------------------------------------------------------------------

TEST(Cle, ScalesWorkedExample) {
  // s = sqrt(r1 / r2): producer range 4 / consumer 1 -> 2 (both become 2); 1 / 4 -> 0.5; a zero range -> 1.
  const std::vector<double> s = cle_scales({4, 1, 0, 3}, {1, 4, 2, 0});
  ASSERT_EQ(s.size(), 4u);
  EXPECT_DOUBLE_EQ(s[0], 2.0);
  EXPECT_DOUBLE_EQ(s[1], 0.5);
  EXPECT_DOUBLE_EQ(s[2], 1.0);
  EXPECT_DOUBLE_EQ(s[3], 1.0);
  EXPECT_THROW(cle_scales({1}, {1, 2}), Error);
}

namespace {
LlamaConfig cle_config() {  // no grouped-query sharing (v -> o is equalized too), Qwen2-style q/k/v biases
  LlamaConfig c = test::small_config(RopeStyle::Interleaved);
  c.n_kv_heads = c.n_heads;
  c.attn_bias = true;
  return c;
}
Tensor block_input(const LlamaConfig& c, int64_t rows) {
  Tensor x = Tensor::empty({rows, c.dim});
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = float(std::sin(0.37 * double(i)) + 0.2);
  return x;
}
double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double d : v) m = std::max(m, std::fabs(d));
  return m;
}
}  // namespace

// Equalization keeps the block's function and equalizes each pair's ranges.
TEST(Cle, EqualizedBlockComputesTheSameFunction) {
  const LlamaConfig c = cle_config();
  LlamaWeights w = random_weights(c, 3, 0.2);
  for (auto& l : w.layers) {  // uneven channel ranges, so that the scales are far from 1
    for (int64_t i = 0; i < c.dim; ++i) l.attn_norm.data<float>()[i] = float(0.2 + 3.0 * std::fabs(std::sin(double(i))));
    for (int64_t o = 0; o < l.w_up.size(0); ++o)
      for (int64_t i = 0; i < l.w_up.size(1); ++i) l.w_up.data<float>()[o * l.w_up.size(1) + i] *= float(1 + o % 7);
  }
  LlamaModel ref(c, w), eq(c, w);
  const int rounds = cle_equalize_block(eq, 0, CleOptions{});
  EXPECT_GE(rounds, 1);
  const int64_t T = 8;
  const Tensor x = block_input(c, 2 * T);
  NoGradGuard ng;
  const Tensor y0 = ref.block_forward(0, Var(x), 2, T).value(), y1 = eq.block_forward(0, Var(x), 2, T).value();
  EXPECT_LT(max_abs_diff(y0, y1), 1e-4 * (1 + max_abs_diff(y0, Tensor::zeros(y0.shape()))));
  // up -> down: row range of up_i equals column range of down_i after convergence.
  LlamaWeights e = eq.weights();
  const Tensor& up = e.layers[0].w_up;
  const Tensor& down = e.layers[0].w_down;
  for (int64_t i = 0; i < up.size(0); ++i) {
    double ru = 0, rd = 0;
    for (int64_t k = 0; k < up.size(1); ++k) ru = std::max(ru, double(std::fabs(up.data<float>()[i * up.size(1) + k])));
    for (int64_t k = 0; k < down.size(0); ++k) rd = std::max(rd, double(std::fabs(down.data<float>()[k * down.size(1) + i])));
    EXPECT_NEAR(ru / rd, 1.0, 0.01) << "channel " << i;
  }
  // attn_norm -> q/k/v: |gamma_i| equals the joint column range.
  std::vector<double> dev;
  for (int64_t i = 0; i < c.dim; ++i) {
    double r = 0;
    for (const Tensor* t : {&e.layers[0].wq, &e.layers[0].wk, &e.layers[0].wv})
      for (int64_t o = 0; o < t->size(0); ++o) r = std::max(r, double(std::fabs(t->data<float>()[o * c.dim + i])));
    dev.push_back(std::fabs(e.layers[0].attn_norm.data<float>()[i]) / r - 1);
  }
  EXPECT_LT(max_abs(dev), 0.01);
}

// Bias correction: the quantized q_proj's mean output over the calibration inputs equals the
// equalized full-precision layer's (b' = b - (Q - W) E[x]).
TEST(Cle, BiasCorrectionRestoresTheMeanOutput) {
  const LlamaConfig c = cle_config();
  LlamaWeights w = random_weights(c, 4, 0.2);
  const int64_t N = 4, T = 8;
  Tensor tokens = Tensor::empty({N, T}, DType::I32);
  for (int64_t i = 0; i < N * T; ++i) tokens.data<int32_t>()[i] = int32_t((i * 7 + 3) % c.vocab_size);
  const QuantFormat& f = parse_quant_format("int2g32");
  auto q_mean = [&](const LlamaModel& m, const Tensor& h) {
    NoGradGuard ng;
    const Tensor y = m.block(0).wq->forward(Var(h)).value();
    std::vector<double> mu(size_t(y.size(1)), 0.0);
    for (int64_t r = 0; r < y.size(0); ++r)
      for (int64_t o = 0; o < y.size(1); ++o) mu[size_t(o)] += y.data<float>()[r * y.size(1) + o] / double(y.size(0));
    return mu;
  };
  LlamaModel fp(c, w);
  cle_equalize_block(fp, 0, CleOptions{});
  Tensor h;
  {
    NoGradGuard ng;
    h = rmsnorm(fp.embed(tokens), fp.block(0).attn_norm, c.norm_eps).value();
  }
  const std::vector<double> want = q_mean(fp, h);
  for (bool correct : {false, true}) {
    LlamaModel m(c, w);
    CleOptions o;
    o.bias_correction = correct;
    CleMethod cle(f, o);
    PipelineOptions po;
    po.progress = false;
    run_blockwise(m, tokens, cle, f, po);
    EXPECT_EQ(cle.bias_corrected(), correct ? 3 * c.n_layers : 0);  // q, k, v of each block
    const std::vector<double> got = q_mean(m, h);
    std::vector<double> d;
    for (size_t i = 0; i < got.size(); ++i) d.push_back(got[i] - want[i]);
    if (correct) {
      EXPECT_LT(max_abs(d), 1e-4);
    } else {
      EXPECT_GT(max_abs(d), 1e-3);  // int2 rounding shifts the mean output
    }
  }
}

// The pipeline's state keeps the biases a method changed (CLE scales v's bias and corrects q/k/v's):
// a resumed run gives the same layers as an uninterrupted one.
TEST(Cle, ResumeKeepsCorrectedBiases) {
  const LlamaConfig c = cle_config();
  LlamaWeights w = random_weights(c, 5, 0.2);
  Tensor tokens = Tensor::empty({4, 8}, DType::I32);
  for (int64_t i = 0; i < tokens.numel(); ++i) tokens.data<int32_t>()[i] = int32_t((i * 5 + 1) % c.vocab_size);
  const QuantFormat& f = parse_quant_format("int3g32");
  CleOptions o;
  o.bias_correction = true;
  PipelineOptions po;
  po.progress = false;
  LlamaModel full(c, w);
  CleMethod m1(f, o);
  run_blockwise(full, tokens, m1, f, po);
  auto dir = test::temp_dir("ptq17-cle-resume");
  po.state_dir = dir.string();
  po.stop_after_blocks = 1;
  po.checkpoint_seconds = 1e9;
  {
    LlamaModel part(c, w);
    CleMethod m2(f, o);
    EXPECT_FALSE(run_blockwise(part, tokens, m2, f, po).complete);
  }
  po.stop_after_blocks = 0;
  LlamaModel resumed(c, w);
  CleMethod m3(f, o);
  EXPECT_EQ(run_blockwise(resumed, tokens, m3, f, po).resumed_from_block, 1);
  for (int i = 0; i < c.n_layers; ++i)
    for (const char* n : {"self_attn.q_proj", "self_attn.v_proj"}) {
      const Linear* a = nullptr;
      const Linear* b = nullptr;
      for (auto& [name, slot] : full.block(i).linears())
        if (name == n) a = slot->get();
      for (auto& [name, slot] : resumed.block(i).linears())
        if (name == n) b = slot->get();
      ASSERT_TRUE(a && b && a->bias().defined() && b->bias().defined());
      EXPECT_EQ(max_abs_diff(a->bias(), b->bias()), 0.0) << i << " " << n;
      EXPECT_EQ(max_abs_diff(a->effective_weight(), b->effective_weight()), 0.0) << i << " " << n;
    }
  std::filesystem::remove_all(dir);
}

TEST_F(Ptq17Stories, CleRunsDataFreeAndResumes) {
  calib_windows = 4;
  calib_len = 64;
  Checkpoint ck = load_llama2c(model_path);
  const QuantFormat& f = parse_quant_format("int4g32");
  LlamaModel m(ck.config, ck.weights);
  CleMethod cle(f, CleOptions{});
  PipelineReport r = quantize(m, cle, f);
  EXPECT_EQ(r.linears.size(), 35u);
  EXPECT_EQ(cle.bias_corrected(), 0);  // Llama's linears have no bias: nothing to correct
  std::printf("cle int4g32: ppl %.3f\n", ppl(m));
  expect_resume_identical(*this, [](const QuantFormat& fm) { return std::make_unique<CleMethod>(fm, CleOptions{}); },
                          "int4g32");
}
