// Tokenizers built from embedded (GGUF) vocabularies: tokenizer_from_vocab, read_gguf_vocab,
// open_tokenizer_file, chat_template_for.
//
// SmolLM2 must-holds (skip without ../shared): every line of ref-tokenize-wikitext2.jsonl, and the
// whole of wiki.test.raw equal to Python `tokenizers` with tokenizer-llamacpp-smollm.json, whose
// count and FNV-1a 64 hash tests/tokenizer/smollm_wikitext_hash.py recomputes. The llama-bpe and
// qwen2 pre-tokenizers are checked by turning the shared Llama 3 / Qwen3 tokenizer.json files into
// GGUF-style vocabularies (tokens by id + merges + token types) and replaying their references.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/expect_message.h"
#include "common/test_util.h"
#include "lowbit/core/error.h"
#include "lowbit/io/checkpoint.h"
#include "lowbit/io/gguf.h"
#include "lowbit/tokenizer/hf_tokenizer.h"
#include "lowbit/tokenizer/tokenizer.h"

namespace lowbit {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kSmolGguf = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

struct RefLine {
  std::string text;
  std::vector<int> ids;
};
std::vector<RefLine> read_jsonl(const std::string& path) {
  std::vector<RefLine> out;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) {
      const auto j = json::parse(line);
      out.push_back({j.at("text").get<std::string>(), j.at("ids").get<std::vector<int>>()});
    }
  return out;
}

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

uint64_t fnv1a_ids(const std::vector<int>& ids) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (int id : ids)
    for (int k = 0; k < 4; ++k) {
      h ^= (static_cast<uint32_t>(id) >> (8 * k)) & 0xFF;
      h *= 0x100000001b3ull;
    }
  return h;
}

int replay(const Tokenizer& tok, const std::vector<RefLine>& ref, const std::string& what) {
  int bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (tok.encode(ref[i].text, false) != ref[i].ids && ++bad <= 5)
      ADD_FAILURE() << what << " line " << i << ": '" << ref[i].text << "'";
  }
  return bad;
}

TEST(VocabTokenizer, SmolLM2GgufMatchesReferenceLines) {
  LOWBIT_REQUIRE_SHARED(gguf, kSmolGguf);
  LOWBIT_REQUIRE_SHARED(ref, "models/smollm2-135m-instruct/ref-tokenize-wikitext2.jsonl");
  const TokenizerVocab v = read_gguf_vocab(gguf);  // metadata only: the Q4_1 tensors are not decoded
  EXPECT_EQ(v.model, "gpt2");
  EXPECT_EQ(v.pre, "smollm");
  EXPECT_EQ(v.add_bos, 0);
  EXPECT_FALSE(v.chat_template.empty());
  const auto tok = tokenizer_from_vocab(v, gguf);
  EXPECT_EQ(tok->vocab_size(), 49152);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  const auto lines = read_jsonl(ref);
  ASSERT_EQ(lines.size(), 310u);
  EXPECT_EQ(replay(*tok, lines, "smollm"), 0);
  // add_bos_token is false: add_special adds nothing; control tokens are matched as specials.
  EXPECT_EQ(tok->encode("Hi", true), tok->encode("Hi", false));
  const auto ids = tok->encode("<|im_start|>user\nHi<|im_end|>", false);
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(ids.back(), 2);
  EXPECT_EQ(tok->decode(ids), "user\nHi");  // specials are skipped
}

TEST(VocabTokenizer, SmolLM2WholeWikitextMatchesTokenizers) {
  LOWBIT_REQUIRE_SHARED(gguf, kSmolGguf);
  LOWBIT_REQUIRE_SHARED(raw, "data/wikitext-2-raw/wiki.test.raw");
  const auto tok = open_tokenizer_file(gguf);
  const std::string text = read_all(raw);
  size_t last = 0;
  const auto ids = tok->encode_long(text, [&](size_t done) {
    EXPECT_GE(done, last);
    last = done;
  });
  EXPECT_EQ(last, text.size());
  // python3 tests/tokenizer/smollm_wikitext_hash.py: "tokens 303415 fnv1a64 8672b255a2935a9b"
  EXPECT_EQ(ids.size(), 303415u);
  EXPECT_EQ(fnv1a_ids(ids), 0x8672b255a2935a9bull);
  EXPECT_EQ(tok->encode(text, false), ids);  // encode_long == encode
}

