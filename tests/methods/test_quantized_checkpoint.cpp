// Quantized checkpoints: save -> load gives the same model; malformed directories are refused.
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <fstream>

#include "common/expect_message.h"
#include "common/test_util.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/methods/saliency.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"

#include "common/small_model.h"

using namespace lowbit;
namespace fs = std::filesystem;

namespace {
using test::logits_of;
using test::small_config;

// Quantizes m with RTN to f on windows of a fixed token stream and saves it as a lowbit directory
// in `dir`; returns the calibration windows (the tests use them as prompts).
Tensor rtn_and_save(LlamaModel& m, const QuantFormat& f, const fs::path& dir) {
  std::vector<int32_t> stream;
  for (int i = 0; i < 300; ++i) stream.push_back((i * 7 + 3) % m.config().vocab_size);
  Tensor calib = sample_calibration(stream, 4, 16, 1);
  RtnMethod rtn(f);
  PipelineOptions o;
  o.progress = false;
  run_blockwise(m, calib, rtn, f, o);
  save_quantized_model(dir.string(), m, "rtn", f);
  return calib;
}
}  // namespace

TEST(QuantizedCheckpoint, RoundTripKeepsLogits) {
  for (auto style : {RopeStyle::Interleaved, RopeStyle::Half})
    for (const char* fmt : {"int4g32", "int2g64", "int3g32s", "ternary", "mxfp4", "nvfp4", "q4_0", "q8_0", "q5_1", "tp2g128", "onebit"}) {
      LlamaConfig c = small_config(style);
      LlamaModel m(c, random_weights(c, 7));
      const QuantFormat& f = parse_quant_format(fmt);
      std::vector<int32_t> stream;
      for (int i = 0; i < 400; ++i) stream.push_back((i * 13 + 5) % c.vocab_size);
      Tensor calib = sample_calibration(stream, 4, 16, 1);
      RtnMethod rtn(f);
      PipelineOptions o;
      o.progress = false;
      run_blockwise(m, calib, rtn, f, o);
      auto dir = test::temp_dir(std::string("qckpt-") + fmt);
      save_quantized_model(dir.string(), m, "rtn", f);
      ASSERT_TRUE(is_lowbit_quantized_dir(dir.string()));
      QuantizedCheckpoint q = load_quantized_model(dir.string());
      EXPECT_EQ(q.quantized.size(), 14u);
      EXPECT_EQ(q.dense.config.rope_style, RopeStyle::Half);  // stored in the HF layout
      auto back = make_quantized_model(q);
      Tensor tokens = calib.slice(0, 0, 2).contiguous();
      EXPECT_LT(max_abs_diff(logits_of(m, tokens), logits_of(*back, tokens)), 1e-4) << fmt;
    }
}

TEST(QuantizedCheckpoint, PackedLoadHasNoDenseCopyAndMatchesTheDenseView) {
  LlamaConfig c = small_config(RopeStyle::Half);
  LlamaModel m(c, random_weights(c, 9));
  const QuantFormat& f = parse_quant_format("int4g32");
  auto dir = test::temp_dir("qckpt-packed");
  Tensor calib = rtn_and_save(m, f, dir);
  QuantizedCheckpoint dense = load_quantized_model(dir.string());
  QuantizedCheckpoint packed = load_quantized_model(dir.string(), /*dense_view=*/false);
  // The dense view of a packed linear is a zero placeholder; the packed codes are the same bytes.
  const Tensor& wq = packed.dense.weights.layers[0].wq;
  ASSERT_TRUE(wq.defined());
  EXPECT_EQ(wq.shape(), (Shape{c.dim, c.dim}));
  EXPECT_EQ(max_abs_diff(wq, Tensor::zeros(wq.shape())), 0.0);
  auto a = make_quantized_model(dense), b = make_quantized_model(packed);
  Tensor tokens = calib.slice(0, 0, 2).contiguous();
  // M = 32 tokens: the exact (f32-activation) body, so the two agree to f32 rounding.
  EXPECT_LT(max_abs_diff(logits_of(*a, tokens), logits_of(*b, tokens)), 1e-4);
  for (int i = 0; i < b->n_layers(); ++i)
    for (auto& [name, slot] : b->block(i).linears()) {
      auto* ql = dynamic_cast<QuantLinear*>(slot->get());
      ASSERT_NE(ql, nullptr) << name;
      EXPECT_FALSE(ql->has_dequantized_weight()) << name << ": inference built an f32 copy";
    }
}

