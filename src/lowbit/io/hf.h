// Hugging Face model directories: config.json + model.safetensors, or shards listed in
// model.safetensors.index.json ({"metadata": {...}, "weight_map": {tensor: file}}).
//
// Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases),
// Qwen3ForCausalLM (per-head q/k RMSNorm). HF stores q/k projection rows in the "rotate_half"
// order, so loaded configs have RopeStyle::Half (see rope_layout.h); saving a model whose config
// is Interleaved (llama2.c, GGUF llama) permutes q/k rows into the HF order.
#pragma once
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "lowbit/io/checkpoint.h"

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

// True when `dir` is a directory holding config.json.
bool looks_like_hf_dir(const std::string& dir);

}  // namespace lowbit
