// Unicode tables, NFC and the pre-tokenizer regex matchers. Expected splits were produced by
// Python's `regex` module (which implements \p{L}, \p{N}, (?i:...) and look-ahead) on the exact
// pattern strings; NFC expectations by unicodedata.normalize.
#include <gtest/gtest.h>

#include "lowbit/tokenizer/pretokenizer.h"
#include "lowbit/tokenizer/unicode.h"

namespace lowbit {
namespace {

TEST(Unicode, Classes) {
  using namespace unicode;
  EXPECT_TRUE(is_letter('a'));
  EXPECT_TRUE(is_letter(0x6771));   // 東
  EXPECT_TRUE(is_letter(0x00AA));   // ª (Lo)
  EXPECT_FALSE(is_letter(0x0301));  // combining acute (Mn)
  EXPECT_FALSE(is_letter(0x1F680)); // 🚀 (So)
  EXPECT_TRUE(is_number('7'));
  EXPECT_TRUE(is_number(0x0663));  // Arabic-Indic 3 (Nd)
  EXPECT_TRUE(is_number(0x216B));  // Roman numeral twelve (Nl)
  EXPECT_TRUE(is_number(0x00B2));  // superscript two (No)
  EXPECT_FALSE(is_number('x'));
  for (uint32_t c : {0x09u, 0x0Au, 0x0Du, 0x20u, 0x85u, 0xA0u, 0x1680u, 0x2009u, 0x2028u, 0x3000u})
    EXPECT_TRUE(is_whitespace(c)) << c;
  for (uint32_t c : {0x00u, 0x1Cu, 0x200Bu, 0xFEFFu, 0x41u}) EXPECT_FALSE(is_whitespace(c)) << c;
  EXPECT_FALSE(is_letter(kInvalid));
}

TEST(Unicode, DecodeUtf8IsLenient) {
  using namespace unicode;
  const std::string s = "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x9A\x80\xFF\xC3(\xED\xA0\x80\xC0\xAF";
  std::vector<uint32_t> cps;
  for (size_t i = 0; i < s.size();) {
    const auto d = decode_utf8(s, i);
    cps.push_back(d.cp);
    i += d.len;
  }
  const std::vector<uint32_t> want = {'a', 0xE9, 0x20AC, 0x1F680, kInvalid, kInvalid, '(',
                                      kInvalid, kInvalid, kInvalid, kInvalid, kInvalid};
  EXPECT_EQ(cps, want);
  // U+FFFD substitution of maximal subparts (as Rust's from_utf8_lossy).
  EXPECT_EQ(to_valid_utf8("ok\xF0\x9F\x9A"), "ok\xEF\xBF\xBD");
  EXPECT_EQ(to_valid_utf8("\xE0\x80\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(to_valid_utf8("\xC3\xA9"), "\xC3\xA9");
}

TEST(Unicode, Nfc) {
  using unicode::nfc;
  struct Case {
    const char* in;
    const char* want;
  };
  const Case cases[] = {
      {"plain ascii", "plain ascii"},
      {"e\xCC\x81", "\xC3\xA9"},                             // e + U+0301 -> é
      {"\xE2\x84\xAB", "\xC3\x85"},                          // Angstrom sign -> Å (singleton)
      {"\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8", "\xEA\xB0\x81"},  // Hangul L V T -> 각
      {"a\xCC\x82\xCC\xA3", "\xE1\xBA\xAD"},                 // reordering: a ̂ ̣ -> ậ
      {"\xC3\xA9\xCC\xA3", "\xE1\xBA\xB9\xCC\x81"},          // é + dot below -> ẹ + acute
      {"\xCD\x84", "\xCC\x88\xCC\x81"},                      // U+0344 excluded: decomposes only
      {"\xE0\xA5\x98", "\xE0\xA4\x95\xE0\xA4\xBC"},          // U+0958 composition exclusion
      {"e\xFF\xCC\x81", "e\xFF\xCC\x81"},                    // an invalid byte blocks composing
      {"\xCC\x81" "e", "\xCC\x81" "e"},                      // leading combining mark stays
  };
  for (const auto& c : cases) {
    EXPECT_EQ(nfc(c.in), c.want) << c.in;
    EXPECT_EQ(nfc(nfc(c.in)), nfc(c.in));
  }
  EXPECT_TRUE(unicode::is_nfc_quick("na\xC3\xAFve caf\xC3\xA9 \xE6\x9D\xB1"));
  EXPECT_FALSE(unicode::is_nfc_quick("e\xCC\x81"));
}

struct SplitCase {
  std::string text;
  std::vector<std::string> llama3, qwen2, gpt2;
};

std::vector<std::string> split(std::string_view s, const SplitPattern& p) {
  std::vector<std::string_view> v;
  split_pretokens(s, p, v);
  return {v.begin(), v.end()};
}

TEST(PreTokenizer, MatchesRegexSemantics) {
  const SplitCase cases[] = {
    {"I'M here, don'T 'LL go",
     {"I", "'M", " here", ",", " don", "'T", " '", "LL", " go"},
     {"I", "'M", " here", ",", " don", "'T", " '", "LL", " go"},
     {"I", "'", "M", " here", ",", " don", "'", "T", " '", "LL", " go"}},
    {"  x\n\n  y\t\t\r\nz   ",
     {" ", " x", "\n\n", " ", " y", "\t\t\r\n", "z", "   "},
     {" ", " x", "\n\n", " ", " y", "\t\t\r\n", "z", "   "},
     {" ", " x", "\n\n ", " y", "\t\t\r", "\n", "z", "   "}},
    {"12345 \xD9\xA3\xD9\xA3\xD9\xA3\xD9\xA3 \xE2\x85\xAB",
     {"123", "45", " ", "\xD9\xA3\xD9\xA3\xD9\xA3", "\xD9\xA3", " ", "\xE2\x85\xAB"},
     {"1", "2", "3", "4", "5", " ", "\xD9\xA3", "\xD9\xA3", "\xD9\xA3", "\xD9\xA3", " ", "\xE2\x85\xAB"},
     {"12345", " \xD9\xA3\xD9\xA3\xD9\xA3\xD9\xA3", " \xE2\x85\xAB"}},
    {" (hello) ...\n\nworld!?\n",
     {" (", "hello", ")", " ...\n\n", "world", "!?\n"},
     {" (", "hello", ")", " ...\n\n", "world", "!?\n"},
     {" (", "hello", ")", " ...", "\n", "\n", "world", "!?", "\n"}},
    {"a\xC2\xA0" "b\xE3\x80\x80\xE3\x80\x80" "c",
     {"a", "\xC2\xA0" "b", "\xE3\x80\x80", "\xE3\x80\x80" "c"},
     {"a", "\xC2\xA0" "b", "\xE3\x80\x80", "\xE3\x80\x80" "c"},
     {"a", "\xC2\xA0", "b", "\xE3\x80\x80", "\xE3\x80\x80", "c"}},
    {"tab\t\tx 'sx",
     {"tab", "\t", "\tx", " '", "sx"},
     {"tab", "\t", "\tx", " '", "sx"},
     {"tab", "\t", "\t", "x", " '", "sx"}},
    {"\xE6\x9D\xB1\xE4\xBA\xAC\xF0\x9F\x9A\x80 na\xC3\xAFve\xCC\x81",
     {"\xE6\x9D\xB1\xE4\xBA\xAC", "\xF0\x9F\x9A\x80", " na\xC3\xAFve", "\xCC\x81"},
     {"\xE6\x9D\xB1\xE4\xBA\xAC", "\xF0\x9F\x9A\x80", " na\xC3\xAFve", "\xCC\x81"},
     {"\xE6\x9D\xB1\xE4\xBA\xAC", "\xF0\x9F\x9A\x80", " na\xC3\xAFve", "\xCC\x81"}},
    {"x  ",
     {"x", "  "},
     {"x", "  "},
     {"x", "  "}},
    {"\n",
     {"\n"},
     {"\n"},
     {"\n"}},
    {"'",
     {"'"},
     {"'"},
     {"'"}},
    {"\xC5\xBFx '\xC5\xBF",
     {"\xC5\xBFx", " '", "\xC5\xBF"},
     {"\xC5\xBFx", " '", "\xC5\xBF"},
     {"\xC5\xBFx", " '", "\xC5\xBF"}},
  };
  const auto llama3 = recognize_split_pattern(
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)");
  const auto qwen2 = recognize_split_pattern(
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)");
  ASSERT_TRUE(llama3 && qwen2);
  for (const auto& c : cases) {
    EXPECT_EQ(split(c.text, *llama3), c.llama3) << c.text;
    EXPECT_EQ(split(c.text, *qwen2), c.qwen2) << c.text;
    EXPECT_EQ(split(c.text, gpt2_split_pattern()), c.gpt2) << c.text;
  }
  EXPECT_FALSE(recognize_split_pattern(R"(\p{L}+|\s+)"));
  // Invalid UTF-8 is never lost: the pieces still cover every byte.
  const std::string bad = "ab\xFF\xFE cd\xC3";
  std::string joined;
  for (const auto& p : split(bad, *llama3)) joined += p;
  EXPECT_EQ(joined, bad);
}

}  // namespace
}  // namespace lowbit
