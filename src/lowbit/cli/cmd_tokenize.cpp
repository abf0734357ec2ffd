// lowbit tokenize: text lines on stdin -> one JSON object a line {"text": ..., "ids": [...]};
// with --decode, JSON id arrays (or those objects) on stdin -> the decoded text, one a line;
// with --file, a whole text file (no special tokens) -> raw int32 ids (--out) and a JSON summary.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/core/error.h"
#include "lowbit/core/progress.h"
#include "lowbit/tokenizer/tokenizer.h"

namespace lowbit::cli {
namespace {

struct TokenizeOptions {
  std::string tokenizer, model, file, out, chat, system;
  bool add_special = false;
  bool decode = false;
};

// FNV-1a 64 over the ids as little-endian int32 bytes (tests/tokenizer/smollm_wikitext_hash.py
// computes the same from Python).
uint64_t fnv1a_ids(const std::vector<int>& ids) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (int id : ids) {
    const auto u = static_cast<uint32_t>(id);
    for (int k = 0; k < 4; ++k) {
      h ^= (u >> (8 * k)) & 0xFF;
      h *= 0x100000001b3ull;
    }
  }
  return h;
}

void run_file(const Tokenizer& tok, const TokenizeOptions& o) {
  std::ifstream f(o.file, std::ios::binary);
  if (!f) throw_error(o.file, ": cannot open");
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) throw_error(o.file, ": read error");
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int> ids;
  {
    ProgressBar bar("tokenize", int64_t(text.size() >> 20), "MB");
    ids = tok.encode_long(text, [&](size_t done) { bar.update(int64_t(done >> 20)); });
    bar.finish();
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!o.out.empty()) {
    const std::string tmp = o.out + ".tmp";
    {
      std::ofstream w(tmp, std::ios::binary);
      std::vector<int32_t> v(ids.begin(), ids.end());
      w.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * 4));
      if (!w) throw_error(o.out, ": write failed");
    }
    std::filesystem::rename(tmp, o.out);
  }
  char hash[32];
  std::snprintf(hash, sizeof hash, "%016llx", static_cast<unsigned long long>(fnv1a_ids(ids)));
  print_json({{"file", o.file}, {"bytes", text.size()}, {"tokens", ids.size()}, {"seconds", secs},
              {"mb_per_s", secs > 0 ? double(text.size()) / 1e6 / secs : 0.0}, {"fnv1a64", hash}});
}

void run_tokenize(const TokenizeOptions& o) {
  const auto tok = open_tokenizer(o.tokenizer, o.model);
  if (!o.file.empty()) return run_file(*tok, o);
  if (!o.chat.empty()) {
    const std::string prompt = chat_prompt(o.tokenizer, o.model, *tok, o.chat, o.system);
    nlohmann::ordered_json j;
    j["text"] = prompt;
    j["ids"] = tok->encode(prompt, false);
    std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
    return;
  }
  std::ios::sync_with_stdio(false);
  std::string line;
  size_t line_no = 0;
  while (std::getline(std::cin, line)) {
    ++line_no;
    if (!o.decode) {
      // ordered_json keeps "text" before "ids", like the reference files.
      nlohmann::ordered_json j;
      j["text"] = line;
      j["ids"] = tok->encode(line, o.add_special);
      // Input that is not valid UTF-8 is still tokenized; only its echo is made printable.
      std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
      if (!std::cout) throw_error("writing to standard output failed");
      continue;
    }
    if (line.find_first_not_of(" \t\r") == std::string::npos) {
      std::cout << '\n';
      continue;
    }
    const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    const nlohmann::json* ids = nullptr;
    if (j.is_array()) ids = &j;
    if (j.is_object() && j.contains("ids")) ids = &j.at("ids");
    LB_CHECK(ids && ids->is_array(), "[tokenize] stdin line ", line_no,
             ": expected a JSON array of ids or an object with \"ids\"");
    std::vector<int> v;
    for (const auto& x : *ids) {
      LB_CHECK(x.is_number_integer(), "[tokenize] stdin line ", line_no, ": id ", x.dump(),
               " is not an integer");
      v.push_back(x.get<int>());
    }
    std::cout << tok->decode(v) << '\n';
    if (!std::cout) throw_error("writing to standard output failed");
  }
  std::cout.flush();
}

}  // namespace

void register_tokenize(CLI::App& app) {
  auto opts = std::make_shared<TokenizeOptions>();
  auto* sub = app.add_subcommand(
      "tokenize", "tokenize stdin lines to JSON ids (or decode id arrays with --decode)");
  sub->add_option("-t,--tokenizer", opts->tokenizer,
                  "tokenizer.json, *.model, tokenizer.bin, a directory holding one, or a GGUF file (its "
                  "embedded tokenizer)");
  sub->add_option("-m,--model", opts->model, "take the model's own tokenizer (GGUF file or model directory)");
  sub->add_option("--file", opts->file,
                  "tokenize this whole text file (no special tokens) instead of stdin lines; prints "
                  "{file, bytes, tokens, seconds, mb_per_s, fnv1a64}");
  sub->add_option("--out", opts->out, "with --file: write the ids there as raw little-endian int32");
  sub->add_option("--chat", opts->chat,
                  "print {text, ids} of this user message in the model's chat template (add_generation_prompt)");
  sub->add_option("--system", opts->system, "with --chat: a system message first");
  sub->add_flag("--add-special", opts->add_special,
                "apply the tokenizer's post-processor (e.g. prepend BOS)");
  sub->add_flag("--decode", opts->decode,
                "read JSON id arrays (or {\"ids\": [...]} objects) and print the text");
  sub->callback([opts] { run_tokenize(*opts); });
}

}  // namespace lowbit::cli
