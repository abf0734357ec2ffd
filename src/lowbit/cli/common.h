// Pieces shared by the CLI commands: model and token-file loading, device selection, output.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "lowbit/io/checkpoint.h"
#include "lowbit/model/llama.h"
#include "lowbit/tokenizer/tokenizer.h"

namespace CLI {
class App;
}

namespace lowbit::cli {

// Adds --threads N to a command that runs the model: lowbit's thread pool (core/threads.h) gets N
// threads when the option is parsed; the default is the number of physical cores.
void add_threads_option(CLI::App* app);

// Parses "cpu" / "cuda"; "cuda" initialises the GPU or fails with a clear message.
Device parse_device(const std::string& name);

// Loads a checkpoint (any supported format) and builds a frozen model on `device`.
struct LoadedModel {
  Checkpoint checkpoint;
  std::unique_ptr<LlamaModel> model;
};
LoadedModel load_model(const std::string& path, Device device);
// For commands that only run the model (eval, generate): on the CPU, weights that are exactly
// f16/bf16 (a model read from an F16/BF16 file) are kept 16-bit (LlamaModel::compact_weights)
// and the checkpoint's f32 copies are released.
void compact_for_inference(LoadedModel& m, Device device);

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
