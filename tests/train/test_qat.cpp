// Quantization-aware training (train/qat.h): the method registry, each method reducing its loss on
// stories260K in a few CPU steps, resume after a stop giving the same model as an uninterrupted
// run, and the written checkpoint loading packed.
#include <gtest/gtest.h>

#include <array>
#include <filesystem>

#include "common/stories_fixture.h"
#include "qat_stories.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/quant/lsq_linear.h"
#include "lowbit/quant/matryoshka.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"
#include "lowbit/train/qat.h"

using namespace lowbit;
namespace fs = std::filesystem;

namespace {

struct QatStories : test::QatStoriesBase {
  // The base's few steps of short windows, and a short Block-AP stage for efficientqat.
  QatConfig small(const char* format = "int2g64") const {
    QatConfig c = QatStoriesBase::small(format);
    c.nsamples = 8;
    c.block_epochs = 2;
    c.block_batch = 2;
    c.block_lr = 1e-3;
    c.block_quant_lr = 1e-3;
    return c;
  }
  static void expect_same(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
    ASSERT_EQ(a.size(), b.size());
    for (size_t k = 0; k < a.size(); ++k) {
      ASSERT_EQ(a[k].numel(), b[k].numel());
      for (int64_t i = 0; i < a[k].numel(); ++i) ASSERT_EQ(a[k].item(i), b[k].item(i)) << "layer " << k << " element " << i;
    }
  }
};

}  // namespace

TEST(QatRegistry, KnowsItsMethodsAndRejectsUnknownOnes) {
  EXPECT_NO_THROW(find_qat_method("lsq"));
  EXPECT_NO_THROW(find_qat_method("efficientqat"));
  EXPECT_NO_THROW(find_qat_method("paretoq"));
  EXPECT_THROW(find_qat_method("paretoq-nope"), Error);
  EXPECT_NE(qat_method_names().find("efficientqat"), std::string::npos);
  QatConfig c;
  c.format = &parse_quant_format("q4_0");
  EXPECT_THROW(make_qat_method("lsq", c), Error);  // not a uniform integer format
  EXPECT_THROW(make_qat_method("paretoq", c), Error);
  c.format = &parse_quant_format("int2g64s");
  c.paretoq_bits = "2";  // 2-bit SEQ needs the asymmetric int2 (zero point 1.5)
  EXPECT_THROW(make_qat_method("paretoq", c), Error);
  c.paretoq_bits = "1.58";
  EXPECT_NO_THROW(make_qat_method("paretoq", c));
  c.paretoq_bits = "1.5";
  EXPECT_THROW(make_qat_method("paretoq", c), Error);
  EXPECT_THROW(register_qat_method({"lsq", "again", [](const QatConfig&) { return std::unique_ptr<QatMethod>(); }}), Error);
}

TEST_F(QatStories, LsqReducesTheLmLossAndWritesALoadableCheckpoint) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  QatConfig c = small();
  QatResult r = make_qat_method("lsq", c)->run(fp, calib_stream);
  ASSERT_TRUE(r.complete);
  ASSERT_EQ(r.stages.size(), 1u);
  EXPECT_LT(r.stages[0].loss_after, r.stages[0].loss_before);
  EXPECT_EQ(r.stages[0].tokens, 12 * 2 * 64);
  ASSERT_TRUE(r.model);
  const auto before = packed(*r.model);
  // The QAT model beats round-to-nearest on held-out tokens already after 12 steps.
  const QuantFormat& f = *c.format;
  const auto rtn = rtn_model(ck, f);
  const double p_qat = ppl(*r.model);
  EXPECT_LT(p_qat, ppl(*rtn));
  // Written and read back packed: the same codes and parameters.
  const auto dir = test::temp_dir("qat-lsq-save");
  save_quantized_model(dir.string(), *r.model, "lsq", f);
  auto loaded = make_quantized_model(load_quantized_model(dir.string(), false));
  const auto after = packed(*loaded);
  ASSERT_EQ(before.size(), after.size());
  // q/k rows are stored in the HF order: compare the function instead of the rows.
  EXPECT_NEAR(ppl(*loaded), p_qat, 1e-3 * p_qat);
  fs::remove_all(dir);
}

TEST_F(QatStories, LsqWithDistillationReducesTheKl) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  QatConfig c = small("int3g64");
  c.distill = true;
  QatResult r = make_qat_method("lsq", c)->run(fp, calib_stream);
  ASSERT_TRUE(r.complete);
  EXPECT_LT(r.stages[0].loss_after, r.stages[0].loss_before);
  EXPECT_GT(r.stages[0].loss_before, 0);
}

