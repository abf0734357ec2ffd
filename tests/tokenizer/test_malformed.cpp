// Malformed input never crashes a loader: it loads (a flipped byte can still leave a valid
// file), or throws lowbit::Error. Fuzz-style: random truncations and byte flips with a fixed
// seed, plus hand-written structural errors in tokenizer.json.
#include <gtest/gtest.h>

#include <fstream>
#include <random>
#include <sstream>

#include "common/test_util.h"
#include "lowbit/core/error.h"
#include "lowbit/tokenizer/hf_tokenizer.h"
#include "lowbit/tokenizer/llama2c_tokenizer.h"
#include "lowbit/tokenizer/sentencepiece_tokenizer.h"

namespace lowbit {
namespace {

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

// Exercises a tokenizer that did load: nothing may crash, errors must be lowbit::Error.
void exercise(const Tokenizer& t) {
  for (const char* text : {"", "Hello, world!", "naïve 東京 🚀\n\t x", "\xFF\xFE"}) {
    try {
      const auto ids = t.encode(text, true);
      t.decode(ids);
      int prev = t.bos_id();
      for (int id : ids) {
        t.decode_piece(prev, id);
        prev = id;
      }
    } catch (const Error&) {
    }
  }
}

// Mutations of `data`: truncations at random lengths and 1..4 random byte flips.
template <class Load>
void fuzz(const std::string& data, int rounds, uint32_t seed, Load&& load, int* errors) {
  std::mt19937 rng(seed);
  for (int r = 0; r < rounds; ++r) {
    std::string m = data;
    if (r % 2 == 0) {
      m.resize(std::uniform_int_distribution<size_t>(0, data.size() - 1)(rng));
    } else {
      const int flips = std::uniform_int_distribution<int>(1, 4)(rng);
      for (int f = 0; f < flips; ++f) {
        const size_t at = std::uniform_int_distribution<size_t>(0, m.size() - 1)(rng);
        m[at] = static_cast<char>(std::uniform_int_distribution<int>(0, 255)(rng));
      }
    }
    try {
      auto t = load(m);
      exercise(*t);
    } catch (const Error& e) {
      ++*errors;
      ASSERT_NE(std::string(e.what()).find("fuzz-input"), std::string::npos) << e.what();
    }
  }
}

TEST(Malformed, Llama2cTruncatedAndFlipped) {
  LOWBIT_REQUIRE_SHARED(path, "models/stories260K/tok512.bin");
  const std::string data = slurp(path);
  int errors = 0;
  for (int vocab : {0, 512}) {
    fuzz(data, 400, 7 + vocab, [&](const std::string& m) {
      return std::make_unique<Llama2cTokenizer>(Llama2cTokenizer::from_bytes(m, "fuzz-input", vocab));
    }, &errors);
  }
  EXPECT_GT(errors, 400);  // every truncation with vocab 512, most without
}

TEST(Malformed, Llama2cSpecificErrors) {
  auto i32 = [](int32_t v) { return std::string(reinterpret_cast<const char*>(&v), 4); };
  auto f32 = [](float v) { return std::string(reinterpret_cast<const char*>(&v), 4); };
  auto expect_error = [](const std::string& data, int vocab, const char* what) {
    try {
      Llama2cTokenizer::from_bytes(data, "x.bin", vocab);
      ADD_FAILURE() << "no error for " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("x.bin"), std::string::npos) << e.what();
    }
  };
  expect_error("", 0, "truncated");
  expect_error(i32(-5), 0, "max_token_length -5");
  expect_error(i32(1 << 30), 0, "max_token_length");
  expect_error(i32(4) + f32(0) + i32(-1), 0, "length -1");
  expect_error(i32(4) + f32(0) + i32(9) + "abcdefghi", 0, "length 9");
  expect_error(i32(4) + f32(0) + i32(3) + "ab", 0, "truncated");
  expect_error(i32(4) + f32(0) + i32(1) + "a", 2, "truncated");
  expect_error(i32(4), 0, "no tokens");
  // vocab_size reads exactly that many entries and ignores the rest, as llama2.c does.
  auto t = Llama2cTokenizer::from_bytes(i32(4) + f32(0) + i32(1) + " " + "junk", "x.bin", 1);
  EXPECT_EQ(t.vocab_size(), 1);
  // Byte fallback needs ids 3 + byte: a tiny vocabulary reports it instead of indexing past it.
  EXPECT_THROW(t.encode("a", false), Error);
}

// A complete, tiny byte-level BPE tokenizer.json (bytes a, b, c, space; merges "a b", "ab c").
std::string mini_json() {
  return R"({
  "version": "1.0",
  "added_tokens": [{"id": 6, "content": "<|end|>", "special": true}],
  "normalizer": {"type": "NFC"},
  "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
  "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|end|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {"<|end|>": {"id": "<|end|>", "ids": [6], "tokens": ["<|end|>"]}}},
  "decoder": {"type": "ByteLevel"},
  "model": {"type": "BPE", "dropout": null, "unk_token": null, "byte_fallback": false,
    "vocab": {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "abc": 5},
    "merges": ["a b", "ab c"]}
})";
}

