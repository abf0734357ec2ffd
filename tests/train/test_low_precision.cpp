// lowbit train --precision (issue 18) on a stories260K-shaped model (dim 64, SwiGLU 172, 5 layers,
// 8 heads, 4 kv heads, vocabulary 512) over a synthetic Markov stream (no shared data needed): the
// loss falls for every precision and ends near the f32 run's, the model holds LowPrecisionLinear
// layers except the kept blocks, the saved model is the f32 master weights, fp8 delayed scaling
// resumes bit-identically (the amax histories are in the state), and a resume with other settings
// is refused naming them.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

#include "common/test_util.h"
#include "train/tiny_train.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/train/trainer.h"

using namespace lowbit;

namespace {
TrainOptions shape260k(const std::string& out, LpPrecision p) {
  TrainOptions o = test::shape260k_train_options(out);
  o.max_steps = 16;
  o.warmup_steps = 2;
  o.low_precision.recipe.precision = p;
  return o;
}
using test::markov_stream;
}  // namespace

TEST(LowPrecisionTrain, LossDecreasesForEveryPrecision) {
  const auto train = markov_stream(8000, 1), val = markov_stream(1000, 2);
  auto d = test::temp_dir("lp-f32");
  const TrainResult ref = train_model(shape260k(d.string(), LpPrecision::F32), train, val);
  const double first = ref.records.front().loss;
  // Bounds: the f32 run falls from ln 512 = 6.24 to ~5.7 in 16 steps here; each precision must fall
  // by at least 60 % as much and end within 10 % of it (measured gaps below 2 %).
  for (LpPrecision p : {LpPrecision::BF16, LpPrecision::FP8, LpPrecision::MXFP4, LpPrecision::NVFP4, LpPrecision::FP4_DGE,
                        LpPrecision::INT4}) {
    auto dp = test::temp_dir(std::string("lp-") + lp_precision_name(p));
    const TrainResult r = train_model(shape260k(dp.string(), p), train, val);
    ASSERT_TRUE(r.complete);
    const double drop = r.records.front().loss - r.records.back().loss, ref_drop = first - ref.records.back().loss;
    EXPECT_GT(drop, 0.6 * ref_drop) << lp_precision_name(p);
    EXPECT_LT(r.final_val_loss, 1.1 * ref.final_val_loss) << lp_precision_name(p);
    EXPECT_GT(r.final_val_loss_f32, 0) << lp_precision_name(p);
    std::printf("%-6s final val %.4f (f32 %.4f, %+.2f %%), master weights in f32 %.4f\n", lp_precision_name(p),
                r.final_val_loss, ref.final_val_loss, 100 * (r.final_val_loss / ref.final_val_loss - 1),
                r.final_val_loss_f32);
    // model.bin holds the f32 master weights: evaluated in f32 they give final_val_loss_f32
    const auto m = load_llama2c((dp / "model.bin").string());
    LlamaModel lm(m.config, m.weights);
    EXPECT_NEAR(validation_loss(lm, val, 32, 8, 2), r.final_val_loss_f32, 1e-4) << lp_precision_name(p);
  }
}

TEST(LowPrecisionTrain, LayersAndKeptBlocks) {
  TrainOptions o = shape260k("", LpPrecision::NVFP4);
  LlamaModel model(o.config, init_weights(o.config, 1), true);
  const size_t params = model.parameters().size();
  auto ctx = make_low_precision(model, o.low_precision, 1);
  EXPECT_EQ(lp_keep_last(o.low_precision, 5), 1);  // round(0.15 * 5) = 1
  for (int i = 0; i < 5; ++i)
    for (auto& [name, slot] : model.block(i).linears())
      EXPECT_EQ((*slot)->kind(), i < 4 ? "lp-nvfp4" : "dense") << "block " << i << " " << name;
  EXPECT_EQ(model.parameters().size(), params);  // the same weight Vars
  EXPECT_EQ(low_precision_key(o.low_precision, 5), "nvfp4 keep 0/1 2d rht sr");
  LowPrecisionOptions naive;
  naive.recipe.precision = LpPrecision::MXFP4;
  apply_lp_recipe_name(naive, "naive");
  EXPECT_EQ(low_precision_key(naive, 5), "mxfp4 keep 0/0 1d");
  LowPrecisionOptions f8;
  f8.recipe.precision = LpPrecision::FP8;
  EXPECT_EQ(low_precision_key(f8, 5), "fp8 keep 0/0 delayed h16");
  f8.keep_first = 3, f8.keep_last = 2;
  EXPECT_THROW(check_low_precision_options(f8, 5), Error);
  LowPrecisionOptions dge;
  dge.recipe.precision = LpPrecision::FP4_DGE;
  EXPECT_EQ(lp_keep_last(dge, 5), 0);
  EXPECT_EQ(low_precision_key(dge, 5), "fp4-dge keep 0/0 dge k5 clip3 occ 0.999");
  apply_lp_recipe_name(dge, "naive");
  EXPECT_EQ(low_precision_key(dge, 5), "fp4-dge keep 0/0 ste");
  LowPrecisionOptions i4;
  i4.recipe.precision = LpPrecision::INT4;
  EXPECT_EQ(lp_keep_last(i4, 5), 0);
  EXPECT_EQ(low_precision_key(i4, 5), "int4 keep 0/0 hq32 bs-lss");
  i4.recipe.int4_grad = LpRecipe::Int4Grad::Bs;
  EXPECT_EQ(low_precision_key(i4, 5), "int4 keep 0/0 hq32 bs");
  i4.recipe.int4_grad = LpRecipe::Int4Grad::BsLssDgrad;
  i4.recipe.int4_row_scales = true;
  EXPECT_EQ(low_precision_key(i4, 5), "int4 keep 0/0 hq32 bs-lss-dgrad row");
  apply_lp_recipe_name(i4, "naive");
  EXPECT_EQ(low_precision_key(i4, 5), "int4 keep 0/0 row");
}

