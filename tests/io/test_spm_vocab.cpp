// GGUF "llama" vocabularies (sentencepiece-style: pieces, scores, token types, byte fallback)
// -> SpmTokenizer, against Python: tests/io/oracle/spm_gguf_oracle.py writes the GGUF with gguf-py
// from a sentencepiece .model of ../shared (Llama 2's 32000 pieces; stories260K's 512) and encodes
// the texts (edge cases, the 400 WikiText-2 lines of ref/tokenize-llama2-wikitext2.jsonl and the
// whole of data/wikitext-2-raw/wiki.test.raw) with
// sentencepiece itself (skips without python3 + gguf + sentencepiece, or without ../shared).
// add_bos_token / add_eos_token are honoured; control and user-defined pieces in the text become
// their ids. (That jsonl's own ids belong to the tokenizer.json of tokenizers/llama2, a different
// vocabulary than tokenizer.model: only its texts are used.)
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <nlohmann/json.hpp>

#include "common/test_util.h"
#include "lowbit/core/error.h"
#include "lowbit/io/checkpoint.h"
#include "lowbit/tokenizer/spm_tokenizer.h"

namespace lowbit {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::pair<std::string, int> run(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return {"", -1};
  std::array<char, 65536> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int st = pclose(p);
  return {out, WIFEXITED(st) ? WEXITSTATUS(st) : -1};
}

std::vector<std::string> texts_for_test(const std::string& ref_jsonl) {
  std::vector<std::string> t = {"Hello world",
                                "  two  leading spaces and  inner  ones ",
                                "Unicode: caf\xC3\xA9 \xE2\x80\x94 \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80 \xE1\x83\x97 z\xCC\x81",
                                "tabs\tand\nnewlines\n\n end",
                                "Once upon a time, there was a little girl named Lily.",
                                "1234567 + 89 = ?",
                                "a",
                                " ",
                                ""};
  std::ifstream f(ref_jsonl);
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) t.push_back(json::parse(line).at("text").get<std::string>());
  return t;
}

TEST(SpmVocab, GgufFromGgufPyEncodesAsSentencepiece) {
  const std::string shared = test::shared_root().string();
  const std::string script = (fs::path(LOWBIT_SOURCE_DIR) / "tests/io/oracle/spm_gguf_oracle.py").string();
  const fs::path dir = test::temp_dir("spm-vocab");
  int compared = 0;
  struct Case {
    const char* model;
    bool add_bos, add_eos;
  };
  for (const Case c : {Case{"tokenizers/llama2/tokenizer.model", true, false}, Case{"models/stories260K/tok512.model", false, true}}) {
    const fs::path model = fs::path(shared) / c.model;
    if (!fs::exists(model)) continue;
    auto texts = texts_for_test((fs::path(shared) / "ref/tokenize-llama2-wikitext2.jsonl").string());
    // And the whole of WikiText-2 test as one text (335,687 ids with Llama 2's vocabulary).
    if (std::ifstream wiki(fs::path(shared) / "data/wikitext-2-raw/wiki.test.raw", std::ios::binary); wiki) {
      std::ostringstream os;
      os << wiki.rdbuf();
      texts.push_back(os.str());
    }
    const fs::path texts_path = dir / "texts.json", gguf = dir / (fs::path(c.model).stem().string() + ".gguf");
    std::ofstream(texts_path) << json(texts).dump();
    auto [out, rc] = run("python3 '" + script + "' '" + model.string() + "' '" + gguf.string() + "' " +
                         (c.add_bos ? "1 " : "0 ") + (c.add_eos ? "1 '" : "0 '") + texts_path.string() + "' 2>&1");
    if (rc == 3 || rc == 127) GTEST_SKIP() << "python3 with gguf and sentencepiece is not available (pip install gguf sentencepiece)";
    ASSERT_EQ(rc, 0) << out;
    const json want = json::parse(out);
    ASSERT_EQ(want.size(), texts.size());
    const auto tok = open_tokenizer_file(gguf.string());
    ASSERT_EQ(tok->kind(), "spm");
    int bad = 0;
    for (size_t i = 0; i < texts.size(); ++i) {
      if (want[i].is_null()) continue;  // sentencepiece's normalizer rewrites this text (see the script)
      const auto got = tok->encode(texts[i], true);
      if (got != want[i].get<std::vector<int>>() && ++bad <= 3) ADD_FAILURE() << c.model << ": text " << i << " '" << texts[i] << "' differs from sentencepiece";
      // Decoding gives the text back (byte fallback included); not across special pieces, after
      // which the text was encoded with a space prefix of its own.
      if (texts[i].find('<') == std::string::npos && tok->decode(got) != texts[i] && ++bad <= 3) ADD_FAILURE() << c.model << ": decode of text " << i << " '" << texts[i] << "'";
      ++compared;
    }
    EXPECT_EQ(bad, 0) << c.model;
    EXPECT_GT(compared, int(texts.size()) / 2) << c.model << ": too few texts compared";
  }
  if (compared == 0) GTEST_SKIP() << "no sentencepiece model under ../shared ($LOWBIT_SHARED)";
}

TEST(SpmVocab, SpecialPiecesAndBadVocabularies) {
  LOWBIT_REQUIRE_SHARED(model, "tokenizers/llama2/tokenizer.model");
  TokenizerVocab v = vocab_from_tokenizer_file(model);
  ASSERT_EQ(v.model, "llama");
  // A user-defined piece and the control pieces in the text become their ids; the text around
  // them is encoded as if it started there (space prefix after a special, as llama.cpp).
  v.tokens.push_back("<|tool|>");
  v.scores.push_back(0.0f);
  v.token_types.push_back(4);
  const int tool = int(v.tokens.size()) - 1;
  v.add_eos = 1;
  const auto tok = tokenizer_from_vocab(v, "llama2+tool.gguf");
  auto plain = [&](const std::string& s) { return tok->encode(s, false); };
  std::vector<int> want = {1};
  for (int id : plain("Hi there")) want.push_back(id);
  want.push_back(tool);
  for (int id : plain("call")) want.push_back(id);
  want.push_back(2);
  for (int id : plain("x")) want.push_back(id);
  want.push_back(2);  // add_eos
  EXPECT_EQ(tok->encode("Hi there<|tool|>call</s>x", true), want);
  EXPECT_EQ(tok->encode("<s>", false), std::vector<int>{1});
  EXPECT_EQ(tok->decode(tok->encode("Hi there<|tool|>call</s>x", true)), "Hi there<|tool|> call x");
  // Bad vocabularies are errors, not crashes.
  TokenizerVocab bad = v;
  bad.scores.pop_back();
  EXPECT_THROW(tokenizer_from_vocab(bad, "bad.gguf"), Error);
  bad = v;
  bad.bos_id = int(v.tokens.size()) + 5;
  EXPECT_THROW(tokenizer_from_vocab(bad, "bad.gguf"), Error);
  bad = v;
  bad.tokens[100] = "";
  EXPECT_THROW(tokenizer_from_vocab(bad, "bad.gguf"), Error);
}

}  // namespace
}  // namespace lowbit
