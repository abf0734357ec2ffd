#include <gtest/gtest.h>

#include <filesystem>

#include "common/test_util.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/train/trainer.h"

using namespace lowbit;

namespace {
TrainOptions tiny(const std::string& out) {
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

std::vector<int32_t> stream(int n, int mod) {
  std::vector<int32_t> s;
  for (int i = 0; i < n; ++i) s.push_back((i * 5 + i / 7) % mod);
  return s;
}
}  // namespace

TEST(Trainer, LearnsAndWritesCheckpoints) {
  auto dir = test::temp_dir("train-learn");
  TrainOptions o = tiny(dir.string());
  o.max_steps = 60;
  o.eval_every = 0;
  TrainResult r = train_model(o, stream(2000, 13), stream(300, 13));
  ASSERT_EQ(r.records.size(), 60u);
  EXPECT_LT(r.records.back().loss, 0.6 * r.records.front().loss);
  EXPECT_GE(r.final_val_loss, 0);
  EXPECT_TRUE(std::filesystem::exists(dir / "hf" / "config.json"));
  Checkpoint ck = load_llama2c((dir / "model.bin").string());
  EXPECT_EQ(ck.config.dim, 16);
}

TEST(Trainer, ResumeAfterStopGivesTheSameRun) {
  auto a = test::temp_dir("train-a"), b = test::temp_dir("train-b");
  TrainResult full = train_model(tiny(a.string()), stream(2000, 13), stream(300, 13));
  TrainOptions o = tiny(b.string());
  o.stop_after = 3;  // simulates a kill right after the checkpoint of step 3
  TrainResult first = train_model(o, stream(2000, 13), stream(300, 13));
  EXPECT_EQ(first.steps_done, 3);
  o.stop_after = 0;
  TrainResult rest = train_model(o, stream(2000, 13), stream(300, 13));
  EXPECT_TRUE(rest.resumed);
  ASSERT_EQ(rest.records.size(), 5u);
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(rest.records[i].step, full.records[i + 3].step);
    EXPECT_DOUBLE_EQ(rest.records[i].loss, full.records[i + 3].loss) << "step " << rest.records[i].step;
  }
  EXPECT_DOUBLE_EQ(rest.final_val_loss, full.final_val_loss);
  Checkpoint x = load_llama2c((a / "model.bin").string()), y = load_llama2c((b / "model.bin").string());
  EXPECT_EQ(max_abs_diff(x.weights.tok_embeddings, y.weights.tok_embeddings), 0.0);
  EXPECT_EQ(max_abs_diff(x.weights.layers[1].w_down, y.weights.layers[1].w_down), 0.0);
}

TEST(Trainer, RejectsBadData) {
  auto dir = test::temp_dir("train-bad");
  EXPECT_THROW(train_model(tiny(dir.string()), stream(2000, 20), {}), Error);  // ids past vocab
  EXPECT_THROW(train_model(tiny(dir.string()), stream(5, 13), {}), Error);     // too short
}
