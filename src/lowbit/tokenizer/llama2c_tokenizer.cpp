#include "lowbit/tokenizer/llama2c_tokenizer.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "lowbit/core/error.h"
#include "lowbit/tokenizer/bpe.h"

namespace lowbit {
namespace {

// Limits that no real tokenizer.bin approaches; larger values mean a corrupt file and would
// otherwise turn into huge allocations.
constexpr int32_t kMaxTokenLengthLimit = 1 << 16;
constexpr size_t kMaxVocab = 1u << 24;

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  LB_CHECK(f, "[tokenizer] ", path, ": cannot open file");
  std::ostringstream os;
  os << f.rdbuf();
  LB_CHECK(!f.bad(), "[tokenizer] ", path, ": read error");
  return std::move(os).str();
}

// "<0xNN>" -> byte, as run.c's sscanf(piece, "<0x%02hhX>", ...) == 1: "<0x" then one or two
// hex digits (the closing '>' is not checked by sscanf either).
int parse_byte_piece(const std::string& p) {
  if (p.size() < 4 || p.compare(0, 3, "<0x") != 0) return -1;
  auto hex = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  int v = hex(p[3]);
  if (v < 0) return -1;
  if (p.size() > 4 && hex(p[4]) >= 0) v = v * 16 + hex(p[4]);
  return v;
}

}  // namespace

Llama2cTokenizer::Llama2cTokenizer(const std::string& path, int vocab_size)
    : Llama2cTokenizer(from_bytes(read_file(path), path, vocab_size)) {}

Llama2cTokenizer Llama2cTokenizer::from_bytes(std::string_view data, const std::string& name,
                                              int vocab_size) {
  Llama2cTokenizer t;
  size_t off = 0;
  auto read_i32 = [&](const char* what, size_t entry) {
    LB_CHECK(off + 4 <= data.size(), "[tokenizer] ", name, ": truncated llama2.c tokenizer (",
             what, " of entry ", entry, " at offset ", off, ", file size ", data.size(), ")");
    int32_t v;
    std::memcpy(&v, data.data() + off, 4);
    off += 4;
    return v;
  };
  const int32_t max_len = read_i32("max_token_length", 0);
  LB_CHECK(max_len > 0 && max_len <= kMaxTokenLengthLimit, "[tokenizer] ", name,
           ": not a llama2.c tokenizer.bin (max_token_length ", max_len, ")");
  t.max_token_length_ = max_len;
  for (size_t i = 0; vocab_size > 0 ? i < static_cast<size_t>(vocab_size) : off < data.size();
       ++i) {
    LB_CHECK(i < kMaxVocab, "[tokenizer] ", name, ": more than ", kMaxVocab, " tokens");
    float score;
    LB_CHECK(off + 4 <= data.size(), "[tokenizer] ", name,
             ": truncated llama2.c tokenizer (score of entry ", i, " at offset ", off,
             ", file size ", data.size(), ")");
    std::memcpy(&score, data.data() + off, 4);
    off += 4;
    const int32_t len = read_i32("length", i);
    LB_CHECK(len >= 0 && len <= max_len, "[tokenizer] ", name, ": entry ", i, " at offset ",
             off - 4, " has length ", len, " outside [0, max_token_length=", max_len, "]");
    LB_CHECK(off + static_cast<size_t>(len) <= data.size(), "[tokenizer] ", name,
             ": truncated llama2.c tokenizer (piece of entry ", i, " needs ", len,
             " bytes at offset ", off, ", file size ", data.size(), ")");
    t.pieces_.emplace_back(data.substr(off, len));
    t.scores_.push_back(score);
    off += len;
  }
  LB_CHECK(!t.pieces_.empty(), "[tokenizer] ", name, ": llama2.c tokenizer has no tokens");
  t.build_index();
  return t;
}

Llama2cTokenizer::Llama2cTokenizer(std::vector<std::string> pieces, std::vector<float> scores,
                                   int bos_id, int eos_id)
    : pieces_(std::move(pieces)), scores_(std::move(scores)), bos_id_(bos_id), eos_id_(eos_id) {
  LB_CHECK(pieces_.size() == scores_.size(), "[tokenizer] llama2.c vocabulary: ",
           pieces_.size(), " pieces but ", scores_.size(), " scores");
  LB_CHECK(!pieces_.empty(), "[tokenizer] llama2.c vocabulary is empty");
  for (const auto& p : pieces_)
    max_token_length_ = std::max(max_token_length_, static_cast<int>(p.size()));
  build_index();
}

std::string Llama2cTokenizer::to_llama2c_piece(std::string_view sp) {
  std::string out;
  for (size_t i = 0; i < sp.size();) {
    if (sp.compare(i, 3, "\xE2\x96\x81") == 0) {
      out += ' ';
      i += 3;
    } else {
      out += sp[i++];
    }
  }
  return out;
}

