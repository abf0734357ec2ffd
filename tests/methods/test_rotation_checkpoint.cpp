// Rotated and activation / KV-quantized models (issue 16) in quantized checkpoints: quantizing a
// rotated model and saving it reloads to identical outputs (packed and dense view, both RoPE
// layouts), rotation before RTN/GPTQ keeps the FP function until the weights are rounded, and
// malformed transform records are refused with the field named.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "common/checkpoint_tamper.h"
#include "common/expect_message.h"
#include "common/small_model.h"
#include "common/test_util.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/gptq.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/model/rotation.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/quant/format.h"

using namespace lowbit;
namespace fs = std::filesystem;

namespace {
Tensor calibration(int V) {
  std::vector<int32_t> stream;
  for (int i = 0; i < 400; ++i) stream.push_back((i * 13 + 5) % V);
  return sample_calibration(stream, 4, 24, 1);
}

// Logits of tokens [1, T] decoded one token at a time through an f32 KV cache.
Tensor decoded(const LlamaModel& m, const Tensor& tokens) {
  NoGradGuard ng;
  const int64_t T = tokens.numel();
  KVCache cache = m.make_cache(T, KVCacheType::F32);
  Tensor out = Tensor::empty({T, m.config().vocab_size});
  const Tensor flat = tokens.contiguous().view({T});
  for (int64_t t = 0; t < T; ++t) out.slice(0, t, t + 1).copy_(m.forward_cached(flat.slice(0, t, t + 1).contiguous(), cache).value());
  return out;
}

// A rotated model quantized with RTN int4g32, with int4 activations and an int2 KIVI cache, saved in `dir`.
std::unique_ptr<LlamaModel> rotated_rtn(RopeStyle style, const fs::path& dir, Tensor* calib_out) {
  LlamaConfig c = test::small_config(style);
  LlamaWeights w = random_weights(c, 9, 0.1);
  ModelTransforms t = rotate_weights(c, w, 77);
  auto m = std::make_unique<LlamaModel>(c, w);
  m->set_transforms(t);
  const QuantFormat& f = parse_quant_format("int4g32");
  const Tensor calib = calibration(c.vocab_size);
  RtnMethod rtn(f);
  PipelineOptions o;
  o.progress = false;
  run_blockwise(*m, calib, rtn, f, o);
  t.act = parse_act_quant("int4-asym");
  t.act.clip = 0.9;
  t.kv.bits = 2;
  t.kv.group = 4;
  t.kv.window = 3;
  m->set_transforms(t);
  save_quantized_model(dir.string(), *m, "rtn", f);
  if (calib_out) *calib_out = calib;
  return m;
}
}  // namespace

TEST(RotationCheckpoint, ReloadsToIdenticalOutputs) {
  for (RopeStyle style : {RopeStyle::Interleaved, RopeStyle::Half}) {
    auto dir = test::temp_dir("rot-ckpt");
    Tensor calib;
    auto m = rotated_rtn(style, dir, &calib);
    QuantizedCheckpoint q = load_quantized_model(dir.string());
    EXPECT_EQ(q.transforms.rotation, "hadamard");
    EXPECT_EQ(q.transforms.rotation_seed, 77u);
    EXPECT_EQ(act_quant_name(q.transforms.act), "int4-asym");
    EXPECT_DOUBLE_EQ(q.transforms.act.clip, 0.9);
    EXPECT_EQ(q.transforms.kv.bits, 2);
    EXPECT_EQ(q.transforms.kv.group, 4);
    EXPECT_EQ(q.transforms.kv.window, 3);
    EXPECT_FALSE(q.dense.config.tied_embeddings);  // untied by the rotation
    auto packed = make_quantized_model(q);
    const Tensor tokens = calib.slice(0, 0, 1).contiguous();
    const Tensor ref = test::logits_of(*m, tokens);
    EXPECT_LT(max_abs_diff(test::logits_of(*packed, tokens), ref), 1e-5);
    EXPECT_LT(max_abs_diff(decoded(*packed, tokens), decoded(*m, tokens)), 1e-5);
    // The dense view with the transforms: the same function.
    LlamaModel dense(q.dense.config, q.dense.weights);
    dense.set_transforms(q.transforms);
    EXPECT_LT(max_abs_diff(test::logits_of(dense, tokens), ref), 1e-4);
    // Without them it is another function: the record matters.
    LlamaModel bare(q.dense.config, q.dense.weights);
    EXPECT_GT(max_abs_diff(test::logits_of(bare, tokens), ref), 1e-3);
    // Readers that would drop the transforms refuse.
    EXPECT_THROW(refuse_transforms(q, "a GGUF file"), Error);
  }
}

