// Layer-wise mixed precision under a bits budget (methods/layer_budget.h): the two importance
// scores on worked examples, the allocation's budget, order and bounds, and the plan through the
// block pipeline (each layer quantized in its level's format).
#include <gtest/gtest.h>

#include "common/small_model.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/layer_budget.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/methods/registry.h"
#include "lowbit/quant/quant_linear.h"

using namespace lowbit;

namespace {

LlamaConfig four_layers() {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  c.n_layers = 4;
  return c;
}

std::vector<QuantFormatId> levels(std::initializer_list<const char*> names) {
  std::vector<QuantFormatId> out;
  for (const char* n : names) out.push_back(parse_quant_format(n).id);
  return out;
}

}  // namespace

TEST(LayerBudget, ZscoreFractionOnAWorkedExample) {
  // {0, 0, 0, 0, 10}: mean 2, population std 4; only |10 - 2| = 8 exceeds it -> 1/5.
  const Tensor a = Tensor::from_vector(std::vector<float>{0, 0, 0}, {3});
  const Tensor b = Tensor::from_vector(std::vector<float>{0, 10}, {2});
  EXPECT_DOUBLE_EQ(zscore_fraction({&a, &b}), 0.2);
  const Tensor flat = Tensor::full({4}, 3.0);
  EXPECT_EQ(zscore_fraction({&flat}), 0.0);
  // A Gaussian has ~31.7 % of its values beyond one std.
  const Tensor g = Tensor::randn({200000}, 5);
  EXPECT_NEAR(zscore_fraction({&g}), 0.3173, 0.005);
  const Tensor bad = Tensor::from_vector(std::vector<float>{1, std::nanf("")}, {2});
  EXPECT_THROW(zscore_fraction({&bad}), Error);
}

TEST(LayerBudget, LimRanksALayerThatChangesNothingLast) {
  // Layer 1's attention output and down projection are zero: the block returns its input (cos 1,
  // LIM -1, the least important); the others change the residual stream (LIM > -1).
  const LlamaConfig c = four_layers();
  LlamaWeights w = random_weights(c, 3, 0.2);
  w.layers[1].wo = Tensor::zeros(w.layers[1].wo.shape());
  w.layers[1].w_down = Tensor::zeros(w.layers[1].w_down.shape());
  LlamaModel m(c, w);
  std::vector<int32_t> stream;
  for (int i = 0; i < 200; ++i) stream.push_back((i * 7 + 1) % c.vocab_size);
  const Tensor calib = sample_calibration(stream, 3, 12, 0);
  const std::vector<double> lim = layer_importance_lim(m, calib, 2);
  ASSERT_EQ(lim.size(), 4u);
  EXPECT_NEAR(lim[1], -1.0, 1e-6);
  for (int i : {0, 2, 3}) EXPECT_GT(lim[size_t(i)], -1.0 + 1e-4) << "layer " << i;
  // Batching the windows differently gives the same scores.
  const std::vector<double> lim1 = layer_importance_lim(m, calib, 1);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(lim[size_t(i)], lim1[size_t(i)], 1e-6);
}

TEST(LayerBudget, ZdScoresEveryLayer) {
  const LlamaConfig c = four_layers();
  LlamaWeights w = random_weights(c, 4);
  // Layer 2 heavy-tailed: a few large weights in a mostly-small layer -> fewer values beyond one
  // std than the Gaussian layers -> more important under the paper's rule.
  for (Tensor* t : {&w.layers[2].wq, &w.layers[2].wk, &w.layers[2].wv, &w.layers[2].wo, &w.layers[2].w_gate,
                    &w.layers[2].w_up, &w.layers[2].w_down}) {
    float* p = t->data<float>();
    for (int64_t k = 0; k < t->numel(); ++k) p[k] = k % 50 == 0 ? 1.0f : p[k] * 0.1f;
  }
  const std::vector<double> zd = layer_importance_zd(w);
  ASSERT_EQ(zd.size(), 4u);
  for (int i : {0, 1, 3}) {
    EXPECT_NEAR(zd[size_t(i)], 1 - 0.3173, 0.03) << "layer " << i;
    EXPECT_GT(zd[2], zd[size_t(i)]);
  }
}

