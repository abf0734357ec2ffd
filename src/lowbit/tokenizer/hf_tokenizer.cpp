#include "lowbit/tokenizer/hf_tokenizer.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>
#include <vector>

#include "lowbit/core/error.h"
#include "lowbit/tokenizer/bpe.h"
#include "lowbit/tokenizer/pretokenizer.h"
#include "lowbit/tokenizer/unicode.h"

namespace lowbit {
namespace {

using json = nlohmann::json;

// Ids must be below 2 * (number of tokens in the file) + kIdSlack: real files number their
// tokens densely, and a corrupt id (e.g. 99999999) must not turn into a huge id table.
constexpr int64_t kIdSlack = 1024;
constexpr std::string_view kMetaspace = "\xE2\x96\x81";  // U+2581, sentencepiece's space

// Heterogeneous lookup, so string_views can be looked up without building std::strings.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using StringMap = std::unordered_map<std::string, int, StringHash, std::equal_to<>>;

// GPT-2's bytes_to_unicode(): printable Latin-1 bytes map to themselves, the other 68 bytes to
// U+0100.. in order, so that every byte is a visible character in vocab/merges files.
struct ByteLevelTable {
  std::array<uint32_t, 256> byte_to_cp{};
  std::unordered_map<uint32_t, uint8_t> cp_to_byte;
  ByteLevelTable() {
    uint32_t n = 0;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      byte_to_cp[b] = keep ? b : 256 + n++;
      cp_to_byte[byte_to_cp[b]] = static_cast<uint8_t>(b);
    }
  }
  // Raw bytes of a byte-level token string; false when a character is outside the table.
  bool to_bytes(std::string_view s, std::string& out) const {
    out.clear();
    for (size_t i = 0; i < s.size();) {
      const auto d = unicode::decode_utf8(s, i);
      auto it = cp_to_byte.find(d.cp);
      if (it == cp_to_byte.end()) return false;
      out += static_cast<char>(it->second);
      i += d.len;
    }
    return true;
  }
};
const ByteLevelTable& byte_level_table() {
  static const ByteLevelTable t;
  return t;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  LB_CHECK(f, "[tokenizer] ", path, ": cannot open file");
  std::ostringstream os;
  os << f.rdbuf();
  LB_CHECK(!f.bad(), "[tokenizer] ", path, ": read error");
  return std::move(os).str();
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(s, pos, hit - pos);
    out.append(to);
  }
  if (pos == 0) return;
  out.append(s, pos);
  s = std::move(out);
}

// A Replace normalizer/decoder pattern: only {"String": "..."} (a Regex pattern would need a
// Unicode regex engine).
std::string string_pattern(const json& step, const char* where) {
  const json& p = step.at("pattern");
  if (!p.contains("String"))
    throw_error("unsupported ", where, " Replace pattern ", p.dump(), " (only String patterns)");
  return p.at("String").get<std::string>();
}

// "<0xNN>" -> NN as HF's ByteFallback decoder reads it (exactly 6 characters), else -1.
int byte_fallback_value(std::string_view t) {
  if (t.size() != 6 || t.substr(0, 3) != "<0x" || t[5] != '>') return -1;
  int v = 0;
  for (char c : t.substr(3, 2)) {
    v *= 16;
    if (c >= '0' && c <= '9') v += c - '0';
    else if (c >= 'a' && c <= 'f') v += c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') v += c - 'A' + 10;
    else return -1;
  }
  return v;
}

// j[key] converted to T, or `def` when the key is absent or null (files write both).
template <class T>
T get_or(const json& j, const char* key, T def) {
  if (!j.contains(key) || j.at(key).is_null()) return def;
  return j.at(key).get<T>();
}

bool is_word_char(uint32_t cp) { return cp == '_' || unicode::is_letter(cp) || unicode::is_number(cp); }

}  // namespace