// A tokenizer.json (byte-level BPE) as the vocabulary a GGUF converter would write.
TokenizerVocab vocab_from_tokenizer_json(const std::string& path, const std::string& pre) {
  const json j = json::parse(read_all(path));
  TokenizerVocab v;
  v.model = "gpt2";
  v.pre = pre;
  int n = 0;
  for (const auto& [t, id] : j.at("model").at("vocab").items()) n = std::max(n, id.get<int>() + 1);
  for (const auto& a : j.at("added_tokens")) n = std::max(n, a.at("id").get<int>() + 1);
  v.tokens.assign(size_t(n), "");
  v.token_types.assign(size_t(n), 1);
  for (const auto& [t, id] : j.at("model").at("vocab").items()) v.tokens[size_t(id.get<int>())] = t;
  for (const auto& a : j.at("added_tokens")) {
    v.tokens[size_t(a.at("id").get<int>())] = a.at("content").get<std::string>();
    v.token_types[size_t(a.at("id").get<int>())] = a.value("special", false) ? 3 : 4;
  }
  for (size_t i = 0; i < v.tokens.size(); ++i)
    if (v.tokens[i].empty()) v.tokens[i] = "[PAD" + std::to_string(i) + "]", v.token_types[i] = 5;
  for (const auto& m : j.at("model").at("merges"))
    v.merges.push_back(m.is_string() ? m.get<std::string>() : m[0].get<std::string>() + " " + m[1].get<std::string>());
  v.add_bos = 0;
  return v;
}

TEST(VocabTokenizer, LlamaBpeAndQwen2PreTokenizersMatchReferences) {
  for (auto [model, pre] : {std::pair{"llama3", "llama-bpe"}, {"qwen3", "qwen2"}}) {
    LOWBIT_REQUIRE_SHARED(tj, std::string("tokenizers/") + model + "/tokenizer.json");
    LOWBIT_REQUIRE_SHARED(ref, std::string("ref/tokenize-") + model + "-wikitext2.jsonl");
    // (Qwen's tokenizer.json also has an NFC normalizer, which llama.cpp does not apply; the
    // reference lines are all NFC already.)
    TokenizerVocab v = vocab_from_tokenizer_json(tj, pre);
    const auto tok = tokenizer_from_vocab(v, tj);
    EXPECT_EQ(replay(*tok, read_jsonl(ref), model), 0) << model;
  }
}

// A tiny byte-level vocabulary: bytes a, b, c, ' ', digits; merges "a b", "ab c".
TokenizerVocab tiny_vocab(const std::string& pre) {
  TokenizerVocab v;
  v.model = "gpt2";
  v.pre = pre;
  v.tokens = {"<s>", "</s>", "a", "b", "c", "\xC4\xA0" /* byte-level ' ' */, "1", "2", "ab", "abc", "<tool>"};
  v.token_types = {3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 4};
  v.merges = {"a b", "ab c"};
  v.bos_id = 0;
  v.eos_id = 1;
  return v;
}

