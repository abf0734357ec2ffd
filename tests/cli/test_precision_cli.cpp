// `lowbit qat --precision` and `lowbit finetune --precision` (issue 18): fp8 runs complete and
// record the precision (the qat report and its stage's hyper-parameters, finetune's JSON and its
// checkpoint metadata); a resume with another precision is refused naming both settings; a method
// or combination the flag does not apply to is refused naming the flag. stories260K from
// ../shared, else a random model of its shape (`lowbit random-model`) and random tokens.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/test_util.h"
#include "lowbit/io/safetensors.h"

using namespace lowbit;

namespace {

struct CliRun {
  int status = -1;
  std::string out;  // stdout and stderr
};

CliRun run(const std::string& args) {
  CliRun r;
  const std::string cmd = test::cli_path() + " " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) r.out.append(buf, n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

// The last line of a run's output that parses as a JSON object.
nlohmann::json last_json(const std::string& s) {
  nlohmann::json j;
  size_t b = 0;
  while (b < s.size()) {
    size_t e = s.find('\n', b);
    if (e == std::string::npos) e = s.size();
    auto k = nlohmann::json::parse(s.substr(b, e - b), nullptr, false);
    if (!k.is_discarded() && k.is_object()) j = k;
    b = e + 1;
  }
  return j;
}

// stories260K and 6,168 of its sample tokens, or a random model of its shape and random tokens.
std::pair<std::string, std::string> model_and_tokens(const std::filesystem::path& dir) {
  const std::string model = test::shared_file("models/stories260K/stories260K.bin");
  const std::string tokens = test::shared_file("models/stories260K/sample-tokens.i32");
  if (!model.empty() && !tokens.empty()) return {model, tokens};
  const std::string m = (dir / "model").string(), t = (dir / "tokens.i32").string();
  if (run("-q random-model -o " + m + " --dim 64 --hidden-dim 172 --layers 5 --heads 8 --kv-heads 4 --vocab 512 " +
          "--max-seq-len 512 --tied --dtype f32 --std 0.1 --seed 7").status != 0)
    return {};
  std::vector<int32_t> ids(16448);
  uint64_t x = 88172645463325252ull;
  for (auto& id : ids) x ^= x << 13, x ^= x >> 7, x ^= x << 17, id = int32_t(x % 512);
  std::ofstream(t, std::ios::binary).write(reinterpret_cast<const char*>(ids.data()), std::streamsize(ids.size() * 4));
  return {m, t};
}

}  // namespace

TEST(PrecisionCli, QatFp8RecordsThePrecisionAndRefusesAnotherOnResume) {
  if (!std::filesystem::exists(test::cli_path())) GTEST_SKIP() << "no " << test::cli_path();
  const auto dir = test::temp_dir("precision-cli-qat");
  const auto [model, tokens] = model_and_tokens(dir);
  ASSERT_FALSE(model.empty());
  const std::string base = "-q qat -m " + model + " --method lsq --format int4g64 --train-tokens " + tokens +
                           " --steps 4 --batch 2 --seqlen 32 --seed 3 --json ";
  // A complete fp8 run: the report and the stage record the settings.
  const std::string out = (dir / "full").string();
  const CliRun a = run(base + "--precision fp8 -o " + out);
  ASSERT_EQ(a.status, 0) << a.out;
  const nlohmann::json rep = last_json(a.out);
  ASSERT_TRUE(rep.is_object()) << a.out;
  EXPECT_EQ(rep["precision"], "fp8 keep 0/0 delayed h16");
  EXPECT_EQ(rep["stages"][0]["hyper"]["precision"], "fp8 keep 0/0 delayed h16");
  EXPECT_EQ(rep["stages"][0]["hyper"]["lp_gemm"], "emulated");
  EXPECT_TRUE(std::filesystem::exists(std::filesystem::path(out) / "model.safetensors"));
  // The f32 run differs (the products were quantized) and records f32.
  const CliRun f = run(base + "-o " + (dir / "f32").string());
  ASSERT_EQ(f.status, 0) << f.out;
  const nlohmann::json frep = last_json(f.out);
  EXPECT_EQ(frep["precision"], "f32");
  EXPECT_NE(frep["stages"][0]["loss_after"], rep["stages"][0]["loss_after"]);
  // Stopped after 2 steps with fp8; resumed with bf16: refused, naming both settings.
  const std::string part = (dir / "part").string(), state = (dir / "state").string();
  const CliRun s = run(base + "--precision fp8 --stop-after 2 --state-dir " + state + " -o " + part);
  ASSERT_EQ(s.status, 0) << s.out;
  EXPECT_EQ(last_json(s.out)["complete"], false);
  const CliRun bad = run(base + "--precision bf16 --state-dir " + state + " -o " + part);
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.out.find("saved with --precision settings 'fp8 keep 0/0 delayed h16', this run uses 'bf16 keep 0/0'"),
            std::string::npos)
      << bad.out;
  // The same precision resumes and ends where the uninterrupted run ended.
  const CliRun ok = run(base + "--precision fp8 --state-dir " + state + " -o " + part);
  ASSERT_EQ(ok.status, 0) << ok.out;
  const nlohmann::json orep = last_json(ok.out);
  EXPECT_EQ(orep["stages"][0]["resumed_from"], 2);
  EXPECT_EQ(orep["stages"][0]["loss_after"], rep["stages"][0]["loss_after"]);
  // Methods whose layers do not multiply a latent weight refuse the flag, naming it.
  const CliRun eq = run("-q qat -m " + model + " --method efficientqat --format int4g64 --train-tokens " + tokens +
                     " --precision fp8 -o " + (dir / "eq").string());
  EXPECT_NE(eq.status, 0);
  EXPECT_NE(eq.out.find("qat --method efficientqat: --precision fp8 is not supported"), std::string::npos) << eq.out;
  const CliRun dge = run(base + "--precision fp4-dge --device cuda -o " + (dir / "dge").string());
  EXPECT_NE(dge.status, 0);
  EXPECT_NE(dge.out.find("--precision fp4-dge has no CUDA body"), std::string::npos) << dge.out;
}

