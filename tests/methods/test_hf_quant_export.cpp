// Export of lowbit quantized directories to AutoGPTQ's and AutoAWQ's safetensors layouts
// (io/hf_quant_export.h): an independent numpy unpacker (hf_quant_unpack.py, written from the
// layouts' descriptions) must recover lowbit's dequantized weights bit for bit, for every format
// the layouts hold; the formats and shapes they cannot hold are refused with a clear error.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common/small_model.h"
#include "common/test_util.h"
#include "lowbit/io/hf_quant_export.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/pipeline.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/model/weights.h"
#include "lowbit/quant/paretoq.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"

using namespace lowbit;
namespace fs = std::filesystem;

namespace {

// RTN of a small random model (dim 64, hidden 96, 4/2 heads) in format `fmt`. With `positive`,
// the up projections are made non-negative, so their asymmetric zero points are 0.
std::string quantized_dir(const std::string& fmt, bool positive = false) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaWeights w = random_weights(c, 5);
  if (positive)
    for (auto& l : w.layers) {
      float* p = l.w_up.data<float>();
      for (int64_t i = 0; i < l.w_up.numel(); ++i) p[i] = std::fabs(p[i]);
    }
  LlamaModel m(c, w);
  const QuantFormat& f = parse_quant_format(fmt);
  std::vector<int32_t> stream;
  for (int i = 0; i < 200; ++i) stream.push_back((i * 7 + 3) % c.vocab_size);
  RtnMethod rtn(f);
  PipelineOptions o;
  o.progress = false;
  run_blockwise(m, sample_calibration(stream, 2, 16, 1), rtn, f, o);
  auto dir = test::temp_dir("hfq-" + fmt + (positive ? "-pos" : ""));
  save_quantized_model(dir.string(), m, "rtn", f);
  return dir.string();
}

std::pair<std::string, int> run(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return {"", -1};
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int st = pclose(p);
  return {out, WIFEXITED(st) ? WEXITSTATUS(st) : -1};
}

