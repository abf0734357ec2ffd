// load_tokenizer(): picks the implementation from the file name (or, failing that, its content).
#include "lowbit/tokenizer/tokenizer.h"

#include <filesystem>
#include <fstream>

#include "lowbit/core/error.h"
#include "lowbit/tokenizer/hf_tokenizer.h"
#include "lowbit/tokenizer/llama2c_tokenizer.h"
#include "lowbit/tokenizer/sentencepiece_tokenizer.h"

namespace lowbit {

namespace fs = std::filesystem;

std::vector<int> Tokenizer::encode_long(std::string_view text, const std::function<void(size_t)>& progress) const {
  std::vector<int> ids = encode(text, false);
  if (progress) progress(text.size());
  return ids;
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& file_or_dir) {
  std::error_code ec;
  const fs::path p(file_or_dir);
  LB_CHECK(fs::exists(p, ec), "[tokenizer] ", file_or_dir, ": no such file or directory");
  if (fs::is_directory(p, ec)) {
    // tokenizer.json carries the most information (added tokens, post-processor), so it wins.
    for (const char* name : {"tokenizer.json", "tokenizer.model", "tokenizer.bin"}) {
      if (fs::is_regular_file(p / name, ec)) return load_tokenizer((p / name).string());
    }
    throw_error("[tokenizer] ", file_or_dir,
                ": directory has no tokenizer.json, tokenizer.model or tokenizer.bin");
  }
  const std::string ext = p.extension().string();
  if (ext == ".json") return std::make_unique<HfTokenizer>(file_or_dir);
  if (ext == ".model") return std::make_unique<SentencePieceTokenizer>(file_or_dir);
  if (ext == ".bin") return std::make_unique<Llama2cTokenizer>(file_or_dir);
  // Unknown extension: a JSON object starts with '{' (after optional whitespace).
  std::ifstream f(file_or_dir, std::ios::binary);
  LB_CHECK(f, "[tokenizer] ", file_or_dir, ": cannot open file");
  char c = 0;
  while (f.get(c) && (c == ' ' || c == '\n' || c == '\r' || c == '\t')) {
  }
  if (c == '{') return std::make_unique<HfTokenizer>(file_or_dir);
  throw_error("[tokenizer] ", file_or_dir,
              ": unknown tokenizer format (expected tokenizer.json, a sentencepiece .model or a "
              "llama2.c tokenizer.bin)");
}

}  // namespace lowbit