TEST(VocabTokenizer, TinyGpt2VocabSpecialsAndBos) {
  for (const char* pre : {"gpt2", "smollm", "llama-bpe", "qwen2", "default", ""}) {
    TokenizerVocab v = tiny_vocab(pre);
    const auto tok = tokenizer_from_vocab(v, "tiny.gguf");
    EXPECT_EQ(tok->encode("abc ab", false), (std::vector<int>{9, 5, 8})) << pre;
    // user-defined (4) tokens are matched and decoded; control (3) ones matched and skipped.
    EXPECT_EQ(tok->encode("<s>abc<tool>", false), (std::vector<int>{0, 9, 10})) << pre;
    EXPECT_EQ(tok->decode({0, 9, 10, 1}), "abc<tool>") << pre;
    // add_bos_token: llama-bpe defaults to true, the others to false; the key overrides.
    const bool bos_default = std::string(pre) == "llama-bpe";
    EXPECT_EQ(tok->encode("ab", true).size(), bos_default ? 2u : 1u) << pre;
    v.add_bos = 1;
    EXPECT_EQ(tokenizer_from_vocab(v, "tiny.gguf")->encode("ab", true), (std::vector<int>{0, 8})) << pre;
  }
  // Digits: smollm splits every digit, gpt2 keeps runs together ("12" has no merge either way).
  EXPECT_EQ(tokenizer_from_vocab(tiny_vocab("smollm"), "t")->encode("a12", false), (std::vector<int>{2, 6, 7}));
}

TEST(VocabTokenizer, MalformedVocabulariesAreClearErrors) {
  auto expect_error = [](TokenizerVocab v, const std::string& needle) {
    const std::string m = test::expect_message([&] { tokenizer_from_vocab(v, "bad.gguf"); }, needle);
    EXPECT_TRUE(m.empty() || m.find("bad.gguf") != std::string::npos) << m;  // empty: already a failure
  };
  expect_error(tiny_vocab("some-new-pre"), "some-new-pre");
  TokenizerVocab v = tiny_vocab("gpt2");
  v.merges.clear();
  expect_error(v, "merges");
  v = tiny_vocab("gpt2");
  v.bos_id = 99;
  expect_error(v, "bos_token_id");
  v = tiny_vocab("gpt2");
  v.merges.push_back("zz q");
  expect_error(v, "merge");
  v = tiny_vocab("gpt2");
  v.model = "rwkv";
  expect_error(v, "rwkv");
  v = tiny_vocab("gpt2");
  v.bos_id = -1;
  v.add_bos = 1;
  expect_error(v, "add_bos");
}

TEST(VocabTokenizer, GgufRoundTripKeepsTemplateAndFlags) {
  const auto dir = test::temp_dir("vocab_tok");
  TokenizerVocab v = tiny_vocab("smollm");
  v.add_bos = 1;
  v.chat_template = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}";
  GgufMetadata md;
  md.emplace_back("tokenizer.ggml.model", GgufValue::string(v.model));
  md.emplace_back("tokenizer.ggml.pre", GgufValue::string(v.pre));
  md.emplace_back("tokenizer.ggml.tokens", GgufValue::string_array(v.tokens));
  md.emplace_back("tokenizer.ggml.token_type", GgufValue::i32_array(v.token_types));
  md.emplace_back("tokenizer.ggml.merges", GgufValue::string_array(v.merges));
  md.emplace_back("tokenizer.ggml.bos_token_id", GgufValue::u32(0));
  md.emplace_back("tokenizer.ggml.eos_token_id", GgufValue::u32(1));
  md.emplace_back("tokenizer.ggml.add_bos_token", GgufValue::boolean(true));
  md.emplace_back("tokenizer.chat_template", GgufValue::string(v.chat_template));
  const std::string path = (dir / "tiny.gguf").string();
  write_gguf(path, md, {});
  const TokenizerVocab r = read_gguf_vocab(path);
  EXPECT_EQ(r.tokens, v.tokens);
  EXPECT_EQ(r.merges, v.merges);
  EXPECT_EQ(r.add_bos, 1);
  EXPECT_EQ(r.chat_template, v.chat_template);
  EXPECT_EQ(chat_template_for(path), v.chat_template);
  EXPECT_EQ(open_tokenizer_file(path)->encode("abc", true), (std::vector<int>{0, 9}));

  // A directory: chat_template.jinja wins over tokenizer_config.json's field.
  const auto mdir = dir / "model";
  fs::create_directories(mdir);
  std::ofstream(mdir / "tokenizer_config.json") << R"({"chat_template": "from config"})";
  EXPECT_EQ(chat_template_for(mdir.string()), "from config");
  std::ofstream(mdir / "tokenizer_config.json") << R"({"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]})";
  EXPECT_EQ(chat_template_for(mdir.string()), "d");
  std::ofstream(mdir / "chat_template.jinja") << "from jinja";
  EXPECT_EQ(chat_template_for(mdir.string()), "from jinja");
  std::ofstream(mdir / "tokenizer_config.json") << R"({"chat_template": 5})";
  fs::remove(mdir / "chat_template.jinja");
  EXPECT_THROW(chat_template_for(mdir.string()), Error);
}

}  // namespace
}  // namespace lowbit

