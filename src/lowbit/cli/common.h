// Pieces shared by the CLI commands: model and token-file loading, device selection, output.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "lowbit/io/checkpoint.h"
#include "lowbit/model/llama.h"
#include "lowbit/tokenizer/tokenizer.h"

namespace lowbit::cli {

// Parses "cpu" / "cuda"; "cuda" initialises the GPU or fails with a clear message.
Device parse_device(const std::string& name);

// Loads a checkpoint (any supported format) and builds a frozen model on `device`.
struct LoadedModel {
  Checkpoint checkpoint;
  std::unique_ptr<LlamaModel> model;
};
LoadedModel load_model(const std::string& path, Device device);

// The tokenizer named by --tokenizer (a tokenizer file, a directory holding one, or a GGUF file's
// embedded one), else the model's own: a model directory's, or the one embedded in a GGUF model
// (read from the metadata only). Throws when there is none.
std::unique_ptr<Tokenizer> open_tokenizer(const std::string& tokenizer_path, const std::string& model_path);

// A prompt from the model's chat template (GGUF tokenizer.chat_template, chat_template.jinja or
// tokenizer_config.json next to --tokenizer or the model): an optional system message, then
// `user`, with add_generation_prompt. Throws when neither path has a template.
std::string chat_prompt(const std::string& tokenizer_path, const std::string& model_path, const Tokenizer& tok,
                        const std::string& user, const std::string& system);

// A file of raw little-endian int32 token ids.
std::vector<int32_t> read_token_file(const std::string& path);

// Tokenizes a text file (no special tokens) and caches the ids at cache_path (+ ".key": path, size,
// mtime and tokenizer path), so restarted runs reuse them.
std::vector<int32_t> tokenize_file_cached(const std::string& text_path, const Tokenizer& tok, const std::string& tok_path,
                                         const std::string& cache_path);

// Prints a JSON object on stdout (one line).
void print_json(const nlohmann::json& j);

}  // namespace lowbit::cli