struct HfTokenizer::Impl {
  struct AddedToken {
    int id;
    std::string content;
    bool special, lstrip, rstrip, single_word;
  };
  struct NormStep {
    enum Kind { kPrepend, kReplace, kNfc } kind;
    std::string a, b;
  };
  struct PreStep {
    enum Kind { kSplit, kByteLevel, kMetaspace, kDigits } kind;
    SplitPattern pattern;
    bool add_prefix_space = false, use_regex = false, split = false;
    std::string replacement;
    enum Scheme { kAlways, kFirst, kNever } scheme = kAlways;
  };
  struct DecStep {
    enum Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace } kind;
    std::string a, b;  // Replace: from/to; Strip, Metaspace: the character
    int start = 0, stop = 0;
    bool prepend = true;  // Metaspace: prepend_scheme != never
  };
  struct PostItem {
    bool is_sequence;
    std::vector<int> ids;
  };

  std::string name;
  bool byte_level = false;  // vocabulary keys are byte-level strings; BPE works on raw bytes
  StringMap vocab;          // in BPE symbol space: raw bytes (byte-level) or text
  std::vector<std::string> tokens;  // id -> token as written in the file ("" for holes)
  std::vector<uint8_t> added_kind;  // 0 model token, 1 added, 2 added special
  std::unordered_map<uint64_t, std::pair<int, int>> merges;  // (left << 32 | right) -> rank, id
  std::vector<uint8_t> in_merge;  // id is the left or right of some merge (else it never merges)
  std::array<int, 256> byte_ids{};  // byte-level: id of each byte; else <0xNN> ids (-1: none)
  int unk_id = -1;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;

  std::vector<AddedToken> added;
  std::array<std::vector<int>, 256> added_by_first_byte;  // indexes into `added`, longest first

  std::vector<NormStep> normalizer;
  std::vector<PreStep> pretokenizer;
  std::vector<PostItem> post_single;  // empty: nothing is added
  std::vector<DecStep> decoder;
  bool strip_space_after_bos = false;
  int bos = -1, eos = -1;
  int64_t id_limit = kIdSlack;

  // Word -> ids cache: pre-tokens repeat a lot in natural text, and a hash lookup is much
  // cheaper than a BPE run. Bounded; cleared when full.
  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int>, StringHash, std::equal_to<>> cache;
  static constexpr size_t kCacheMax = 1 << 16;

  // ---- loading ----------------------------------------------------------------------------
  void load(const json& j, const json* config);
  void load_model(const json& m);
  void load_added(const json& a);
  void load_normalizer(const json& n);
  void load_pretokenizer(const json& p);
  void load_post_processor(const json& p);
  void load_decoder(const json& d);
  void resolve_bos_eos(const json* config);
  int id_of(std::string_view token) const;  // added tokens first, then the file's vocabulary
  void set_token(int64_t id, const std::string& text, const char* what);

  // ---- encoding ---------------------------------------------------------------------------
  struct Segment {
    std::string_view text;
    int added_id;  // -1: text to tokenize
  };
  void split_added(std::string_view text, std::vector<Segment>& out) const;
  std::string normalize(std::string_view s) const;
  void pretokenize(std::string_view s, bool first_segment, std::vector<std::string_view>& out,
                   std::deque<std::string>& arena) const;
  void bpe(std::string_view word, std::vector<int>& out, const std::function<void(size_t)>* progress = nullptr) const;
  void bpe_uncached(std::string_view word, std::vector<int>& out,
                    const std::function<void(size_t)>* progress = nullptr) const;
  std::vector<int> encode(std::string_view text, bool add_special,
                          const std::function<void(size_t)>* progress) const;

  // ---- decoding ---------------------------------------------------------------------------
  struct Piece {
    std::string text;
    bool raw;  // an added token's content: decoders leave it alone
  };
  std::string run_decoder(std::vector<Piece> pieces) const;
  void check_id(int id) const {
    LB_CHECK(id >= 0 && id < static_cast<int>(tokens.size()), "[tokenizer] ", name,
             ": token id ", id, " out of range [0, ", tokens.size(), ")");
  }
};

// ============================================================================== loading

void HfTokenizer::Impl::set_token(int64_t id, const std::string& text, const char* what) {
  LB_CHECK(id >= 0 && id < id_limit, what, " '", text, "' has id ", id, " outside [0, ",
           id_limit, ")");
  if (static_cast<size_t>(id) >= tokens.size()) {
    tokens.resize(id + 1);
    added_kind.resize(id + 1, 0);
  }
  tokens[id] = text;
}

void HfTokenizer::Impl::load(const json& j, const json* config) {
  LB_CHECK(j.is_object(), "tokenizer.json is not a JSON object");
  LB_CHECK(j.contains("model") && j.at("model").is_object(), "no 'model' object");
  const json& model = j.at("model");
  const size_t n_vocab = model.contains("vocab") ? model.at("vocab").size() : 0;
  const size_t n_added = j.contains("added_tokens") ? j.at("added_tokens").size() : 0;
  id_limit = 2 * static_cast<int64_t>(n_vocab + n_added) + kIdSlack;
  // The pre-tokenizer decides the BPE symbol space, so it is read before the model.
  if (j.contains("pre_tokenizer")) load_pretokenizer(j.at("pre_tokenizer"));
  load_model(j.at("model"));
  if (j.contains("added_tokens")) load_added(j.at("added_tokens"));
  if (j.contains("normalizer")) load_normalizer(j.at("normalizer"));
  if (j.contains("post_processor")) load_post_processor(j.at("post_processor"));
  if (j.contains("decoder")) load_decoder(j.at("decoder"));
  resolve_bos_eos(config);
}

