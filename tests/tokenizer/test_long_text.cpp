// llama.cpp's default BPE pre-tokenizer chain, and linear-time merging of long texts
// (bpe_merge_runs must give exactly what one bpe_merge over the whole sequence gives).
#include <gtest/gtest.h>

#include <random>

#include "common/test_util.h"
#include "lowbit/tokenizer/bpe.h"
#include "lowbit/tokenizer/pretokenizer.h"
#include "tokenizer/tokenizer_test_util.h"

namespace lowbit {
namespace {

std::vector<std::string> split(std::string_view text) {
  auto p = recognize_split_pattern("LlamaCppDefault");
  EXPECT_TRUE(p.has_value());
  std::vector<std::string_view> out;
  split_pretokens(text, *p, out);
  return {out.begin(), out.end()};
}

// Expected pieces from Python's `regex` module applying llama.cpp's four regexes in turn, each
// splitting the previous pieces (matches and the text between them are pieces).
TEST(LlamaCppDefaultPre, MatchesRegexChain) {
  using V = std::vector<std::string>;
  EXPECT_EQ(split("Hello, world! 12345 $x+y"),
            (V{"Hello", ",", " world", "!", " ", "123", "45", " ", "$", "x", "+", "y"}));
  EXPECT_EQ(split("a  1\tb\n\nc's  1234567 \xC2\xBD x"),
            (V{"a", " ", " ", "1", "\t", "b", "\n", "\n", "c", "'", "s", " ", " ", "123", "456", "7", " ",
               "\xC2\xBD", " x"}));
  EXPECT_EQ(split("foo(bar)==>baz; \xE2\x80\x9Cquoted\xE2\x80\x9D 3.14159"),
            (V{"foo", "(", "bar", ")==>", "baz", ";", " ", "\xE2\x80\x9C", "quoted", "\xE2\x80\x9D", " ", "3", ".",
               "141", "59"}));
  EXPECT_EQ(split("x   \n  y"), (V{"x", "   \n ", " y"}));
}

TEST(BpeMergeRuns, SameAsOneMergeOverTheWholeSequence) {
  // Random merge table over 12 symbols; symbols 10 and 11 are in no rule (barriers).
  std::mt19937 rng(7);
  std::map<std::pair<int, int>, std::pair<double, int>> rules;
  for (int a = 0; a < 10; ++a)
    for (int b = 0; b < 10; ++b)
      if (rng() % 3 == 0) rules[{a, b}] = {double(rng() % 20), int(rng() % 10)};
  auto find = [&](int a, int b, double& pr, int& merged) {
    auto it = rules.find({a, b});
    if (it == rules.end()) return false;
    pr = it->second.first;
    merged = it->second.second;
    return true;
  };
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int> ids(size_t(rng() % 300));
    for (int& x : ids) x = int(rng() % 12);
    std::vector<int> whole = ids, runs = ids;
    detail::bpe_merge(whole, find);
    size_t last = 0;
    std::function<void(size_t)> progress = [&](size_t d) { EXPECT_GE(d, last), last = d; };
    detail::bpe_merge_runs(runs, find, [](int id) { return id >= 10; }, &progress);
    ASSERT_EQ(runs, whole) << "trial " << trial;
  }
}

// Whole-text encoding of a file-sized text equals the concatenation property the fast path
// relies on, for the tokenizers whose pipelines have no pre-tokenizer (one "word" per text).
TEST(BpeMergeRuns, LongTextEncodeLongEqualsEncode) {
  for (const char* rel : {"tokenizers/llama2/tokenizer.json", "models/stories260K/tok512.bin"}) {
    LOWBIT_REQUIRE_SHARED(path, rel);
    LOWBIT_REQUIRE_SHARED(text_path, "data/tinyshakespeare/input.txt");
    const Tokenizer& tok = test::cached_tokenizer(path);
    std::ifstream f(text_path, std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    text.resize(200000);
    const auto a = tok.encode(text, false);
    size_t calls = 0;
    const auto b = tok.encode_long(text, [&](size_t) { ++calls; });
    EXPECT_EQ(a, b) << rel;
    EXPECT_GE(calls, 1u);
  }
}

}  // namespace
}  // namespace lowbit
