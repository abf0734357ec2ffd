// BitNet b1.58 pretraining (train/bitnet.h): BitLinear blocks learn, the 16 -> 1.58-bit
// transition switches at the right step and resumes exactly, the two-stage schedule, and the
// ternary checkpoint holds exactly the weights the training forward used; BitNet v2 (H-BitLinear,
// A8 -> A4) learns, resumes, and its checkpoint runs the training numerics.
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
#include "lowbit/model/rotation.h"
#include "lowbit/ops/device_init.h"
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

// ---- BitNet v2 (H-BitLinear o_proj / down_proj, W1.58A4) ------------------------------------

namespace {
TrainOptions tiny_v2(const std::string& out) {
  TrainOptions o = tiny_bitnet(out);
  o.bitnet.v2 = true;
  return o;
}

// The dense view of a BitNet v2 checkpoint with its transforms reproduces the training forward's
// final validation loss (BitLinear + transforms), and the packed model `qm` (the same checkpoint) on
// the exact path computes the same logits of `toks`; returns the dense model's logits.
Tensor expect_checkpoint_runs_training_numerics(const QuantizedCheckpoint& q, const LlamaModel& qm,
                                               const TrainOptions& o, const std::vector<int32_t>& val,
                                               const TrainResult& r, const Tensor& toks) {
  LlamaModel dm(q.dense.config, q.dense.weights);
  dm.set_transforms(q.transforms);
  EXPECT_NEAR(validation_loss(dm, val, o.seq_len, o.batch_size, o.eval_batches), r.final_val_loss, 2e-5);
  EXPECT_EQ(qm.transforms().rotation, "h-bitlinear");
  NoGradGuard ng;
  const Tensor b = dm.forward(toks).value();
  ops::set_quant_matmul_default(ops::QuantMatmulPath::Exact);
  const Tensor a = qm.forward(toks).value();
  ops::set_quant_matmul_default(ops::QuantMatmulPath::Auto);
  EXPECT_LT(max_abs_diff(a, b), 1e-4);
  return b;
}
}  // namespace

TEST(BitNetV2, ActivationBitsFollowTheA8ToA4Schedule) {
  BitNetOptions o;
  set_train_arch(o, parse_train_arch("bitnet-v2"));
  ASSERT_TRUE(o.enabled && o.v2);
  EXPECT_STREQ(bitnet_arch_name(o), "bitnet-v2");
  o.transition_at = 0.25;
  o.act4_at = 0.5;
  EXPECT_EQ(bitnet_act4_step(o, 8), 4);
  const int want[8] = {0, 0, 8, 8, 4, 4, 4, 4};
  for (int s = 0; s < 8; ++s) EXPECT_EQ(bitnet_step_act_bits(o, s, 8), want[s]) << s;
  for (int s = 0; s < 8; ++s) EXPECT_FALSE(bitnet_step_options(o, s, 8).quantize_activations);  // the transforms quantize
  o.act4_at = 0.1;  // before the transition: 4-bit from the transition on
  EXPECT_EQ(bitnet_step_act_bits(o, 2, 8), 4);
  o.act4_at = 0;
  o.act_bits = 8;
  EXPECT_EQ(bitnet_step_act_bits(o, 7, 8), 8);
  BitNetOptions b158;
  set_train_arch(b158, TrainArch::BitNetB158);
  EXPECT_EQ(bitnet_step_act_bits(b158, 5, 8), 0);
  EXPECT_TRUE(bitnet_step_options(b158, 5, 8).quantize_activations);
  // Bad options name their flag.
  BitNetOptions bad = o;
  bad.act_bits = 6;
  EXPECT_THROW(check_bitnet_options(bad, 10), Error);
  bad = o;
  bad.act4_at = 0.5;  // with --act-bits 8
  EXPECT_THROW(check_bitnet_options(bad, 10), Error);
  bad = o;
  bad.act_bits = 4;
  bad.act4_at = 1.0;
  EXPECT_THROW(check_bitnet_options(bad, 10), Error);
  bad = o;
  bad.phase_in_steps = 2;
  EXPECT_THROW(check_bitnet_options(bad, 10), Error);
  BitNetOptions not_v2;
  set_train_arch(not_v2, TrainArch::BitNetB158);
  not_v2.act4_at = 0.5;
  EXPECT_THROW(check_bitnet_options(not_v2, 10), Error);
  // The transforms: h-bitlinear rotations of the o_proj and down_proj inputs, int4 activations.
  LlamaConfig c = test::tiny_train_options("unused").config;
  const ModelTransforms t = bitnet_v2_transforms(c, 5, 4);
  EXPECT_EQ(t.rotation, "h-bitlinear");
  EXPECT_EQ(t.o_in.size(), int64_t(c.n_heads) * c.resolved_head_dim());
  EXPECT_EQ(t.ffn.size(), c.hidden_dim);
  EXPECT_FALSE(t.head.defined());
  EXPECT_EQ(act_quant_name(t.act), "int4");
  EXPECT_NO_THROW(validate_transforms(c, t, "test"));
  // The ablation (--hadamard off): the activation quantizer alone.
  const ModelTransforms noh = bitnet_v2_transforms(c, 5, 4, false);
  EXPECT_TRUE(noh.rotation.empty());
  EXPECT_FALSE(noh.o_in.defined() || noh.ffn.defined());
  EXPECT_EQ(act_quant_name(noh.act), "int4");
  BitNetOptions noh_b158;
  set_train_arch(noh_b158, TrainArch::BitNetB158);
  noh_b158.hadamard = false;
  EXPECT_THROW(check_bitnet_options(noh_b158, 10), Error);
  ModelTransforms q = t;  // an o_in rotation is H-BitLinear's only
  q.rotation = "hadamard";
  EXPECT_THROW(validate_transforms(c, q, "test"), Error);
  // bf16 is refused with a named error (CUDA itself trains: BitNet.CudaTrainingTracksCpu).
  auto dir = test::temp_dir("bitnet-v2-bf16");
  TrainOptions tc = tiny_v2(dir.string());
  tc.device = Device::CUDA;
  tc.bf16 = true;
  try {
    train_model(tc, stream(2000, 13), stream(300, 13));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bitnet-v2"), std::string::npos) << e.what();
  }
}

