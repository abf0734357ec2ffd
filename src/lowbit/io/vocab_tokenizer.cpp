// Tokenizers from embedded vocabularies (GGUF tokenizer.ggml.*): see checkpoint.h.
//
// A "gpt2" vocabulary is turned into the tokenizer.json that describes the same pipeline and
// handed to HfTokenizer, so there is one byte-level BPE implementation. The pre-tokenizer of each
// tokenizer.ggml.pre name follows llama.cpp's llama-vocab.cpp (the regex lists of
// llm_tokenizer_bpe), written as the equivalent Hugging Face pre-tokenizers:
//   smollm     \p{N} | gpt2 regex       -> Digits(individual) + ByteLevel(regex)
//   gpt2       gpt2 regex               -> ByteLevel(regex)
//   llama-bpe  llama 3 regex            -> Split(llama 3) + ByteLevel(no regex); ignore_merges
//   qwen2      qwen 2 regex             -> Split(qwen 2) + ByteLevel(no regex)
//   default    [\p{P}$+<=>^~|]+ | gpt2 regex | \p{N}+ | [0-9]{3}
//                                       -> Split(LlamaCppDefault) + ByteLevel(no regex)
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "lowbit/core/error.h"
#include "lowbit/io/checkpoint.h"
#include "lowbit/io/gguf.h"
#include "lowbit/tokenizer/hf_tokenizer.h"
#include "lowbit/tokenizer/llama2c_tokenizer.h"
#include "lowbit/tokenizer/pretokenizer.h"
#include "lowbit/tokenizer/sentencepiece_tokenizer.h"
#include "lowbit/tokenizer/spm_tokenizer.h"

namespace fs = std::filesystem;

