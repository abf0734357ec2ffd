// BitNet b1.58 pretraining (train/bitnet.h): BitLinear blocks learn, the 16 -> 1.58-bit
// transition switches at the right step and resumes exactly, the two-stage schedule, and the
// ternary checkpoint holds exactly the weights the training forward used.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "common/test_util.h"
#include "lowbit/autograd/optim.h"
#include "lowbit/io/checkpoint.h"
#include "lowbit/io/hf.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/model/bit_linear.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"
#include "lowbit/train/trainer.h"
#include "train/tiny_train.h"

using namespace lowbit;

namespace {
TrainOptions tiny_bitnet(const std::string& out) {
  TrainOptions o = test::tiny_train_options(out);
  o.grad_accum = 1;
  o.bitnet.enabled = true;
  return o;
}

std::vector<int32_t> stream(int n, int mod) {
  std::vector<int32_t> s;
  for (int i = 0; i < n; ++i) s.push_back((i * 5 + i / 7) % mod);
  return s;
}
}  // namespace

TEST(BitNet, LearnsAndSavesATernaryCheckpointOfTheTrainedWeights) {
  for (auto scale : {ops::TernaryScale::AbsMean, ops::TernaryScale::AbsMedian}) {
    auto dir = test::temp_dir(std::string("bitnet-learn-") + ops::ternary_scale_name(scale));
    TrainOptions o = tiny_bitnet(dir.string());
    o.max_steps = 60;
    o.eval_every = 0;
    o.bitnet.scale = scale;
    TrainResult r = train_model(o, stream(2000, 13), stream(300, 13));
    ASSERT_EQ(r.records.size(), 60u);
    EXPECT_LT(r.records.back().loss, 0.7 * r.records.front().loss);
    // hf/ holds the dequantized ternary weights: gamma * {-1, 0, 1} per tensor.
    Checkpoint dense = load_checkpoint((dir / "hf").string());
    QuantizedCheckpoint q = load_quantized_model((dir / "ternary").string());
    EXPECT_EQ(q.method, "bitnet-b1.58");
    EXPECT_EQ(q.format, QuantFormatId::Ternary);
    ASSERT_EQ(q.quantized.size(), 14u);
    const Tensor wd = dense.weights.layers[1].w_down;
    const QuantizedTensor& qd = q.quantized.at("model.layers.1.mlp.down_proj");
    const double gamma = qd.tensor_scale.item(0);
    const Tensor deq = qd.dequantize();
    int nonzero = 0;
    for (int64_t i = 0; i < wd.numel(); ++i) {
      const double c = wd.item(i) / gamma;
      ASSERT_TRUE(c == -1.0 || c == 0.0 || c == 1.0) << c;
      nonzero += c != 0.0;
      ASSERT_EQ(deq.item(i), wd.item(i)) << i;  // the checkpoint holds the training forward's weights
    }
    EXPECT_GT(nonzero, 0);
    // Loaded for inference (packed linears), it computes what the dense view computes.
    auto qm = make_quantized_model(load_quantized_model((dir / "ternary").string(), false));
    LlamaModel dm(dense.config, dense.weights);
    Tensor toks = Tensor::from_vector(std::vector<int32_t>{1, 5, 7, 2, 9, 11}, {1, 6});
    NoGradGuard ng;
    const Tensor b = dm.forward(toks).value();
    // f32 activations (exact body): the same numbers up to summation order.
    ops::set_quant_matmul_default(ops::QuantMatmulPath::Exact);
    const Tensor a = qm->forward(toks).value();
    ops::set_quant_matmul_default(ops::QuantMatmulPath::Auto);
    EXPECT_LT(max_abs_diff(a, b), 1e-4);
    // Auto: 6 tokens take the int8-activation decode kernels (activations rounded per block of 32).
    EXPECT_LT(max_abs_diff(qm->forward(toks).value(), b), 0.1);
  }
}

TEST(BitNet, TernaryFormatOfF32WeightsEqualsTheTrainingQuantizer) {
  // The RTN quantizer of quant/format.h's "ternary" format and BitLinear's weight quantizer agree
  // value for value on f32 weights (mean scale).
  const Tensor w = Tensor::randn({24, 40}, 5, 0.03, DType::F32);
  const Tensor a = bitlinear_effective_weight(w, BitLinearOptions{});
  const Tensor b = dequantize(quantize(w, quant_format(QuantFormatId::Ternary)));
  EXPECT_EQ(max_abs_diff(a, b), 0.0);
}