TEST(RotationCheckpoint, RotationBeforeGptqKeepsTheFunctionOfTheCalibratedModel) {
  // GPTQ int8 on a rotated model: the pipeline's hooks see down_proj's rotated input (GPTQ's
  // Hessian is the right one), so every layer's output error stays small and the logits stay as
  // close to the FP model's as GPTQ on the unrotated model gets them.
  LlamaConfig c = test::small_config(RopeStyle::Half);
  const LlamaWeights w = random_weights(c, 3, 0.1);
  const QuantFormat& f = parse_quant_format("int8pc");
  const Tensor calib = calibration(c.vocab_size);
  const Tensor tokens = calib.slice(0, 0, 2).contiguous();
  const Tensor fp = test::logits_of(LlamaModel(c, w), tokens);
  double err[2] = {0, 0};
  for (int rotated = 0; rotated < 2; ++rotated) {
    LlamaConfig rc = c;
    LlamaWeights rw = w;
    ModelTransforms t;
    if (rotated) t = rotate_weights(rc, rw, 5);
    LlamaModel m(rc, rw);
    m.set_transforms(t);
    GptqMethod gptq(f, GptqOptions{});
    PipelineOptions o;
    o.progress = false;
    PipelineReport r = run_blockwise(m, calib, gptq, f, o);
    for (const auto& l : r.linears) EXPECT_LT(l.rel_error, 1e-3) << l.name << (rotated ? " (rotated)" : "");
    err[rotated] = max_abs_diff(test::logits_of(m, tokens), fp);
  }
  EXPECT_LT(err[1], 3 * err[0] + 1e-3) << "rotated " << err[1] << ", unrotated " << err[0];
}

TEST(RotationCheckpoint, MalformedTransformsAreRefused) {
  auto dir = test::temp_dir("rot-ckpt-bad");
  rotated_rtn(RopeStyle::Half, dir, nullptr);
  const std::string cfg = (dir / "config.json").string(), st = (dir / "model.safetensors").string();
  nlohmann::json j;
  {
    std::ifstream in(cfg);
    j = nlohmann::json::parse(in);
  }
  auto expect_error = [&](const std::string& needle) {
    test::expect_message([&] { load_quantized_model(dir.string()); }, needle);
  };
  test::expect_transform_edits_refused(cfg, j,
                                       {{"rotation", "givens", "givens"},
                                        {"act", "int3", "int3"},
                                        {"act", 8, "act"},
                                        {"act_clip", 1.5, "clip"},
                                        {"kv_quant", "int8", "int8"},
                                        {"kv_group", 0, "kv_group"},
                                        {"kv_window", -1, "kv_window"},
                                        {"rotation_seed", -3, "rotation_seed"},
                                        {"kv_group", 2.5, "kv_group"}},
                                       expect_error);
  auto bad = j;
  bad["quantization_config"]["transforms"] = "hadamard";
  std::ofstream(cfg) << bad.dump();
  expect_error("transforms");
  std::ofstream(cfg) << j.dump();
  EXPECT_NO_THROW(load_quantized_model(dir.string()));
  // The rotation tensors: missing, wrong size, not +-1, not orthogonal.
  const test::SafetensorsSnapshot snap(st);
  snap.rewrite("lowbit.rotation.ffn.signs", nullptr);
  expect_error("ffn rotation is missing");
  snap.rewrite("lowbit.rotation.ffn.signs", [](const Tensor& t) { return t.slice(0, 0, t.numel() - 1).contiguous(); });
  expect_error("ffn rotation signs");
  snap.rewrite("lowbit.rotation.head.signs", [](const Tensor& t) {
    Tensor u = t.clone();
    u.data<float>()[0] = 2.0f;
    return u;
  });
  expect_error("not +-1");
  snap.rewrite("lowbit.rotation.ffn.small", [](const Tensor& t) {
    Tensor u = t.clone();
    u.data<float>()[0] += 0.3f;
    return u;
  });
  expect_error("not orthogonal");
}

// A packed model with per-token symmetric activations (int8 / int4, clip 1) runs its block products on
// the integer codes at every row count (ops::QuantActPerRowScope, the packed W4A8 / W4A4 product):
// the prefill (24 rows) with the Auto path is bit-identical to forcing the Int8 body, and within
// f32-rounding effects of the simulation (fake quantization + f32 products, --matmul exact); an
// asymmetric activation quantizer keeps the simulated path (Auto = Exact at 24 rows).
TEST(RotationCheckpoint, PerTokenActivationsRunTheIntegerProducts) {
  auto dir = test::temp_dir("rot-w4a8");
  Tensor calib;
  rotated_rtn(RopeStyle::Half, dir, &calib);
  QuantizedCheckpoint q = load_quantized_model(dir.string());
  const Tensor tokens = calib.slice(0, 0, 1).contiguous();
  for (const char* act : {"int8", "int4", "int8-asym"}) {
    SCOPED_TRACE(act);
    auto m = make_quantized_model(q);
    ModelTransforms t = m->transforms();
    t.act = parse_act_quant(act);
    t.kv = KVQuantSpec{};
    m->set_transforms(t);
    auto logits = [&](ops::QuantMatmulPath p) {
      ops::set_quant_matmul_default(p);
      Tensor l = test::logits_of(*m, tokens);
      ops::set_quant_matmul_default(ops::QuantMatmulPath::Auto);
      return l;
    };
    const Tensor yauto = logits(ops::QuantMatmulPath::Auto), yint8 = logits(ops::QuantMatmulPath::Int8),
                 yexact = logits(ops::QuantMatmulPath::Exact);
    if (std::string(act) == "int8-asym") {
      EXPECT_EQ(max_abs_diff(yauto, yexact), 0.0);
      continue;
    }
    EXPECT_EQ(max_abs_diff(yauto, yint8), 0.0);
    EXPECT_GT(max_abs_diff(yauto, yexact), 0.0);
    EXPECT_LT(max_abs_diff(yauto, yexact), 1e-3);
  }
}
