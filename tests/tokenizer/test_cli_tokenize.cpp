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

// The model's own tokenizer from a GGUF file (metadata only: SmolLM2's Q4_1 tensors are not
// decoded), whole-file tokenization, and the chat template embedded in the file.
TEST(CliTokenize, GgufTokenizerFileAndChat) {
  LOWBIT_REQUIRE_SHARED(gguf, "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
  LOWBIT_REQUIRE_SHARED(raw, "data/wikitext-2-raw/wiki.test.raw");
  if (!std::filesystem::exists(test::cli_path())) GTEST_SKIP() << "no " << test::cli_path();
  const std::string cli = test::cli_path();
  EXPECT_EQ(run("echo 'a  1' | " + cli + " tokenize -m " + gguf), "{\"text\":\"a  1\",\"ids\":[81,256,33]}\n");
  EXPECT_EQ(run("echo 'x ½ y' | " + cli + " tokenize --tokenizer " + gguf),
            "{\"text\":\"x ½ y\",\"ids\":[104,216,16738,329]}\n");
  const std::string file = run(cli + " tokenize -m " + gguf + " --file " + raw);
  EXPECT_NE(file.find("\"tokens\":303415"), std::string::npos) << file;
  EXPECT_NE(file.find("\"fnv1a64\":\"8672b255a2935a9b\""), std::string::npos) << file;
  // Ids from Python tokenizers (tokenizer-llamacpp-smollm.json) on the same rendered prompt.
  EXPECT_EQ(run(cli + " tokenize -m " + gguf + " --chat 'What is the capital of France?'"),
            "{\"text\":\"<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\\n<|im_start|>user\\nWhat is the capital of France?<|im_end|>\\n<|im_start|>assistant\\n\","
            "\"ids\":[1,9690,198,2683,359,253,5356,5646,11173,3365,3511,308,34519,28,7018,411,407,19712,8182,2,198,1,"
            "4093,198,1780,314,260,3575,282,4649,47,2,198,1,520,9531,198]}\n");
}

// convert --tokenizer embeds a sentencepiece model in the GGUF output; the file then tokenizes on
// its own like the original tokenizer.
TEST(CliTokenize, ConvertEmbedsTokenizer) {
  LOWBIT_REQUIRE_SHARED(model, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(sp, "models/stories260K/tok512.model");
  LOWBIT_REQUIRE_SHARED(bin, "models/stories260K/tok512.bin");
  if (!std::filesystem::exists(test::cli_path())) GTEST_SKIP() << "no " << test::cli_path();
  const std::string cli = test::cli_path();
  const auto dir = test::temp_dir("cli-convert-tok");
  const std::string out = (dir / "s.gguf").string();
  run(cli + " convert --from " + model + " --to " + out + " --tokenizer " + sp + " 2>/dev/null");
  ASSERT_TRUE(std::filesystem::exists(out));
  EXPECT_EQ(run("echo 'Once upon a time' | " + cli + " tokenize --add-special -m " + out),
            run("echo 'Once upon a time' | " + cli + " tokenize --add-special -t " + bin));
  // A tokenizer larger than the model's vocabulary is refused, and nothing is written.
  LOWBIT_REQUIRE_SHARED(l3, "tokenizers/llama3/tokenizer.json");
  const std::string out2 = (dir / "bad.gguf").string();
  EXPECT_NE(run(cli + " convert --from " + model + " --to " + out2 + " --tokenizer " + l3 + " 2>&1").find("more than the model"),
            std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(out2));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace lowbit
