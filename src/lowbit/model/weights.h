// Plain weight tensors of a Llama-family model, as loaded from or saved to a checkpoint.
// Linear weights are [out_features, in_features] (y = x W^T), as in PyTorch and llama2.c.
// Dimension letters: D model width, F SwiGLU width, H heads, K kv heads, h head_dim, V vocab.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "lowbit/core/tensor.h"
#include "lowbit/model/config.h"

namespace lowbit {

struct LayerWeights {
  Tensor attn_norm;           // [D]
  Tensor wq, wk, wv, wo;      // [H*h, D], [K*h, D], [K*h, D], [D, H*h]
  Tensor bq, bk, bv;          // [H*h], [K*h], [K*h]   (only when config.attn_bias)
  Tensor q_norm, k_norm;      // [h]                    (only when config.qk_norm)
  Tensor ffn_norm;            // [D]
  Tensor w_gate, w_down, w_up;  // w1 [F, D], w2 [D, F], w3 [F, D]  (llama2.c names w1, w2, w3)
};

struct LlamaWeights {
  Tensor tok_embeddings;  // [V, D]
  Tensor final_norm;      // [D]
  Tensor output;          // [V, D]; undefined when config.tied_embeddings
  std::vector<LayerWeights> layers;
};

// Visits every tensor with a stable Hugging Face-style name ("model.layers.3.self_attn.q_proj.weight").
// Undefined optional tensors are skipped. Used by savers, converters and tests.
void for_each_weight(LlamaWeights& w, const std::function<void(const std::string& name, Tensor& t)>& f);
void for_each_weight(const LlamaWeights& w, const std::function<void(const std::string& name, const Tensor& t)>& f);

// Checks that every tensor the config needs is present with the right shape and dtype (f32, or
// f64 for gradient tests, all alike) and is finite (values = false: shapes and dtypes only, no
// value is read — block-wise streaming's placeholders).
// Throws lowbit::Error naming `source` and the tensor.
void validate_weights(const LlamaConfig& c, const LlamaWeights& w, const std::string& source, bool values = true);

// Random weights for tests and benchmarks (normal with the given std; norms = 1), on the CPU.
LlamaWeights random_weights(const LlamaConfig& c, uint64_t seed, double std = 0.02);
// w with every tensor moved to `device`.
LlamaWeights weights_to(const LlamaWeights& w, Device device);

}  // namespace lowbit
