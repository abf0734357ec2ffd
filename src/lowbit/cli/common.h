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

// Loads a checkpoint (any supported format) and builds a frozen model on `device`. Quantized
// models (lowbit directories, GGUF files in ggml block types) stay packed (QuantLinear layers on
// ops::quant_matmul); dequantize = true loads them as dequantized f32 instead (the reference path).
struct LoadedModel {
  Checkpoint checkpoint;
  std::unique_ptr<LlamaModel> model;
  int64_t packed_vocab_bytes = 0;  // packed token_embd / output (GGUF), not in checkpoint.weights
};
LoadedModel load_model(const std::string& path, Device device, bool dequantize = false);

// The tokenizer named by --tokenizer, else the one inside a model directory; throws when neither.
std::unique_ptr<Tokenizer> open_tokenizer(const std::string& tokenizer_path, const std::string& model_path);

// A file of raw little-endian int32 token ids.
std::vector<int32_t> read_token_file(const std::string& path);

// Tokenizes a text file (no special tokens) and caches the ids at cache_path (+ ".key": path, size,
// mtime and tokenizer path), so restarted runs reuse them.
std::vector<int32_t> tokenize_file_cached(const std::string& text_path, const Tokenizer& tok, const std::string& tok_path,
                                         const std::string& cache_path);

// Prints a JSON object on stdout (one line).
void print_json(const nlohmann::json& j);

}  // namespace lowbit::cli