TEST_F(QatStories, EfficientQatReducesBothStagesLosses) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  QatConfig c = small();
  c.lr = 1e-3;
  QatResult r = make_qat_method("efficientqat", c)->run(fp, calib_stream);
  ASSERT_TRUE(r.complete);
  ASSERT_EQ(r.stages.size(), 2u);
  EXPECT_EQ(r.stages[0].name, "block-ap");
  EXPECT_LT(r.stages[0].loss_after, r.stages[0].loss_before);
  EXPECT_EQ(r.stages[1].name, "e2e-qp");
  EXPECT_LT(r.stages[1].loss_after, r.stages[1].loss_before);
  ASSERT_TRUE(r.model);
  packed(*r.model);  // every linear packed
}

TEST_F(QatStories, LsqResumeAfterStopGivesTheSameModel) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  const auto dir = test::temp_dir("qat-lsq-resume");
  QatConfig c = small();
  c.state_dir = (dir / "state").string();
  c.stop_after_steps = 5;
  QatResult a = make_qat_method("lsq", c)->run(fp, calib_stream);
  ASSERT_FALSE(a.complete);
  EXPECT_FALSE(a.model);
  ASSERT_TRUE(fs::exists(dir / "state" / "lsq.safetensors"));
  c.stop_after_steps = 0;
  QatResult b = make_qat_method("lsq", c)->run(fp, calib_stream);
  ASSERT_TRUE(b.complete);
  EXPECT_EQ(b.stages[0].resumed_from, 5);
  QatConfig u = small();
  QatResult whole = make_qat_method("lsq", u)->run(fp, calib_stream);
  expect_same(packed(*b.model), packed(*whole.model));
  EXPECT_EQ(b.stages[0].loss_before, whole.stages[0].loss_before);
  EXPECT_EQ(b.stages[0].loss_after, whole.stages[0].loss_after);
  // A state written with other settings is refused.
  QatConfig other = small();
  other.state_dir = c.state_dir;
  other.stop_after_steps = 3;
  make_qat_method("lsq", other)->run(fp, calib_stream);
  other.steps = 20;
  other.stop_after_steps = 0;
  EXPECT_THROW(make_qat_method("lsq", other)->run(fp, calib_stream), Error);
  fs::remove_all(dir);
}

// --optimizer-bits 8 in the end-to-end stage: the loss still falls, a resumed run gives the same
// model as an uninterrupted one, and a state of the other bits is refused naming the flag.
TEST_F(QatStories, LsqWith8BitOptimizerStateResumesIdenticallyAndChecksTheBits) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  const auto dir = test::temp_dir("qat-lsq-optim8");
  QatConfig c = small();
  c.optimizer_bits = 8;
  c.state_dir = (dir / "state").string();
  c.stop_after_steps = 5;
  ASSERT_FALSE(make_qat_method("lsq", c)->run(fp, calib_stream).complete);
  {
    SafetensorsFile st = SafetensorsFile::open((dir / "state" / "lsq.safetensors").string());
    int codes = 0;
    for (const auto& t : st.tensors()) codes += t.dtype == DType::U8 ? 1 : 0;
    EXPECT_GT(codes, 0) << "no 8-bit moments in the state";
    EXPECT_EQ(st.metadata().at("optimizer_bits"), "8");
  }
  c.stop_after_steps = 0;
  QatResult b = make_qat_method("lsq", c)->run(fp, calib_stream);
  ASSERT_TRUE(b.complete);
  EXPECT_EQ(b.stages[0].resumed_from, 5);
  QatConfig u = small();
  u.optimizer_bits = 8;
  QatResult whole = make_qat_method("lsq", u)->run(fp, calib_stream);
  expect_same(packed(*b.model), packed(*whole.model));
  EXPECT_EQ(b.stages[0].loss_after, whole.stages[0].loss_after);
  EXPECT_LT(whole.stages[0].loss_after, whole.stages[0].loss_before);
  QatConfig other = small();  // 32-bit state over the 8-bit one
  other.state_dir = c.state_dir;
  fs::remove_all(dir / "state");
  other.optimizer_bits = 8;
  other.stop_after_steps = 3;
  make_qat_method("lsq", other)->run(fp, calib_stream);
  other.optimizer_bits = 32;
  other.stop_after_steps = 0;
  try {
    make_qat_method("lsq", other)->run(fp, calib_stream);
    ADD_FAILURE() << "a 32-bit run over an 8-bit state must fail";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--optimizer-bits 8"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

TEST_F(QatStories, EfficientQatResumeAfterStopsInBothStagesGivesTheSameModel) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  const auto dir = test::temp_dir("qat-eq-resume");
  QatConfig c = small();
  c.lr = 1e-3;
  c.state_dir = (dir / "state").string();
  c.checkpoint_seconds = 0;
  c.stop_after_blocks = 2;
  QatResult a = make_qat_method("efficientqat", c)->run(fp, calib_stream);
  ASSERT_FALSE(a.complete);
  c.stop_after_blocks = 0;
  c.stop_after_steps = 4;
  QatResult b = make_qat_method("efficientqat", c)->run(fp, calib_stream);
  ASSERT_FALSE(b.complete);
  EXPECT_EQ(b.stages[0].resumed_from, 2);
  c.stop_after_steps = 0;
  QatResult d = make_qat_method("efficientqat", c)->run(fp, calib_stream);
  ASSERT_TRUE(d.complete);
  EXPECT_EQ(d.stages[1].resumed_from, 4);
  // Uninterrupted, with a state directory (the Block-AP model goes through its checkpoint in both).
  QatConfig u = small();
  u.lr = 1e-3;
  u.state_dir = (dir / "state-whole").string();
  QatResult whole = make_qat_method("efficientqat", u)->run(fp, calib_stream);
  ASSERT_TRUE(whole.complete);
  expect_same(packed(*d.model), packed(*whole.model));
  EXPECT_EQ(d.stages[1].loss_after, whole.stages[1].loss_after);
  fs::remove_all(dir);
}

