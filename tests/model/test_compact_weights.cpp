// 16-bit weights on the CPU: a model whose weights are exactly f16 (or bf16) computes the same
// logits after LlamaModel::compact_weights() keeps them 16-bit, through the full forward and the
// KV-cache path; weights that are not exactly 16-bit stay f32.
#include <gtest/gtest.h>

#include <cmath>

#include "lowbit/autograd/functions.h"
#include "lowbit/model/llama.h"
#include "lowbit/ops/ops.h"

using namespace lowbit;

namespace {
LlamaConfig small_config() {
  LlamaConfig c;
  c.dim = 64;
  c.hidden_dim = 96;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 300;
  c.max_seq_len = 80;
  return c;
}

double max_rel_diff(const Tensor& a, const Tensor& b) {
  double d = 0, m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    d = std::max(d, std::abs(a.item(i) - b.item(i)));
    m = std::max(m, std::abs(b.item(i)));
  }
  return d / m;
}
}  // namespace

TEST(CompactWeights, SixteenBitWeightsGiveTheSameLogits) {
  for (DType dt : {DType::F16, DType::BF16}) {
    for (bool tied : {true, false}) {
      LlamaConfig c = small_config();
      c.tied_embeddings = tied;
      LlamaWeights w = random_weights(c, 5, 0.05);
      // Round the matrices to the 16-bit grid, as a model read from an F16/BF16 file is.
      for_each_weight(w, [&](const std::string&, Tensor& t) {
        if (t.defined() && t.dim() == 2) t = t.to(dt).to(DType::F32);
      });
      LlamaModel ref(c, w, false), small(c, w, false);
      const int64_t saved = small.compact_weights();
      EXPECT_GT(saved, 0);
      EXPECT_EQ(small.block(0).wq->effective_weight().dtype(), dt);
      Tensor tokens = Tensor::empty({2, 70}, DType::I32);
      for (int64_t i = 0; i < tokens.numel(); ++i) tokens.data<int32_t>()[i] = int32_t((i * 37 + 11) % c.vocab_size);
      NoGradGuard ng;
      Tensor a = ref.forward(tokens).value(), b = small.forward(tokens).value();
      EXPECT_LT(max_rel_diff(b, a), 1e-5) << dtype_name(dt) << " tied " << tied;
      // Decoding with the KV cache (f32 cache next to 16-bit weights).
      KVCache cache = small.make_cache(16, KVCacheType::F32);
      EXPECT_EQ(cache.k[0].dtype(), DType::F32);
      Tensor first = tokens.slice(0, 0, 1).contiguous().view({70}).slice(0, 0, 5).contiguous();
      Tensor step = small.forward_cached(first, cache).value();
      EXPECT_LT(max_rel_diff(step, a.slice(0, 0, 5).contiguous()), 1e-5);
    }
  }
}

TEST(CompactWeights, InexactWeightsStayF32AndTrainableModelsAreRefused) {
  LlamaConfig c = small_config();
  LlamaWeights w = random_weights(c, 6, 0.05);  // arbitrary f32 values
  LlamaModel m(c, w, false);
  EXPECT_EQ(m.compact_weights(), 0);
  EXPECT_EQ(m.block(1).w_down->effective_weight().dtype(), DType::F32);
  LlamaModel t(c, w, true);
  EXPECT_THROW(t.compact_weights(), Error);
}