void Llama2cTokenizer::build_index() {
  index_.reserve(pieces_.size());
  // run.c bsearch()es a sorted copy, which returns an unspecified one of duplicate pieces;
  // real vocabularies have none, and here the lowest id wins.
  for (size_t i = 0; i < pieces_.size(); ++i) index_.emplace(pieces_[i], static_cast<int>(i));
  // A pair (a, b) merges only when piece(a) + piece(b) is a piece, so a token that is neither
  // half of any such split never merges: encode() cuts the text there (bpe_merge_runs).
  mergeable_.assign(pieces_.size(), 0);
  for (const auto& p : pieces_) {
    const std::string_view v(p);
    for (size_t k = 1; k < v.size(); ++k) {
      const int a = lookup(v.substr(0, k));
      if (a < 0) continue;
      const int b = lookup(v.substr(k));
      if (b < 0) continue;
      mergeable_[a] = mergeable_[b] = 1;
    }
  }
  // Duplicate pieces: merges look pieces up by text, so a duplicate is as mergeable as the first.
  for (size_t i = 0; i < pieces_.size(); ++i) mergeable_[i] = mergeable_[size_t(lookup(pieces_[i]))];
}

int Llama2cTokenizer::lookup(std::string_view s) const {
  auto it = index_.find(s);
  return it == index_.end() ? -1 : it->second;
}

const std::string& Llama2cTokenizer::piece(int id) const {
  LB_CHECK(id >= 0 && id < vocab_size(), "[tokenizer] token id ", id, " out of range [0, ",
           vocab_size(), ")");
  return pieces_[id];
}

float Llama2cTokenizer::score(int id) const {
  piece(id);  // range check
  return scores_[id];
}

std::vector<int> Llama2cTokenizer::encode(std::string_view text, bool add_special) const {
  return encode_impl(text, add_special, nullptr);
}

std::vector<int> Llama2cTokenizer::encode_long(std::string_view text,
                                               const std::function<void(size_t)>& progress) const {
  std::vector<int> ids = encode_impl(text, false, progress ? &progress : nullptr);
  if (progress) progress(text.size());
  return ids;
}

std::vector<int> Llama2cTokenizer::encode_impl(std::string_view text, bool add_special,
                                               const std::function<void(size_t)>* progress) const {
  std::vector<int> ids;
  ids.reserve(text.size() + 2);
  if (add_special && bos_id_ >= 0) ids.push_back(bos_id_);
  if (!text.empty()) {
    const int dummy = lookup(" ");
    LB_CHECK(dummy >= 0, "[tokenizer] llama2.c vocabulary has no ' ' piece for the dummy prefix");
    ids.push_back(dummy);
  }
  // One lookup per UTF-8 character: a lead byte starts a new buffer, continuation bytes are
  // appended (at most 4 bytes, as run.c).
  size_t start = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80) start = i;
    const size_t len = i + 1 - start;
    if (i + 1 < text.size() && (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80 &&
        len < 4)
      continue;
    const int id = lookup(text.substr(start, len));
    if (id >= 0) {
      ids.push_back(id);
    } else {
      for (size_t k = start; k <= i; ++k) {
        const int b = static_cast<unsigned char>(text[k]) + 3;
        LB_CHECK(b < vocab_size(), "[tokenizer] byte-fallback id ", b,
                 " is outside the llama2.c vocabulary of ", vocab_size());
        ids.push_back(b);
      }
    }
    start = i + 1;
  }
  std::string buf;
  // Symbols are about one per byte, so the symbol position is the progress in bytes.
  detail::bpe_merge_runs(ids, [&](int a, int b, double& priority, int& merged) {
    buf.assign(pieces_[a]);
    buf += pieces_[b];
    const int id = lookup(buf);
    // run.c keeps the best score strictly above -1e10; NaN scores never win either.
    if (id < 0 || !(scores_[id] > -1e10f)) return false;
    priority = -static_cast<double>(scores_[id]);
    merged = id;
    return true;
  }, [&](int id) { return !mergeable_[id]; }, progress);
  return ids;
}

std::string Llama2cTokenizer::decode_piece(int prev, int id) const {
  const std::string& p = piece(id);
  size_t skip = (prev == bos_id_ && !p.empty() && p[0] == ' ') ? 1 : 0;
  const std::string rest = p.substr(skip);
  const int byte = parse_byte_piece(rest);
  if (byte >= 0) return std::string(1, static_cast<char>(byte));
  return rest;
}

std::string Llama2cTokenizer::decode(const std::vector<int>& ids) const {
  std::string out;
  int prev = bos_id_;
  for (int id : ids) {
    if (id != bos_id_ && id != eos_id_) out += decode_piece(prev, id);
    prev = id;
  }
  return out;
}

std::string printable_piece(const std::string& piece) {
  if (piece.empty()) return {};
  if (piece.size() == 1) {
    const unsigned char c = static_cast<unsigned char>(piece[0]);
    const bool print = c >= 0x20 && c <= 0x7E;
    const bool space = c == ' ' || (c >= '\t' && c <= '\r');
    if (!print && !space) return {};
  }
  return piece.substr(0, piece.find('\0'));
}

}  // namespace lowbit