namespace lowbit {
namespace {

using json = nlohmann::json;

constexpr const char* kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

json byte_level(bool use_regex) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", use_regex}};
}
json split(const char* regex) {
  return {{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}};
}

// The pre-tokenizer for a tokenizer.ggml.pre name, and whether merges are ignored for pre-tokens
// that are whole vocabulary entries (llama.cpp: Llama 3 only). Unknown names throw.
json pre_tokenizer_for(const std::string& pre, const std::string& source, bool& ignore_merges, bool& add_bos_default) {
  ignore_merges = false;
  add_bos_default = false;
  auto is = [&](std::initializer_list<const char*> names) {
    for (const char* n : names)
      if (pre == n) return true;
    return false;
  };
  if (is({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}))
    return {{"type", "Sequence"},
            {"pretokenizers", json::array({{{"type", "Digits"}, {"individual_digits", true}}, byte_level(true)})}};
  if (is({"gpt2", "mpt", "olmo", "jais"})) return byte_level(true);
  if (is({"llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe"})) {
    ignore_merges = true;
    add_bos_default = true;
    return {{"type", "Sequence"}, {"pretokenizers", json::array({split(kLlama3Regex), byte_level(false)})}};
  }
  if (is({"qwen2", "stablelm2", "hunyuan"}))
    return {{"type", "Sequence"}, {"pretokenizers", json::array({split(kQwen2Regex), byte_level(false)})}};
  if (is({"default", ""}))
    return {{"type", "Sequence"}, {"pretokenizers", json::array({split("LlamaCppDefault"), byte_level(false)})}};
  throw_error(source, ": metadata key 'tokenizer.ggml.pre': pre-tokenizer '", pre,
              "' is not supported (lowbit knows smollm, gpt2, llama-bpe, qwen2, default and their aliases)");
}

// The tokenizer.json (and the tokenizer_config.json fields bos_token / eos_token) describing a
// gpt2 vocabulary.
json gpt2_tokenizer_json(const TokenizerVocab& v, const std::string& source, json& config) {
  const int n = static_cast<int>(v.tokens.size());
  auto check_id = [&](int id, const char* key) {
    if (id >= n) throw_error(source, ": metadata key '", key, "': token id ", id, " is outside the vocabulary of ", n);
  };
  check_id(v.bos_id, "tokenizer.ggml.bos_token_id");
  check_id(v.eos_id, "tokenizer.ggml.eos_token_id");
  check_id(v.unk_id, "tokenizer.ggml.unknown_token_id");
  if (v.merges.empty()) throw_error(source, ": metadata key 'tokenizer.ggml.merges': a gpt2 (BPE) vocabulary needs merges");

  bool ignore_merges = false, add_bos_default = false;
  json j;
  j["version"] = "1.0";
  j["pre_tokenizer"] = pre_tokenizer_for(v.pre, source, ignore_merges, add_bos_default);
  json vocab = json::object();
  json added = json::array();
  for (int id = 0; id < n; ++id) {
    const std::string& t = v.tokens[id];
    if (t.empty()) throw_error(source, ": metadata key 'tokenizer.ggml.tokens': token ", id, " is empty");
    if (!vocab.contains(t)) vocab[t] = id;  // duplicates: the first id keeps the text
    const int type = v.token_types.empty() ? 1 : v.token_types[id];
    if (type == 3 || type == 4)
      added.push_back({{"id", id}, {"content", t}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                       {"normalized", false}, {"special", type == 3}});
  }
  j["added_tokens"] = std::move(added);
  j["model"] = {{"type", "BPE"},       {"vocab", std::move(vocab)}, {"merges", v.merges},
                {"byte_fallback", false}, {"fuse_unk", false},     {"ignore_merges", ignore_merges}};
  j["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  const bool add_bos = v.add_bos < 0 ? add_bos_default : v.add_bos != 0;
  const bool add_eos = v.add_eos > 0;
  json single = json::array();
  json specials = json::object();
  auto special = [&](int id, const char* what) {
    if (id < 0) throw_error(source, ": tokenizer.ggml.add_", what, "_token is true but the file has no ", what, " token id");
    specials[v.tokens[id]] = {{"id", v.tokens[id]}, {"ids", {id}}, {"tokens", {v.tokens[id]}}};
    single.push_back({{"SpecialToken", {{"id", v.tokens[id]}, {"type_id", 0}}}});
  };
  if (add_bos) special(v.bos_id, "bos");
  single.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
  if (add_eos) special(v.eos_id, "eos");
  json pair = single;  // Hugging Face's TemplateProcessing needs one; lowbit never encodes pairs
  pair.push_back({{"Sequence", {{"id", "B"}, {"type_id", 1}}}});
  j["post_processor"] = {{"type", "TemplateProcessing"}, {"single", std::move(single)}, {"pair", std::move(pair)},
                         {"special_tokens", std::move(specials)}};
  config = json::object();
  config["bos_token"] = v.bos_id >= 0 ? json(v.tokens[v.bos_id]) : json(nullptr);
  config["eos_token"] = v.eos_id >= 0 ? json(v.tokens[v.eos_id]) : json(nullptr);
  config["add_bos_token"] = add_bos;
  config["add_eos_token"] = add_eos;
  return j;
}

std::unique_ptr<Tokenizer> gpt2_tokenizer(const TokenizerVocab& v, const std::string& source) {
  json config;
  const json j = gpt2_tokenizer_json(v, source, config);
  return HfTokenizer::from_json(j.dump(), source, config.dump());
}

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) throw_error(p.string(), ": cannot open");
  std::ostringstream os;
  os << f.rdbuf();
  return std::move(os).str();
}

}  // namespace

std::unique_ptr<Tokenizer> tokenizer_from_vocab(const TokenizerVocab& v, const std::string& source) {
  if (v.empty()) throw_error(source, ": has no embedded tokenizer");
  if (v.model == "llama") {
    // llama.cpp's defaults for this vocabulary type: BOS added, EOS not, a space prefix.
    SpmVocab s;
    s.pieces = v.tokens;
    s.scores = v.scores;
    s.types = v.token_types;
    s.bos_id = v.bos_id;
    s.eos_id = v.eos_id;
    s.unk_id = v.unk_id;
    s.add_bos = v.add_bos != 0 && v.bos_id >= 0;
    s.add_eos = v.add_eos > 0;
    s.add_space_prefix = v.add_space_prefix != 0;
    if (v.add_bos > 0 && v.bos_id < 0) throw_error(source, ": tokenizer.ggml.add_bos_token is true but the file has no bos token id");
    return std::make_unique<SpmTokenizer>(std::move(s), source);
  }
  if (v.model == "gpt2") return gpt2_tokenizer(v, source);
  throw_error(source, ": embedded tokenizer model '", v.model,
              "' is not supported (lowbit reads 'gpt2' and 'llama'); pass --tokenizer");
}

