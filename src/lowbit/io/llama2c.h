// llama2.c checkpoints (karpathy/llama2.c, the "legacy" version-0 format read by run.c).
//
// Layout (run.c `read_checkpoint` / `memory_map_weights`, export.py `legacy_export`), all
// little-endian:
//   int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
//     (vocab_size < 0 means the classifier is NOT shared with the token embedding)
//   f32 token_embedding[V][D]
//   f32 rms_att[L][D]
//   f32 wq[L][D][D], wk[L][KV*h][D], wv[L][KV*h][D], wo[L][D][D]   (rows = output features)
//   f32 rms_ffn[L][D]
//   f32 w1[L][F][D], w2[L][D][F], w3[L][F][D]
//   f32 rms_final[D]
//   f32 freq_cis_real[seq_len][h/2], freq_cis_imag[seq_len][h/2]   (RoPE table; ignored on load)
//   f32 wcls[V][D]                                                   (only when vocab_size < 0)
// q/k rows are in Meta's interleaved RoPE order; the format implies rope_theta 10000, RMSNorm
// eps 1e-5, BOS 1, EOS 2 (run.c hard-codes them).
#pragma once
#include <string>

#include "lowbit/io/checkpoint.h"

namespace lowbit {

// Loads a llama2.c checkpoint. The file is memory-mapped to parse it; every tensor is copied into
// owned, 64-byte-aligned f32 storage (so kernels get aligned data and the file may be replaced
// afterwards), then the weights are validated (shapes, finiteness).
// The file size must EQUAL the size implied by the header: a larger file means the header does
// not describe the file (e.g. a llama2.c version-1/2 export, or a corrupt header), and reading it
// anyway would silently produce garbage weights.
Checkpoint load_llama2c(const std::string& path);

// Writes a llama2.c checkpoint atomically (path.tmp, fsync, rename). The format cannot represent
// biases, q/k norms, head_dim != dim/n_heads, rope_theta != 10000 or norm_eps != 1e-5: such models
// are refused with an error. Weights in the Hugging Face (Half) RoPE layout are permuted back to
// the interleaved layout llama2.c expects. The RoPE table is recomputed (theta 10000).
void save_llama2c(const std::string& path, const LlamaConfig& config, const LlamaWeights& weights);

// True when the first bytes of a file look like a llama2.c legacy header that could describe a
// file of `file_size` bytes (used by format detection; cheap, no exceptions).
bool looks_like_llama2c(const std::string& path);

}  // namespace lowbit
