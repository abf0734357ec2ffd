// llama2.c tokenizer.bin: encode/decode against a literal transcription of run.c and against
// sentencepiece on the same vocabulary.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <random>

#include "common/test_util.h"
#include "lowbit/core/error.h"
#include "lowbit/tokenizer/llama2c_tokenizer.h"
#include "lowbit/tokenizer/sentencepiece_tokenizer.h"
#include "tokenizer/tokenizer_test_util.h"

namespace lowbit {
namespace {

// run.c encode() transcribed as literally as C++ allows (O(n^2) rescans, std::map lookups of
// the first id of each piece): the specification the fast implementation is checked against.
class RunC {
 public:
  explicit RunC(const Llama2cTokenizer& t) : t_(t) {
    for (int i = t.vocab_size() - 1; i >= 0; --i) sorted_[t.piece(i)] = i;
  }
  std::vector<int> encode(const std::string& text, bool bos) const;

 private:
  int lookup(const std::string& s) const {
    auto it = sorted_.find(s);
    return it == sorted_.end() ? -1 : it->second;
  }
  const Llama2cTokenizer& t_;
  std::map<std::string, int> sorted_;
};

std::vector<int> RunC::encode(const std::string& text, bool bos) const {
  const Llama2cTokenizer& t = t_;
  std::vector<int> tokens;
  if (bos) tokens.push_back(1);
  if (!text.empty()) tokens.push_back(lookup(" "));
  std::string buf;
  for (size_t c = 0; c < text.size(); ++c) {
    if ((text[c] & 0xC0) != 0x80) buf.clear();
    buf += text[c];
    const char next = c + 1 < text.size() ? text[c + 1] : '\0';
    if ((next & 0xC0) == 0x80 && buf.size() < 4) continue;
    const int id = lookup(buf);
    if (id != -1) {
      tokens.push_back(id);
    } else {
      for (unsigned char b : buf) tokens.push_back(b + 3);
    }
    buf.clear();
  }
  while (true) {
    float best_score = -1e10;
    int best_id = -1, best_idx = -1;
    for (size_t i = 0; i + 1 < tokens.size(); ++i) {
      const int id = lookup(t.piece(tokens[i]) + t.piece(tokens[i + 1]));
      if (id != -1 && t.score(id) > best_score) {
        best_score = t.score(id);
        best_id = id;
        best_idx = static_cast<int>(i);
      }
    }
    if (best_idx == -1) break;
    tokens[best_idx] = best_id;
    tokens.erase(tokens.begin() + best_idx + 1);
  }
  return tokens;
}

std::vector<std::string> wikitext_lines(size_t max_lines) {
  std::vector<std::string> out;
  const std::string ref = test::shared_file("ref/tokenize-llama2-wikitext2.jsonl");
  if (ref.empty()) return out;
  for (auto& r : test::read_ref_jsonl(ref)) {
    if (out.size() >= max_lines) break;
    out.push_back(std::move(r.text));
  }
  return out;
}

TEST(Llama2cTokenizer, Tok512MatchesRunC) {
  LOWBIT_REQUIRE_SHARED(path, "models/stories260K/tok512.bin");
  Llama2cTokenizer tok(path, 512);
  const RunC run_c(tok);
  EXPECT_EQ(tok.vocab_size(), 512);
  EXPECT_EQ(tok.kind(), "llama2c");
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  // Reading to the end of the file gives the same 512 entries.
  EXPECT_EQ(Llama2cTokenizer(path).vocab_size(), 512);

  std::vector<std::string> texts = {"", "Once upon a time, there was a little girl named Lily.",
                                    " leading space", "naïve café — 東京 🚀", "tab\tand\nnewline",
                                    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", std::string("\xff\x80stray", 7)};
  for (auto& l : wikitext_lines(60)) texts.push_back(l);
  for (const auto& text : texts) {
    for (bool bos : {false, true}) {
      const auto ids = tok.encode(text, bos);
      ASSERT_EQ(ids, run_c.encode(text, bos)) << "text: " << text;
    }
    // decode() drops the dummy prefix, so ASCII/UTF-8 text comes back unchanged.
    if (text.find('\xff') == std::string::npos) {
      EXPECT_EQ(tok.decode(tok.encode(text, true)), text);
    }
  }
  const auto hello = tok.encode("Hello", true);
  EXPECT_EQ(hello.front(), 1);
}

TEST(Llama2cTokenizer, DecodePieceIsRunCDecode) {
  LOWBIT_REQUIRE_SHARED(path, "models/stories260K/tok512.bin");
  Llama2cTokenizer tok(path, 512);
  const int a = tok.encode("Once", false).back();  // " Once"
  ASSERT_EQ(tok.piece(a)[0], ' ');
  EXPECT_EQ(tok.decode_piece(1, a), tok.piece(a).substr(1));  // after BOS: space dropped
  EXPECT_EQ(tok.decode_piece(5, a), tok.piece(a));
  // Byte pieces <0xNN> (ids 3..258) become the raw byte.
  EXPECT_EQ(tok.piece(3 + 0x0A), "<0x0A>");
  EXPECT_EQ(tok.decode_piece(1, 3 + 0x0A), "\n");
  EXPECT_EQ(tok.decode_piece(1, 3 + 0xE4), "\xE4");
  // safe_printf: a lone non-printable, non-space byte is not printed.
  EXPECT_EQ(printable_piece("\n"), "\n");
  EXPECT_EQ(printable_piece("\xE4"), "");
  EXPECT_EQ(printable_piece("\x01"), "");
  EXPECT_EQ(printable_piece(""), "");
  EXPECT_EQ(printable_piece(" Once"), " Once");
  EXPECT_EQ(printable_piece(std::string("a\0b", 3)), "a");
  EXPECT_THROW(tok.decode_piece(1, 512), Error);
  EXPECT_THROW(tok.decode({-1}), Error);
}

TEST(Llama2cTokenizer, DecodesStories260KSamples) {
  LOWBIT_REQUIRE_SHARED(tok_path, "models/stories260K/tok512.bin");
  LOWBIT_REQUIRE_SHARED(ids_path, "models/stories260K/sample-tokens.i32");
  Llama2cTokenizer tok(tok_path, 512);
  std::ifstream f(ids_path, std::ios::binary);
  std::vector<int32_t> ids(257);
  f.read(reinterpret_cast<char*>(ids.data()), ids.size() * 4);
  ASSERT_TRUE(f);
  ASSERT_EQ(ids[0], 1);
  const std::string text = tok.decode(std::vector<int>(ids.begin(), ids.end()));
  EXPECT_GT(text.size(), 500u);
  // The sampled story re-encodes to the same ids (sampling follows the tokenizer's merges
  // almost always; require most of them to survive).
  const auto again = tok.encode(text.substr(0, text.find('\n')), true);
  const size_t n = std::min(again.size(), ids.size());
  size_t same = 0;
  while (same < n && again[same] == ids[same]) ++same;
  EXPECT_GT(same, 5u);
}

TEST(Llama2cTokenizer, VectorConstructor) {
  // A toy vocabulary built the way a GGUF loader would: sentencepiece pieces and scores.
  std::vector<std::string> sp = {"<unk>", "<s>", "</s>"};
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    sp.push_back(buf);
  }
  for (const char* p : {"\xE2\x96\x81", "a", "b", "\xE2\x96\x81" "a", "ab", "\xE2\x96\x81" "ab"})
    sp.push_back(p);
  std::vector<std::string> pieces;
  for (const auto& p : sp) pieces.push_back(Llama2cTokenizer::to_llama2c_piece(p));
  std::vector<float> scores(pieces.size(), 0.f);
  scores[262] = -1.f;  // " a"
  scores[263] = -2.f;  // "ab"
  scores[264] = -3.f;  // " ab"
  Llama2cTokenizer tok(pieces, scores);
  EXPECT_EQ(tok.vocab_size(), 265);
  EXPECT_EQ(tok.max_token_length(), 6);
  // " " + "a" + "b" + "c": " a" (score -1) first, then " ab"; "c" falls back to byte 0x63.
  EXPECT_EQ(tok.encode("abc", true), (std::vector<int>{1, 264, 3 + 'c'}));
  EXPECT_EQ(tok.decode(tok.encode("abc", true)), "abc");
  EXPECT_THROW(Llama2cTokenizer({"a"}, {}), Error);
}

TEST(Llama2cTokenizer, Llama2BinMatchesRunCAndSentencepiece) {
  LOWBIT_REQUIRE_SHARED(bin, "tokenizers/llama2/tokenizer.bin");
  LOWBIT_REQUIRE_SHARED(model, "tokenizers/llama2/tokenizer.model");
  Llama2cTokenizer tok(bin, 32000);
  SentencePieceTokenizer sp(model);
  ASSERT_EQ(sp.vocab_size(), 32000);
  for (int id : {0, 1, 2, 3, 100, 259, 1000, 31999}) {
    const std::string want = id == 1 ? "\n<s>\n" : id == 2 ? "\n</s>\n"
                                                           : Llama2cTokenizer::to_llama2c_piece(sp.id_to_piece(id));
    EXPECT_EQ(tok.piece(id), want) << id;
  }
  // The exact O(n^2) transcription is slow on a 32000 vocabulary: a few lines suffice.
  const auto lines = wikitext_lines(410);
  const RunC run_c(tok);
  for (size_t i = 0; i < 12; ++i) ASSERT_EQ(tok.encode(lines[i], true), run_c.encode(lines[i], true));
  // llama2.c's greedy best-score merging reproduces sentencepiece's BPE on Llama 2 for
  // ordinary text (sentencepiece's BPE also merges the highest-scoring pair first).
  size_t same = 0;
  for (const auto& l : lines) {
    const auto a = tok.encode(l, false), b = sp.encode(l, false);
    if (a == b) {
      ++same;
    } else {
      ADD_FAILURE() << "llama2.c and sentencepiece differ on '" << l << "'";
    }
  }
  EXPECT_EQ(same, lines.size());
}

}  // namespace
}  // namespace lowbit
