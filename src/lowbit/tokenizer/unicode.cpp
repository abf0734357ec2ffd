#include "lowbit/tokenizer/unicode.h"

#include <algorithm>
#include <array>
#include <vector>

#include "lowbit/tokenizer/unicode_tables.h"

namespace lowbit::unicode {
namespace t = unicode_tables;

Decoded decode_utf8(std::string_view s, size_t pos) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + pos;
  const size_t left = s.size() - pos;
  const unsigned c = p[0];
  if (c < 0x80) return {c, 1};
  uint32_t len, cp, min;
  if ((c & 0xE0) == 0xC0) {
    len = 2, cp = c & 0x1F, min = 0x80;
  } else if ((c & 0xF0) == 0xE0) {
    len = 3, cp = c & 0x0F, min = 0x800;
  } else if ((c & 0xF8) == 0xF0) {
    len = 4, cp = c & 0x07, min = 0x10000;
  } else {
    return {kInvalid, 1};
  }
  if (left < len) return {kInvalid, 1};
  for (uint32_t i = 1; i < len; ++i) {
    if ((p[i] & 0xC0) != 0x80) return {kInvalid, 1};
    cp = (cp << 6) | (p[i] & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return {kInvalid, 1};
  return {cp, len};
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

namespace {

template <size_t N>
bool in_ranges(const t::Range (&r)[N], uint32_t cp) {
  auto it = std::upper_bound(std::begin(r), std::end(r), cp,
                             [](uint32_t v, const t::Range& x) { return v < x.first; });
  return it != std::begin(r) && cp <= std::prev(it)->last;
}

// ASCII answers from a 128-entry table: the pre-tokenizer asks these questions for every byte.
enum : uint8_t { kL = 1, kN = 2, kS = 4 };
constexpr std::array<uint8_t, 128> make_ascii() {
  std::array<uint8_t, 128> a{};
  for (int c = 'a'; c <= 'z'; ++c) a[c] = kL;
  for (int c = 'A'; c <= 'Z'; ++c) a[c] = kL;
  for (int c = '0'; c <= '9'; ++c) a[c] = kN;
  for (int c = 9; c <= 13; ++c) a[c] = kS;
  a[' '] = kS;
  return a;
}
constexpr auto kAscii = make_ascii();

uint8_t combining_class(uint32_t cp) {
  if (cp < 0x300) return 0;
  const auto& r = t::kCombiningClass;
  auto it = std::upper_bound(std::begin(r), std::end(r), cp,
                             [](uint32_t v, const t::ValuedRange& x) { return v < x.first; });
  if (it == std::begin(r) || cp > std::prev(it)->last) return 0;
  return std::prev(it)->value;
}

// Hangul syllable arithmetic (Unicode 14, section 3.12).
constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
                   kSCount = kLCount * kNCount;

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const uint32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out.push_back(kTBase + s % kTCount);
    return;
  }
  const auto& d = t::kDecompositions;
  auto it = std::lower_bound(std::begin(d), std::end(d), cp,
                             [](const t::Decomposition& x, uint32_t v) { return x.cp < v; });
  if (it == std::end(d) || it->cp != cp) {
    out.push_back(cp);
    return;
  }
  decompose(it->first, out);
  if (it->second) decompose(it->second, out);
}

// Primary composite of (a, b), or 0.
uint32_t compose_pair(uint32_t a, uint32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount)
    return a + (b - kTBase);
  const auto& c = t::kCompositions;
  auto it = std::lower_bound(std::begin(c), std::end(c), std::pair{a, b},
                             [](const t::Composition& x, const std::pair<uint32_t, uint32_t>& v) {
                               return std::pair{x.first, x.second} < v;
                             });
  return (it != std::end(c) && it->first == a && it->second == b) ? it->composite : 0;
}

}  // namespace