namespace {

// The tokenizer.ggml.pre name whose pipeline equals a tokenizer.json pre_tokenizer (see the table
// at the top of this file), or throws.
std::string pre_name_of(const json& pre, const std::string& path) {
  auto bad = [&]() -> std::string {
    throw_error(path, ": field 'pre_tokenizer' ", pre.dump().substr(0, 300),
                " has no GGUF equivalent lowbit knows (smollm, gpt2, llama-bpe, qwen2)");
  };
  auto is_byte_level = [](const json& p, bool use_regex) {
    return p.is_object() && p.value("type", "") == "ByteLevel" && p.value("use_regex", true) == use_regex &&
           !p.value("add_prefix_space", false);
  };
  if (is_byte_level(pre, true)) return "gpt2";
  if (!pre.is_object() || pre.value("type", "") != "Sequence" || !pre.contains("pretokenizers")) return bad();
  const json& s = pre.at("pretokenizers");
  if (s.size() != 2) return bad();
  if (s[0].value("type", "") == "Digits" && s[0].value("individual_digits", false) && is_byte_level(s[1], true))
    return "smollm";
  if (s[0].value("type", "") == "Split" && s[0].contains("pattern") && s[0].at("pattern").contains("Regex") &&
      is_byte_level(s[1], false)) {
    const auto sp = recognize_split_pattern(s[0].at("pattern").at("Regex").get<std::string>());
    if (sp && sp->family == SplitPattern::Family::kLlama3) return sp->max_digits == 3 ? "llama-bpe" : "qwen2";
  }
  return bad();
}

TokenizerVocab vocab_from_hf_json(const std::string& path) {
  const json j = json::parse(read_text(path), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) throw_error(path, ": not valid JSON");
  const auto tok = HfTokenizer::from_json(read_text(path), path,
                                          fs::is_regular_file(fs::path(path).parent_path() / "tokenizer_config.json")
                                              ? read_text(fs::path(path).parent_path() / "tokenizer_config.json")
                                              : std::string());  // validates the whole file
  if (tok->kind() != "hf-bpe")
    throw_error(path, ": only byte-level BPE tokenizer.json files can be embedded as GGUF 'gpt2' vocabularies; for a "
                "sentencepiece-style one pass its tokenizer.model");
  if (j.contains("normalizer") && !j.at("normalizer").is_null() && j.at("normalizer").value("type", "") != "NFC")
    throw_error(path, ": field 'normalizer' (", j.at("normalizer").value("type", "?"), ") has no GGUF equivalent");
  TokenizerVocab v;
  v.model = "gpt2";
  v.pre = pre_name_of(j.contains("pre_tokenizer") ? j.at("pre_tokenizer") : json(), path);
  const int n = tok->vocab_size();
  v.tokens.resize(size_t(n));
  v.token_types.assign(size_t(n), 1);
  for (int id = 0; id < n; ++id) {
    v.tokens[size_t(id)] = tok->id_to_token(id);
    if (v.tokens[size_t(id)].empty()) {
      v.tokens[size_t(id)] = "[PAD" + std::to_string(id) + "]";
      v.token_types[size_t(id)] = 5;
    }
  }
  if (j.contains("added_tokens"))
    for (const json& a : j.at("added_tokens")) {
      const int id = a.at("id").get<int>();
      if (id >= 0 && id < n) v.token_types[size_t(id)] = a.value("special", false) ? 3 : 4;
    }
  for (const json& m : j.at("model").at("merges"))
    v.merges.push_back(m.is_string() ? m.get<std::string>() : m.at(0).get<std::string>() + " " + m.at(1).get<std::string>());
  v.bos_id = tok->bos_id();
  v.eos_id = tok->eos_id();
  const json& model = j.at("model");
  if (model.contains("unk_token") && model.at("unk_token").is_string())
    v.unk_id = tok->token_to_id(model.at("unk_token").get<std::string>());
  const auto with = tok->encode("a", true), without = tok->encode("a", false);
  v.add_bos = (v.bos_id >= 0 && with.size() > without.size() && with.front() == v.bos_id) ? 1 : 0;
  if (with.size() > without.size() && with.back() != without.back()) v.add_eos = 1;
  return v;
}

TokenizerVocab vocab_from_sentencepiece(const std::string& path) {
  SentencePieceTokenizer sp(path);
  TokenizerVocab v;
  v.model = "llama";
  const int n = sp.vocab_size();
  for (int id = 0; id < n; ++id) {
    v.tokens.push_back(sp.id_to_piece(id));
    v.scores.push_back(sp.score(id));
    v.token_types.push_back(sp.piece_type(id));
  }
  v.bos_id = sp.bos_id();
  v.eos_id = sp.eos_id();
  v.unk_id = sp.unk_id();
  v.pad_id = sp.pad_id();
  v.add_bos = v.bos_id >= 0 ? 1 : 0;
  return v;
}

}  // namespace