namespace {
// A quantized (RTN int3g64) copy of the test model in dir/q and the finetune command line on it
// (STEPS steps, EVAL eval batches, JSON report); empty when the model could not be made.
std::string finetune_command(const std::filesystem::path& dir, int steps, int eval_batches) {
  const auto [model, tokens] = model_and_tokens(dir);
  if (model.empty()) return "";
  const std::string q = (dir / "q").string();
  const CliRun qr = run("-q quantize -m " + model + " --format int3g64 --method rtn -o " + q);
  EXPECT_EQ(qr.status, 0) << qr.out;
  if (qr.status != 0) return "";
  return "-q finetune -m " + q + " --train-tokens " + tokens + " --valid-tokens " + tokens + " --steps " +
         std::to_string(steps) + " --batch 2 --seq-len 32 --eval-batches " + std::to_string(eval_batches) +
         " --rank 4 --lr 1e-3 --json ";
}
}  // namespace

// `lp_gemm` reports what runs: --lp-gemm native is honoured by fp8 (ops::fp8_gemm, also on the
// CPU) but the fp4 precisions and int4 have no native GEMM anywhere, so they report emulated.
TEST(PrecisionCli, LpGemmReportsWhatRuns) {
  if (!std::filesystem::exists(test::cli_path())) GTEST_SKIP() << "no " << test::cli_path();
  const auto dir = test::temp_dir("precision-cli-lp-gemm");
  const std::string base = finetune_command(dir, 1, 1);
  ASSERT_FALSE(base.empty());
  for (const auto& [prec, want] : {std::pair<std::string, std::string>{"fp8", "native"}, {"nvfp4", "emulated"},
                                   {"mxfp4", "emulated"}, {"int4", "emulated"}}) {
    const CliRun r = run(base + "--lp-gemm native --precision " + prec + " --out " + (dir / ("run-" + prec)).string());
    ASSERT_EQ(r.status, 0) << prec << "\n" << r.out;
    EXPECT_EQ(last_json(r.out)["lp_gemm"], want) << prec;
  }
}

TEST(PrecisionCli, FinetuneFp8RecordsThePrecisionAndRefusesAnotherOnResume) {
  if (!std::filesystem::exists(test::cli_path())) GTEST_SKIP() << "no " << test::cli_path();
  const auto dir = test::temp_dir("precision-cli-finetune");
  const std::string base = finetune_command(dir, 4, 2);
  ASSERT_FALSE(base.empty());
  const std::string out = (dir / "run").string();
  const CliRun a = run(base + "--precision fp8 --out " + out);
  ASSERT_EQ(a.status, 0) << a.out;
  const nlohmann::json j = last_json(a.out);
  EXPECT_EQ(j["precision"], "fp8 keep 0/0 delayed h16");
  EXPECT_EQ(j["lp_gemm"], "emulated");
  ASSERT_TRUE(j["val_loss_after"].is_number() && j["val_loss_after_f32"].is_number()) << a.out;
  EXPECT_NE(j["val_loss_after"], j["val_loss_after_f32"]);  // the adapters' products were quantized
  // The checkpoint records it; its state too (the fp8 amax histories of the adapters' products).
  std::ifstream cf(std::filesystem::path(out) / "model" / "config.json");
  const nlohmann::json config = nlohmann::json::parse(cf, nullptr, false);
  ASSERT_TRUE(config.is_object());
  EXPECT_EQ(config["quantization_config"]["finetune"]["precision"], "fp8 keep 0/0 delayed h16") << config.dump();
  const SafetensorsFile st = SafetensorsFile::open((std::filesystem::path(out) / "state.safetensors").string());
  EXPECT_EQ(st.metadata().at("precision"), "fp8 keep 0/0 delayed h16");
  EXPECT_TRUE(st.find("lp.0.x") && st.find("lp.1.dy"));
  // Resuming the run's state with another precision is refused, naming both.
  const CliRun bad = run(base + "--precision nvfp4 --out " + out);
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.out.find("saved with --precision settings 'fp8 keep 0/0 delayed h16', this run uses 'nvfp4 keep 0/1 2d rht sr'"),
            std::string::npos)
      << bad.out;
  const CliRun keep = run(base + "--precision fp8 --lp-keep-first 5 --out " + (dir / "keep").string());
  EXPECT_NE(keep.status, 0);
  EXPECT_NE(keep.out.find("keep all 5 blocks in high precision"), std::string::npos) << keep.out;
}
