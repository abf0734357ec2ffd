// LoRA finetuning of a quantized stories260K: held-out loss must fall, packed weights must not
// change, and the written checkpoint must reload with the adapters.
#include <gtest/gtest.h>

#include "common/stories_fixture.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/train/finetune.h"

using namespace lowbit;

TEST(Finetune, LoraRecoversInt2Quality) {
  LOWBIT_REQUIRE_SHARED(model_path, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(tokens_path, "models/stories260K/sample-tokens.i32");
  const std::vector<int32_t> all = test::read_i32_file(tokens_path);
  std::vector<int32_t> train(all.begin(), all.begin() + 32 * 257), valid(all.begin() + 32 * 257, all.end());
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel m(ck.config, ck.weights);
  const QuantFormat& fmt = parse_quant_format("int2g64");
  RtnMethod rtn(fmt);
  PipelineOptions po;
  po.progress = false;
  run_blockwise(m, sample_calibration(train, 4, 64, 0), rtn, fmt, po);
  auto dir = test::temp_dir("finetune");
  save_quantized_model((dir / "q").string(), m, "rtn", fmt);
  FinetuneOptions o;
  o.lora_rank = 8;
  o.train.batch_size = 8;
  o.train.seq_len = 64;
  o.train.max_steps = 40;
  o.train.warmup_steps = 5;
  o.train.lr = 2e-3;
  o.train.weight_decay = 0;
  o.train.eval_every = 0;
  o.train.eval_batches = 4;
  o.train.out_dir = (dir / "run").string();
  FinetuneResult r = finetune_quantized((dir / "q").string(), o, train, valid);
  EXPECT_EQ(r.adapters_created, 35);
  ASSERT_TRUE(r.train.complete);
  EXPECT_LT(r.val_loss_after, r.val_loss_before - 0.5) << r.val_loss_before << " -> " << r.val_loss_after;
  QuantizedCheckpoint before = load_quantized_model((dir / "q").string());
  QuantizedCheckpoint after = load_quantized_model((dir / "run" / "model").string());
  EXPECT_EQ(after.lora.size(), 35u);
  for (const auto& [name, q] : before.quantized)
    EXPECT_EQ(max_abs_diff(q.codes, after.quantized.at(name).codes), 0.0) << name;  // packed weights frozen
  EXPECT_THROW(finetune_quantized(model_path, o, train, valid), Error);  // not a quantized checkpoint
}
