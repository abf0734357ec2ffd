#include "common/test_util.h"
#include "io_test_util.h"
#include "lowbit/io/checkpoint.h"
#include "lowbit/io/gguf.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/tokenizer/tokenizer.h"

using namespace lowbit;
using namespace lowbit::test;

TEST(Checkpoint, DetectsAndRoundTripsEveryFormat) {
  LOWBIT_REQUIRE_SHARED(bin, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(gguf, "models/stories260K/stories260K-gguf-v1-f32.gguf");
  EXPECT_EQ(detect_checkpoint_format(bin), CheckpointFormat::Llama2c);
  EXPECT_EQ(detect_checkpoint_format(gguf), CheckpointFormat::Gguf);
  Checkpoint a = load_checkpoint(bin);
  auto dir = temp_dir("ckpt");
  const std::string hf = (dir / "hf").string(), g = (dir / "m.gguf").string(), b = (dir / "m.bin").string();
  save_checkpoint(hf, a);
  EXPECT_EQ(detect_checkpoint_format(hf), CheckpointFormat::HfDir);
  EXPECT_EQ(detect_checkpoint_format(hf + "/model.safetensors"), CheckpointFormat::HfDir);
  Checkpoint h = load_checkpoint(hf + "/model.safetensors");  // a safetensors file loads its directory
  EXPECT_EQ(h.source, hf);
  save_checkpoint(g, h);
  save_checkpoint(b, load_checkpoint(g));
  Checkpoint z = load_checkpoint(b);
  expect_same_config(a.config, z.config);
  expect_same_weights(a.weights, z.weights);
  // Never over the source; dtype/format mismatches refused.
  EXPECT_THROW(save_checkpoint(b, z), Error);
  EXPECT_THROW(save_checkpoint((dir / "x.bin").string(), a, CheckpointFormat::Auto, DType::F16), Error);
  EXPECT_THROW(save_checkpoint((dir / "x.safetensors").string(), a), Error);
  EXPECT_THROW(detect_checkpoint_format((dir / "missing").string()), Error);
  EXPECT_THROW(detect_checkpoint_format(dir.string()), Error);  // no config.json
  std::filesystem::remove_all(dir);
}

TEST(Checkpoint, GgufVocabularyTravelsAndBuildsATokenizer) {
  LOWBIT_REQUIRE_SHARED(gguf, "models/stories260K/stories260K-gguf-v1-f32.gguf");
  Checkpoint c = load_checkpoint(gguf);
  ASSERT_FALSE(c.vocab.empty());
  auto dir = temp_dir("ckpt-vocab");
  const std::string out = (dir / "m.gguf").string();
  save_checkpoint(out, c, CheckpointFormat::Auto, DType::F16);
  Checkpoint d = load_checkpoint(out);
  EXPECT_EQ(d.vocab.tokens, c.vocab.tokens);
  EXPECT_EQ(d.vocab.scores, c.vocab.scores);
  EXPECT_EQ(d.vocab.token_types, c.vocab.token_types);
  auto tok = tokenizer_from_vocab(d.vocab, out);
  EXPECT_EQ(tok->vocab_size(), 512);
  EXPECT_EQ(tok->bos_id(), 1);
  const auto ids = tok->encode("Once upon a time", true);
  ASSERT_GT(ids.size(), 2u);
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(tok->decode(ids), "Once upon a time");
  TokenizerVocab gpt2;
  gpt2.model = "gpt2";
  gpt2.tokens = {"a"};
  EXPECT_THROW(tokenizer_from_vocab(gpt2, "x.gguf"), Error);
  std::filesystem::remove_all(dir);
}

TEST(Checkpoint, TokenizerPathFor) {
  auto dir = temp_dir("ckpt-tok");
  EXPECT_EQ(tokenizer_path_for(dir.string()), "");
  write_bytes((dir / "tokenizer.model").string(), {1});
  EXPECT_EQ(tokenizer_path_for(dir.string()), (dir / "tokenizer.model").string());
  write_bytes((dir / "tokenizer.json").string(), {'{', '}'});
  EXPECT_EQ(tokenizer_path_for(dir.string()), (dir / "tokenizer.json").string());
  write_bytes((dir / "m.bin").string(), {1});
  EXPECT_EQ(tokenizer_path_for((dir / "m.bin").string()), "");
  std::filesystem::remove_all(dir);
}