// The packed model on the GPU (packed linears, a packed q8_0 vocabulary: embedding lookups and the
// head from the device copies) computes what the packed model on the CPU does: prefill through the
// exact bodies, decode through the int8-activation bodies (the same int8 operand on both).
TEST(QuantizedCheckpoint, GpuPackedModelMatchesTheCpuPackedModel) {
  if (!init_cuda()) GTEST_SKIP() << "no CUDA device (or a CPU-only build)";
  ops::set_cuda_packed_enabled(true);  // the default; said again so that LOWBIT_CUDA_PACKED=0 cannot skip it
  LlamaConfig c = small_config(RopeStyle::Half);
  LlamaModel m(c, random_weights(c, 9));
  const QuantFormat& f = parse_quant_format("int4g32");
  auto dir = test::temp_dir("qckpt-gpu");
  Tensor calib = rtn_and_save(m, f, dir);
  QuantizedCheckpoint q = load_quantized_model(dir.string(), /*dense_view=*/false);
  const QuantFormat& q8 = parse_quant_format("q8_0");
  q.quantized["model.embed_tokens"] = quantize(q.dense.weights.tok_embeddings, q8);
  if (!c.tied_embeddings) q.quantized["lm_head"] = quantize(q.dense.weights.output, q8);
  auto cpu = make_quantized_model(q, Device::CPU), gpu = make_quantized_model(q, Device::CUDA);
  ASSERT_TRUE(gpu->packed_output());
  NoGradGuard ng;
  const Tensor prompt = calib.slice(0, 0, 1).contiguous().view({-1}).slice(0, 0, 12).contiguous();
  // Prompt then 4 decode steps on one model; the logits of each step, on the CPU. Both caches f32:
  // the CPU's default f16 cache moves activations across int8 rounding boundaries (the first H100
  // run of this test compared it with the GPU's f32 cache and saw 1.2e-3..3.9e-3 — the same numbers,
  // to the last digit, as the CPU with an f32 cache against the CPU with its f16 one).
  auto run = [&](LlamaModel& model) {
    KVCache kv = model.make_cache(20, KVCacheType::F32);
    std::vector<Tensor> out{model.forward_cached(prompt, kv).value().to(Device::CPU)};
    for (int t = 0; t < 4; ++t) {
      const Tensor tok = Tensor::from_vector(std::vector<int32_t>{(t * 11 + 2) % int32_t(c.vocab_size)}, {1});
      out.push_back(model.forward_cached(tok, kv).value().to(Device::CPU));
    }
    return out;
  };
  // Every matmul through the exact (f32-activation) bodies, then the default rule (decode steps
  // through the int8-activation bodies, the same int8 operand on both devices).
  for (const auto path : {ops::QuantMatmulPath::Exact, ops::QuantMatmulPath::Auto}) {
    ops::set_quant_matmul_default(path);
    const auto lc = run(*cpu), lg = run(*gpu);
    for (size_t s = 0; s < lc.size(); ++s)
      EXPECT_LT(max_abs_diff(lc[s], lg[s]), 1e-3) << (path == ops::QuantMatmulPath::Exact ? "exact" : "default")
                                                  << " bodies, " << (s ? "decode step " : "prompt") << s;
  }
  ops::set_quant_matmul_default(ops::QuantMatmulPath::Auto);
  for (int i = 0; i < gpu->n_layers(); ++i)
    for (auto& [name, slot] : gpu->block(i).linears()) {
      auto* ql = dynamic_cast<QuantLinear*>(slot->get());
      ASSERT_NE(ql, nullptr) << name;
      EXPECT_FALSE(ql->has_dequantized_weight()) << name << ": GPU inference built an f32 copy";
      EXPECT_TRUE(ql->quantized().has_device_copy()) << name;
    }
  // The weights of the packed GPU model (the decoded q8_0 vocabulary included) live on the GPU:
  // SAPR's saliency pass runs a dense model built from them (the first H100 run of the SmolLM2 plan
  // failed there: the decoded embedding stayed on the host).
  const LlamaWeights w = gpu->weights();
  EXPECT_EQ(w.tok_embeddings.device(), Device::CUDA);
  EXPECT_EQ(w.layers[0].wq.device(), Device::CUDA);
  SaliencyOptions so;
  const SaliencyMap sal = compute_saliency(c, w, calib.slice(0, 0, 1).contiguous().slice(1, 0, 8).contiguous(), so);
  EXPECT_EQ(sal.scores.size(), size_t(7 * c.n_layers));
}

