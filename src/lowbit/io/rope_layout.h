// Conversions of q/k projection rows between the two rotary-embedding layouts (see RopeStyle in
// model/config.h).
//
// Meta/llama2.c/GGUF-llama rotate channel pairs (2i, 2i+1) of each head; Hugging Face rotates
// (i, i + h/2). HF's convert_llama_weights_to_hf.py therefore permutes the rows of q_proj and
// k_proj within each head:
//     permute(w, n_heads, dim1, dim2) = w.view(n_heads, dim1 // n_heads // 2, 2, dim2)
//                                        .transpose(1, 2).reshape(dim1, dim2)
// i.e. HF row (head, a * h/2 + i) = Meta row (head, 2 i + a) for a in {0, 1}. The model computes
// identical outputs when each layout is paired with its RoPE style.
#pragma once
#include "lowbit/core/tensor.h"
#include "lowbit/model/config.h"
#include "lowbit/model/weights.h"

namespace lowbit {

// Rows [n_heads * head_dim, ...] (a weight [out, in] or a bias [out]) from interleaved to half.
Tensor rope_rows_interleaved_to_half(const Tensor& w, int n_heads, int head_dim);
// The inverse permutation.
Tensor rope_rows_half_to_interleaved(const Tensor& w, int n_heads, int head_dim);

// Returns weights whose q/k (weights, biases and q/k norms) are in the layout of `target`,
// permuting when config.rope_style differs; other tensors are shared, not copied.
LlamaWeights weights_with_rope_style(const LlamaConfig& config, const LlamaWeights& weights, RopeStyle target);

}  // namespace lowbit