void HfTokenizer::Impl::load_model(const json& m) {
  std::string type = get_or(m, "type", std::string());
  if (type.empty() && m.contains("merges")) type = "BPE";  // tokenizers infers it the same way
  LB_CHECK(type == "BPE", "unsupported model type '", type,
           "' (lowbit reads BPE tokenizer.json models)");
  LB_CHECK(m.contains("vocab") && m.at("vocab").is_object(), "model has no 'vocab' object");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (m.contains(key) && !m.at(key).is_null())
      LB_CHECK(m.at(key).get<std::string>().empty(), "BPE ", key, " is not supported");
  }
  fuse_unk = get_or(m, "fuse_unk", false);
  byte_fallback = get_or(m, "byte_fallback", false);
  ignore_merges = get_or(m, "ignore_merges", false);

  // Vocabulary in the file's spelling (merges refer to it), then in BPE symbol space.
  StringMap file_vocab;
  file_vocab.reserve(m.at("vocab").size());
  for (const auto& [tok, idj] : m.at("vocab").items()) {
    const int64_t id = idj.get<int64_t>();
    set_token(id, tok, "vocabulary token");
    file_vocab.emplace(tok, static_cast<int>(id));
  }
  LB_CHECK(!file_vocab.empty(), "model vocabulary is empty");
  const auto& bl = byte_level_table();
  std::string bytes;
  vocab.reserve(file_vocab.size());
  for (const auto& [tok, id] : file_vocab) {
    if (byte_level && bl.to_bytes(tok, bytes)) {
      vocab.emplace(bytes, id);
    } else {
      vocab.emplace(tok, id);
    }
  }
  byte_ids.fill(-1);
  for (int b = 0; b < 256; ++b) {
    std::string key;
    if (byte_level) {
      key = std::string(1, static_cast<char>(b));
      auto it = vocab.find(key);
      if (it != vocab.end()) byte_ids[b] = it->second;
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "<0x%02X>", b);
      auto it = file_vocab.find(std::string_view(buf));
      if (it != file_vocab.end()) byte_ids[b] = it->second;
    }
  }

  if (m.contains("unk_token") && !m.at("unk_token").is_null()) {
    const auto unk = m.at("unk_token").get<std::string>();
    auto it = file_vocab.find(unk);
    LB_CHECK(it != file_vocab.end(), "unk_token '", unk, "' is not in the vocabulary");
    unk_id = it->second;
  }

  // Merges: "a b" strings (older files) or ["a", "b"] pairs (newer files). Their order is the
  // rank: lower merges first.
  if (!m.contains("merges")) return;
  const json& mj = m.at("merges");
  LB_CHECK(mj.is_array(), "model 'merges' is not an array");
  merges.reserve(mj.size());
  std::string a, b;
  for (size_t rank = 0; rank < mj.size(); ++rank) {
    const json& e = mj[rank];
    if (e.is_string()) {
      const auto& s = e.get_ref<const std::string&>();
      const size_t sp = s.find(' ');
      LB_CHECK(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos, "merge ",
               rank, " '", s, "' is not two tokens separated by one space");
      a.assign(s, 0, sp);
      b.assign(s, sp + 1);
    } else {
      LB_CHECK(e.is_array() && e.size() == 2, "merge ", rank, " is not a pair: ", e.dump());
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    }
    auto ia = file_vocab.find(a), ib = file_vocab.find(b), iab = file_vocab.find(a + b);
    LB_CHECK(ia != file_vocab.end() && ib != file_vocab.end() && iab != file_vocab.end(),
             "merge ", rank, " ('", a, "', '", b, "') uses a token missing from the vocabulary");
    const uint64_t key = (uint64_t(uint32_t(ia->second)) << 32) | uint32_t(ib->second);
    merges.emplace(key, std::pair{static_cast<int>(rank), iab->second});  // first rank wins
    for (int id : {ia->second, ib->second}) {
      if (size_t(id) >= in_merge.size()) in_merge.resize(size_t(id) + 1, 0);
      in_merge[size_t(id)] = 1;
    }
  }
}

void HfTokenizer::Impl::load_added(const json& a) {
  LB_CHECK(a.is_array(), "'added_tokens' is not an array");
  for (const json& t : a) {
    AddedToken at;
    const int64_t id = t.at("id").get<int64_t>();
    at.content = t.at("content").get<std::string>();
    LB_CHECK(!at.content.empty(), "added token ", id, " has empty content");
    set_token(id, at.content, "added token");
    at.id = static_cast<int>(id);
    at.special = get_or(t, "special", false);
    at.lstrip = get_or(t, "lstrip", false);
    at.rstrip = get_or(t, "rstrip", false);
    at.single_word = get_or(t, "single_word", false);
    // "normalized": true tokens are matched on the raw text too (documented gap: tokenizers
    // matches them after normalization; none of the supported model files use it).
    added_kind[at.id] = at.special ? 2 : 1;
    added.push_back(std::move(at));
  }
  for (size_t i = 0; i < added.size(); ++i)
    added_by_first_byte[static_cast<unsigned char>(added[i].content[0])].push_back(int(i));
  for (auto& v : added_by_first_byte)
    std::stable_sort(v.begin(), v.end(), [&](int x, int y) {
      return added[x].content.size() > added[y].content.size();
    });
}

