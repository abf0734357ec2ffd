// Hand-written matchers for the regex families Hugging Face byte-level BPE tokenizers split text
// with before BPE. std::regex has no \p{L}/\p{N}, and a general Unicode regex engine would be a
// new dependency, so each supported pattern is recognised by its exact source text and matched
// by code that follows the regex's alternatives in order (leftmost-first, with the backtracking
// the pattern implies). Unknown patterns are rejected when the tokenizer is loaded.
#pragma once
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lowbit {

struct SplitPattern {
  enum class Family {
    kGpt2,    // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    kLlama3,  // (?i:'s|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,K}| ?[^\s\p{L}\p{N}]+[\r\n]*|
              // \s*[\r\n]+|\s+(?!\S)|\s+   (Llama 3: K = 3; Qwen 2/3: \p{N}, i.e. K = 1)
    kLlamaCppDefault,  // llama.cpp's default BPE pre-tokenizer, a chain of four regexes, each
                       // splitting the pieces of the previous one (Isolated):
                       // [\p{P}\$\+<=>\^~\|]+ ; the GPT-2 regex ; \p{N}+ ; [0-9][0-9][0-9]
                       // Named by the pseudo-regex "LlamaCppDefault" (GGUF tokenizer.ggml.pre
                       // "default"), not by a tokenizer.json regex.
  };
  Family family = Family::kGpt2;
  int max_digits = 0;  // kLlama3: K; 0 = unbounded
};

// The family of a regex source string from a tokenizer.json, or nullopt when unsupported.
std::optional<SplitPattern> recognize_split_pattern(std::string_view regex);
// The pattern the ByteLevel pre-tokenizer uses when use_regex is true.
SplitPattern gpt2_split_pattern();

// Appends the matches of `pattern` in `text` to `out` (behaviour "Isolated": every match is a
// piece; the supported patterns match every character, so nothing falls between matches).
// Invalid UTF-8 bytes count as single characters of no class.
void split_pretokens(std::string_view text, const SplitPattern& pattern,
                     std::vector<std::string_view>& out);

}  // namespace lowbit