TEST(BitNetV2, LearnsAndItsCheckpointRunsTheTrainingNumerics) {
  auto dir = test::temp_dir("bitnet-v2-learn");
  TrainOptions o = tiny_v2(dir.string());
  o.max_steps = 60;
  o.eval_every = 0;
  o.bitnet.act4_at = 0.75;  // A8, then A4 for the last 15 steps
  const auto val = stream(300, 13);
  TrainResult r = train_model(o, stream(2000, 13), val);
  ASSERT_EQ(r.records.size(), 60u);
  EXPECT_LT(r.records.back().loss, 0.7 * r.records.front().loss);
  QuantizedCheckpoint q = load_quantized_model((dir / "ternary").string());
  EXPECT_EQ(q.method, "bitnet-v2");
  EXPECT_EQ(q.format, QuantFormatId::Ternary);
  EXPECT_EQ(q.transforms.rotation, "h-bitlinear");
  EXPECT_EQ(act_quant_name(q.transforms.act), "int4");
  ASSERT_TRUE(q.transforms.o_in.defined() && q.transforms.ffn.defined());
  Tensor toks = Tensor::from_vector(std::vector<int32_t>{1, 5, 7, 2, 9, 11, 3, 3, 8, 0, 12}, {1, 11});
  auto qm = make_quantized_model(load_quantized_model((dir / "ternary").string(), false));
  const Tensor b = expect_checkpoint_runs_training_numerics(q, *qm, o, val, r, toks);
  NoGradGuard ng;
  // Auto (the default): the int4-grid activations go to the integer kernels as they are.
  EXPECT_LT(max_abs_diff(qm->forward(toks).value(), b), 1e-3);
  // Without the transforms the model computes something else (the Hadamard is part of it).
  LlamaModel plain(q.dense.config, q.dense.weights);
  EXPECT_GT(max_abs_diff(plain.forward(toks).value(), b), 1e-2);
}

TEST(BitNetV2, ResumesExactlyAcrossTheA8ToA4Switch) {
  auto a = test::temp_dir("bitnet-v2-a"), b = test::temp_dir("bitnet-v2-b");
  TrainOptions oa = tiny_v2(a.string());
  oa.bitnet.act4_at = 0.5;
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
  // A b1.58 state does not resume as v2.
  TrainOptions ol = oa;
  ol.bitnet.v2 = false;
  ol.bitnet.act4_at = 0;
  EXPECT_THROW(train_model(ol, stream(2000, 13), stream(300, 13)), Error);
}