void HfTokenizer::Impl::load_normalizer(const json& n) {
  if (n.is_null()) return;
  const std::string type = n.at("type").get<std::string>();
  if (type == "Sequence") {
    for (const json& s : n.at("normalizers")) load_normalizer(s);
  } else if (type == "Prepend") {
    normalizer.push_back({NormStep::kPrepend, n.at("prepend").get<std::string>(), {}});
  } else if (type == "Replace") {
    normalizer.push_back(
        {NormStep::kReplace, string_pattern(n, "normalizer"), n.at("content").get<std::string>()});
  } else if (type == "NFC") {
    normalizer.push_back({NormStep::kNfc, {}, {}});
  } else {
    throw_error("unsupported normalizer type '", type, "'");
  }
}

void HfTokenizer::Impl::load_pretokenizer(const json& p) {
  if (p.is_null()) return;
  const std::string type = p.at("type").get<std::string>();
  PreStep s{};
  if (type == "Sequence") {
    for (const json& x : p.at("pretokenizers")) load_pretokenizer(x);
    return;
  } else if (type == "Split") {
    const json& pat = p.at("pattern");
    LB_CHECK(pat.contains("Regex"), "unsupported Split pattern ", pat.dump(),
             " (only Regex patterns)");
    const auto re = pat.at("Regex").get<std::string>();
    auto sp = recognize_split_pattern(re);
    LB_CHECK(sp.has_value(), "unsupported Split regex '", re,
             "' (lowbit implements the GPT-2, Llama 3 and Qwen 2 patterns)");
    const auto behavior = get_or(p, "behavior", std::string("Isolated"));
    LB_CHECK(behavior == "Isolated" && !get_or(p, "invert", false), "unsupported Split behavior '",
             behavior, "'", get_or(p, "invert", false) ? " with invert" : "");
    s.kind = PreStep::kSplit;
    s.pattern = *sp;
  } else if (type == "ByteLevel") {
    s.kind = PreStep::kByteLevel;
    s.add_prefix_space = get_or(p, "add_prefix_space", true);
    s.use_regex = get_or(p, "use_regex", true);
    s.pattern = gpt2_split_pattern();
    byte_level = true;
  } else if (type == "Digits") {
    // Digits: every run of \p{N} characters (or every single one, individual_digits) is a piece.
    s.kind = PreStep::kDigits;
    s.split = get_or(p, "individual_digits", false);
  } else if (type == "Metaspace") {
    s.kind = PreStep::kMetaspace;
    s.replacement = get_or(p, "replacement", std::string(kMetaspace));
    s.split = get_or(p, "split", true);
    std::string scheme = get_or(p, "prepend_scheme", std::string());
    if (scheme.empty()) scheme = get_or(p, "add_prefix_space", true) ? "always" : "never";
    if (scheme == "always") s.scheme = PreStep::kAlways;
    else if (scheme == "first") s.scheme = PreStep::kFirst;
    else if (scheme == "never") s.scheme = PreStep::kNever;
    else throw_error("unsupported Metaspace prepend_scheme '", scheme, "'");
  } else {
    throw_error("unsupported pre_tokenizer type '", type, "'");
  }
  pretokenizer.push_back(std::move(s));
}

void HfTokenizer::Impl::load_post_processor(const json& p) {
  if (p.is_null()) return;
  const std::string type = p.at("type").get<std::string>();
  if (type == "Sequence") {
    for (const json& x : p.at("processors")) load_post_processor(x);
  } else if (type == "ByteLevel") {
    // Only adjusts offsets, which lowbit does not report.
  } else if (type == "TemplateProcessing") {
    post_single.clear();
    const json& specials = get_or(p, "special_tokens", json::object());
    for (const json& item : p.at("single")) {
      if (item.contains("Sequence")) {
        post_single.push_back({true, {}});
      } else if (item.contains("SpecialToken")) {
        const auto name_ = item.at("SpecialToken").at("id").get<std::string>();
        LB_CHECK(specials.contains(name_), "post_processor refers to undefined special token '",
                 name_, "'");
        PostItem pi{false, specials.at(name_).at("ids").get<std::vector<int>>()};
        for (int id : pi.ids)
          LB_CHECK(id >= 0 && id < static_cast<int>(tokens.size()), "post_processor token '",
                   name_, "' has id ", id, " outside the vocabulary");
        post_single.push_back(std::move(pi));
      } else {
        throw_error("unsupported TemplateProcessing item ", item.dump());
      }
    }
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    // {"cls": ["<s>", 0], "sep": ["</s>", 2]}: cls A sep
    auto id_at = [&](const char* k) {
      const int id = p.at(k).at(1).get<int>();
      LB_CHECK(id >= 0 && id < static_cast<int>(tokens.size()), "post_processor ", k, " id ", id,
               " outside the vocabulary");
      return id;
    };
    post_single = {{false, {id_at("cls")}}, {true, {}}, {false, {id_at("sep")}}};
  } else {
    throw_error("unsupported post_processor type '", type, "'");
  }
}

