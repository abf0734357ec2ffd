// L4Q (qat --method l4q, arXiv 2402.04902): the training layer (quant/l4q_linear.h) — what trains,
// the exported packed tensor decoding to the trained fake-quantized merged weight exactly, the
// gradient chain through W0 + s B A — and the method on stories260K: loss reduction in a few CPU
// steps, a loadable checkpoint, resume after a stop giving the same model.
#include <gtest/gtest.h>

#include <filesystem>

#include "common/stories_fixture.h"
#include "qat_stories.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/quant/l4q_linear.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"
#include "lowbit/train/qat.h"

using namespace lowbit;
namespace fs = std::filesystem;

namespace {

// A layer whose LoRA factors and steps have moved away from their initial values.
L4qTrainLinear moved_layer(const QuantFormat& f, DType dt, const Tensor& w) {
  L4qOptions o;
  o.rank = 4;
  o.lora_alpha = 8;
  o.seed = 3;
  o.grad_scale = lsq_grad_scale(f, w.size(1));
  L4qTrainLinear t(w, Tensor(), f, lsq_init(w.to(dt), f, LsqInit::Mse), o);
  auto p = t.parameters();  // A, B, step (, offset)
  p[1].mutable_value().copy_(Tensor::randn(p[1].value().shape(), 11, 0.05, dt));
  Tensor s = p[2].value().to(DType::F64);
  for (int64_t i = 0; i < s.numel(); ++i) s.data<double>()[i] *= 1.0 + 0.01 * double(i % 7);
  p[2].mutable_value().copy_(s.to(dt));
  return t;
}

struct L4qStories : test::QatStoriesBase {};

}  // namespace

TEST(L4qLayer, TrainsLoraAndQuantizerNotW0AndStartsAtTheQuantizedW0) {
  for (const char* name : {"int2g64", "int3g64s"}) {
    const QuantFormat& f = parse_quant_format(name);
    const Tensor w = Tensor::randn({24, 128}, 5, 0.1, DType::F32);
    const LsqParams init = lsq_init(w, f, LsqInit::Mse);
    L4qOptions o;
    o.rank = 4;
    L4qTrainLinear t(w, Tensor(), f, init, o);
    EXPECT_EQ(t.lora_parameters().size(), 2u);
    EXPECT_EQ(t.quant_parameters().size(), f.kind == QuantKind::IntAsym ? 2u : 1u) << name;
    EXPECT_EQ(t.lora_parameters()[0].value().shape(), Shape({4, 128}));
    EXPECT_EQ(t.lora_parameters()[1].value().shape(), Shape({24, 4}));
    // B = 0: the layer starts as LSQ on W0.
    const Tensor eff = t.effective_weight();
    const Tensor ref =
        lsq_fake_quant(Var(w), Var(init.step), init.offset.defined() ? Var(init.offset) : Var(), f, 1.0).value();
    for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(eff.item(i), ref.item(i)) << name << " " << i;
  }
  const QuantFormat& f = parse_quant_format("int2g64");
  const Tensor w = Tensor::randn({8, 64}, 5, 0.1, DType::F32);
  L4qOptions bad;
  bad.rank = 0;
  EXPECT_THROW(L4qTrainLinear(w, Tensor(), f, lsq_init(w, f, LsqInit::Mse), bad), Error);
  EXPECT_THROW(L4qTrainLinear(w, Tensor(), parse_quant_format("q4_0"), lsq_init(w, f, LsqInit::Mse), L4qOptions()), Error);
}

TEST(L4qLayer, ExportedPackedWeightDecodesToTheTrainedFakeQuantExactly) {
  for (const char* name : {"int2g64", "int3g64", "int4g32s", "int3pc"}) {
    const QuantFormat& f = parse_quant_format(name);
    const Tensor w = Tensor::randn({16, 128}, 7, 0.1, DType::F32);
    L4qTrainLinear t = moved_layer(f, DType::F32, w);
    auto p = t.parameters();
    Tensor merged;
    {
      NoGradGuard ng;
      merged = t.merged_weight().value();
    }
    // The merged weight really moved (B != 0).
    double moved = 0;
    for (int64_t i = 0; i < w.numel(); ++i) moved = std::max(moved, std::abs(double(merged.item(i) - w.item(i))));
    EXPECT_GT(moved, 1e-3) << name;
    const Var off = f.kind == QuantKind::IntAsym ? Var(p[3].value()) : Var();
    const Tensor want = lsq_fake_quant(Var(merged), Var(lsq_storage_step(p[2].value())), off, f, 1.0).value();
    const QuantizedTensor q = t.encode();
    EXPECT_EQ(q.fmt().name, f.name);
    const Tensor got = q.dequantize();
    ASSERT_EQ(got.numel(), want.numel());
    for (int64_t i = 0; i < want.numel(); ++i) ASSERT_EQ(got.item(i), want.item(i)) << name << " element " << i;
  }
}

