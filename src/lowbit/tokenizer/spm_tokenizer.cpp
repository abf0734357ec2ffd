#include "lowbit/tokenizer/spm_tokenizer.h"

#include <algorithm>
#include <cstdio>
#include <queue>

#include "lowbit/core/error.h"

namespace lowbit {

namespace {

constexpr const char* kSpace = "\xE2\x96\x81";  // U+2581, sentencepiece's whitespace

int utf8_len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0) return 2;
  if ((c & 0xF0) == 0xE0) return 3;
  if ((c & 0xF8) == 0xF0) return 4;
  return 1;  // a stray continuation or invalid byte: a symbol of its own
}

}  // namespace

SpmTokenizer::SpmTokenizer(SpmVocab vocab, const std::string& source) : v_(std::move(vocab)) {
  const size_t n = v_.pieces.size();
  if (n == 0) throw_error(source, ": the sentencepiece vocabulary is empty");
  if (!v_.scores.empty() && v_.scores.size() != n)
    throw_error(source, ": ", v_.scores.size(), " scores for ", n, " tokens");
  if (!v_.types.empty() && v_.types.size() != n)
    throw_error(source, ": ", v_.types.size(), " token types for ", n, " tokens");
  for (auto [id, what] : {std::pair{v_.bos_id, "bos"}, {v_.eos_id, "eos"}, {v_.unk_id, "unknown"}})
    if (id >= int(n)) throw_error(source, ": the ", what, " token id ", id, " is outside the vocabulary of ", n);
  if (v_.add_bos && v_.bos_id < 0) throw_error(source, ": add_bos_token is true but there is no BOS token id");
  if (v_.add_eos && v_.eos_id < 0) throw_error(source, ": add_eos_token is true but there is no EOS token id");
  std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
  index_.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string& p = v_.pieces[i];
    if (p.empty()) throw_error(source, ": token ", i, " is empty");
    const int t = type(int(i));
    if (t == 6 || (p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>')) {
      unsigned b = 0;
      if (p.size() == 6 && std::sscanf(p.c_str() + 3, "%2X", &b) == 1 && byte_ids_[b] < 0) byte_ids_[b] = int(i);
      if (t == 6) continue;  // byte pieces are never merge results
    }
    if (t == 2 || t == 3 || t == 4) {
      specials_.push_back(int(i));
      continue;  // matched in the text, never formed by merges
    }
    index_.emplace(std::string_view(p), int(i));
    if (size_t(utf8_len(static_cast<unsigned char>(p[0]))) < p.size())  // two or more characters
      for (size_t k = 0; k < p.size();) {
        const size_t len = std::min<size_t>(utf8_len(static_cast<unsigned char>(p[k])), p.size() - k);
        merge_chars_.insert(std::string_view(p.data() + k, len));
        k += len;
      }
  }
  std::stable_sort(specials_.begin(), specials_.end(),
                   [&](int a, int b) { return v_.pieces[size_t(a)].size() > v_.pieces[size_t(b)].size(); });
  for (int id : specials_) specials_by_first_[static_cast<unsigned char>(v_.pieces[size_t(id)][0])].push_back(id);
}

std::string SpmTokenizer::token_text(int id) const {
  return id >= 0 && id < vocab_size() ? v_.pieces[size_t(id)] : std::string();
}

std::vector<int> SpmTokenizer::encode(std::string_view text, bool add_special) const {
  std::vector<int> out;
  if (add_special && v_.add_bos) out.push_back(v_.bos_id);
  // Cut special pieces out (leftmost, then longest), encode the text between them.
  size_t start = 0, i = 0;
  bool prev_special = true;  // the first piece of text gets the space prefix
  std::string buf;
  while (i < text.size()) {
    int hit = -1;
    for (int id : specials_by_first_[static_cast<unsigned char>(text[i])]) {
      const std::string& p = v_.pieces[size_t(id)];
      if (p.size() <= text.size() - i && text.compare(i, p.size(), p) == 0) {
        hit = id;
        break;
      }
    }
    if (hit < 0) {
      ++i;
      continue;
    }
    if (i > start) {
      buf.clear();
      if (v_.add_space_prefix && prev_special) buf += ' ';
      buf.append(text.substr(start, i - start));
      encode_text(buf, out);
    }
    out.push_back(hit);
    prev_special = true;
    i += v_.pieces[size_t(hit)].size();
    start = i;
  }
  if (start < text.size()) {
    buf.clear();
    if (v_.add_space_prefix && prev_special) buf += ' ';
    buf.append(text.substr(start));
    encode_text(buf, out);
  }
  if (add_special && v_.add_eos) out.push_back(v_.eos_id);
  return out;
}