// The int4 ablations (--lp-int4-grad bs / bs-lss-dgrad, --lp-int4-scale row) train: the same bounds
// as LossDecreasesForEveryPrecision against the f32 run.
TEST(LowPrecisionTrain, Int4AblationsTrain) {
  const auto train = markov_stream(8000, 1), val = markov_stream(1000, 2);
  auto d = test::temp_dir("lp-f32-int4ab");
  const TrainResult ref = train_model(shape260k(d.string(), LpPrecision::F32), train, val);
  const double ref_drop = ref.records.front().loss - ref.records.back().loss;
  using G = LpRecipe::Int4Grad;
  const struct {
    const char* name;
    G grad;
    bool row;
  } cases[] = {{"bs", G::Bs, false}, {"bs-lss-dgrad", G::BsLssDgrad, false}, {"row", G::BsLss, true}};
  for (const auto& c : cases) {
    auto dp = test::temp_dir(std::string("lp-int4-") + c.name);
    TrainOptions o = shape260k(dp.string(), LpPrecision::INT4);
    o.low_precision.recipe.int4_grad = c.grad;
    o.low_precision.recipe.int4_row_scales = c.row;
    const TrainResult r = train_model(o, train, val);
    ASSERT_TRUE(r.complete) << c.name;
    const double drop = r.records.front().loss - r.records.back().loss;
    EXPECT_GT(drop, 0.6 * ref_drop) << c.name;
    EXPECT_LT(r.final_val_loss, 1.1 * ref.final_val_loss) << c.name;
    std::printf("int4 %-12s final val %.4f (f32 %.4f, %+.2f %%)\n", c.name, r.final_val_loss, ref.final_val_loss,
                100 * (r.final_val_loss / ref.final_val_loss - 1));
  }
}

// int4 on CUDA (the CUDA bodies of its three quantizers, bit for bit the CPU's, into f32 cuBLAS GEMMs)
// against the CPU run of the same model, data and seed. The first step reads the same quantized
// operands up to what the f32 GEMMs, norms and attention sum in another order move (an amax by an ulp,
// an element across a rounding boundary): its loss within 1e-3 relative; then the runs drift by
// such roundings (and LSS's probabilities with them) and must track: every step's loss and the final
// validation loss within 2e-2 relative. Skipped without a GPU (not run on one yet: the tolerances are
// those of the qat/finetune GPU test, QatCli.CudaPrecisionTracksCpuOnStories260K).
TEST(LowPrecisionTrain, Int4CudaTracksCpu) {
  if (!init_cuda()) GTEST_SKIP() << "no CUDA device (or a CPU-only build): int4 GPU training test skipped";
  const auto train = markov_stream(8000, 7), val = markov_stream(1000, 8);
  TrainResult r[2];
  for (int i = 0; i < 2; ++i) {
    auto d = test::temp_dir(i ? "lp-int4-cuda" : "lp-int4-cpu");
    TrainOptions o = shape260k(d.string(), LpPrecision::INT4);
    o.device = i ? Device::CUDA : Device::CPU;
    r[i] = train_model(o, train, val);
    ASSERT_TRUE(r[i].complete);
  }
  ASSERT_EQ(r[0].records.size(), r[1].records.size());
  double worst = 0;
  for (size_t k = 0; k < r[0].records.size(); ++k)
    worst = std::max(worst, std::fabs(r[1].records[k].loss - r[0].records[k].loss) / r[0].records[k].loss);
  std::printf("int4 cpu vs cuda: loss %.5f -> %.5f (cpu), %.5f -> %.5f (cuda); max step gap %.2e; val %.5f vs %.5f\n",
              r[0].records.front().loss, r[0].records.back().loss, r[1].records.front().loss, r[1].records.back().loss,
              worst, r[0].final_val_loss, r[1].final_val_loss);
  EXPECT_NEAR(r[1].records.front().loss, r[0].records.front().loss, 1e-3 * r[0].records.front().loss);
  EXPECT_LT(worst, 2e-2);
  EXPECT_NEAR(r[1].final_val_loss, r[0].final_val_loss, 2e-2 * r[0].final_val_loss);
}

