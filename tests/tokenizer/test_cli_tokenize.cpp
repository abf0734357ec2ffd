// `lowbit tokenize` end to end (skipped when the CLI binary has not been built).
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "common/test_util.h"

namespace lowbit {
namespace {

std::string run(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
  ::pclose(p);
  return out;
}

TEST(CliTokenize, EncodeAndDecode) {
  LOWBIT_REQUIRE_SHARED(tok, "tokenizers/llama3/tokenizer.json");
  LOWBIT_REQUIRE_SHARED(l2, "tokenizers/llama2/tokenizer.model");
  if (!std::filesystem::exists(test::cli_path())) GTEST_SKIP() << "no " << test::cli_path();
  const auto dir = test::temp_dir("cli-tokenize");
  std::ofstream(dir / "in.txt") << "Hello, world!\nnaïve \"café\"\n";
  const std::string cli = test::cli_path();
  const std::string enc = run(cli + " tokenize --tokenizer " + tok + " < " + (dir / "in.txt").string());
  EXPECT_EQ(enc,
            "{\"text\":\"Hello, world!\",\"ids\":[9906,11,1917,0]}\n"
            "{\"text\":\"naïve \\\"café\\\"\",\"ids\":[3458,38672,588,330,936,59958,1]}\n");
  std::ofstream(dir / "enc.jsonl") << enc << "[9906, 11]\n";
  EXPECT_EQ(run(cli + " tokenize --decode -t " + tok + " < " + (dir / "enc.jsonl").string()),
            "Hello, world!\nnaïve \"café\"\nHello,\n");
  EXPECT_EQ(run("echo 'Hello' | " + cli + " tokenize --add-special -t " + l2),
            "{\"text\":\"Hello\",\"ids\":[1,15043]}\n");
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace lowbit