TEST(L4qLayer, LoraGradientsAreTheMergedWeightGradientThroughSBA) {
  // f64, the fused layer (it recomputes M and Q(M) in its backward) against the autograd chain:
  // dL/dA = s B^T G and dL/dB = s G A^T with G the straight-through gradient lsq_fake_quant gives
  // the merged weight; the step / zero-point gradients equal lsq_fake_quant's on that weight.
  const QuantFormat& f = parse_quant_format("int3g64");
  const Tensor w = Tensor::randn({12, 128}, 9, 0.1, DType::F64);
  L4qTrainLinear t = moved_layer(f, DType::F64, w);
  const Tensor x = Tensor::randn({5, 128}, 13, 1.0, DType::F64);
  const Tensor tgt = Tensor::randn({5, 12}, 17, 1.0, DType::F64);
  // The fused forward computes what the unfused form (linear of the quantized merged weight) does.
  const Var y = t.forward(Var(x));
  {
    NoGradGuard ng;
    const Tensor ref = linear(Var(x), t.quantized_weight()).value();
    for (int64_t i = 0; i < ref.numel(); ++i) ASSERT_EQ(y.value().item(i), ref.item(i)) << "y " << i;
  }
  Var loss = mse(y, Var(tgt));
  backward(loss);
  auto p = t.parameters();
  // Reference: the quantizer on a leaf copy of the merged weight.
  Tensor merged;
  {
    NoGradGuard ng;
    merged = t.merged_weight().value();
  }
  Var m(merged.clone(), true), st(p[2].value().clone(), true), off(p[3].value().clone(), true);
  backward(mse(linear(Var(x), lsq_fake_quant(m, st, off, f, lsq_grad_scale(f, 128))), Var(tgt)));
  const double s = t.lora_scale();
  const Tensor A = p[0].value(), B = p[1].value(), G = m.grad();
  const int64_t out = 12, in = 128, r = 4;
  for (int64_t k = 0; k < r; ++k)
    for (int64_t j = 0; j < in; ++j) {
      double want = 0;
      for (int64_t o = 0; o < out; ++o) want += s * B.item(o * r + k) * G.item(o * in + j);
      ASSERT_NEAR(p[0].grad().item(k * in + j), want, 1e-12 + 1e-9 * std::abs(want)) << "dA " << k << "," << j;
    }
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < r; ++k) {
      double want = 0;
      for (int64_t j = 0; j < in; ++j) want += s * G.item(o * in + j) * A.item(k * in + j);
      ASSERT_NEAR(p[1].grad().item(o * r + k), want, 1e-12 + 1e-9 * std::abs(want)) << "dB " << o << "," << k;
    }
  for (int64_t i = 0; i < st.grad().numel(); ++i) ASSERT_NEAR(p[2].grad().item(i), st.grad().item(i), 1e-12);
  for (int64_t i = 0; i < off.grad().numel(); ++i) ASSERT_NEAR(p[3].grad().item(i), off.grad().item(i), 1e-12);
}

TEST_F(L4qStories, L4qReducesTheLmLossBeatsRtnAndWritesALoadableCheckpoint) {
  expect_trains_beats_rtn_and_reloads("l4q");
}

TEST_F(L4qStories, L4qResumeAfterStopGivesTheSameModel) {
  // Another rank is another state: refused.
  expect_resume_gives_the_same_model("l4q", [](QatConfig& c) { c.lora_rank = 4; });
}

TEST(QatRegistryL4q, IsRegisteredAndChecksItsOptions) {
  EXPECT_NO_THROW(find_qat_method("l4q"));
  QatConfig c;
  c.format = &parse_quant_format("q4_0");
  EXPECT_THROW(make_qat_method("l4q", c), Error);
  c.format = &parse_quant_format("int2g64");
  c.lora_rank = 0;
  EXPECT_THROW(make_qat_method("l4q", c), Error);
  c.lora_rank = 8;
  c.lora_alpha = 0;
  EXPECT_THROW(make_qat_method("l4q", c), Error);
}
