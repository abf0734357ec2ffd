// `lowbit quantize --stream` (methods/stream.h): a Hugging Face safetensors model quantized block
// by block gives the checkpoint of the resident path byte for byte (RTN, GPTQ, AWQ, ApiQ), resumes
// after a stop, and holds one block at a time: the peak memory of a 32-block model stays that of a
// 4-block one, under a limit the model's own size exceeds. The models are random ones written shard
// by shard (write_random_hf_model). Skipped when the CLI binary has not been built.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "common/test_util.h"
#include "lowbit/io/hf.h"

namespace lowbit {
namespace {

namespace fs = std::filesystem;

struct CliResult {
  int status = -1;
  std::string out;  // stdout and stderr
};

CliResult run_cli(const std::string& args) {
  CliResult r;
  FILE* p = ::popen((test::cli_path() + " " + args + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) r.out.append(buf, n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

nlohmann::json report(const fs::path& out) { return nlohmann::json::parse(slurp(out / "quantize_report.json")); }

LlamaConfig small_config(int layers) {
  LlamaConfig c;
  c.dim = 64, c.hidden_dim = 160, c.n_layers = layers, c.n_heads = 4, c.n_kv_heads = 2, c.vocab_size = 256;
  c.max_seq_len = 128;
  c.tied_embeddings = false;
  return c;
}

// Random calibration ids below `vocab`.
std::string write_tokens(const fs::path& dir, int vocab) {
  std::mt19937 rng(3);
  std::string ids;
  for (int i = 0; i < 4096; ++i) {
    const int32_t id = int32_t(rng() % uint32_t(vocab));
    ids.append(reinterpret_cast<const char*>(&id), 4);
  }
  const fs::path p = dir / "calib.i32";
  std::ofstream(p, std::ios::binary) << ids;
  return p.string();
}

// A sharded random model: shards of 40 KB, so blocks spread over several files.
std::string write_model(const fs::path& dir, const LlamaConfig& c, const std::string& name) {
  RandomModelOptions o;
  o.max_shard_bytes = 40'000;
  o.seed = 5;
  o.std = 0.1;
  const fs::path p = dir / name;
  write_random_hf_model(p.string(), c, o);
  return p.string();
}

class StreamCli : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(test::cli_path())) GTEST_SKIP() << "no " << test::cli_path();
  }
};

TEST_F(StreamCli, SameCheckpointAsResidentPath) {
  const auto dir = test::temp_dir("stream-same");
  // Every optional tensor: q/k/v biases and a tied head (qwen2), q/k norms (qwen3).
  LlamaConfig qwen2 = small_config(3), qwen3 = small_config(3);
  qwen2.arch = "qwen2";
  qwen2.attn_bias = true;
  qwen2.tied_embeddings = true;
  qwen3.arch = "qwen3";
  qwen3.qk_norm = true;
  const std::pair<std::string, LlamaConfig> models[] = {{"llama", small_config(3)}, {"qwen2", qwen2}, {"qwen3", qwen3}};
  const std::string calib = write_tokens(dir, 256);
  const char* methods[] = {"--method rtn --format int4g32", "--method gptq --format int3g32",
                           "--method awq --format int4g32", "--method apiq --format int2g32 --epochs 1 --rank 2",
                           "--method apiq --format int2g32 --epochs 1 --rank 2 --lora merge"};
  for (const auto& [name, c] : models) {
    const std::string model = write_model(dir, c, name);
    ASSERT_TRUE(fs::exists(fs::path(model) / "model.safetensors.index.json")) << "the test model should be sharded";
    for (const char* m : methods) {
      if (name != "llama" && std::string(m).find("--method rtn") == std::string::npos &&
          std::string(m).find("--method gptq") == std::string::npos)
        continue;  // the other methods once, on the llama model
      SCOPED_TRACE(name + ": " + m);
      const std::string common = "quantize -m " + model + " " + m + " --calib-tokens " + calib +
                                 " --nsamples 4 --seqlen 32 --json --stream ";
      const fs::path on = dir / "on", off = dir / "off";
      fs::remove_all(on);
      fs::remove_all(off);
      CliResult r = run_cli(common + "on -o " + on.string());
      ASSERT_EQ(r.status, 0) << r.out;
      r = run_cli(common + "off -o " + off.string());
      ASSERT_EQ(r.status, 0) << r.out;
      EXPECT_TRUE(report(on).at("stream").get<bool>());
      EXPECT_FALSE(report(off).at("stream").get<bool>());
      EXPECT_EQ(report(on).at("block_seconds").size(), size_t(c.n_layers));
      EXPECT_TRUE(slurp(on / "model.safetensors") == slurp(off / "model.safetensors")) << "model.safetensors differs";
      EXPECT_EQ(slurp(on / "config.json"), slurp(off / "config.json"));
      EXPECT_FALSE(fs::exists(on / ".state")) << "the parts are removed with the state";
    }
  }
  // auto streams a Hugging Face directory unless an option needs the whole model.
  const std::string model = (dir / "llama").string();
  CliResult r = run_cli("quantize -m " + model + " --method rtn --format int4g32 --json -o " + (dir / "auto").string());
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_TRUE(report(dir / "auto").at("stream").get<bool>());
  r = run_cli("quantize -m " + model + " --method rtn --format int4g32 --rotate hadamard --json -o " +
              (dir / "auto-rot").string());
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_FALSE(report(dir / "auto-rot").at("stream").get<bool>());
  EXPECT_NE(report(dir / "auto-rot").at("stream_obstacle").get<std::string>().find("--rotate"), std::string::npos);
  fs::remove_all(dir);
}

TEST_F(StreamCli, ResumesFromFinishedBlocks) {
  const auto dir = test::temp_dir("stream-resume");
  const std::string model = write_model(dir, small_config(4), "m");
  const std::string calib = write_tokens(dir, 256);
  const std::string common = "quantize -m " + model + " --method gptq --format int4g32 --calib-tokens " + calib +
                             " --nsamples 4 --seqlen 32 --json --stream on --checkpoint-seconds 0 ";
  const fs::path full = dir / "full", part = dir / "part";
  CliResult r = run_cli(common + "-o " + full.string());
  ASSERT_EQ(r.status, 0) << r.out;
  // Stopped after block 0, then after block 1 (resumed at 1), then to the end (resumed at 2).
  r = run_cli(common + "--stop-after-blocks 1 -o " + part.string());
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_TRUE(fs::exists(part / ".state" / "blocks" / "block-00000.safetensors"));
  EXPECT_FALSE(fs::exists(part / "model.safetensors"));
  r = run_cli(common + "--stop-after-blocks 1 -o " + part.string());
  ASSERT_EQ(r.status, 0) << r.out;
  r = run_cli(common + "-o " + part.string());
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_EQ(report(part).at("resumed_from_block").get<int>(), 2);
  EXPECT_TRUE(slurp(part / "model.safetensors") == slurp(full / "model.safetensors"));
  EXPECT_EQ(slurp(part / "config.json"), slurp(full / "config.json"));
  // A finished block that is gone: the resumed run says which, instead of writing a partial model.
  const fs::path gone = dir / "gone";
  r = run_cli(common + "--stop-after-blocks 2 -o " + gone.string());
  ASSERT_EQ(r.status, 0) << r.out;
  fs::remove(gone / ".state" / "blocks" / "block-00001.safetensors");
  r = run_cli(common + "-o " + gone.string());
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("block 1 of the resumed run is missing"), std::string::npos) << r.out;
  fs::remove_all(dir);
}

// Peak resident memory (the CLI process's getrusage maximum, reported as peak_rss_bytes) of RTN
// on 4 and 32 blocks of 3.4 MB (f32) each. The memory limit of the test is half the f32 size of
// the 32-block model: the resident path exceeds it, the streamed one stays under it, and its peak
// does not grow with depth (28 more blocks held would add 95 MB; the margin is 12 MB).
TEST_F(StreamCli, PeakMemoryDoesNotGrowWithDepth) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer keeps freed memory in quarantine: resident memory is not the program's";
#endif
  const auto dir = test::temp_dir("stream-memory");
  auto config = [](int layers) {
    LlamaConfig c;
    c.dim = 256, c.hidden_dim = 768, c.n_layers = layers, c.n_heads = 4, c.n_kv_heads = 4, c.vocab_size = 256;
    c.max_seq_len = 64;
    c.tied_embeddings = false;
    return c;
  };
  const double block_f32 = 4.0 * (4 * 256 * 256 + 3 * 256 * 768);
  const double model32_f32 = 32 * block_f32;
  RandomModelOptions o;
  o.max_shard_bytes = 2'000'000;
  auto peak = [&](int layers, const std::string& mode) {
    const fs::path model = dir / ("m" + std::to_string(layers));
    if (!fs::exists(model)) write_random_hf_model(model.string(), config(layers), o);
    const fs::path out = dir / ("q" + std::to_string(layers) + mode);
    const CliResult r = run_cli("quantize -m " + model.string() + " --method rtn --format int4g32 --json --stream " + mode +
                                " -o " + out.string());
    EXPECT_EQ(r.status, 0) << r.out;
    if (r.status != 0) return 0.0;
    const double p = report(out).at("peak_rss_bytes").get<double>();
    fs::remove_all(out);
    return p;
  };
  const double p4 = peak(4, "on"), p32 = peak(32, "on"), p32_resident = peak(32, "off");
  std::printf("peak RSS: 4 blocks %.1f MB, 32 blocks %.1f MB streamed, %.1f MB resident (model %.1f MB in f32)\n",
              p4 / 1e6, p32 / 1e6, p32_resident / 1e6, model32_f32 / 1e6);
  // Differences only: the process's own resident pages (the binary and its libraries: ~275 MB with
  // the CUDA runtime linked, ~20 MB without) are in every peak and cancel out.
  EXPECT_LT(p32, p4 + 12e6) << "the streamed peak grows with depth";
  EXPECT_GT(p32_resident - p32, model32_f32 / 2)
      << "streaming the 32-block model should save at least half of its f32 size against the resident path";
  fs::remove_all(dir);
}

}  // namespace
}  // namespace lowbit
