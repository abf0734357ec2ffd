// The same model loaded from every checkpoint format computes the same logits (issue: real
// checkpoints). Formats that keep llama2.c's interleaved q/k layout (GGUF "llama") must match
// bit for bit; the Hugging Face layout permutes q/k channels, which reorders the sums in q.k,
// so there the bound is float rounding: 5e-5 on logits of magnitude ~10-20 (about 1e-6 relative).
#include <gtest/gtest.h>

#include "common/test_util.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/io/checkpoint.h"
#include "lowbit/model/llama.h"

using namespace lowbit;

namespace {
Tensor logits(const Checkpoint& ck) {
  LlamaModel m(ck.config, ck.weights);
  std::vector<int32_t> ids;
  for (int i = 0; i < 64; ++i) ids.push_back((i * 37 + 1) % ck.config.vocab_size);
  NoGradGuard ng;
  return m.forward(Tensor::from_vector(ids, {2, 32})).value();
}
}  // namespace

TEST(FormatsLogits, GgufV1AndRoundTripsMatchTheBin) {
  LOWBIT_REQUIRE_SHARED(bin, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(gguf1, "models/stories260K/stories260K-gguf-v1-f32.gguf");
  const Tensor ref = logits(load_checkpoint(bin));
  EXPECT_EQ(max_abs_diff(logits(load_checkpoint(gguf1)), ref), 0.0);
  auto dir = test::temp_dir("formats-logits");
  const std::string hf = (dir / "hf").string(), gg = (dir / "m.gguf").string(), back = (dir / "back.bin").string();
  save_checkpoint(hf, load_checkpoint(bin));
  const Checkpoint hf_ck = load_checkpoint(hf);
  EXPECT_EQ(hf_ck.config.rope_style, RopeStyle::Half);
  EXPECT_LE(max_abs_diff(logits(hf_ck), ref), 5e-5);
  save_checkpoint(gg, hf_ck);
  const Checkpoint gg_ck = load_checkpoint(gg);
  EXPECT_EQ(gg_ck.config.rope_style, RopeStyle::Interleaved);
  EXPECT_EQ(max_abs_diff(logits(gg_ck), ref), 0.0);
  save_checkpoint(back, gg_ck);
  EXPECT_EQ(max_abs_diff(logits(load_checkpoint(back)), ref), 0.0);
}