namespace lowbit {
namespace {

// convert --tokenizer's library half: a tokenizer file becomes a GGUF vocabulary that, written
// and read back, tokenizes exactly like the file itself.
void write_vocab_gguf(const std::string& path, const TokenizerVocab& v) {
  GgufMetadata md;
  md.emplace_back("tokenizer.ggml.model", GgufValue::string(v.model));
  if (!v.pre.empty()) md.emplace_back("tokenizer.ggml.pre", GgufValue::string(v.pre));
  md.emplace_back("tokenizer.ggml.tokens", GgufValue::string_array(v.tokens));
  if (!v.scores.empty()) md.emplace_back("tokenizer.ggml.scores", GgufValue::f32_array(v.scores));
  md.emplace_back("tokenizer.ggml.token_type", GgufValue::i32_array(v.token_types));
  if (!v.merges.empty()) md.emplace_back("tokenizer.ggml.merges", GgufValue::string_array(v.merges));
  if (v.bos_id >= 0) md.emplace_back("tokenizer.ggml.bos_token_id", GgufValue::u32(uint32_t(v.bos_id)));
  if (v.eos_id >= 0) md.emplace_back("tokenizer.ggml.eos_token_id", GgufValue::u32(uint32_t(v.eos_id)));
  if (v.add_bos >= 0) md.emplace_back("tokenizer.ggml.add_bos_token", GgufValue::boolean(v.add_bos != 0));
  if (!v.chat_template.empty()) md.emplace_back("tokenizer.chat_template", GgufValue::string(v.chat_template));
  write_gguf(path, md, {});
}

TEST(VocabTokenizer, TokenizerJsonEmbedsAndReadsBack) {
  const auto dir = test::temp_dir("vocab_embed");
  for (auto [rel, ref, pre] : {std::tuple{"models/smollm2-135m-instruct/tokenizer-llamacpp-smollm.json",
                                          "models/smollm2-135m-instruct/ref-tokenize-wikitext2.jsonl", "smollm"},
                               {"tokenizers/llama3/tokenizer.json", "ref/tokenize-llama3-wikitext2.jsonl", "llama-bpe"},
                               {"tokenizers/qwen3/tokenizer.json", "ref/tokenize-qwen3-wikitext2.jsonl", "qwen2"}}) {
    LOWBIT_REQUIRE_SHARED(tj, rel);
    LOWBIT_REQUIRE_SHARED(refp, ref);
    const TokenizerVocab v = vocab_from_tokenizer_file(tj);
    EXPECT_EQ(v.pre, pre);
    const std::string out = (dir / "t.gguf").string();
    write_vocab_gguf(out, v);
    const auto tok = open_tokenizer_file(out);
    EXPECT_EQ(replay(*tok, read_jsonl(refp), rel), 0) << rel;
    const auto orig = load_tokenizer(tj);
    EXPECT_EQ(tok->bos_id(), orig->bos_id()) << rel;
    EXPECT_EQ(tok->eos_id(), orig->eos_id()) << rel;
    EXPECT_EQ(tok->encode("Hi there", true), orig->encode("Hi there", true)) << rel;
  }
  // The SmolLM2 folder has chat_template.jinja next to the json: it is carried along.
  LOWBIT_REQUIRE_SHARED(smol, "models/smollm2-135m-instruct/tokenizer-llamacpp-smollm.json");
  EXPECT_NE(vocab_from_tokenizer_file(smol).chat_template.find("<|im_start|>"), std::string::npos);
  EXPECT_EQ(vocab_from_tokenizer_file(smol, 49200).tokens.size(), 49200u);
  EXPECT_THROW(vocab_from_tokenizer_file(smol, 100), Error);
}

TEST(VocabTokenizer, SentencepieceModelEmbedsAndReadsBack) {
  LOWBIT_REQUIRE_SHARED(model, "models/stories260K/tok512.model");
  LOWBIT_REQUIRE_SHARED(bin, "models/stories260K/tok512.bin");
  const TokenizerVocab v = vocab_from_tokenizer_file(model);
  EXPECT_EQ(v.model, "llama");
  EXPECT_EQ(v.tokens.size(), 512u);
  const auto dir = test::temp_dir("vocab_embed_sp");
  const std::string out = (dir / "t.gguf").string();
  write_vocab_gguf(out, v);
  const auto tok = open_tokenizer_file(out);
  const auto ref = load_tokenizer(bin);  // the same vocabulary in llama2.c form
  for (const char* text : {"Once upon a time, there was a little girl.", "Lily's cat: 42!\nThe end", ""})
    EXPECT_EQ(tok->encode(text, true), ref->encode(text, true)) << text;
}

TEST(VocabTokenizer, SentencepieceStyleTokenizerJsonIsRefused) {
  LOWBIT_REQUIRE_SHARED(tj, "tokenizers/llama2/tokenizer.json");
  EXPECT_THROW(vocab_from_tokenizer_file(tj), Error);
}

}  // namespace
}  // namespace lowbit

