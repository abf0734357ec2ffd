// A tiny Llama configuration (2 layers, dim 64, GQA) and its logits, shared by the tests that
// build small random models to round-trip through quantized checkpoints and GGUF.
#pragma once
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

inline Tensor logits_of(const LlamaModel& m, const Tensor& tokens) {
  NoGradGuard ng;
  return m.forward(tokens).value();
}

}  // namespace lowbit::test
