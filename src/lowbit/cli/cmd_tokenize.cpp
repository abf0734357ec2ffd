// lowbit tokenize: text lines on stdin -> one JSON object a line {"text": ..., "ids": [...]};
// with --decode, JSON id arrays (or those objects) on stdin -> the decoded text, one a line.
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "lowbit/cli/commands.h"
#include "lowbit/core/error.h"
#include "lowbit/tokenizer/tokenizer.h"

namespace lowbit::cli {
namespace {

struct TokenizeOptions {
  std::string tokenizer;
  bool add_special = false;
  bool decode = false;
};

void run_tokenize(const TokenizeOptions& o) {
  const auto tok = load_tokenizer(o.tokenizer);
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
                  "tokenizer.json, *.model, tokenizer.bin, or a directory holding one")
      ->required();
  sub->add_flag("--add-special", opts->add_special,
                "apply the tokenizer's post-processor (e.g. prepend BOS)");
  sub->add_flag("--decode", opts->decode,
                "read JSON id arrays (or {\"ids\": [...]} objects) and print the text");
  sub->callback([opts] { run_tokenize(*opts); });
}

}  // namespace lowbit::cli