void HfTokenizer::Impl::load_decoder(const json& d) {
  if (d.is_null()) return;
  const std::string type = d.at("type").get<std::string>();
  DecStep s{};
  if (type == "Sequence") {
    for (const json& x : d.at("decoders")) load_decoder(x);
    return;
  } else if (type == "ByteLevel") {
    s.kind = DecStep::kByteLevel;
  } else if (type == "Replace") {
    s.kind = DecStep::kReplace;
    s.a = string_pattern(d, "decoder");
    s.b = d.at("content").get<std::string>();
  } else if (type == "ByteFallback") {
    s.kind = DecStep::kByteFallback;
  } else if (type == "Fuse") {
    s.kind = DecStep::kFuse;
  } else if (type == "Strip") {
    s.kind = DecStep::kStrip;
    s.a = d.at("content").get<std::string>();
    s.start = get_or(d, "start", 0);
    s.stop = get_or(d, "stop", 0);
    if (s.a == " " && s.start > 0) strip_space_after_bos = true;
  } else if (type == "Metaspace") {
    s.kind = DecStep::kMetaspace;
    s.a = get_or(d, "replacement", std::string(kMetaspace));
    std::string scheme = get_or(d, "prepend_scheme", std::string());
    if (scheme.empty()) scheme = get_or(d, "add_prefix_space", true) ? "always" : "never";
    s.prepend = scheme != "never";
    strip_space_after_bos = strip_space_after_bos || s.prepend;
  } else {
    throw_error("unsupported decoder type '", type, "'");
  }
  decoder.push_back(std::move(s));
}

int HfTokenizer::Impl::id_of(std::string_view token) const {
  for (const auto& a : added)
    if (a.content == token) return a.id;
  if (byte_level) {  // the vocabulary is keyed by raw bytes; try the file spelling too
    std::string bytes;
    if (byte_level_table().to_bytes(token, bytes)) {
      auto it = vocab.find(bytes);
      if (it != vocab.end() && tokens[it->second] == token) return it->second;
    }
  }
  auto it = vocab.find(token);
  return it == vocab.end() ? -1 : it->second;
}

void HfTokenizer::Impl::resolve_bos_eos(const json* config) {
  // tokenizer_config.json names them ("bos_token": "<s>" or {"content": "<s>", ...} or null);
  // without it: the first special token of the post-processor template, then common names.
  auto from_config = [&](const char* key, int& out) {
    if (!config || !config->is_object() || !config->contains(key)) return false;
    const json& v = config->at(key);
    if (v.is_null()) return true;  // explicitly none
    const std::string s = v.is_object() ? v.at("content").get<std::string>() : v.get<std::string>();
    out = id_of(s);
    return true;
  };
  if (!from_config("bos_token", bos)) {
    if (!post_single.empty() && !post_single.front().is_sequence)
      bos = post_single.front().ids.empty() ? -1 : post_single.front().ids[0];
    for (const char* n : {"<s>", "<|begin_of_text|>"})
      if (bos < 0) bos = id_of(n);
  }
  if (!from_config("eos_token", eos)) {
    for (const char* n : {"</s>", "<|end_of_text|>", "<|endoftext|>"})
      if (eos < 0) eos = id_of(n);
  }
}

// ============================================================================== encoding

void HfTokenizer::Impl::split_added(std::string_view text, std::vector<Segment>& out) const {
  size_t last = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const auto& cands = added_by_first_byte[static_cast<unsigned char>(text[i])];
    const AddedToken* hit = nullptr;
    for (int c : cands) {  // longest first: leftmost-longest, like tokenizers' Aho-Corasick
      const AddedToken& t = added[c];
      if (text.compare(i, t.content.size(), t.content) != 0) continue;
      if (t.single_word) {
        const size_t end = i + t.content.size();
        bool word_before = false, word_after = false;
        if (i > 0) {
          size_t k = i - 1;  // start of the previous character
          while (k > 0 && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
          word_before = is_word_char(unicode::decode_utf8(text, k).cp);
        }
        if (end < text.size()) word_after = is_word_char(unicode::decode_utf8(text, end).cp);
        if (word_before || word_after) continue;
      }
      hit = &t;
      break;
    }
    if (!hit) continue;
    size_t start = i, end = i + hit->content.size();
    // lstrip/rstrip absorb ASCII whitespace (bytes >= 0x80 are parts of UTF-8 sequences).
    auto ascii_space = [](char c) {
      return static_cast<unsigned char>(c) < 0x80 && unicode::is_whitespace(static_cast<unsigned char>(c));
    };
    if (hit->lstrip)
      while (start > last && ascii_space(text[start - 1])) --start;
    if (hit->rstrip)
      while (end < text.size() && ascii_space(text[end])) ++end;
    if (start > last) out.push_back({text.substr(last, start - last), -1});
    out.push_back({text.substr(start, end - start), hit->id});
    last = end;
    i = end - 1;
  }
  if (last < text.size()) out.push_back({text.substr(last), -1});
}

