// The tensors a config needs, with their names in each file format and their expected shape,
// bound to the LlamaWeights fields that hold them. One table used by every loader and saver.
#pragma once
#include <string>
#include <vector>

#include "lowbit/model/weights.h"

namespace lowbit::io {

struct WeightSlot {
  std::string hf_name;    // "model.layers.3.self_attn.q_proj.weight" (as for_each_weight)
  std::string gguf_name;  // "blk.3.attn_q.weight" (llama.cpp naming)
  Shape shape;            // PyTorch order [out, in]; GGUF lists the reverse (ne[0] = in)
  Tensor* tensor;         // where the loaded tensor goes
};

// Slots for every tensor `c` needs (lm_head only when untied, biases only with attn_bias, q/k
// norms only with qk_norm). Resizes w.layers to c.n_layers; the pointers stay valid while `w`'s
// layers are not resized.
std::vector<WeightSlot> weight_slots(const LlamaConfig& c, LlamaWeights& w);

// True for the weight of one of the seven linear layers of a block ("model.layers.3.mlp.up_proj.weight").
bool is_block_linear_weight(const std::string& hf_name);

}  // namespace lowbit::io