TokenizerVocab vocab_from_tokenizer_file(const std::string& path, int vocab_size) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) throw_error(path, ": no such tokenizer file");
  TokenizerVocab v;
  const std::string ext = fs::path(path).extension().string();
  if (ext == ".model") v = vocab_from_sentencepiece(path);
  else if (ext == ".json") v = vocab_from_hf_json(path);
  else if (looks_like_gguf(path)) v = read_gguf_vocab(path);
  else throw_error(path, ": expected a sentencepiece .model, a tokenizer.json or a GGUF file to take the tokenizer from");
  if (v.empty()) throw_error(path, ": has no tokenizer vocabulary");
  if (vocab_size > 0) {
    if (int(v.tokens.size()) > vocab_size)
      throw_error(path, ": the tokenizer has ", v.tokens.size(), " tokens, more than the model's vocabulary of ", vocab_size);
    while (int(v.tokens.size()) < vocab_size) {
      v.tokens.push_back("[PAD" + std::to_string(v.tokens.size()) + "]");
      if (!v.scores.empty()) v.scores.push_back(0.0f);
      if (!v.token_types.empty()) v.token_types.push_back(5);
    }
  }
  if (v.chat_template.empty()) v.chat_template = chat_template_for(path);
  return v;
}

HfTokenizerFiles hf_tokenizer_files_from_vocab(const TokenizerVocab& v, const std::string& source) {
  if (v.model != "gpt2")
    throw_error(source, ": the embedded '", v.model, "' tokenizer has no tokenizer.json equivalent lowbit writes (gpt2 only)");
  if (v.pre.empty() || v.pre == "default")
    throw_error(source, ": pre-tokenizer '", v.pre, "' (llama.cpp's default regex list) has no tokenizer.json equivalent");
  json config;
  const json j = gpt2_tokenizer_json(v, source, config);
  HfTokenizer::from_json(j.dump(), source, config.dump());  // lowbit reads what it writes
  config["tokenizer_class"] = "PreTrainedTokenizerFast";
  config["model_max_length"] = 1000000000000000019884624838656.0;
  config["clean_up_tokenization_spaces"] = false;
  if (!v.chat_template.empty()) config["chat_template"] = v.chat_template;
  return {j.dump(2), config.dump(2)};
}

TokenizerVocab read_gguf_vocab(const std::string& path) { return gguf_tokenizer_vocab(GgufFile::open(path)); }

std::unique_ptr<Tokenizer> open_tokenizer_file(const std::string& path) {
  std::error_code ec;
  if (fs::is_regular_file(path, ec) && looks_like_gguf(path)) {
    TokenizerVocab v = read_gguf_vocab(path);
    if (v.empty()) throw_error(path, ": this GGUF file has no embedded tokenizer (tokenizer.ggml.tokens); pass --tokenizer");
    return tokenizer_from_vocab(v, path);
  }
  return load_tokenizer(path);
}

std::string chat_template_for(const std::string& path) {
  std::error_code ec;
  if (fs::is_regular_file(path, ec) && looks_like_gguf(path)) return read_gguf_vocab(path).chat_template;
  const fs::path dir = fs::is_directory(path, ec) ? fs::path(path) : fs::path(path).parent_path();
  if (fs::is_regular_file(dir / "chat_template.jinja", ec)) return read_text(dir / "chat_template.jinja");
  const fs::path cfg = dir / "tokenizer_config.json";
  if (!fs::is_regular_file(cfg, ec)) return "";
  const json j = json::parse(read_text(cfg), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw_error(cfg.string(), ": not valid JSON");
  if (!j.is_object() || !j.contains("chat_template") || j.at("chat_template").is_null()) return "";
  const json& t = j.at("chat_template");
  if (t.is_string()) return t.get<std::string>();
  if (t.is_array()) {  // [{"name": "default", "template": "..."}, ...]
    for (const json& e : t)
      if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e.at("template").is_string())
        return e.at("template").get<std::string>();
  }
  throw_error(cfg.string(), ": field 'chat_template' is neither a string nor a list with a 'default' template");
}

}  // namespace lowbit
