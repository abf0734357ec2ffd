// `lowbit quantize --method apiq|sapr ... -o FILE.gguf` on llama.cpp's block types, end to end: a
// 256-wide random model (k-quants without fallback), a q4_k_m plan (q4_k, q6_k, q5_0 ... per
// tensor), the GGUF written with the learned clipping only (--rank 0 by default) and read back.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "lowbit/io/gguf.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/model/weights.h"

using namespace lowbit;
namespace fs = std::filesystem;

namespace {
int run(const std::string& cmd) { return std::system(cmd.c_str()); }
}  // namespace

TEST(ApiqGgufCli, ApiqAndSaprWriteGgufOnBlockTypes) {
  LlamaConfig c;
  c.dim = 256;
  c.hidden_dim = 512;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 64;
  c.max_seq_len = 64;
  const fs::path dir = test::temp_dir("apiq-gguf-cli");
  fs::create_directories(dir);
  const fs::path model = dir / "f32.gguf", tokens = dir / "calib.i32";
  GgufSaveOptions so;
  so.dtype = DType::F32;
  save_gguf(model.string(), c, random_weights(c, 5), so);
  {
    std::ofstream t(tokens, std::ios::binary);
    for (int32_t i = 0; i < 600; ++i) {
      const int32_t id = (i * 11 + i / 7) % c.vocab_size;
      t.write(reinterpret_cast<const char*>(&id), 4);
    }
  }
  for (const std::string plan : {"--format q4_0", "--preset q4_k_m"})
    for (const std::string method : {"apiq", "sapr"}) {
      const fs::path out = dir / (method + (plan[2] == 'p' ? "-q4_k_m.gguf" : "-q4_0.gguf"));
      const std::string cmd = "'" + test::cli_path() + "' -q quantize -m '" + model.string() + "' --method " + method +
                              " " + plan + " --calib-tokens '" + tokens.string() +
                              "' --nsamples 2 --seqlen 32 --epochs 1 --clip-wd 0 -o '" + out.string() + "' 2>'" +
                              out.string() + ".err'";
      ASSERT_EQ(run(cmd), 0) << cmd;
      ASSERT_TRUE(fs::exists(out)) << out;
      GgufFile g = GgufFile::open(out.string());
      ASSERT_NE(g.find("lowbit.quantization.method"), nullptr);
      EXPECT_EQ(g.find("lowbit.quantization.method")->str, method);
      const QuantizedCheckpoint q = load_gguf_quantized(out.string());
      EXPECT_EQ(q.quantized.size(), size_t(7 * c.n_layers)) << out;  // every linear packed, no dense (merged) layer
      EXPECT_TRUE(q.lora.empty());
      if (plan == "--format q4_0") {
        for (const auto& [name, t] : q.quantized) EXPECT_EQ(t.format, QuantFormatId::Q4_0) << name;
      } else {
        bool has_q4k = false;
        for (const auto& [name, t] : q.quantized) has_q4k = has_q4k || t.format == QuantFormatId::Q4_K;
        EXPECT_TRUE(has_q4k) << "q4_k_m on 256-wide rows keeps q4_k tensors";
      }
    }
  fs::remove_all(dir);
}
