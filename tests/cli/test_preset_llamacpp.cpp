// `lowbit quantize --preset X` picks, tensor by tensor, the ggml type llama-quantize picks for the
// same model (issue 12, "Mixed types per tensor"). Small random models are written as F32 GGUF,
// quantized by llama.cpp's llama-quantize and by lowbit's CLI (RTN), and both output files are read
// with gguf-py (the reference reader): same names, same types, same tensor byte sizes. Also checks
// the rule engine alone (plan_from_preset) against llama-quantize on more presets.
//
// Needs llama-quantize ($LOWBIT_LLAMA_QUANTIZE, else the build bench/llama_cpp.sh caches under
// ~/.cache/lowbit-llamacpp) and python3 with gguf; skips with a message when either is missing.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "lowbit/io/gguf.h"
#include "lowbit/model/weights.h"
#include "lowbit/quant/format_map.h"

using namespace lowbit;
namespace fs = std::filesystem;

namespace {

struct TensorType {
  int type = -1;
  long long bytes = 0;
};

std::vector<std::string> quantize_candidates() {
  std::vector<std::string> c;
  if (const char* e = std::getenv("LOWBIT_LLAMA_QUANTIZE"); e && *e) c.push_back(e);
  const char* home = std::getenv("HOME");
  const fs::path cache = std::getenv("LOWBIT_LLAMACPP_CACHE") ? fs::path(std::getenv("LOWBIT_LLAMACPP_CACHE"))
                         : home ? fs::path(home) / ".cache" / "lowbit-llamacpp"
                                : fs::path();
  std::error_code ec;
  if (!cache.empty() && fs::is_directory(cache, ec)) {
    std::vector<std::string> found;
    for (const auto& d : fs::directory_iterator(cache, ec)) {
      const fs::path b = d.path() / "bin" / "llama-quantize";
      if (d.path().filename().string().rfind("build-", 0) == 0 && fs::exists(b, ec)) found.push_back(b.string());
    }
    // The AVX2 build first: the native one may die with "Illegal instruction" on this shared box.
    std::sort(found.begin(), found.end(), [](const std::string& a, const std::string& b) {
      return (a.find("avx2") != std::string::npos) > (b.find("avx2") != std::string::npos);
    });
    c.insert(c.end(), found.begin(), found.end());
  }
  return c;
}

int run(const std::string& cmd) {
  const int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

// name -> (ggml type, bytes), read by gguf-py.
std::map<std::string, TensorType> gguf_py_types(const fs::path& file, const fs::path& dir) {
  const fs::path py = dir / "types.py", out = dir / "types.txt";
  std::ofstream(py) << "import sys\n"
                       "from gguf import GGUFReader\n"
                       "r = GGUFReader(sys.argv[1])\n"
                       "with open(sys.argv[2], 'w') as f:\n"
                       "    for t in r.tensors:\n"
                       "        f.write(f'{t.name} {int(t.tensor_type)} {int(t.n_bytes)}\\n')\n";
  std::map<std::string, TensorType> m;
  if (run("python3 '" + py.string() + "' '" + file.string() + "' '" + out.string() + "'") != 0) return m;
  std::ifstream in(out);
  std::string name;
  TensorType t;
  while (in >> name >> t.type >> t.bytes) m[name] = t;
  return m;
}

LlamaConfig config_a() {  // 256 wide (whole k-quant super-blocks), GQA 4, untied head
  LlamaConfig c;
  c.dim = 256;
  c.hidden_dim = 512;
  c.n_layers = 8;
  c.n_heads = 4;
  c.n_kv_heads = 1;
  c.vocab_size = 64;
  c.max_seq_len = 64;
  c.tied_embeddings = false;
  return c;
}

LlamaConfig config_b() {  // 96 wide: k-quants fall back (SmolLM2's case), tied embeddings
  LlamaConfig c;
  c.dim = 96;
  c.hidden_dim = 256;
  c.n_layers = 16;
  c.n_heads = 3;
  c.n_kv_heads = 3;
  c.vocab_size = 64;
  c.max_seq_len = 64;
  c.tied_embeddings = true;
  return c;
}

std::string upper(std::string s) {
  for (char& ch : s) ch = char(std::toupper(static_cast<unsigned char>(ch)));
  return s;
}

class PresetVsLlamaQuantize : public ::testing::Test {
 protected:
  void SetUp() override {
    if (run("python3 -c 'import gguf' >/dev/null 2>&1") != 0)
      GTEST_SKIP() << "python3 with the gguf module is not available (pip install gguf)";
    dir_ = test::temp_dir("preset-llamacpp");
    fs::create_directories(dir_);
    for (const auto& [name, c] : {std::pair{"a", config_a()}, std::pair{"b", config_b()}}) {
      const fs::path p = dir_ / (std::string(name) + "-f32.gguf");
      GgufSaveOptions o;
      o.dtype = DType::F32;
      save_gguf(p.string(), c, random_weights(c, 7), o);
      models_.emplace_back(p, c);
    }
    for (const std::string& q : quantize_candidates()) {
      const fs::path out = dir_ / "probe.gguf";
      if (run("'" + q + "' '" + models_[0].first.string() + "' '" + out.string() + "' Q8_0 1 >'" +
              (dir_ / "probe.log").string() + "' 2>&1") == 0) {
        quantize_ = q;
        break;
      }
    }
    if (quantize_.empty())
      GTEST_SKIP() << "no working llama-quantize (set LOWBIT_LLAMA_QUANTIZE or run bench/llama_cpp.sh --avx2)";
  }
  void TearDown() override {
    std::error_code ec;
    if (!dir_.empty()) fs::remove_all(dir_, ec);
  }
  std::map<std::string, TensorType> llama_quantize(const fs::path& in, const std::string& preset) {
    const fs::path out = dir_ / ("llama-" + preset + ".gguf");
    EXPECT_EQ(run("'" + quantize_ + "' '" + in.string() + "' '" + out.string() + "' " + upper(preset) + " 1 >'" +
                  (dir_ / "llama.log").string() + "' 2>&1"),
              0)
        << preset;
    return gguf_py_types(out, dir_);
  }

  fs::path dir_;
  std::string quantize_;
  std::vector<std::pair<fs::path, LlamaConfig>> models_;
};

}  // namespace

// The rule engine against llama-quantize, every preset, both shapes.
TEST_F(PresetVsLlamaQuantize, RuleEngineMatchesEveryTensor) {
  for (const auto& [path, c] : models_)
    for (const char* preset :
         {"q4_k_m", "q4_k_s", "q3_k_m", "q3_k_s", "q3_k_l", "q2_k", "q5_k_m", "q5_k_s", "q6_k", "q8_0", "q4_0"}) {
      const auto types = llama_quantize(path, preset);
      ASSERT_FALSE(types.empty()) << preset;
      const FormatPlan plan = plan_from_preset(preset, c);
      int compared = 0;
      for (const PlanTensor& t : plan_tensors(c)) {
        const std::string name = gguf_tensor_name(t);
        auto it = types.find(name);
        ASSERT_NE(it, types.end()) << preset << ": llama-quantize wrote no " << name;
        EXPECT_EQ(it->second.type, quant_format(plan.formats.at(t.module)).ggml_type)
            << path.filename() << " " << preset << " " << name << ": lowbit plans "
            << quant_format(plan.formats.at(t.module)).name;
        ++compared;
      }
      EXPECT_EQ(compared, int(plan.formats.size()));
    }
}

// The CLI end to end: lowbit quantize --method rtn --preset X -o out.gguf writes the same tensor
// types and byte sizes as llama-quantize (vocabulary matrices included).
TEST_F(PresetVsLlamaQuantize, CliFileHasLlamaQuantizesTypes) {
  for (const auto& [path, c] : models_)
    for (const char* preset : {"q4_k_m", "q2_k", "q6_k"}) {
      const auto ref = llama_quantize(path, preset);
      const fs::path out = dir_ / (std::string("lowbit-") + preset + ".gguf");
      ASSERT_EQ(run("'" + test::cli_path() + "' quantize -m '" + path.string() + "' --method rtn --preset " + preset +
                    " -o '" + out.string() + "' --json >'" + (dir_ / "lowbit.log").string() + "' 2>&1"),
                0)
          << preset << " (see " << (dir_ / "lowbit.log") << ")";
      const auto got = gguf_py_types(out, dir_);
      ASSERT_EQ(got.size(), ref.size()) << preset;
      for (const auto& [name, t] : ref) {
        auto it = got.find(name);
        ASSERT_NE(it, got.end()) << preset << ": lowbit wrote no " << name;
        EXPECT_EQ(it->second.type, t.type) << path.filename() << " " << preset << " " << name;
        EXPECT_EQ(it->second.bytes, t.bytes) << path.filename() << " " << preset << " " << name;
      }
    }
}