TEST_F(QatStories, ParetoQReducesTheLmLossAtEveryBitWidth) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  // {format, --bits, the bit width that runs}
  const std::array<const char*, 3> cases[] = {
      {"int2g64", "", "2"}, {"int2pcs", "", "1.58"}, {"int2pcs", "1", "1"}, {"int3g64", "", "3"}};
  for (const auto& [format, bits, want] : cases) {
    QatConfig c = small(format);
    c.paretoq_bits = bits;
    QatResult r = make_qat_method("paretoq", c)->run(fp, calib_stream);
    ASSERT_TRUE(r.complete) << format << " " << bits;
    ASSERT_EQ(r.stages.size(), 1u);
    EXPECT_LT(r.stages[0].loss_after, r.stages[0].loss_before) << format << " " << bits;
    EXPECT_EQ(r.stages[0].tokens, 12 * 2 * 64);
    ASSERT_TRUE(r.model);
    EXPECT_EQ(r.stages[0].hyper.value("bits", ""), std::string(want)) << format << " " << bits;
    packed(*r.model);  // every linear packed
    if (std::string(format) == "int2g64") {
      // Written (half-integer zero points) and read back packed: the same function.
      const double p = ppl(*r.model);
      const auto dir = test::temp_dir("qat-paretoq-save");
      save_quantized_model(dir.string(), *r.model, "paretoq", *c.format);
      auto loaded = make_quantized_model(load_quantized_model(dir.string(), false));
      EXPECT_NEAR(ppl(*loaded), p, 1e-3 * p);
      fs::remove_all(dir);
    }
  }
}

TEST_F(QatStories, ParetoQResumeAfterStopGivesTheSameModel) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  const auto dir = test::temp_dir("qat-paretoq-resume");
  QatConfig c = small();
  c.state_dir = (dir / "state").string();
  c.stop_after_steps = 5;
  QatResult a = make_qat_method("paretoq", c)->run(fp, calib_stream);
  ASSERT_FALSE(a.complete);
  ASSERT_TRUE(fs::exists(dir / "state" / "paretoq.safetensors"));
  c.stop_after_steps = 0;
  QatResult b = make_qat_method("paretoq", c)->run(fp, calib_stream);
  ASSERT_TRUE(b.complete);
  EXPECT_EQ(b.stages[0].resumed_from, 5);
  QatResult whole = make_qat_method("paretoq", small())->run(fp, calib_stream);
  expect_same(packed(*b.model), packed(*whole.model));
  EXPECT_EQ(b.stages[0].loss_after, whole.stages[0].loss_after);
  // The bit width is part of the state's key: a ternary run refuses the 2-bit state.
  QatConfig other = small("int2g64");
  other.state_dir = c.state_dir;
  other.stop_after_steps = 3;
  make_qat_method("paretoq", other)->run(fp, calib_stream);
  other.paretoq_bits = "1.58";
  other.stop_after_steps = 0;
  EXPECT_THROW(make_qat_method("paretoq", other)->run(fp, calib_stream), Error);
  fs::remove_all(dir);
}

