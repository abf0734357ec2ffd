// `lowbit quantize --calib-dtype` (issue 19): the ApiQ family keeps the pipeline's calibration
// activations in bf16 when asked (auto: with --bf16, which needs a GPU), records it in the report
// and the output's config, and other methods refuse it with a message naming the option.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "common/test_util.h"
#include "lowbit/io/gguf.h"
#include "lowbit/model/weights.h"

using namespace lowbit;
namespace fs = std::filesystem;

namespace {
std::string slurp(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}
}  // namespace

TEST(CalibDtypeCli, ApiqRecordsTheCacheDtypeAndOthersRefuseBf16) {
  LlamaConfig c;
  c.dim = 64;
  c.hidden_dim = 128;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 64;
  c.max_seq_len = 64;
  const fs::path dir = test::temp_dir("calib-dtype-cli");
  fs::create_directories(dir);
  const fs::path model = dir / "f32.gguf", tokens = dir / "calib.i32";
  GgufSaveOptions so;
  so.dtype = DType::F32;
  save_gguf(model.string(), c, random_weights(c, 9), so);
  {
    std::ofstream t(tokens, std::ios::binary);
    for (int32_t i = 0; i < 300; ++i) {
      const int32_t id = (i * 13 + i / 5) % c.vocab_size;
      t.write(reinterpret_cast<const char*>(&id), 4);
    }
  }
  auto cmd = [&](const std::string& method, const std::string& extra, const fs::path& out) {
    std::ostringstream c;  // (not "literal" + std::string: GCC 12's false -Wrestrict)
    c << "'" << test::cli_path() << "' -q quantize -m '" << model.string() << "' --method " << method
      << " --calib-tokens '" << tokens.string() << "' --nsamples 2 --seqlen 32 --epochs 1 " << extra << " -o '"
      << out.string() << "' 2>'" << out.string() << ".err'";
    return c.str();
  };
  for (const std::string d : {"auto", "f32", "bf16"}) {
    const fs::path out = dir / ("apiq-" + d);
    const std::string c1 = cmd("apiq", "--format int4g32 --calib-dtype " + d, out);
    ASSERT_EQ(std::system(c1.c_str()), 0) << c1 << "\n" << slurp(out.string() + ".err");
    const auto rep = nlohmann::json::parse(slurp(out / "quantize_report.json"), nullptr, false);
    ASSERT_FALSE(rep.is_discarded()) << out;
    const std::string text = rep.dump();
    EXPECT_NE(text.find(std::string("\"calib_dtype\":\"") + (d == "bf16" ? "bf16" : "f32") + "\""), std::string::npos)
        << d << ": " << text.substr(0, 400);
  }
  const fs::path bad = dir / "gptq-bf16";
  const std::string c2 = cmd("gptq", "--format int4g32 --calib-dtype bf16", bad);
  EXPECT_NE(std::system(c2.c_str()), 0) << c2;
  EXPECT_NE(slurp(bad.string() + ".err").find("--calib-dtype bf16"), std::string::npos) << slurp(bad.string() + ".err");
}
