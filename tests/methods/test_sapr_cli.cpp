// `lowbit quantize --method sapr`: the SAPR flags (--saliency-norm, --sapr-reduction, --sapr-recipe)
// are checked before any model is loaded, and --sapr-recipe paper sets the reference code's
// settings. Skipped when the CLI binary has not been built (the recipe run also needs stories260K).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "common/test_util.h"
#include "lowbit/methods/saliency.h"

namespace lowbit {
namespace {

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

// Fails with a message containing `want`, before touching the (nonexistent) model.
void expect_error(const std::string& flags, const std::string& want) {
  const auto dir = test::temp_dir("sapr-cli-err");
  const CliResult r = run_cli("quantize -m " + (dir / "no-model.bin").string() + " -o " + (dir / "out").string() +
                              " --calib-tokens " + (dir / "no-tokens.i32").string() + " " + flags);
  EXPECT_EQ(r.status, 1) << flags << "\n" << r.out;
  EXPECT_NE(r.out.find("lowbit: error: "), std::string::npos) << flags << "\n" << r.out;
  EXPECT_NE(r.out.find(want), std::string::npos) << flags << "\n" << r.out;
}

TEST(SaprCli, RejectsBadValues) {
  if (!std::filesystem::exists(test::cli_path())) GTEST_SKIP() << "no " << test::cli_path();
  expect_error("--method sapr --saliency-norm mean", "--saliency-norm must be 'layer' or 'none', got 'mean'");
  expect_error("--method sapr --sapr-reduction avg", "--sapr-reduction must be 'mean' or 'sum', got 'avg'");
  expect_error("--method sapr --sapr-target lora", "--sapr-target must be");
  expect_error("--method sapr --sapr-recipe squeezellm --lambda 1", "--sapr-recipe must be 'paper', got 'squeezellm'");
  expect_error("--method apiq --sapr-recipe paper --lambda 1", "--sapr-recipe applies to --method sapr");
  expect_error("--method sapr --sapr-recipe paper", "--sapr-recipe paper needs --lambda");
  expect_error("--method sapr --epochs 4 --sapr-weight-epochs 3 --sapr-output-epochs 2", "add up to at most --epochs (4)");
  expect_error("--method sapr --sapr-recipe paper --lambda 1 --epochs 4 --sapr-output-epochs 5",
               "add up to at most --epochs (4)");
  // GPU precision flags need the GPU.
  expect_error("--method apiq --bf16", "--bf16 needs --device cuda");
  expect_error("--method gptq --tf32", "--tf32 needs --device cuda");
}

TEST(SaprCli, PaperRecipeAndSaliencyFileNormalisation) {
  if (!std::filesystem::exists(test::cli_path())) GTEST_SKIP() << "no " << test::cli_path();
  LOWBIT_REQUIRE_SHARED(model, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(tokens, "models/stories260K/sample-tokens.i32");
  const auto dir = test::temp_dir("sapr-cli");
  const std::string sal = (dir / "raw.safetensors").string();
  const std::string common = "quantize -m " + model + " --method sapr --format int2g64 --calib-tokens " + tokens +
                             " --nsamples 2 --seqlen 32 --rank 1 --lora-alpha 1 --json --saliency " + sal;
  // The recipe: raw Fisher, sum, Q(W), 3 + 1 of 4 epochs.
  CliResult r = run_cli(common + " --epochs 4 --sapr-recipe paper --lambda 0.5 -o " + (dir / "a").string());
  ASSERT_EQ(r.status, 0) << r.out;
  {
    std::ifstream in(dir / "a" / "quantize_report.json");
    const auto rep = nlohmann::json::parse(in);
    const auto& s = rep.at("apiq").at("sapr");
    EXPECT_EQ(s.at("saliency_norm"), "none");
    EXPECT_EQ(s.at("reduction"), "sum");
    EXPECT_EQ(s.at("target"), "quant");
    EXPECT_EQ(s.at("weight_epochs"), 3);
    EXPECT_EQ(s.at("output_epochs"), 1);
    EXPECT_EQ(s.at("recipe"), "paper");
    EXPECT_EQ(s.at("lambda"), 0.5);
  }
  EXPECT_EQ(load_saliency(sal).norm, SaliencyNorm::None);
  // Explicit flags take precedence over the recipe.
  r = run_cli(common + " --epochs 4 --sapr-recipe paper --lambda 0.5 --sapr-target quant-lora --sapr-weight-epochs 1 -o " +
              (dir / "b").string());
  ASSERT_EQ(r.status, 0) << r.out;
  {
    std::ifstream in(dir / "b" / "quantize_report.json");
    const auto s = nlohmann::json::parse(in).at("apiq").at("sapr");
    EXPECT_EQ(s.at("target"), "quant-lora");
    EXPECT_EQ(s.at("weight_epochs"), 1);
    EXPECT_EQ(s.at("output_epochs"), 3);
  }
  // The raw file serves the default (layer) form, normalised on load; the default stage schedule is
  // the paper's 3/4 weight- + 1/4 output-preservation split (at least one output epoch).
  r = run_cli(common + " --epochs 4 -o " + (dir / "c").string());
  ASSERT_EQ(r.status, 0) << r.out;
  {
    std::ifstream in(dir / "c" / "quantize_report.json");
    const auto s = nlohmann::json::parse(in).at("apiq").at("sapr");
    EXPECT_EQ(s.at("saliency_norm"), "layer");
    EXPECT_EQ(s.at("target"), "quant-lora");
    EXPECT_EQ(s.at("weight_epochs"), 3);
    EXPECT_EQ(s.at("output_epochs"), 1);
  }
  // 0 and 0: every epoch on the mixed loss.
  r = run_cli(common + " --epochs 1 --sapr-weight-epochs 0 --sapr-output-epochs 0 -o " + (dir / "c2").string());
  ASSERT_EQ(r.status, 0) << r.out;
  {
    std::ifstream in(dir / "c2" / "quantize_report.json");
    const auto s = nlohmann::json::parse(in).at("apiq").at("sapr");
    EXPECT_EQ(s.at("weight_epochs"), 0);
    EXPECT_EQ(s.at("output_epochs"), 0);
  }
  // A layer-normalised file cannot serve --saliency-norm none: the error names the file.
  const std::string lsal = (dir / "layer.safetensors").string();
  const std::string common_l = "quantize -m " + model + " --method sapr --format int2g64 --calib-tokens " + tokens +
                               " --nsamples 2 --seqlen 32 --rank 1 --lora-alpha 1 --epochs 1 --json --saliency " + lsal;
  ASSERT_EQ(run_cli(common_l + " -o " + (dir / "d").string()).status, 0);
  r = run_cli(common_l + " --saliency-norm none -o " + (dir / "e").string());
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find(lsal + ": holds layer-normalised saliency"), std::string::npos) << r.out;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace lowbit
