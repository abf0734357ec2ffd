// Hugging Face model directories: config.json + model.safetensors, or shards listed in
// model.safetensors.index.json ({"metadata": {...}, "weight_map": {tensor: file}}).
//
// Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases),
// Qwen3ForCausalLM (per-head q/k RMSNorm). HF stores q/k projection rows in the "rotate_half"
// order, so loaded configs have RopeStyle::Half (see rope_layout.h); saving a model whose config
// is Interleaved (llama2.c, GGUF llama) permutes q/k rows into the HF order.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "lowbit/io/checkpoint.h"
#include "lowbit/io/safetensors.h"

namespace lowbit {

// config.json (already parsed) -> LlamaConfig. Throws naming `source` for unsupported
// architectures or features (rope_scaling other than null / llama3, biases on o_proj/MLP, non-SiLU
// activations, wrong field types); prints a warning for ignored fields (sliding_window). Missing
// vocab_size gives 0. The result is NOT validated (a training config may be completed later):
// call LlamaConfig::validate before use; load_hf_dir does.
LlamaConfig config_from_hf_json(const nlohmann::json& j, const std::string& source);
// LlamaConfig -> config.json contents for `torch_dtype` ("float32", "float16", "bfloat16").
nlohmann::json config_to_hf_json(const LlamaConfig& c, const std::string& torch_dtype);

// Loads a model directory (config.json + safetensors weights), converting weights to f32.
Checkpoint load_hf_dir(const std::string& dir);

// A model directory opened without loading its weights (block-wise streaming, methods/stream.h):
// the config (validated), every weight file's header (validated; the files are mapped, which
// costs address space, not memory), and tensors read on demand with pread, converted to f32, so
// the process holds only what it asked for. The same checks as load_hf_dir: a tensor missing, of
// the wrong shape or with a non-finite value is an error naming the file and the tensor.
class HfTensorSource {
 public:
  static std::shared_ptr<HfTensorSource> open(const std::string& dir);
  const LlamaConfig& config() const { return config_; }
  const std::string& dir() const { return dir_; }
  // The file holding the tensor `name` (throws naming the directory when it has none).
  const SafetensorsFile& file_of(const std::string& name) const;
  // The tensor as f32, checked against `shape` and for non-finite values.
  Tensor read_f32(const std::string& name, const Shape& shape) const;
  // Layer i's weights (f32, the tensors the config needs).
  LayerWeights read_layer(int i) const;

 private:
  std::string dir_;
  LlamaConfig config_;
  std::map<std::string, std::shared_ptr<SafetensorsFile>> files_;  // by file name
  std::map<std::string, std::string> where_;                       // tensor -> file name
};

struct HfSaveOptions {
  DType dtype = DType::F32;                   // f32, f16 or bf16
  uint64_t max_shard_bytes = 5'000'000'000ull;  // HF's default max_shard_size "5GB"
};

// Writes config.json and model.safetensors (or model-0000i-of-0000n.safetensors + index when
// the weights exceed max_shard_bytes) into `dir` (created if needed). Each file is written
// atomically; weight files of a previous save with the other layout (single vs sharded) are
// removed afterwards so the directory stays consistent.
void save_hf_dir(const std::string& dir, const LlamaConfig& config, const LlamaWeights& weights,
                 const HfSaveOptions& options = {});

// A random Llama-shaped model for tests and measurements of large models (lowbit random-model):
// every matrix uniform with mean 0 and standard deviation `std`, norms 1, biases 0.
struct RandomModelOptions {
  DType dtype = DType::BF16;                    // f32, f16 or bf16
  uint64_t max_shard_bytes = 5'000'000'000ull;  // as save_hf_dir
  uint64_t seed = 0;
  double std = 0.02;
};
// Writes config.json and the weights (sharded as save_hf_dir, each file atomic) of a random model
// with `config`, shard by shard and every tensor in pieces of 1M values generated as they are
// written: the process holds a few MiB whatever the model's size (a 70B-shaped model is written
// without ever being held). Value k of a tensor depends only on (seed, tensor name, k). Returns the
// bytes of weights written.
uint64_t write_random_hf_model(const std::string& dir, const LlamaConfig& config, const RandomModelOptions& options = {});

// True when `dir` is a directory holding config.json.
bool looks_like_hf_dir(const std::string& dir);

}  // namespace lowbit
