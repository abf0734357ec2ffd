#pragma once
// The small training run the trainer tests share: a 2-layer, 16-wide model over 13 token ids,
// 8 optimizer steps of 2 micro-batches, validation every 4 steps, no periodic checkpoints.
#include <string>

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
}  // namespace lowbit::test
