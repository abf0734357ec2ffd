// A tiny Llama configuration (2 layers, dim 64, GQA) and its logits, shared by the tests that
// build small random models to round-trip through quantized checkpoints and GGUF.
#pragma once
#include <algorithm>
#include <vector>
#include "lowbit/autograd/variable.h"
#include "lowbit/model/config.h"
#include "lowbit/model/llama.h"

namespace lowbit::test {

inline LlamaConfig small_config(RopeStyle style) {
  LlamaConfig c;
  c.dim = 64;
  c.hidden_dim = 96;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 50;
  c.max_seq_len = 32;
  c.rope_style = style;
  return c;
}

// The smallest Llama worth differentiating (dim 8, 2 layers, 2 heads sharing one KV head, a
// vocabulary of 11): the f64 central-difference checks of whole models.
inline LlamaConfig grad_check_config() {
  LlamaConfig c;
  c.dim = 8;
  c.hidden_dim = 12;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.vocab_size = 11;
  c.max_seq_len = 16;
  return c;
}

// A deterministic, non-periodic token pattern of shape [B, T] over a vocabulary of V (seeded).
inline Tensor pattern_tokens(int64_t B, int64_t T, int V, int seed) {
  std::vector<int32_t> v;
  for (int64_t i = 0; i < B * T; ++i) v.push_back(int32_t((i * 7 + seed * 13 + 3 + (i * i) % 5) % V));
  return Tensor::from_vector(v, {B, T});
}

inline Tensor logits_of(const LlamaModel& m, const Tensor& tokens) {
  NoGradGuard ng;
  return m.forward(tokens).value();
}

// Logits of the whole sequence decoded through a KV cache of `type`, `chunk` tokens per call.
inline Tensor cached_logits(const LlamaModel& m, const Tensor& tokens, int64_t chunk,
                            KVCacheType type = KVCacheType::F32) {
  NoGradGuard ng;
  const int64_t T = tokens.numel();
  KVCache cache = m.make_cache(T, type);
  Tensor out = Tensor::empty({T, m.config().vocab_size});
  const Tensor flat = tokens.contiguous().view({T});
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t t1 = std::min(T, t0 + chunk);
    out.slice(0, t0, t1).copy_(m.forward_cached(flat.slice(0, t0, t1).contiguous(), cache).value());
  }
  return out;
}

}  // namespace lowbit::test