TEST(QatLayer, FrozenCodesLayerTrainsOnlyTheStepAndEncodesBack) {
  const QuantFormat& f = parse_quant_format("int3g64");
  const Tensor w = Tensor::randn({16, 128}, 5, 0.1, DType::F32);
  const QuantizedTensor q = quantize(w, f);
  LsqTrainLinear t(q, Tensor());
  ASSERT_EQ(t.parameters().size(), 1u);
  const Tensor eff = t.effective_weight(), dq = q.dequantize();
  for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(eff.item(i), dq.item(i));
  const Tensor back = t.encode().dequantize();
  for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(back.item(i), dq.item(i));
}

// MatQuant (quant/matryoshka.h): Block-AP on int8 codes with the loss summed over the widths.
TEST_F(QatStories, MatQuantReducesItsSummedLossAndTheNarrowWidthsLosses) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  QatConfig c = small("int8g64");
  c.widths = {8, 4, 2};
  c.width_weights = {1, 1, 1};
  QatResult r = make_qat_method("matquant", c)->run(fp, calib_stream);
  ASSERT_TRUE(r.complete);
  ASSERT_EQ(r.stages.size(), 1u);  // no E2E-QP stage
  EXPECT_EQ(r.stages[0].name, "matquant");
  EXPECT_LT(r.stages[0].loss_after, r.stages[0].loss_before);
  const auto& wl = r.stages[0].hyper.at("width_loss");
  // The narrow widths improve; the int8 width may lose a little in so few steps (the shared
  // weights move for the int2 term), so only the summed loss above is required to drop.
  for (const char* w : {"4", "2"})
    EXPECT_LT(wl.at(w).at("after").get<double>(), wl.at(w).at("before").get<double>()) << "width " << w;
  // The narrower slices reconstruct worse.
  EXPECT_LT(wl.at("8").at("after").get<double>(), wl.at("4").at("after").get<double>());
  EXPECT_LT(wl.at("4").at("after").get<double>(), wl.at("2").at("after").get<double>());
  ASSERT_TRUE(r.model);
  packed(*r.model);
  for (int i = 0; i < r.model->n_layers(); ++i)
    for (auto& [name, slot] : r.model->block(i).linears()) EXPECT_EQ((*slot)->kind(), "int8g64") << name;
  EXPECT_EQ(matryoshka_slice_model(*r.model, 2, "test"), r.model->n_layers() * 7);
  for (auto& [name, slot] : r.model->block(0).linears()) EXPECT_EQ((*slot)->kind(), "int2g64") << name;
}

TEST_F(QatStories, MatQuantResumeAfterStopGivesTheSameModel) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  const auto dir = test::temp_dir("qat-matquant-resume");
  QatConfig c = small("int8g64");
  c.widths = {8, 2};
  c.width_weights = {1, 2};
  c.state_dir = (dir / "state").string();
  c.checkpoint_seconds = 0;
  c.stop_after_blocks = 2;
  QatResult a = make_qat_method("matquant", c)->run(fp, calib_stream);
  ASSERT_FALSE(a.complete);
  c.stop_after_blocks = 0;
  QatResult b = make_qat_method("matquant", c)->run(fp, calib_stream);
  ASSERT_TRUE(b.complete);
  EXPECT_EQ(b.stages[0].resumed_from, 2);
  QatConfig u = small("int8g64");
  u.widths = {8, 2};
  u.width_weights = {1, 2};
  u.state_dir = (dir / "state-whole").string();
  QatResult whole = make_qat_method("matquant", u)->run(fp, calib_stream);
  ASSERT_TRUE(whole.complete);
  expect_same(packed(*b.model), packed(*whole.model));
  fs::remove_all(dir);
}

TEST(QatRegistry, MatQuantRefusesBadFormatsAndWidths) {
  QatConfig c;
  c.format = &parse_quant_format("int2g64");
  try {
    make_qat_method("matquant", c);
    ADD_FAILURE() << "int2g64 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a Matryoshka parent format; use int8g32, int8g64 or int8g128"),
              std::string::npos)
        << e.what();
  }
  c.format = &parse_quant_format("int8g64");
  EXPECT_NO_THROW(make_qat_method("matquant", c));
  c.widths = {8, 6};
  EXPECT_THROW(make_qat_method("matquant", c), Error);
  c.widths = {8, 4};
  c.width_weights = {1};
  EXPECT_THROW(make_qat_method("matquant", c), Error);
  c.width_weights = {};
  EXPECT_THROW(make_qat_method("efficientqat", c), Error);  // widths belong to matquant
}