// pack_vocab: the dense embedding/output of a lowbit directory become q8_0 blocks for inference;
// the logits stay within q8_0's rounding of the vocabulary matrix (tied and untied heads), the
// dense tensors become placeholders, and a second call changes nothing.
TEST(QuantizedCheckpoint, PackVocabRunsTheVocabularyAsQ8_0) {
  for (bool tied : {false, true}) {
    LlamaConfig c = small_config(RopeStyle::Half);
    c.tied_embeddings = tied;
    LlamaModel m(c, random_weights(c, 11));
    const QuantFormat& f = parse_quant_format("int4g32");
    auto dir = test::temp_dir(std::string("qckpt-vocab") + (tied ? "-tied" : ""));
    Tensor calib = rtn_and_save(m, f, dir);
    QuantizedCheckpoint plain = load_quantized_model(dir.string(), false), packed = load_quantized_model(dir.string(), false);
    const Tensor emb = packed.dense.weights.tok_embeddings.contiguous();
    const int64_t bytes = pack_vocab(packed);
    const int64_t blocks = c.vocab_size * c.dim / 32;
    EXPECT_EQ(bytes, blocks * 34 * (tied ? 1 : 2));  // q8_0: 32 codes + an f16 scale per block
    EXPECT_EQ(packed.quantized.count("lm_head"), tied ? 0u : 1u);
    EXPECT_EQ(max_abs_diff(packed.dense.weights.tok_embeddings, Tensor::zeros(emb.shape())), 0.0);  // placeholder
    EXPECT_EQ(pack_vocab(packed), 0);
    auto a = make_quantized_model(plain), b = make_quantized_model(packed);
    ASSERT_TRUE(b->packed_output());
    EXPECT_FALSE(a->packed_output());
    Tensor tokens = calib.slice(0, 0, 2).contiguous();
    const Tensor la = logits_of(*a, tokens), lb = logits_of(*b, tokens);
    // Tolerance: q8_0 rounds each value to within absmax/254 of its block of 32 (random weights of
    // std ~0.02-0.1 here); measured max |dlogit| ~1e-2.
    EXPECT_LT(max_abs_diff(la, lb), 5e-2) << "tied " << tied;
    EXPECT_GT(max_abs_diff(la, lb), 0.0);
  }
}

TEST(QuantizedCheckpoint, MalformedDirectoriesGiveClearErrors) {
  LlamaConfig c = small_config(RopeStyle::Half);
  LlamaModel m(c, random_weights(c, 7));
  const QuantFormat& f = parse_quant_format("int4g32");
  std::vector<int32_t> stream(200, 3);
  RtnMethod rtn(f);
  PipelineOptions o;
  o.progress = false;
  run_blockwise(m, sample_calibration(stream, 2, 8, 1), rtn, f, o);
  auto dir = test::temp_dir("qckpt-bad");
  save_quantized_model(dir.string(), m, "rtn", f);
  const std::string cfg = (dir / "config.json").string(), st = (dir / "model.safetensors").string();
  std::ifstream in(cfg);
  nlohmann::json j = nlohmann::json::parse(in);
  auto expect_error = [&](const std::string& needle) {
    test::expect_message([&] { load_quantized_model(dir.string()); }, needle);
  };
  // Unknown format name.
  auto bad = j;
  bad["quantization_config"]["format"] = "int5g7";
  std::ofstream(cfg) << bad.dump();
  expect_error("int5g7");
  std::ofstream(cfg) << j.dump();
  // Missing scales / wrong packed size: rewrite the safetensors without or with a wrong tensor.
  SafetensorsFile f0 = SafetensorsFile::open(st);
  std::vector<std::pair<std::string, Tensor>> all;
  for (const auto& t : f0.tensors()) all.emplace_back(t.name, f0.load(t.name));
  auto rewrite = [&](const std::string& drop, const std::string& shrink) {
    std::vector<std::pair<std::string, Tensor>> ts;
    for (auto& [n, t] : all) {
      if (n == drop) continue;
      ts.emplace_back(n, n == shrink ? t.slice(1, 0, t.size(1) - 1).contiguous() : t);
    }
    save_safetensors(st, ts);
  };
  rewrite("model.layers.1.mlp.up_proj.scales", "");
  expect_error("model.layers.1.mlp.up_proj");
  rewrite("", "model.layers.0.self_attn.q_proj.qweight");
  expect_error("model.layers.0.self_attn.q_proj");
  rewrite("model.norm.weight", "");
  expect_error("model.norm.weight");
}