std::string HfTokenizer::Impl::normalize(std::string_view s) const {
  std::string r(s);
  for (const auto& n : normalizer) {
    switch (n.kind) {
      case NormStep::kPrepend:
        if (!r.empty()) r.insert(0, n.a);  // tokenizers prepends to non-empty strings only
        break;
      case NormStep::kReplace:
        replace_all(r, n.a, n.b);
        break;
      case NormStep::kNfc:
        if (!unicode::is_nfc_quick(r)) r = unicode::nfc(r);
        break;
    }
  }
  return r;
}

void HfTokenizer::Impl::pretokenize(std::string_view s, bool first_segment,
                                    std::vector<std::string_view>& out,
                                    std::deque<std::string>& arena) const {
  out.clear();
  if (s.empty()) return;
  out.push_back(s);
  std::vector<std::string_view> next;
  for (const auto& step : pretokenizer) {
    next.clear();
    for (size_t k = 0; k < out.size(); ++k) {
      std::string_view p = out[k];
      switch (step.kind) {
        case PreStep::kSplit:
          split_pretokens(p, step.pattern, next);
          break;
        case PreStep::kByteLevel:
          if (step.add_prefix_space && !p.empty() && p[0] != ' ')
            p = arena.emplace_back(" " + std::string(p));
          if (step.use_regex) {
            split_pretokens(p, step.pattern, next);
          } else {
            next.push_back(p);
          }
          break;
        case PreStep::kDigits: {
          size_t from = 0;
          bool prev_digit = false;
          for (size_t i = 0; i < p.size();) {
            const auto d = unicode::decode_utf8(p, i);
            const bool digit = unicode::is_number(d.cp);
            if (i > from && (digit != prev_digit || (digit && step.split))) {
              next.push_back(p.substr(from, i - from));
              from = i;
            }
            prev_digit = digit;
            i += d.len;
          }
          if (from < p.size()) next.push_back(p.substr(from));
          break;
        }
        case PreStep::kMetaspace: {
          std::string m(p);
          replace_all(m, " ", step.replacement);
          const bool prepend = step.scheme == PreStep::kAlways ||
                               (step.scheme == PreStep::kFirst && first_segment && k == 0);
          if (prepend && m.compare(0, step.replacement.size(), step.replacement) != 0)
            m.insert(0, step.replacement);
          std::string_view v = arena.emplace_back(std::move(m));
          if (!step.split) {
            next.push_back(v);
            break;
          }
          // Behaviour MergedWithNext: each replacement character starts a new piece.
          size_t from = 0;
          for (size_t hit = v.find(step.replacement, 1); hit != std::string_view::npos;
               hit = v.find(step.replacement, hit + 1)) {
            if (hit > from) next.push_back(v.substr(from, hit - from));
            from = hit;
          }
          if (from < v.size()) next.push_back(v.substr(from));
          break;
        }
      }
    }
    out.swap(next);
  }
}

void HfTokenizer::Impl::bpe_uncached(std::string_view word, std::vector<int>& out,
                                     const std::function<void(size_t)>* progress) const {
  thread_local std::vector<int> ids;
  ids.clear();
  bool last_unk = false;
  auto push_unknown = [&]() {
    // tokenizers: unknown characters become unk_token (consecutive ones fused when fuse_unk),
    // or are dropped when the model has no unk_token.
    if (unk_id < 0) return;
    if (!(fuse_unk && last_unk)) ids.push_back(unk_id);
    last_unk = true;
  };
  if (byte_level) {
    for (unsigned char b : word) {
      if (byte_ids[b] >= 0) {
        ids.push_back(byte_ids[b]);
        last_unk = false;
      } else {
        push_unknown();
      }
    }
  } else {
    for (size_t i = 0; i < word.size();) {
      const uint32_t len = unicode::decode_utf8(word, i).len;
      auto it = vocab.find(word.substr(i, len));
      if (it != vocab.end()) {
        ids.push_back(it->second);
        last_unk = false;
      } else if (byte_fallback &&
                 std::all_of(word.begin() + i, word.begin() + i + len,
                             [&](char c) { return byte_ids[static_cast<unsigned char>(c)] >= 0; })) {
        for (size_t k = i; k < i + len; ++k) ids.push_back(byte_ids[static_cast<unsigned char>(word[k])]);
        last_unk = false;
      } else {
        push_unknown();
      }
      i += len;
    }
  }
  // A word can be a whole text (sentencepiece-style files have no pre-tokenizer): merge the runs
  // between symbols that take part in no merge separately (linear time, same result).
  detail::bpe_merge_runs(ids, [&](int a, int b, double& priority, int& merged) {
    auto it = merges.find((uint64_t(uint32_t(a)) << 32) | uint32_t(b));
    if (it == merges.end()) return false;
    priority = it->second.first;
    merged = it->second.second;
    return true;
  }, [&](int id) { return size_t(id) >= in_merge.size() || !in_merge[size_t(id)]; }, progress);
  out.insert(out.end(), ids.begin(), ids.end());
}