void SpmTokenizer::encode_text(std::string_view raw, std::vector<int>& out) const {
  std::string text;
  text.reserve(raw.size() + raw.size() / 4);
  for (char c : raw) {
    if (c == ' ') text += kSpace;
    else text += c;
  }
  // A character that occurs in no piece of two or more characters takes part in no merge: the
  // text is merged segment by segment between such characters (same ids, and memory and time
  // stay linear in long texts such as whole training files).
  size_t seg = 0;
  for (size_t p = 0; p < text.size();) {
    const size_t len = std::min<size_t>(utf8_len(static_cast<unsigned char>(text[p])), text.size() - p);
    if (!merge_chars_.count(std::string_view(text.data() + p, len))) {
      merge_segment(std::string_view(text.data() + seg, p - seg), out);
      merge_segment(std::string_view(text.data() + p, len), out);
      seg = p + len;
    }
    p += len;
  }
  merge_segment(std::string_view(text.data() + seg, text.size() - seg), out);
}

void SpmTokenizer::merge_segment(std::string_view text, std::vector<int>& out) const {
  struct Sym {
    size_t pos, len;
    int prev, next;
  };
  std::vector<Sym> sym;
  for (size_t p = 0; p < text.size();) {
    const size_t len = std::min<size_t>(utf8_len(static_cast<unsigned char>(text[p])), text.size() - p);
    sym.push_back({p, len, int(sym.size()) - 1, int(sym.size()) + 1});
    p += len;
  }
  if (sym.empty()) return;
  sym.back().next = -1;
  struct Pair {
    int left, right;
    float score;
    size_t len;
  };
  // Highest score first; equal scores: the leftmost pair.
  auto worse = [](const Pair& a, const Pair& b) { return a.score < b.score || (a.score == b.score && a.left > b.left); };
  std::priority_queue<Pair, std::vector<Pair>, decltype(worse)> heap(worse);
  auto try_pair = [&](int l, int r) {
    if (l < 0 || r < 0) return;
    const std::string_view s(text.data() + sym[size_t(l)].pos, sym[size_t(l)].len + sym[size_t(r)].len);
    auto it = index_.find(s);
    if (it == index_.end()) return;
    const float score = v_.scores.empty() ? 0.0f : v_.scores[size_t(it->second)];
    heap.push({l, r, score, s.size()});
  };
  for (size_t k = 1; k < sym.size(); ++k) try_pair(int(k) - 1, int(k));
  while (!heap.empty()) {
    const Pair p = heap.top();
    heap.pop();
    Sym& l = sym[size_t(p.left)];
    Sym& r = sym[size_t(p.right)];
    if (l.len == 0 || r.len == 0 || l.next != p.right || l.len + r.len != p.len) continue;  // stale
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) sym[size_t(r.next)].prev = p.left;
    try_pair(l.prev, p.left);
    try_pair(p.left, l.next);
  }
  for (int k = 0; k >= 0; k = sym[size_t(k)].next) {
    const std::string_view s(text.data() + sym[size_t(k)].pos, sym[size_t(k)].len);
    auto it = index_.find(s);
    if (it != index_.end()) {
      out.push_back(it->second);
      continue;
    }
    bool bytes = true;
    for (unsigned char c : s) bytes = bytes && byte_ids_[c] >= 0;
    if (bytes) {
      for (unsigned char c : s) out.push_back(byte_ids_[c]);
    } else if (v_.unk_id >= 0) {
      out.push_back(v_.unk_id);
    } else {
      throw_error("[tokenizer] sentencepiece vocabulary: '", std::string(s),
                  "' is not a piece and the vocabulary has neither its byte pieces nor an unknown token");
    }
  }
}

std::string SpmTokenizer::decode_piece(int prev, int id) const {
  if (id < 0 || id >= vocab_size()) throw_error("[tokenizer] token id ", id, " out of range [0, ", vocab_size(), ")");
  const int t = type(id);
  if (t == 3) return {};
  const std::string& p = v_.pieces[size_t(id)];
  if (t == 6 || (v_.types.empty() && p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>')) {
    unsigned b = 0;
    if (p.size() == 6 && std::sscanf(p.c_str() + 3, "%2X", &b) == 1) return std::string(1, char(b));
  }
  if (t == 4) return p;
  std::string s;
  for (size_t i = 0; i < p.size();) {
    if (p.compare(i, 3, kSpace) == 0) {
      s += ' ';
      i += 3;
    } else {
      s += p[i++];
    }
  }
  if (v_.add_space_prefix && (prev < 0 || prev == v_.bos_id) && !s.empty() && s[0] == ' ') s.erase(0, 1);
  return s;
}

std::string SpmTokenizer::decode(const std::vector<int>& ids) const {
  std::string out;
  int prev = -1;
  for (int id : ids) {
    if (id == v_.bos_id || id == v_.eos_id) {
      prev = id;
      continue;
    }
    out += decode_piece(prev, id);
    prev = id;
  }
  return out;
}

}  // namespace lowbit