TEST(LayerBudget, AllocationFillsTheBudgetInImportanceOrder) {
  const LlamaConfig c = four_layers();
  const auto two = levels({"int2g32", "int4g32"});
  const std::vector<double> imp = {0.1, 0.9, 0.5, 0.3};
  const double lo = plan_bits(c, two, {0, 0, 0, 0}), hi = plan_bits(c, two, {1, 1, 1, 1});
  EXPECT_DOUBLE_EQ(lo, 3.0);  // 2 bits + f16 scale and zero per 32 values
  EXPECT_DOUBLE_EQ(hi, 5.0);
  // Half way: the two most important layers (1, then 2) move up.
  BudgetPlan bp = plan_for_bits_budget(c, imp, two, 4.0, LayerScore::Lim);
  EXPECT_EQ(bp.level, (std::vector<int>{0, 1, 1, 0}));
  EXPECT_DOUBLE_EQ(bp.bits, 4.0);
  EXPECT_EQ(quant_format(bp.plan.formats.at("model.layers.1.mlp.down_proj")).name, std::string("int4g32"));
  EXPECT_EQ(quant_format(bp.plan.formats.at("model.layers.0.self_attn.q_proj")).name, std::string("int2g32"));
  EXPECT_EQ(bp.plan.formats.size(), size_t(7 * c.n_layers));
  // Just under one more layer: still two; the budget is never exceeded.
  bp = plan_for_bits_budget(c, imp, two, 4.49, LayerScore::Lim);
  EXPECT_EQ(bp.level, (std::vector<int>{0, 1, 1, 0}));
  EXPECT_LE(bp.bits, 4.49);
  // Bounds: at the lowest level nothing moves; above the highest everything is at the top.
  EXPECT_EQ(plan_for_bits_budget(c, imp, two, 3.0, LayerScore::Lim).level, (std::vector<int>{0, 0, 0, 0}));
  EXPECT_EQ(plan_for_bits_budget(c, imp, two, 9.0, LayerScore::Lim).level, (std::vector<int>{1, 1, 1, 1}));
  EXPECT_THROW(plan_for_bits_budget(c, imp, two, 2.9, LayerScore::Lim), Error);
  EXPECT_THROW(plan_for_bits_budget(c, imp, two, std::nan(""), LayerScore::Lim), Error);
  // Three levels: pass after pass in importance order; a more important layer never ends lower.
  const auto three = levels({"int2g32", "int3g32", "int4g32"});
  // (levels at 3, 4, 5 bits per weight: the first pass lifts all four to 4, the second the most
  // important layer to 5 at 4.25, the two most important at 4.5.)
  EXPECT_EQ(plan_for_bits_budget(c, imp, three, 4.25, LayerScore::Zd).level, (std::vector<int>{1, 2, 1, 1}));
  bp = plan_for_bits_budget(c, imp, three, 4.6, LayerScore::Zd);
  EXPECT_LE(bp.bits, 4.6);
  EXPECT_EQ(bp.level, (std::vector<int>{1, 2, 2, 1}));
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) {
      if (imp[size_t(a)] > imp[size_t(b)]) {
        EXPECT_GE(bp.level[size_t(a)], bp.level[size_t(b)]);
      }
    }
}

TEST(LayerBudget, LevelsAreCheckedAgainstTheModel) {
  const LlamaConfig c = four_layers();
  EXPECT_EQ(parse_budget_levels("int2g32,int3g32,int4g32", c).size(), 3u);
  EXPECT_THROW(parse_budget_levels("int4g32", c), Error);            // one level
  EXPECT_THROW(parse_budget_levels("int4g32,int2g32", c), Error);    // decreasing
  EXPECT_THROW(parse_budget_levels("int2g32,,int4g32", c), Error);   // empty entry
  EXPECT_THROW(parse_budget_levels("int2g32,int9", c), Error);       // unknown
  EXPECT_THROW(parse_budget_levels("int2g32,q4_k", c), Error);       // 64-wide rows, 256-value blocks
  EXPECT_THROW(parse_layer_score("kurtosis"), Error);
}

TEST(LayerBudget, ThePlanReachesThePipeline) {
  const LlamaConfig c = four_layers();
  LlamaModel m(c, random_weights(c, 6, 0.1));
  std::vector<int32_t> stream;
  for (int i = 0; i < 300; ++i) stream.push_back((i * 11 + 3) % c.vocab_size);
  const Tensor calib = sample_calibration(stream, 4, 16, 0);
  const auto lv = levels({"int2g32", "int4g32"});
  BudgetPlan bp = plan_for_bits_budget(c, layer_importance_lim(m, calib), lv, 4.0, LayerScore::Lim);
  MethodConfig mc;
  mc.format = &quant_format(lv[0]);
  auto method = make_method("rtn", mc);
  PipelineOptions o;
  o.formats = &bp.plan.formats;
  run_blockwise(m, calib, *method, quant_format(lv[0]), o);
  for (int i = 0; i < 4; ++i)
    for (auto& [name, slot] : m.block(i).linears()) {
      auto* q = dynamic_cast<const QuantLinear*>(slot->get());
      ASSERT_NE(q, nullptr);
      EXPECT_EQ(q->quantized().fmt().id, lv[size_t(bp.level[size_t(i)])]) << "layer " << i << " " << name;
    }
}