bool is_letter(uint32_t cp) {
  if (cp < 128) return kAscii[cp] & kL;
  return cp != kInvalid && in_ranges(t::kLetters, cp);
}
bool is_number(uint32_t cp) {
  if (cp < 128) return kAscii[cp] & kN;
  return cp != kInvalid && in_ranges(t::kNumbers, cp);
}
bool is_punctuation(uint32_t cp) { return cp != kInvalid && in_ranges(t::kPunctuation, cp); }
bool is_whitespace(uint32_t cp) {
  if (cp < 128) return kAscii[cp] & kS;
  return cp != kInvalid && in_ranges(t::kWhiteSpace, cp);
}

bool is_nfc_quick(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const Decoded d = decode_utf8(s, i);
    if (d.cp != kInvalid && d.cp >= 0x300 && in_ranges(t::kNfcUnsafe, d.cp)) return false;
    i += d.len;
  }
  return true;
}

std::string nfc(std::string_view s) {
  if (is_nfc_quick(s)) return std::string(s);
  // UAX #15: full canonical decomposition, canonical ordering, canonical composition. Invalid
  // bytes are carried through as blocking "starters" tagged with their byte value.
  constexpr uint32_t kByteTag = 0x80000000u;
  std::vector<uint32_t> cps;
  cps.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const Decoded d = decode_utf8(s, i);
    if (d.cp == kInvalid) {
      cps.push_back(kByteTag | static_cast<unsigned char>(s[i]));
    } else {
      decompose(d.cp, cps);
    }
    i += d.len;
  }
  auto ccc = [](uint32_t cp) -> uint8_t { return (cp & kByteTag) ? 0 : combining_class(cp); };
  // Canonical ordering: stable-sort each run of non-starters by combining class.
  for (size_t i = 0; i < cps.size();) {
    if (ccc(cps[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < cps.size() && ccc(cps[j]) != 0) ++j;
    std::stable_sort(cps.begin() + i, cps.begin() + j,
                     [&](uint32_t a, uint32_t b) { return ccc(a) < ccc(b); });
    i = j;
  }
  // Canonical composition: each character combines with the last starter unless blocked (a
  // character in between has the same or higher combining class, or is a starter).
  std::vector<uint32_t> out;
  out.reserve(cps.size());
  size_t starter = SIZE_MAX;
  int last_ccc = -1;
  for (uint32_t cp : cps) {
    const int c = ccc(cp);
    if (starter != SIZE_MAX && !(out[starter] & kByteTag) && !(cp & kByteTag)) {
      const bool blocked = (out.size() - 1 != starter) && (last_ccc == 0 || last_ccc >= c);
      if (!blocked) {
        if (uint32_t comp = compose_pair(out[starter], cp)) {
          out[starter] = comp;
          continue;
        }
      }
    }
    if (c == 0) starter = out.size();
    last_ccc = c;
    out.push_back(cp);
  }
  std::string r;
  r.reserve(s.size());
  for (uint32_t cp : out) {
    if (cp & kByteTag) {
      r += static_cast<char>(cp & 0xFF);
    } else {
      append_utf8(r, cp);
    }
  }
  return r;
}

std::string to_valid_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const Decoded d = decode_utf8(s, i);
    if (d.cp != kInvalid) {
      out.append(s.substr(i, d.len));
      i += d.len;
      continue;
    }
    // Maximal subpart: a lead byte followed by the continuation bytes that are still a valid
    // prefix of some sequence is replaced as one unit (Unicode 14, section 3.9, U+FFFD policy).
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    const unsigned c = p[i];
    size_t need = (c >= 0xC2 && c <= 0xDF) ? 1 : (c >= 0xE0 && c <= 0xEF) ? 2
                  : (c >= 0xF0 && c <= 0xF4) ? 3 : 0;
    size_t j = i + 1;
    for (size_t k = 0; k < need && j < s.size(); ++k, ++j) {
      const unsigned b = p[j];
      unsigned lo = 0x80, hi = 0xBF;
      if (k == 0) {
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
      }
      if (b < lo || b > hi) break;
    }
    out += "\xEF\xBF\xBD";
    i = j;
  }
  return out;
}

}  // namespace lowbit::unicode