namespace lowbit {
namespace {

// A GGUF gpt2 vocabulary written as tokenizer.json + tokenizer_config.json (what export --layout
// gptq|awq puts next to a model converted from GGUF): lowbit and Python `tokenizers` read it back
// and give the SmolLM2 reference ids on every line.
TEST(VocabTokenizer, Gpt2VocabularyWritesAHuggingFaceTokenizerJson) {
  LOWBIT_REQUIRE_SHARED(gguf, kSmolGguf);
  LOWBIT_REQUIRE_SHARED(ref, "models/smollm2-135m-instruct/ref-tokenize-wikitext2.jsonl");
  const TokenizerVocab v = read_gguf_vocab(gguf);
  const HfTokenizerFiles files = hf_tokenizer_files_from_vocab(v, gguf);
  const auto dir = test::temp_dir("vocab_hf_files");
  std::ofstream(dir / "tokenizer.json") << files.tokenizer_json;
  std::ofstream(dir / "tokenizer_config.json") << files.tokenizer_config_json;
  const json cfg = json::parse(files.tokenizer_config_json);
  EXPECT_NE(cfg.at("chat_template").get<std::string>().find("<|im_start|>"), std::string::npos);
  const auto tok = load_tokenizer(dir.string());
  const auto lines = read_jsonl(ref);
  for (const auto& l : lines) EXPECT_EQ(tok->encode(l.text, false), l.ids) << l.text;
  const std::string cmd = "python3 -c \"import json,sys; from tokenizers import Tokenizer; t=Tokenizer.from_file(sys.argv[1]); "
                          "L=[json.loads(x) for x in open(sys.argv[2])]; "
                          "print(sum(t.encode(l['text'], add_special_tokens=False).ids != l['ids'] for l in L), len(L))\" '" +
                          (dir / "tokenizer.json").string() + "' '" + ref + "' 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  char buf[128] = {0};
  const size_t n = fread(buf, 1, sizeof buf - 1, p);
  const int st = pclose(p);
  if (st != 0 || n == 0) GTEST_SKIP() << "python3 with the tokenizers module is not available (pip install tokenizers)";
  EXPECT_EQ(std::string(buf, n), "0 " + std::to_string(lines.size()) + "\n");
  TokenizerVocab spm;
  spm.model = "llama";
  spm.tokens = {"a"};
  EXPECT_THROW(hf_tokenizer_files_from_vocab(spm, "x.gguf"), Error);
}

}  // namespace
}  // namespace lowbit