TEST(BitNet, TransitionSwitchesAtTheStepAndResumesExactly) {
  BitNetOptions bo;
  bo.enabled = true;
  bo.transition_at = 0.25;
  EXPECT_EQ(bitnet_transition_step(bo, 8), 2);
  EXPECT_FALSE(bitnet_step_options(bo, 1, 8).quantize);
  EXPECT_TRUE(bitnet_step_options(bo, 2, 8).quantize);
  EXPECT_DOUBLE_EQ(bitnet_step_options(bo, 2, 8).lambda, 1.0);
  bo.phase_in_steps = 4;
  EXPECT_DOUBLE_EQ(bitnet_step_options(bo, 2, 8).lambda, 0.25);
  EXPECT_DOUBLE_EQ(bitnet_step_options(bo, 5, 8).lambda, 1.0);

  // Stopped before the transition and resumed: the same run as an uninterrupted one.
  auto a = test::temp_dir("bitnet-a"), b = test::temp_dir("bitnet-b");
  TrainOptions oa = tiny_bitnet(a.string());
  oa.bitnet.transition_at = 0.5;
  oa.bitnet.phase_in_steps = 2;
  oa.bitnet.two_stage = true;
  TrainResult full = train_model(oa, stream(2000, 13), stream(300, 13));
  TrainOptions ob = oa;
  ob.out_dir = b.string();
  ob.stop_after = 3;
  EXPECT_EQ(train_model(ob, stream(2000, 13), stream(300, 13)).steps_done, 3);
  ob.stop_after = 0;
  TrainResult rest = train_model(ob, stream(2000, 13), stream(300, 13));
  ASSERT_EQ(rest.records.size(), 5u);
  for (size_t i = 0; i < 5; ++i) EXPECT_DOUBLE_EQ(rest.records[i].loss, full.records[i + 3].loss) << i;
  EXPECT_DOUBLE_EQ(rest.final_val_loss, full.final_val_loss);
  EXPECT_TRUE(std::filesystem::exists(b / "ternary" / "config.json"));

  // A state of one architecture does not resume another.
  TrainOptions ol = oa;
  ol.out_dir = a.string();
  ol.bitnet = BitNetOptions{};
  EXPECT_THROW(train_model(ol, stream(2000, 13), stream(300, 13)), Error);
}

TEST(BitNet, TwoStageSchedule) {
  const int64_t total = 100, warmup = 10;
  for (int64_t s = 0; s < 50; ++s) EXPECT_DOUBLE_EQ(two_stage_lr(s, warmup, total, 0.1), warmup_cosine(s, warmup, total, 0.1));
  const double end1 = warmup_cosine(50, warmup, total, 0.1);
  EXPECT_DOUBLE_EQ(two_stage_lr(50, warmup, total, 0.1), 0.5 * end1);  // the drop at mid-run
  EXPECT_NEAR(two_stage_lr(99, warmup, total, 0.1), 0.1, 1e-3);
  for (int64_t s = 51; s < 100; ++s) EXPECT_LE(two_stage_lr(s, warmup, total, 0.1), two_stage_lr(s - 1, warmup, total, 0.1));
  EXPECT_EQ(two_stage_wd(49, total), 1.0);
  EXPECT_EQ(two_stage_wd(50, total), 0.0);
}

TEST(BitNet, RejectsBadOptions) {
  BitNetOptions o;
  o.enabled = true;
  o.transition_at = 1.0;
  EXPECT_THROW(check_bitnet_options(o, 10), Error);
  o.transition_at = 0.5;
  o.phase_in_steps = 6;
  EXPECT_THROW(check_bitnet_options(o, 10), Error);
  o.phase_in_steps = 5;
  EXPECT_NO_THROW(check_bitnet_options(o, 10));
  BitNetOptions off;
  off.transition_at = 0.5;
  EXPECT_THROW(check_bitnet_options(off, 10), Error);  // needs --arch bitnet-b1.58
  EXPECT_THROW(parse_train_arch("bitnet"), Error);
  EXPECT_THROW(parse_train_schedule("linear"), Error);
  auto dir = test::temp_dir("bitnet-bad");
  TrainOptions t = tiny_bitnet(dir.string());
  t.device = Device::CUDA;
  EXPECT_THROW(train_model(t, stream(2000, 13), stream(300, 13)), Error);
}

TEST(BitNet, TernaryWeightsKeepTheirCodesInGgmlTq2_0) {
  // What `lowbit quantize -m OUT/hf --method rtn --format tq2_0 -o m.gguf` does to a trained b1.58
  // matrix (rows of 256): every 256-value block's scale is its absmax = gamma, so the codes are the
  // same and only gamma is rounded to f16.
  const Tensor w = bitlinear_effective_weight(Tensor::randn({8, 512}, 9, 0.02, DType::F32), BitLinearOptions{});
  const Tensor d = dequantize(quantize(w, quant_format(QuantFormatId::TQ2_0)));
  for (int64_t i = 0; i < w.numel(); ++i) {
    const double a = w.item(i), b = d.item(i);
    ASSERT_EQ(a == 0.0, b == 0.0) << i;
    ASSERT_EQ(a > 0.0, b > 0.0) << i;
    ASSERT_LE(std::fabs(a - b), std::fabs(a) * 0x1p-11) << i;
  }
}