// Exports `dir` and runs the numpy unpacker against lowbit's dequantized weights. Returns the
// unpacker's "ok ..." line, or "" when python3/numpy/safetensors are missing.
std::string export_and_check(const std::string& dir, HfQuantLayout layout, HfQuantExportInfo* info = nullptr) {
  const std::string out = dir + "-" + hf_quant_layout_name(layout);
  HfQuantExportInfo i = export_hf_quant_layout(dir, out, layout);
  if (info) *info = i;
  QuantizedCheckpoint q = load_quantized_model(dir, /*dense_view=*/false);
  std::vector<std::pair<std::string, Tensor>> ref;
  for (const auto& [name, t] : q.quantized) ref.emplace_back(name, t.dequantize());
  EXPECT_EQ(int(ref.size()), i.layers);
  const std::string ref_path = out + "-reference.safetensors";
  save_safetensors(ref_path, ref);
  const std::string script = (fs::path(LOWBIT_SOURCE_DIR) / "tests/methods/hf_quant_unpack.py").string();
  auto [text, rc] = run("python3 '" + script + "' '" + out + "' '" + ref_path + "' 2>&1");
  if (rc == 3 || rc == 127) return "";
  EXPECT_EQ(rc, 0) << text;
  return text;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST(HfQuantExport, GptqLayoutUnpacksToLowbitsWeights) {
  int checked = 0;
  for (const char* fmt : {"int4g32", "int4g32s", "int3g32", "int3g64s", "int2g32", "int2g64s", "int4pc", "int3pcs", "int8pc"}) {
    SCOPED_TRACE(fmt);
    HfQuantExportInfo info;
    const std::string ok = export_and_check(quantized_dir(fmt), HfQuantLayout::Gptq, &info);
    EXPECT_EQ(info.checkpoint_format, "gptq");
    EXPECT_EQ(info.layers, 2 * 7);
    if (ok.empty()) continue;
    EXPECT_EQ(ok.rfind("ok gptq gptq 14", 0), 0u) << ok;
    ++checked;
  }
  if (checked == 0) GTEST_SKIP() << "python3 with numpy and safetensors is not available (pip install numpy safetensors)";
}

TEST(HfQuantExport, ZeroPointZeroIsWrittenAsGptqV2) {
  HfQuantExportInfo info;
  const std::string ok = export_and_check(quantized_dir("int4g32", /*positive=*/true), HfQuantLayout::Gptq, &info);
  EXPECT_EQ(info.checkpoint_format, "gptq_v2");
  if (ok.empty()) GTEST_SKIP() << "python3 with numpy and safetensors is not available";
  EXPECT_EQ(ok.rfind("ok gptq gptq_v2 14", 0), 0u) << ok;
}

TEST(HfQuantExport, AwqLayoutUnpacksToLowbitsWeights) {
  int checked = 0;
  for (const char* fmt : {"int4g32", "int4g32s"}) {
    SCOPED_TRACE(fmt);
    HfQuantExportInfo info;
    const std::string ok = export_and_check(quantized_dir(fmt), HfQuantLayout::Awq, &info);
    EXPECT_EQ(info.checkpoint_format, "gemm");
    if (ok.empty()) continue;
    EXPECT_EQ(ok.rfind("ok awq gemm 14", 0), 0u) << ok;
    ++checked;
  }
  if (checked == 0) GTEST_SKIP() << "python3 with numpy and safetensors is not available";
}

TEST(HfQuantExport, RefusesWhatTheLayoutsCannotHold) {
  const std::string q40 = quantized_dir("q4_0");
  EXPECT_NE(error_of([&] { export_hf_quant_layout(q40, q40 + "-x", HfQuantLayout::Gptq); })
                .find("format q4_0 cannot be exported as gptq: the gptq layout holds"),
            std::string::npos);
  const std::string i3 = quantized_dir("int3g32");
  EXPECT_NE(error_of([&] { export_hf_quant_layout(i3, i3 + "-x", HfQuantLayout::Awq); })
                .find("format int3g32 cannot be exported as awq: the awq (GEMM) layout holds 4-bit group formats only"),
            std::string::npos);
  const std::string pc = quantized_dir("int4pc");
  EXPECT_NE(error_of([&] { export_hf_quant_layout(pc, pc + "-x", HfQuantLayout::Awq); }).find("cannot be exported as awq"),
            std::string::npos);
  const std::string tern = quantized_dir("ternary");
  EXPECT_NE(error_of([&] { export_hf_quant_layout(tern, tern + "-x", HfQuantLayout::Gptq); }).find("cannot be exported as gptq"),
            std::string::npos);
  EXPECT_NE(error_of([&] { export_hf_quant_layout(i3, i3, HfQuantLayout::Gptq); }).find("is the input directory"),
            std::string::npos);
  EXPECT_NE(error_of([&] { parse_hf_quant_layout("exl2"); }).find("unknown layout (known: gptq, awq)"), std::string::npos);
  EXPECT_NE(error_of([&] { export_hf_quant_layout(i3 + "-nothing", i3 + "-x", HfQuantLayout::Gptq); })
                .find("not a lowbit quantized directory"),
            std::string::npos);
  for (const std::string& d : {q40, i3, pc, tern}) EXPECT_FALSE(fs::exists(d + "-x")) << d;
}

TEST(HfQuantExport, RefusesHalfIntegerZeroPoints) {
  // ParetoQ's 2-bit SEQ grid is stored with zero point 1.5, which the integer layouts cannot hold.
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaModel m(c, random_weights(c, 5));
  const QuantFormat& f = parse_quant_format("int2g32");
  for (int i = 0; i < m.n_layers(); ++i)
    for (auto& [name, slot] : m.block(i).linears()) {
      const Tensor w = (*slot)->effective_weight();
      const Tensor a = paretoq_init_alpha(w, ParetoQBits::Two, f);
      *slot = std::make_shared<QuantLinear>(paretoq_encode(w, a, ParetoQBits::Two, f), (*slot)->bias(), Device::CPU);
    }
  const std::string dir = test::temp_dir("hfq-paretoq").string();
  save_quantized_model(dir, m, "paretoq", f);
  EXPECT_NE(error_of([&] { export_hf_quant_layout(dir, dir + "-x", HfQuantLayout::Gptq); })
                .find("the gptq layout stores integer zero points only"),
            std::string::npos);
  EXPECT_FALSE(fs::exists(dir + "-x"));
}

TEST(HfQuantExport, RefusesLoraAdaptersInBothLayouts) {
  // ApiQ/SAPR keep LoRA adapters beside the codes; neither layout has a place for them, whether the
  // directory stores them separately or merged into dense layers. Nothing is written.
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaModel m(c, random_weights(c, 5));
  const QuantFormat& f = parse_quant_format("int4g32");
  for (int i = 0; i < m.n_layers(); ++i)
    for (auto& [name, slot] : m.block(i).linears()) {
      const Tensor w = (*slot)->effective_weight();
      const int64_t out = w.shape()[0], in = w.shape()[1], rank = 4;
      Tensor a = Tensor::zeros({rank, in}, DType::F32), b = Tensor::zeros({out, rank}, DType::F32);
      a.data<float>()[0] = 0.01f;
      b.data<float>()[0] = 0.01f;
      *slot = std::make_shared<QuantLinear>(quantize(w, f), (*slot)->bias(), Device::CPU, a, b);
    }
  for (LoraStorage storage : {LoraStorage::Separate, LoraStorage::Merged}) {
    const bool merged = storage == LoraStorage::Merged;
    const std::string dir = test::temp_dir(merged ? "hfq-lora-merged" : "hfq-lora-separate").string();
    save_quantized_model(dir, m, "apiq", f, {}, storage);
    for (HfQuantLayout layout : {HfQuantLayout::Gptq, HfQuantLayout::Awq}) {
      const std::string msg = error_of([&] { export_hf_quant_layout(dir, dir + "-x", layout); });
      EXPECT_NE(msg.find(std::string("has LoRA adapters (") + (merged ? "merged" : "separate")), std::string::npos) << msg;
      EXPECT_NE(msg.find(std::string("the ") + hf_quant_layout_name(layout)), std::string::npos) << msg;
      EXPECT_FALSE(fs::exists(dir + "-x"));
    }
  }
}