TEST(Malformed, MiniJsonWorks) {
  auto t = HfTokenizer::from_json(mini_json(), "mini.json");
  EXPECT_EQ(t->encode("abc ab", false), (std::vector<int>{5, 3, 4}));
  EXPECT_EQ(t->encode("abc", true), (std::vector<int>{6, 5}));
  EXPECT_EQ(t->decode({6, 5, 3, 4}), "abc ab");
  EXPECT_EQ(t->encode("xyz", false), (std::vector<int>{}));  // no unk_token: dropped, as HF
  EXPECT_EQ(t->vocab_size(), 7);
}

TEST(Malformed, JsonStructuralErrors) {
  struct Case {
    std::string json, expect;
  };
  auto patch = [](std::string s, const std::string& from, const std::string& to) {
    const size_t at = s.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return s.replace(at, from.size(), to);
  };
  const std::string j = mini_json();
  const Case cases[] = {
      {"", "invalid tokenizer.json"},
      {"[1, 2]", "not a JSON object"},
      {"{\"version\": \"1.0\"}", "no 'model'"},
      {patch(j, R"("vocab": {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "abc": 5},)", ""),
       "no 'vocab'"},
      {patch(j, R"("type": "BPE")", R"("type": "WordPiece")"), "unsupported model type 'WordPiece'"},
      {patch(j, R"("type": "BPE")", R"("type": "Unigram")"), "unsupported model type 'Unigram'"},
      {patch(j, R"("a": 0,)", R"("a": -4,)"), "id -4"},
      {patch(j, R"("a": 0,)", R"("a": 99999999999,)"), "outside"},
      {patch(j, R"("a": 0,)", R"("a": "zero",)"), "invalid tokenizer.json"},
      {patch(j, R"("ab c")", R"("ab d")"), "missing from the vocabulary"},
      {patch(j, R"("ab c")", R"("abc")"), "not two tokens"},
      {patch(j, R"({"type": "NFC"})", R"({"type": "NFKD"})"), "unsupported normalizer type 'NFKD'"},
      {patch(j, R"(\\p{N}{1,3})", R"(\\d+)"), "unsupported Split regex"},
      {patch(j, R"("decoder": {"type": "ByteLevel"})", R"("decoder": {"type": "CTC"})"),
       "unsupported decoder type 'CTC'"},
      {patch(j, R"("ids": [6])", R"("ids": [600])"), "outside the vocabulary"},
      {patch(j, R"("vocab": {)", R"("vocab": [)"), "invalid tokenizer.json"},
  };
  for (const auto& c : cases) {
    try {
      HfTokenizer::from_json(c.json, "case.json");
      ADD_FAILURE() << "no error, expected '" << c.expect << "' for\n" << c.json;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(c.expect), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("case.json"), std::string::npos) << e.what();
    }
  }
}

TEST(Malformed, JsonTruncatedAndFlipped) {
  int errors = 0;
  fuzz(mini_json(), 1000, 11, [](const std::string& m) {
    return HfTokenizer::from_json(m, "fuzz-input");
  }, &errors);
  EXPECT_GT(errors, 500);
}

TEST(Malformed, SentencepieceTruncatedAndFlipped) {
  LOWBIT_REQUIRE_SHARED(path, "models/stories260K/tok512.model");
  int errors = 0;
  fuzz(slurp(path), 200, 13, [](const std::string& m) {
    return SentencePieceTokenizer::from_serialized(m, "fuzz-input");
  }, &errors);
  EXPECT_GT(errors, 50);
}

}  // namespace
}  // namespace lowbit