// tp2g128 stores two 2-bit planes of t + 1: a checkpoint holding a plane code 3 is malformed and the
// load names the layer, plane, row and column.
TEST(QuantizedCheckpoint, TritPlaneCodesOutOfRangeAreRejected) {
  LlamaConfig c = small_config(RopeStyle::Half);
  LlamaModel m(c, random_weights(c, 7));
  const QuantFormat& f = parse_quant_format("tp2g128");
  std::vector<int32_t> stream(200, 3);
  RtnMethod rtn(f);
  PipelineOptions o;
  o.progress = false;
  run_blockwise(m, sample_calibration(stream, 2, 8, 1), rtn, f, o);
  auto dir = test::temp_dir("qckpt-tp-bad");
  save_quantized_model(dir.string(), m, "rtn", f);
  EXPECT_NO_THROW(load_quantized_model(dir.string()));
  const std::string st = (dir / "model.safetensors").string();
  SafetensorsFile f0 = SafetensorsFile::open(st);
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& t : f0.tensors()) {
    Tensor v = f0.load(t.name).clone();
    if (t.name == "model.layers.1.mlp.down_proj.qweight") v.data<uint8_t>()[3] = 0xf0;  // plane 1, columns 14-15: 3
    ts.emplace_back(t.name, v);
  }
  save_safetensors(st, ts);
  try {
    load_quantized_model(dir.string());
    ADD_FAILURE() << "a plane code 3 was accepted";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("model.layers.1.mlp.down_proj"), std::string::npos) << msg;
    EXPECT_NE(msg.find("plane 1 holds code 3 (not a trit: t + 1 is 0, 1 or 2) at row 0, column 14"), std::string::npos) << msg;
  }
}

// onebit (OneBit: sign bits, h per row, g per column): the column values g travel as <m>.col_scales;
// a checkpoint without them, with the wrong count, or with a sign bit past the last column is refused
// naming the file's layer and the field.
TEST(QuantizedCheckpoint, OneBitMalformedLayersAreRejected) {
  LlamaConfig c = small_config(RopeStyle::Half);
  c.hidden_dim = 92;  // down_proj rows of 92 columns: 4 padding bits in each row's last byte
  LlamaModel m(c, random_weights(c, 7));
  const QuantFormat& f = parse_quant_format("onebit");
  std::vector<int32_t> stream(200, 3);
  RtnMethod rtn(f);
  PipelineOptions o;
  o.progress = false;
  run_blockwise(m, sample_calibration(stream, 2, 8, 1), rtn, f, o);
  auto dir = test::temp_dir("qckpt-onebit-bad");
  save_quantized_model(dir.string(), m, "rtn", f);
  EXPECT_NO_THROW(load_quantized_model(dir.string()));
  const std::string st = (dir / "model.safetensors").string();
  SafetensorsFile f0 = SafetensorsFile::open(st);
  std::vector<std::pair<std::string, Tensor>> all;
  for (const auto& t : f0.tensors()) all.emplace_back(t.name, f0.load(t.name).clone());
  const std::string layer = "model.layers.1.mlp.down_proj";
  using Tensors = std::vector<std::pair<std::string, Tensor>>;
  auto expect_error = [&](const std::function<void(Tensors&)>& edit,
                          const std::string& needle) {
    auto ts = all;
    edit(ts);
    save_safetensors(st, ts);
    const std::string m = test::expect_message([&] { load_quantized_model(dir.string()); }, needle);
    EXPECT_TRUE(m.empty() || m.find(layer) != std::string::npos) << m;  // empty: already a failure
  };
  expect_error([&](Tensors& ts) { std::erase_if(ts, [&](const auto& p) { return p.first == layer + ".col_scales"; }); },
               "[onebit] quantized tensor lacks its 'col_scales' tensor");
  expect_error([&](Tensors& ts) {
    for (auto& [n, t] : ts)
      if (n == layer + ".col_scales") t = t.slice(0, 0, t.size(0) - 1).contiguous();
  }, "'col_scales' is");
  expect_error([&](Tensors& ts) {
    for (auto& [n, t] : ts)
      if (n == layer + ".qweight") {
        t = t.clone();  // the copy of `all` shares its tensors
        t.data<uint8_t>()[t.size(1) - 1] |= 0x80;  // row 0, past column 92
      }
  }, "row 0 has sign bits set beyond its 92 columns");
  save_safetensors(st, all);
  EXPECT_NO_THROW(load_quantized_model(dir.string()));
}
