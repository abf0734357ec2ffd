#include "lowbit/tokenizer/pretokenizer.h"

#include <cstdint>

#include "lowbit/tokenizer/unicode.h"

namespace lowbit {
namespace {

constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// Per-character classes, computed once per text so that the matchers below are simple loops.
enum : uint8_t {
  kLetter = 1,
  kNumber = 2,
  kSpace = 4,    // \s
  kNewline = 8,  // \r or \n
  kBlank = 16,   // U+0020 (the literal ' ?' of the patterns)
};

struct Chars {
  std::vector<uint32_t> cp;
  std::vector<uint32_t> off;  // byte offset of each character; off[n] = text size
  std::vector<uint8_t> cls;
  void scan(std::string_view s) {
    cp.clear(), off.clear(), cls.clear();
    for (size_t i = 0; i < s.size();) {
      const auto d = unicode::decode_utf8(s, i);
      uint8_t c = 0;
      if (unicode::is_letter(d.cp)) c |= kLetter;
      if (unicode::is_number(d.cp)) c |= kNumber;
      if (unicode::is_whitespace(d.cp)) c |= kSpace;
      if (d.cp == '\r' || d.cp == '\n') c |= kNewline;
      if (d.cp == ' ') c |= kBlank;
      cp.push_back(d.cp), off.push_back(static_cast<uint32_t>(i)), cls.push_back(c);
      i += d.len;
    }
    off.push_back(static_cast<uint32_t>(s.size()));
  }
};

// [^\s\p{L}\p{N}]
bool is_other(uint8_t c) { return (c & (kLetter | kNumber | kSpace)) == 0; }

// Length (in characters) of a contraction 's 't 're 've 'm 'll 'd at i, or 0. With
// case_insensitive, (?i) as Rust/Oniguruma apply it: simple case folding, under which U+017F
// (long s) also matches 's'.
size_t contraction(const Chars& ch, size_t i, bool case_insensitive) {
  const size_t n = ch.cp.size();
  if (ch.cp[i] != '\'' || i + 1 >= n) return 0;
  auto is = [&](size_t k, char lower) {
    if (k >= n) return false;
    const uint32_t c = ch.cp[k];
    if (c == static_cast<uint32_t>(lower)) return true;
    if (!case_insensitive) return false;
    return c == static_cast<uint32_t>(lower - 'a' + 'A') || (lower == 's' && c == 0x17F);
  };
  if (is(i + 1, 's') || is(i + 1, 't') || is(i + 1, 'm') || is(i + 1, 'd')) return 2;
  if ((is(i + 1, 'r') && is(i + 2, 'e')) || (is(i + 1, 'v') && is(i + 2, 'e')) ||
      (is(i + 1, 'l') && is(i + 2, 'l')))
    return 3;
  return 0;
}

// The whitespace alternatives common to both families, at a whitespace character i:
// [\s*[\r\n]+ |] \s+(?!\S) | \s+
size_t match_whitespace(const Chars& ch, size_t i, bool newline_alternative) {
  const size_t n = ch.cp.size();
  size_t j = i;
  while (j < n && (ch.cls[j] & kSpace)) ++j;
  if (newline_alternative) {
    // \s*[\r\n]+ : greedy \s* backtracks to the last newline of the run.
    for (size_t k = j; k > i; --k)
      if (ch.cls[k - 1] & kNewline) return k - i;
  }
  if (j == n) return j - i;          // \s+(?!\S) at the end of the text
  if (j - i >= 2) return j - i - 1;  // \s+(?!\S) leaves the last space for the next word
  return j - i;                      // \s+
}

size_t match_gpt2(const Chars& ch, size_t i) {
  const size_t n = ch.cp.size();
  if (size_t c = contraction(ch, i, false)) return c;
  const size_t start = (ch.cls[i] & kBlank) && i + 1 < n ? i + 1 : i;
  auto run = [&](auto pred) {
    size_t j = start;
    while (j < n && pred(ch.cls[j])) ++j;
    return j - i;
  };
  // ' ?X+' for the three classes: the optional space is taken only when X follows it.
  if (ch.cls[start] & kLetter) return run([](uint8_t c) { return (c & kLetter) != 0; });
  if (ch.cls[start] & kNumber) return run([](uint8_t c) { return (c & kNumber) != 0; });
  if (is_other(ch.cls[start])) return run(is_other);
  if (ch.cls[i] & kSpace) return match_whitespace(ch, i, false);
  return 1;  // unreachable for the classes above; keeps progress guaranteed
}

size_t match_llama3(const Chars& ch, size_t i, int max_digits) {
  const size_t n = ch.cp.size();
  const uint8_t c = ch.cls[i];
  if (size_t k = contraction(ch, i, true)) return k;
  // [^\r\n\p{L}\p{N}]?\p{L}+
  size_t j = i;
  if (!(c & (kNewline | kLetter | kNumber)) && i + 1 < n && (ch.cls[i + 1] & kLetter)) j = i + 1;
  if (ch.cls[j] & kLetter) {
    while (j < n && (ch.cls[j] & kLetter)) ++j;
    return j - i;
  }
  // \p{N}{1,K}
  if (c & kNumber) {
    j = i;
    while (j < n && (ch.cls[j] & kNumber) && (max_digits == 0 || j - i < size_t(max_digits))) ++j;
    return j - i;
  }
  //  ?[^\s\p{L}\p{N}]+[\r\n]*
  j = ((c & kBlank) && i + 1 < n && is_other(ch.cls[i + 1])) ? i + 1 : i;
  if (is_other(ch.cls[j])) {
    while (j < n && is_other(ch.cls[j])) ++j;
    while (j < n && (ch.cls[j] & kNewline)) ++j;
    return j - i;
  }
  if (c & kSpace) return match_whitespace(ch, i, true);
  return 1;  // unreachable: every character is a letter, number, space or "other"
}

// Splits every piece of `in` into the matches of a matcher and the text between them.
// match(piece, i) -> length of a match starting at byte i, or 0.
template <class Match>
void split_isolated(const std::vector<std::string_view>& in, std::vector<std::string_view>& out, Match match) {
  for (std::string_view p : in) {
    size_t from = 0;
    for (size_t i = 0; i < p.size();) {
      const size_t len = match(p, i);
      if (len == 0) {
        i += unicode::decode_utf8(p, i).len;
        continue;
      }
      if (i > from) out.push_back(p.substr(from, i - from));
      out.push_back(p.substr(i, len));
      i += len;
      from = i;
    }
    if (from < p.size()) out.push_back(p.substr(from));
  }
}

// Greedy run of characters satisfying pred starting at byte i (0 when p[i] does not).
template <class Pred>
size_t run_of(std::string_view p, size_t i, Pred pred) {
  size_t j = i;
  while (j < p.size()) {
    const auto d = unicode::decode_utf8(p, j);
    if (!pred(d.cp)) break;
    j += d.len;
  }
  return j - i;
}

void split_llama_cpp_default(std::string_view text, std::vector<std::string_view>& out) {
  std::vector<std::string_view> a{text}, b;
  // 1. [\p{P}\$\+<=>\^~\|]+
  split_isolated(a, b, [](std::string_view p, size_t i) {
    return run_of(p, i, [](uint32_t cp) {
      return unicode::is_punctuation(cp) || (cp < 128 && std::string_view("$+<=>^~|").find(char(cp)) != std::string_view::npos);
    });
  });
  // 2. the GPT-2 regex on every piece (its pieces cover the input, so nothing falls between)
  a.clear();
  for (std::string_view p : b) split_pretokens(p, gpt2_split_pattern(), a);
  // 3. \p{N}+
  b.clear();
  split_isolated(a, b, [](std::string_view p, size_t i) { return run_of(p, i, unicode::is_number); });
  // 4. [0-9][0-9][0-9], leftmost first
  split_isolated(b, out, [](std::string_view p, size_t i) -> size_t {
    auto digit = [&](size_t k) { return k < p.size() && p[k] >= '0' && p[k] <= '9'; };
    return digit(i) && digit(i + 1) && digit(i + 2) ? 3 : 0;
  });
}

}  // namespace

std::optional<SplitPattern> recognize_split_pattern(std::string_view regex) {
  if (regex == "LlamaCppDefault") return SplitPattern{SplitPattern::Family::kLlamaCppDefault, 0};
  if (regex == kGpt2Regex) return gpt2_split_pattern();
  if (regex == kLlama3Regex) return SplitPattern{SplitPattern::Family::kLlama3, 3};
  if (regex == kQwen2Regex) return SplitPattern{SplitPattern::Family::kLlama3, 1};
  return std::nullopt;
}

SplitPattern gpt2_split_pattern() { return SplitPattern{SplitPattern::Family::kGpt2, 0}; }

void split_pretokens(std::string_view text, const SplitPattern& pattern,
                     std::vector<std::string_view>& out) {
  if (pattern.family == SplitPattern::Family::kLlamaCppDefault) return split_llama_cpp_default(text, out);
  thread_local Chars ch;
  ch.scan(text);
  const size_t n = ch.cp.size();
  for (size_t i = 0; i < n;) {
    const size_t len = pattern.family == SplitPattern::Family::kGpt2
                           ? match_gpt2(ch, i)
                           : match_llama3(ch, i, pattern.max_digits);
    out.push_back(text.substr(ch.off[i], ch.off[i + len] - ch.off[i]));
    i += len;
  }
}

}  // namespace lowbit
