// Llama-family model configuration (Llama 2/3, Mistral, Qwen2/3, SmolLM, TinyLlama, llama2.c).
#pragma once
#include <string>

#include "lowbit/ops/rope_style.h"

namespace lowbit {

struct LlamaConfig {
  std::string arch = "llama";  // llama | mistral | qwen2 | qwen3
  int dim = 0;                 // model width D
  int hidden_dim = 0;          // SwiGLU width F
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;          // grouped-query attention: n_heads % n_kv_heads == 0
  int head_dim = 0;            // 0: dim / n_heads
  int vocab_size = 0;
  int max_seq_len = 2048;
  float rope_theta = 10000.0f;
  float norm_eps = 1e-5f;
  bool tied_embeddings = true;  // output head shares tok_embeddings
  RopeStyle rope_style = RopeStyle::Interleaved;
  RopeScaling rope_scaling;  // HF rope_scaling "llama3" (Llama 3.1/3.2); inactive by default
  bool attn_bias = false;  // q/k/v biases (Qwen2)
  bool qk_norm = false;    // per-head RMSNorm on q and k (Qwen3)
  int bos_id = 1;
  int eos_id = 2;

  int resolved_head_dim() const { return head_dim > 0 ? head_dim : (n_heads > 0 ? dim / n_heads : 0); }
  // Throws lowbit::Error naming `source` (a file) and the bad field.
  void validate(const std::string& source) const;
  std::string summary() const;  // one line for logs
};

}  // namespace lowbit