TEST(LowPrecisionTrain, Fp4DgeOptionsOutOfRangeNameTheFlag) {
  const auto msg = [](auto set) {
    LowPrecisionOptions o;
    o.recipe.precision = LpPrecision::FP4_DGE;
    set(o.recipe);
    try {
      check_low_precision_options(o, 5);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(msg([](LpRecipe& r) { r.dge_k = 0.5f; }).find("--dge-k 0.5 is outside [1, 100]"), std::string::npos);
  EXPECT_NE(msg([](LpRecipe& r) { r.dge_k = 1000.0f; }).find("--dge-k 1000 is outside"), std::string::npos);
  EXPECT_NE(msg([](LpRecipe& r) { r.dge_k = NAN; }).find("--dge-k nan is outside"), std::string::npos);
  EXPECT_NE(msg([](LpRecipe& r) { r.dge_clip = 0; }).find("--dge-clip 0 is outside (0, 1000]"), std::string::npos);
  EXPECT_NE(msg([](LpRecipe& r) { r.occ_quantile = 0.5; }).find("--occ-quantile 0.5 is outside (0.5, 1]"), std::string::npos);
  EXPECT_NE(msg([](LpRecipe& r) { r.occ_quantile = 1.01; }).find("--occ-quantile 1.01 is outside"), std::string::npos);
  EXPECT_EQ(msg([](LpRecipe& r) { r.dge_k = 1, r.occ_quantile = 1; }), "no error");
  // CUDA: refused naming the precision (the quantile and the DGE have CPU bodies only)
  const auto train = test::markov_stream(4000, 6);
  auto d = test::temp_dir("lp-dge-cuda");
  TrainOptions o = shape260k(d.string(), LpPrecision::FP4_DGE);
  o.device = Device::CUDA;
  try {
    train_model(o, train, {});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--precision fp4-dge: no CUDA body"), std::string::npos) << e.what();
  }
}

TEST(LowPrecisionTrain, Fp8DelayedResumesIdentically) {
  const auto train = markov_stream(8000, 3), val = markov_stream(2000, 4);
  auto full = test::temp_dir("lp-resume-full"), part = test::temp_dir("lp-resume-part");
  TrainOptions o = shape260k(full.string(), LpPrecision::FP8);
  o.max_steps = 8;
  const TrainResult a = train_model(o, train, val);
  o.out_dir = part.string();
  o.stop_after = 4;
  const TrainResult b1 = train_model(o, train, val);
  ASSERT_FALSE(b1.complete);
  o.stop_after = 0;
  const TrainResult b2 = train_model(o, train, val);
  ASSERT_TRUE(b2.resumed);
  ASSERT_EQ(b2.records.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(b2.records[i].loss, a.records[4 + i].loss) << "step " << 5 + i;
  EXPECT_EQ(b2.final_val_loss, a.final_val_loss);
  // A resume with other settings is refused, naming them.
  o.low_precision.recipe.delayed_scaling = false;
  try {
    train_model(o, train, val);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'fp8 keep 0/0 delayed h16', this run uses 'fp8 keep 0/0 current'"),
              std::string::npos)
        << e.what();
  }
}

TEST(LowPrecisionTrain, RefusedCombinations) {
  const auto train = markov_stream(4000, 5);
  auto d = test::temp_dir("lp-refused");
  TrainOptions o = shape260k(d.string(), LpPrecision::NVFP4);
  o.bitnet.enabled = true;
  EXPECT_THROW(train_model(o, train, {}), Error);
  o = shape260k(d.string(), LpPrecision::NVFP4);
  o.low_precision.keep_first = 5;
  EXPECT_THROW(train_model(o, train, {}), Error);
}
