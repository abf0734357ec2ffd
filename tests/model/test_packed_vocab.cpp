// A model with a packed vocabulary (set_packed_vocab, as a GGUF model's Q8_0 token_embd is kept)
// still reports its real weights: LlamaModel::weights() decodes the embedding rows (and the untied
// output projection), so a quantization run that saves weights() writes the real table, not the
// shape-only placeholder the model holds (regression: quantizing the SmolLM2 GGUF on the CPU wrote
// an all-zero embedding and the result scored perplexity = vocabulary size).
#include <gtest/gtest.h>

#include <memory>

#include "common/small_model.h"
#include "lowbit/model/linear.h"

using namespace lowbit;

TEST(PackedVocab, WeightsDecodeThePackedTable) {
  for (bool tied : {true, false}) {
    LlamaConfig c = test::small_config(RopeStyle::Interleaved);
    c.tied_embeddings = tied;
    const LlamaWeights w = random_weights(c, 3, 0.05);
    // The model holds zero placeholders; the packed functions hold the real table.
    LlamaWeights placeholder = w;
    placeholder.tok_embeddings = Tensor::zeros(w.tok_embeddings.shape());
    if (!tied) placeholder.output = Tensor::zeros(w.output.shape());
    LlamaModel m(c, placeholder, false);
    const Tensor table = w.tok_embeddings, out = tied ? w.tok_embeddings : w.output;
    m.set_packed_vocab(std::make_shared<DenseLinear>(out, Tensor(), false), [table, &c](int64_t id, float* dst) {
      for (int64_t j = 0; j < c.dim; ++j) dst[j] = float(table.item(id * c.dim + j));
    });
    const LlamaWeights got = m.weights();
    ASSERT_TRUE(got.tok_embeddings.defined());
    EXPECT_EQ(got.tok_embeddings.shape(), w.tok_embeddings.shape());
    double d = 0;
    for (int64_t i = 0; i < table.numel(); ++i) d = std::max(d, std::abs(got.tok_embeddings.item(i) - table.item(i)));
    EXPECT_EQ(d, 0.0) << "tied " << tied;
    if (tied) {
      EXPECT_FALSE(got.output.defined());
    } else {
      ASSERT_TRUE(got.output.defined());
      double o = 0;
      for (int64_t i = 0; i < out.numel(); ++i) o = std::max(o, std::abs(got.output.item(i) - out.item(i)));
      EXPECT_EQ(o, 0.0);
    }
    // And the model rebuilt from them computes what the packed one does.
    LlamaModel rebuilt(c, got, false);
    Tensor tokens = Tensor::empty({1, 8}, DType::I32);
    for (int64_t i = 0; i < 8; ++i) tokens.data<int32_t>()[i] = int32_t((i * 7 + 3) % c.vocab_size);
    const Tensor a = test::logits_of(m, tokens), b = test::logits_of(rebuilt, tokens);
    double l = 0;
    for (int64_t i = 0; i < a.numel(); ++i) l = std::max(l, std::abs(a.item(i) - b.item(i)));
    EXPECT_LT(l, 1e-5);
  }
}
