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
#include <cstring>
#include <iterator>
#include <tuple>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "lowbit/io/gguf.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/model/weights.h"
#include "lowbit/quant/format_map.h"
#include "lowbit/quant/quantize.h"

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
  // llama-quantize --pure (every tensor the ftype's base type, then llama.cpp's fallback for rows that
  // are not whole blocks), vocabulary matrices kept f32 as `lowbit quantize --format F` keeps them.
  std::map<std::string, TensorType> llama_quantize_pure(const fs::path& in, const std::string& ftype) {
    const fs::path out = dir_ / ("llama-pure-" + ftype + ".gguf");
    EXPECT_EQ(run("'" + quantize_ + "' --pure --token-embedding-type f32 --output-tensor-type f32 '" + in.string() +
                  "' '" + out.string() + "' " + ftype + " 1 >'" + (dir_ / "llama.log").string() + "' 2>&1"),
              0)
        << ftype;
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
    for (const char* preset : {"q4_k_m", "q4_k_s", "q3_k_m", "q3_k_s", "q3_k_l", "q2_k", "q5_k_m", "q5_k_s", "q6_k",
                               "q8_0", "q4_0", "iq4_nl", "iq4_xs"}) {
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
  const std::string cli = test::cli_path();  // an lvalue: GCC 12 warns (-Wrestrict) on "'" + f() chains
  for (const auto& [path, c] : models_)
    for (const char* preset : {"q4_k_m", "q2_k", "q6_k"}) {
      const auto ref = llama_quantize(path, preset);
      const fs::path out = dir_ / (std::string("lowbit-") + preset + ".gguf");
      ASSERT_EQ(run("'" + cli + "' quantize -m '" + path.string() + "' --method rtn --preset " + preset +
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

// `lowbit quantize --format F` with a ggml type whose blocks do not fit some rows (model b: 96-wide
// rows, 256-wide ffn_down) writes llama-quantize --pure's type and size for every tensor: the
// fallback of llama.cpp's tensor_type_fallback (q4_k -> q5_0, q3_k / q2_k -> q4_0, q5_k -> q5_1,
// q6_k -> q8_0, iq4_xs -> iq4_nl); on model a (256 wide) nothing falls back.
TEST_F(PresetVsLlamaQuantize, SingleFormatFallsBackAsLlamaQuantizePure) {
  const std::string cli = test::cli_path();
  const std::pair<const char*, const char*> cases[] = {
      {"q4_k", "Q4_K_S"}, {"q3_k", "Q3_K_S"}, {"q2_k", "Q2_K"}, {"q5_k", "Q5_K_S"}, {"q6_k", "Q6_K"}, {"iq4_xs", "IQ4_XS"}};
  for (const auto& [path, c] : models_)
    for (const auto& [format, ftype] : cases) {
      const auto ref = llama_quantize_pure(path, ftype);
      ASSERT_FALSE(ref.empty()) << ftype;
      const fs::path out = dir_ / (std::string("lowbit-format-") + format + ".gguf");
      ASSERT_EQ(run("'" + cli + "' quantize -m '" + path.string() + "' --method rtn --format " + format +
                    " -o '" + out.string() + "' --json >'" + (dir_ / "lowbit.log").string() + "' 2>&1"),
                0)
          << format << " (see " << (dir_ / "lowbit.log") << ")";
      const auto got = gguf_py_types(out, dir_);
      ASSERT_EQ(got.size(), ref.size()) << format;
      int fell_back = 0;
      for (const auto& [name, t] : ref) {
        auto it = got.find(name);
        ASSERT_NE(it, got.end()) << format << ": lowbit wrote no " << name;
        EXPECT_EQ(it->second.type, t.type) << path.filename() << " " << format << " " << name;
        EXPECT_EQ(it->second.bytes, t.bytes) << path.filename() << " " << format << " " << name;
        fell_back += it->second.type != parse_quant_format(format).ggml_type && name.find("blk.") == 0 &&
                     name.find("norm") == std::string::npos;
      }
      EXPECT_EQ(fell_back, c.dim == 96 ? 6 * c.n_layers : 0) << path.filename() << " " << format;
    }
}

// Without llama-quantize: `--format q4_k -o x.gguf` on the 96-wide model writes q5_0 for every
// 96-wide linear (llama.cpp's fallback) and q4_k for the 256-wide ffn_down, each tensor exactly the
// reference rounding of its weight in that type; general.file_type stays Q4_K's (Q4_K_S = 14) and
// the fallback is recorded in the file's metadata.
TEST(SingleFormatFallback, CliWritesTheFallbackTypeWithoutLlamaCpp) {
  const std::string cli = test::cli_path();
  const LlamaConfig c = config_b();
  const fs::path dir = test::temp_dir("format-fallback");
  fs::create_directories(dir);
  const fs::path in = dir / "f32.gguf", out = dir / "q4_k.gguf";
  GgufSaveOptions o;
  o.dtype = DType::F32;
  const LlamaWeights w = random_weights(c, 7);
  save_gguf(in.string(), c, w, o);
  ASSERT_EQ(run("'" + cli + "' quantize -m '" + in.string() + "' --method rtn --format q4_k -o '" +
                out.string() + "' >'" + (dir / "log").string() + "' 2>&1"),
            0);
  std::ifstream log(dir / "log");
  const std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("fallback as llama.cpp (rows not whole blocks): q4_k -> q5_0 x 96"), std::string::npos) << text;
  const QuantizedCheckpoint q = load_gguf_quantized(out.string());
  ASSERT_EQ(q.quantized.size(), size_t(7 * c.n_layers));
  for (const auto& [name, t] : q.quantized)
    EXPECT_EQ(quant_format(t.format).name, std::string(name.find("down_proj") != std::string::npos ? "q4_k" : "q5_0"))
        << name;
  // ffn_up / ffn_down hold no q/k row permutation: their blocks are quantize()'s, byte for byte.
  for (const auto& [module, weight, id] :
       {std::tuple{"model.layers.3.mlp.up_proj", w.layers[3].w_up, QuantFormatId::Q5_0},
        std::tuple{"model.layers.3.mlp.down_proj", w.layers[3].w_down, QuantFormatId::Q4_K}}) {
    const QuantizedTensor ref = quantize(weight, quant_format(id));
    const QuantizedTensor& got = q.quantized.at(module);
    ASSERT_EQ(got.codes.numel(), ref.codes.numel()) << module;
    EXPECT_EQ(std::memcmp(got.codes.data<uint8_t>(), ref.codes.data<uint8_t>(), size_t(ref.codes.numel())), 0) << module;
  }
  GgufFile g = GgufFile::open(out.string());
  ASSERT_NE(g.find("general.file_type"), nullptr);
  EXPECT_EQ(g.find("general.file_type")->u, 14u);
  ASSERT_NE(g.find("lowbit.quantization.config"), nullptr);
  EXPECT_NE(g.find("lowbit.quantization.config")->str.find("q4_k -> q5_0 (96 columns)"), std::string::npos);
  fs::remove_all(dir);
}