// --act-quant absmean: the papers' INT4 quantizer (s = mean|x| / sqrt(7)) for the A4 steps, absmax
// for the A8 ones; its checkpoint records "int4-absmean" and runs the training numerics; a state
// resumes only with the same quantizer.
TEST(BitNetV2, AbsmeanA4TrainsSavesAndResumesOnlyWithTheSameQuantizer) {
  // The spec: name round trip, the op's numbers, no clip ratio.
  const ActQuantSpec am = parse_act_quant("int4-absmean");
  EXPECT_TRUE(am.absmean && am.bits == 4);
  EXPECT_EQ(act_quant_name(am), "int4-absmean");
  const Tensor x = Tensor::randn({3, 16}, 7, 1.0, DType::F32);
  Tensor ref;
  ops::act_quant_int4_absmean(x, ref);
  EXPECT_EQ(max_abs_diff(act_fake_quant(Var(x), am).value(), ref), 0.0);
  LlamaConfig c = test::tiny_train_options("unused").config;
  ModelTransforms t = bitnet_v2_transforms(c, 5, 4, true, ops::ActScale::AbsMean);
  EXPECT_EQ(act_quant_name(t.act), "int4-absmean");
  EXPECT_NO_THROW(validate_transforms(c, t, "test"));
  EXPECT_EQ(act_quant_name(bitnet_v2_transforms(c, 5, 8, true, ops::ActScale::AbsMean).act), "int8");
  t.act.clip = 0.9;
  EXPECT_THROW(validate_transforms(c, t, "test"), Error);
  // Bad options name the flag.
  BitNetOptions o;
  set_train_arch(o, TrainArch::BitNetV2);
  o.act_scale = ops::ActScale::AbsMean;
  EXPECT_NO_THROW(check_bitnet_options(o, 10));
  for (int which = 0; which < 2; ++which) {
    BitNetOptions bad = o;
    if (which == 0) bad.act_bits = 8;
    else set_train_arch(bad, TrainArch::BitNetB158);
    try {
      check_bitnet_options(bad, 10);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--act-quant"), std::string::npos) << e.what();
    }
  }
  // Training: A8 (absmax) for half the steps, then A4 absmean.
  auto dir = test::temp_dir("bitnet-v2-absmean");
  TrainOptions ot = tiny_v2(dir.string());
  ot.bitnet.act_scale = ops::ActScale::AbsMean;
  ot.bitnet.act4_at = 0.5;
  const auto val = stream(300, 13);
  TrainResult r = train_model(ot, stream(2000, 13), val);
  ASSERT_TRUE(r.complete);
  QuantizedCheckpoint q = load_quantized_model((dir / "ternary").string());
  EXPECT_EQ(act_quant_name(q.transforms.act), "int4-absmean");
  Tensor toks = Tensor::from_vector(std::vector<int32_t>{1, 5, 7, 2, 9, 11, 3, 3, 8, 0, 12}, {1, 11});
  {
    auto qm = make_quantized_model(load_quantized_model((dir / "ternary").string(), false));
    const Tensor b = expect_checkpoint_runs_training_numerics(q, *qm, ot, val, r, toks);
    NoGradGuard ng;
    // absmax A4 computes something else.
    LlamaModel mx(q.dense.config, q.dense.weights);
    ModelTransforms tx = q.transforms;
    tx.act = parse_act_quant("int4");
    mx.set_transforms(tx);
    EXPECT_GT(max_abs_diff(mx.forward(toks).value(), b), 1e-4);
  }
  // Resume: the same flags continue exactly; the other quantizer is refused, naming the flag.
  auto d2 = test::temp_dir("bitnet-v2-absmean-resume");
  TrainOptions ob = ot;
  ob.out_dir = d2.string();
  ob.stop_after = 3;
  EXPECT_EQ(train_model(ob, stream(2000, 13), val).steps_done, 3);
  ob.stop_after = 0;
  TrainOptions omax = ob;
  omax.bitnet.act_scale = ops::ActScale::AbsMax;
  try {
    train_model(omax, stream(2000, 13), val);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--act-quant absmean"), std::string::npos) << e.what();
  }
  TrainResult rest = train_model(ob, stream(2000, 13), val);
  ASSERT_EQ(rest.records.size(), r.records.size() - 3);
  for (size_t i = 0; i < rest.records.size(); ++i) EXPECT_DOUBLE_EQ(rest.records[i].loss, r.records[i + 3].loss) << i;
  EXPECT_DOUBLE_EQ(rest.final_val_loss, r.final_val_loss);
}

// BitLinear / H-BitLinear on the GPU (the quantizers' CUDA bodies, ops/cuda/act_quant.cu): b1.58 and
// v2 (A8 then A4) train 8 steps on both devices; the first step's loss agrees to 1e-4 (the same
// quantized operands: the quantizers are bit for bit the CPU's but for gamma's summation order, the
// GEMMs differ by summation order), later steps to 5 % (a code flip moves a loss a little), and the
// GPU run learns. Skips without a GPU.
TEST(BitNet, CudaTrainingTracksCpu) {
  if (!init_cuda()) GTEST_SKIP() << "no CUDA device (or a CPU-only build)";
  for (bool v2 : {false, true}) {
    auto run = [&](Device d) {
      auto dir = test::temp_dir(std::string("bitnet-cuda-") + (v2 ? "v2-" : "b158-") + (d == Device::CUDA ? "gpu" : "cpu"));
      TrainOptions o = v2 ? tiny_v2(dir.string()) : tiny_bitnet(dir.string());
      o.max_steps = 8;
      o.eval_every = 0;
      o.device = d;
      if (v2) o.bitnet.act4_at = 0.5;
      return train_model(o, stream(2000, 13), stream(300, 13));
    };
    const TrainResult c = run(Device::CPU), g = run(Device::CUDA);
    ASSERT_EQ(c.records.size(), 8u);
    ASSERT_EQ(g.records.size(), 8u);
    EXPECT_NEAR(g.records[0].loss, c.records[0].loss, 1e-4 * c.records[0].loss) << (v2 ? "v2" : "b1.58");
    for (size_t i = 1; i < 8; ++i)
      EXPECT_NEAR(g.records[i].loss, c.records[i].loss, 5e-2 * c.records[i].loss) << (v2 ? "v2" : "b1.58") << " step " << i;
    EXPECT_LT(g.records.back().loss, g.records.front().loss);
  }
}
