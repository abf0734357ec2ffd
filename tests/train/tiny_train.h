#pragma once
// The small training run the trainer tests share: a 2-layer, 16-wide model over 13 token ids,
// 8 optimizer steps of 2 micro-batches, validation every 4 steps, no periodic checkpoints.
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "lowbit/train/trainer.h"

namespace lowbit::test {
inline TrainOptions tiny_train_options(const std::string& out) {
  TrainOptions o;
  o.config.dim = 16;
  o.config.hidden_dim = 32;
  o.config.n_layers = 2;
  o.config.n_heads = 2;
  o.config.n_kv_heads = 1;
  o.config.vocab_size = 13;
  o.config.max_seq_len = 16;
  o.batch_size = 4;
  o.seq_len = 8;
  o.grad_accum = 2;
  o.max_steps = 8;
  o.warmup_steps = 2;
  o.lr = 1e-2;
  o.eval_every = 4;
  o.eval_batches = 2;
  o.checkpoint_every = 0;
  o.out_dir = out;
  return o;
}

// The stories260K shape (dim 64, SwiGLU 172, 5 layers, 8 heads, 4 kv heads, vocabulary 512; windows
// of 32, batches of 8, lr 5e-3, no periodic evaluation or checkpoints) for the tests of the
// trainer's options (8-bit optimizer state, low-precision GEMMs); max_steps 40, warmup 4.
inline TrainOptions shape260k_train_options(const std::string& out) {
  TrainOptions o;
  o.config.dim = 64;
  o.config.hidden_dim = 172;
  o.config.n_layers = 5;
  o.config.n_heads = 8;
  o.config.n_kv_heads = 4;
  o.config.vocab_size = 512;
  o.config.max_seq_len = 32;
  o.batch_size = 8;
  o.seq_len = 32;
  o.max_steps = 40;
  o.warmup_steps = 4;
  o.lr = 5e-3;
  o.eval_every = 0;
  o.eval_batches = 2;
  o.checkpoint_every = 0;
  o.out_dir = out;
  return o;
}

// A token stream over 512 ids that follows a fixed successor 3 times in 4 and is random otherwise:
// learnable, so the loss falls well below ln(512).
inline std::vector<int32_t> markov_stream(int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> s{0};
  while (int(s.size()) < n) {
    const int32_t prev = s.back();
    s.push_back(rng() % 4 != 0 ? int32_t((prev * 37 + 11) % 512) : int32_t(rng() % 512));
  }
  return s;
}
}  // namespace lowbit::test
