// Mixed formats per tensor through the block pipeline (BlockContext::format_of): every method of
// the registry quantizes each linear in the format the plan gives it; the quantized checkpoint
// keeps the per-layer formats (quantization_config.layer_formats); GGUF export writes each layer's
// ggml type and packs the planned vocabulary matrices; GPTQ rounds the k-quant layers of a plan to
// nearest and counts them.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "common/small_model.h"
#include "common/test_util.h"
#include "lowbit/io/gguf.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/methods/registry.h"
#include "lowbit/quant/format_map.h"
#include "lowbit/quant/quant_linear.h"

using namespace lowbit;
namespace fs = std::filesystem;

namespace {

Tensor calib_tokens(const LlamaConfig& c) {
  std::vector<int32_t> stream;
  for (int i = 0; i < 400; ++i) stream.push_back((i * 13 + 5) % c.vocab_size);
  return sample_calibration(stream, 4, 16, 1);
}

// The format of every linear of the model, by module name.
std::map<std::string, std::string> formats_of(LlamaModel& m) {
  std::map<std::string, std::string> out;
  for (int i = 0; i < m.n_layers(); ++i)
    for (auto& [name, slot] : m.block(i).linears()) {
      auto* q = dynamic_cast<const QuantLinear*>(slot->get());
      out["model.layers." + std::to_string(i) + "." + name] = q ? q->quantized().fmt().name : "dense";
    }
  return out;
}

std::map<std::string, std::string> names(const FormatPlan& p) {
  std::map<std::string, std::string> out;
  for (const auto& [m, id] : p.formats)
    if (m.rfind("model.layers.", 0) == 0) out[m] = quant_format(id).name;
  return out;
}

}  // namespace

TEST(FormatPlan, EveryRegisteredMethodFollowsThePlan) {
  const LlamaConfig c = test::small_config(RopeStyle::Half);
  const FormatPlan plan = plan_from_map(
      parse_format_map("attn_v int8pc\nffn_down layers=1 int3g32\nattn_q layers=0 int2g32\ndefault int4g32\n", "plan"),
      c, quant_format(QuantFormatId::Int4G128));
  const Tensor calib = calib_tokens(c);
  for (const MethodInfo& info : method_registry()) {
    if (info.name == "sapr") continue;  // ApiqMethod with a saliency map: the apiq rows cover its format path
    auto m = std::make_unique<LlamaModel>(c, random_weights(c, 5));
    MethodConfig mc;
    mc.format = &quant_format(QuantFormatId::Int4G32);
    mc.apiq.epochs = 1;
    mc.apiq.layer.rank = 2;
    mc.adaround.iters = 50;  // the format path, not the optimisation, is under test
    mc.base = "gptq";
    // ptqtp writes only tp2g128: the plan's integer layers are rounded to nearest by it.
    if (!info.default_format.empty()) mc.format = &parse_quant_format(info.default_format);
    auto method = make_method(info.name, mc);
    PipelineOptions o;
    o.progress = false;
    o.formats = &plan.formats;
    run_blockwise(*m, calib, *method, *mc.format, o);
    EXPECT_EQ(formats_of(*m), names(plan)) << info.name;
  }
}

TEST(FormatPlan, CheckpointAndGgufKeepEachLayersFormat) {
  LlamaConfig c = test::small_config(RopeStyle::Interleaved);
  c.tied_embeddings = false;
  const FormatPlan plan = plan_from_map(
      parse_format_map("attn_v q8_0\nffn_down layers=0 q5_0\ntoken_embd q8_0\noutput q4_1\ndefault q4_0\n", "p.txt"),
      c, quant_format(QuantFormatId::Int4G128));
  auto m = std::make_unique<LlamaModel>(c, random_weights(c, 9));
  const QuantFormat& base = quant_format(plan.base);
  GptqMethod gptq(base, GptqOptions{});
  PipelineOptions o;
  o.progress = false;
  o.formats = &plan.formats;
  run_blockwise(*m, calib_tokens(c), gptq, base, o);
  EXPECT_EQ(formats_of(*m), names(plan));
  EXPECT_EQ(gptq.rtn_layers(), 0);
  const fs::path dir = test::temp_dir("format-plan");
  nlohmann::json vf = nlohmann::json::object();
  for (const auto& [mod, id] : plan.vocab_formats()) vf[mod] = quant_format(id).name;
  save_quantized_model(dir.string(), *m, "gptq", base, {{"format_plan", {{"origin", plan.origin}, {"vocab_formats", vf}}}});
  QuantizedCheckpoint q = load_quantized_model(dir.string());
  for (const auto& [mod, f] : names(plan)) EXPECT_EQ(q.quantized.at(mod).fmt().name, f) << mod;
  // Export: vocabulary packed as planned, every linear in its own type.
  EXPECT_GT(pack_vocab(q, plan.vocab_formats()), 0);
  const std::string path = dir.string() + ".gguf";
  save_gguf_quantized(path, q, nullptr, nlohmann::json{{"format_plan", {{"origin", plan.origin}, {"llama_ftype", -1}}}}.dump());
  GgufFile g = GgufFile::open(path);
  for (const PlanTensor& t : plan_tensors(c)) {
    const GgufTensorInfo* info = g.find_tensor(gguf_tensor_name(t));
    ASSERT_NE(info, nullptr) << gguf_tensor_name(t);
    EXPECT_EQ(int(info->ggml_type), quant_format(plan.formats.at(t.module)).ggml_type) << gguf_tensor_name(t);
  }
  ASSERT_NE(g.find("lowbit.quantization.format_plan"), nullptr);
  EXPECT_EQ(g.find("lowbit.quantization.format_plan")->str, "format-map p.txt");
  EXPECT_EQ(g.find("general.file_type")->u, 2u);  // the base type's llama_ftype (MOSTLY_Q4_0)
  // A layer_formats entry that names no layer, or an unknown format, is refused.
  {
    std::ifstream in(dir / "config.json");
    nlohmann::json cfg = nlohmann::json::parse(in);
    cfg["quantization_config"]["layer_formats"]["model.layers.9.mlp.up_proj"] = "q8_0";
    std::ofstream(dir / "config.json") << cfg.dump();
    try {
      load_quantized_model(dir.string());
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("layer_formats names 'model.layers.9.mlp.up_proj'"), std::string::npos)
          << e.what();
    }
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
  fs::remove(path, ec);
}

TEST(FormatPlan, GptqSweepsKQuantLayersAndRoundsIq4XsToNearest) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  c.dim = 256;
  c.hidden_dim = 256;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  // k-quant layers run GPTQ's sweep on their two-level grid (ggml_grid.h); iq4_xs has no per-value
  // grid and is rounded to nearest, counted in rtn_layers().
  for (const char* map : {"attn_v q6_k\nffn_down q3_k\ndefault q4_0\n", "attn_v iq4_xs\ndefault q4_k\n"}) {
    const FormatPlan plan = plan_from_map(parse_format_map(map, "p"), c, quant_format(QuantFormatId::Q4_0));
    auto m = std::make_unique<LlamaModel>(c, random_weights(c, 3));
    GptqMethod gptq(quant_format(QuantFormatId::Q4_0), GptqOptions{});
    PipelineOptions o;
    o.progress = false;
    o.formats = &plan.formats;
    run_blockwise(*m, calib_tokens(c), gptq, quant_format(QuantFormatId::Q4_0), o);
    EXPECT_EQ(formats_of(*m), names(plan)) << map;
    EXPECT_EQ(gptq.rtn_layers(), std::string(map).find("iq4_xs") != std::string::npos ? c.n_layers : 0) << map;
  }
}
