// Shared helpers of the tokenizer tests: tokenizers loaded once per process (the JSON files take
// a few hundred ms each to parse) and the reference JSONL files.
#pragma once
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "lowbit/tokenizer/tokenizer.h"

namespace lowbit::test {

struct RefLine {
  std::string text;
  std::vector<int> ids;
};

inline std::vector<RefLine> read_ref_jsonl(const std::string& path) {
  std::vector<RefLine> out;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    const auto j = nlohmann::json::parse(line);
    out.push_back({j.at("text").get<std::string>(), j.at("ids").get<std::vector<int>>()});
  }
  return out;
}

// load_tokenizer(path), cached for the whole test binary.
inline const Tokenizer& cached_tokenizer(const std::string& path) {
  static std::mutex mu;
  static std::map<std::string, std::unique_ptr<Tokenizer>> cache;
  std::lock_guard lock(mu);
  auto& t = cache[path];
  if (!t) t = load_tokenizer(path);
  return *t;
}

}  // namespace lowbit::test