void HfTokenizer::Impl::bpe(std::string_view word, std::vector<int>& out,
                            const std::function<void(size_t)>* progress) const {
  if (ignore_merges) {  // Llama 3: a pre-token that is a vocabulary entry is used as is
    auto it = vocab.find(word);
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  constexpr size_t kCacheableWord = 64;  // long words are rare and would bloat the cache
  if (word.size() > kCacheableWord) return bpe_uncached(word, out, progress);
  {
    std::lock_guard lock(cache_mutex);
    auto it = cache.find(word);
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t before = out.size();
  bpe_uncached(word, out);
  std::lock_guard lock(cache_mutex);
  if (cache.size() >= kCacheMax) cache.clear();
  cache.emplace(std::string(word), std::vector<int>(out.begin() + before, out.end()));
}

// ============================================================================== decoding

std::string HfTokenizer::Impl::run_decoder(std::vector<Piece> pieces) const {
  const auto& bl = byte_level_table();
  for (const auto& d : decoder) {
    switch (d.kind) {
      case DecStep::kByteLevel: {
        // Each token's characters back to bytes (a token with a character outside the table
        // is kept as its UTF-8), then one lossy UTF-8 string, as tokenizers does.
        std::string bytes, all;
        for (const auto& p : pieces) {
          if (!p.raw && bl.to_bytes(p.text, bytes)) {
            all += bytes;
          } else {
            all += p.text;
          }
        }
        pieces = {{unicode::to_valid_utf8(all), false}};
        break;
      }
      case DecStep::kReplace:
        for (auto& p : pieces)
          if (!p.raw) replace_all(p.text, d.a, d.b);
        break;
      case DecStep::kByteFallback: {
        // Runs of <0xNN> tokens become their bytes when those are valid UTF-8, else one U+FFFD
        // per byte (tokenizers' ByteFallback).
        std::vector<Piece> out;
        std::string run;
        size_t run_len = 0;
        auto flush = [&] {
          if (!run_len) return;
          if (unicode::to_valid_utf8(run) == run) {
            out.push_back({run, false});
          } else {
            for (size_t k = 0; k < run_len; ++k) out.push_back({"\xEF\xBF\xBD", false});
          }
          run.clear();
          run_len = 0;
        };
        for (auto& p : pieces) {
          const int b = p.raw ? -1 : byte_fallback_value(p.text);
          if (b >= 0) {
            run += static_cast<char>(b);
            ++run_len;
          } else {
            flush();
            out.push_back(std::move(p));
          }
        }
        flush();
        pieces = std::move(out);
        break;
      }
      case DecStep::kFuse: {
        std::string all;
        for (const auto& p : pieces) all += p.text;
        pieces = {{std::move(all), false}};
        break;
      }
      case DecStep::kStrip:
        for (auto& p : pieces) {
          if (p.raw) continue;
          size_t a = 0, z = p.text.size();
          for (int k = 0; k < d.start && p.text.compare(a, d.a.size(), d.a) == 0 && a < z; ++k)
            a += d.a.size();
          for (int k = 0; k < d.stop && z >= a + d.a.size() &&
                          p.text.compare(z - d.a.size(), d.a.size(), d.a) == 0;
               ++k)
            z -= d.a.size();
          p.text = p.text.substr(a, z - a);
        }
        break;
      case DecStep::kMetaspace:
        // tokenizers: the replacement becomes ' ', except in the first token (when a prefix
        // was prepended) where it is removed.
        for (size_t i = 0; i < pieces.size(); ++i) {
          if (pieces[i].raw) continue;
          replace_all(pieces[i].text, d.a, (i == 0 && d.prepend) ? "" : " ");
        }
        break;
    }
  }
  std::string out;
  for (const auto& p : pieces) out += p.text;
  return out;
}

// ============================================================================== public API

HfTokenizer::HfTokenizer() : impl_(std::make_unique<Impl>()) {}
HfTokenizer::~HfTokenizer() = default;

HfTokenizer::HfTokenizer(const std::string& path) : HfTokenizer() {
  LB_CHECK(std::filesystem::is_regular_file(path), "[tokenizer] ", path, ": no such file");
  const std::string text = read_file(path);
  const auto cfg_path = std::filesystem::path(path).parent_path() / "tokenizer_config.json";
  std::string cfg;
  if (std::filesystem::is_regular_file(cfg_path)) cfg = read_file(cfg_path.string());
  auto t = from_json(text, path, cfg);
  impl_ = std::move(t->impl_);
}

std::unique_ptr<HfTokenizer> HfTokenizer::from_json(std::string_view tokenizer_json,
                                                    const std::string& name,
                                                    std::string_view config_json) {
  std::unique_ptr<HfTokenizer> t(new HfTokenizer());
  t->impl_->name = name;
  try {
    const json j = json::parse(tokenizer_json);
    json cfg;
    bool have_cfg = false;
    if (!config_json.empty()) {
      cfg = json::parse(config_json, nullptr, /*allow_exceptions=*/false);
      have_cfg = !cfg.is_discarded();  // a broken config only loses the BOS/EOS names
    }
    t->impl_->load(j, have_cfg ? &cfg : nullptr);
  } catch (const json::exception& e) {
    throw_error("[tokenizer] ", name, ": invalid tokenizer.json: ", e.what());
  } catch (const Error& e) {
    throw_error("[tokenizer] ", name, ": ", e.what());
  }
  return t;
}

int HfTokenizer::vocab_size() const { return static_cast<int>(impl_->tokens.size()); }
int HfTokenizer::bos_id() const { return impl_->bos; }
int HfTokenizer::eos_id() const { return impl_->eos; }
std::string HfTokenizer::kind() const { return impl_->byte_level ? "hf-bpe" : "hf-bpe-sp"; }

int HfTokenizer::token_to_id(std::string_view token) const { return impl_->id_of(token); }

std::string HfTokenizer::id_to_token(int id) const {
  impl_->check_id(id);
  return impl_->tokens[id];
}

std::string HfTokenizer::token_text(int id) const {
  return id >= 0 && id < static_cast<int>(impl_->tokens.size()) ? impl_->tokens[size_t(id)] : std::string();
}

bool HfTokenizer::is_special(int id) const {
  impl_->check_id(id);
  return impl_->added_kind[id] == 2;
}

std::vector<int> HfTokenizer::encode(std::string_view text, bool add_special) const {
  return impl_->encode(text, add_special, nullptr);
}

std::vector<int> HfTokenizer::encode_long(std::string_view text,
                                          const std::function<void(size_t)>& progress) const {
  std::vector<int> ids = impl_->encode(text, false, progress ? &progress : nullptr);
  if (progress) progress(text.size());
  return ids;
}

std::vector<int> HfTokenizer::Impl::encode(std::string_view text, bool add_special,
                                           const std::function<void(size_t)>* progress) const {
  const Impl& m = *this;
  std::vector<int> ids;
  ids.reserve(text.size() / 3 + 4);
  std::vector<Impl::Segment> segments;
  m.split_added(text, segments);
  std::vector<std::string_view> words;
  std::deque<std::string> arena;
  size_t next_report = 0;
  for (size_t si = 0; si < segments.size(); ++si) {
    const auto& seg = segments[si];
    const size_t seg_offset = static_cast<size_t>(seg.text.data() - text.data());
    if (seg.added_id >= 0) {
      ids.push_back(seg.added_id);
      continue;
    }
    const std::string norm = m.normalize(seg.text);
    arena.clear();
    m.pretokenize(norm, si == 0, words, arena);
    // Progress in bytes of the normalized segment (close to the input's), mapped to the text.
    std::function<void(size_t)> word_progress;
    size_t word_start = 0;
    if (progress)
      word_progress = [&](size_t done) { (*progress)(std::min(text.size(), seg_offset + word_start + done)); };
    for (std::string_view w : words) {
      if (progress) {
        word_start += w.size();
        if (word_start >= next_report) {
          (*progress)(std::min(text.size(), seg_offset + word_start));
          next_report = word_start + (size_t(1) << 18);
        }
      }
      m.bpe(w, ids, progress ? &word_progress : nullptr);
    }
  }
  if (add_special && !m.post_single.empty()) {
    std::vector<int> out;
    for (const auto& item : m.post_single) {
      if (item.is_sequence) {
        out.insert(out.end(), ids.begin(), ids.end());
      } else {
        out.insert(out.end(), item.ids.begin(), item.ids.end());
      }
    }
    return out;
  }
  return ids;
}

std::string HfTokenizer::decode(const std::vector<int>& ids) const {
  const Impl& m = *impl_;
  std::vector<Impl::Piece> pieces;
  pieces.reserve(ids.size());
  for (int id : ids) {
    m.check_id(id);
    if (m.added_kind[id] == 2) continue;
    pieces.push_back({m.tokens[id], m.added_kind[id] == 1});
  }
  return m.run_decoder(std::move(pieces));
}

std::string HfTokenizer::decode_piece(int prev, int id) const {
  const Impl& m = *impl_;
  m.check_id(id);
  if (m.added_kind[id] == 2) return {};
  if (m.added_kind[id] == 1) return m.tokens[id];
  std::string t = m.tokens[id];
  std::string bytes;
  for (const auto& d : m.decoder) {
    if (d.kind == Impl::DecStep::kByteLevel && byte_level_table().to_bytes(t, bytes)) {
      t = bytes;
    } else if (d.kind == Impl::DecStep::kReplace) {
      replace_all(t, d.a, d.b);
    } else if (d.kind == Impl::DecStep::kMetaspace) {
      replace_all(t, d.a, " ");
    } else if (d.kind == Impl::DecStep::kByteFallback && byte_fallback_value(t) >= 0) {
      t = std::string(1, static_cast<char>(byte_fallback_value(t)));
    }
  }
  if (prev == m.bos && m.strip_space_after_bos && !t.empty() && t[0] == ' ') t.erase(0, 1);
  return t;
}

}  // namespace lowbit
