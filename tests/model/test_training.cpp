// The model as a whole is differentiable and trainable.
#include <gtest/gtest.h>

#include <cmath>

#include "common/small_model.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/optim.h"
#include "lowbit/model/llama.h"
#include "lowbit/ops/ops.h"

using namespace lowbit;

namespace {
using test::grad_check_config;

LlamaWeights to_f64(LlamaWeights w) {
  for_each_weight(w, [](const std::string&, Tensor& t) { t = t.to(DType::F64); });
  return w;
}
}  // namespace

TEST(ModelGrad, WholeBlockMatchesFiniteDifferences) {
  // Every parameter of one decoder block and its input, in f64 (tolerance as in tests/ops).
  for (bool qwen : {false, true}) {
    LlamaConfig c = grad_check_config();
    if (qwen) {
      c.attn_bias = c.qk_norm = true;
      c.rope_style = RopeStyle::Half;
    }
    LlamaWeights w = to_f64(random_weights(c, 3));
    for_each_weight(w, [](const std::string& n, Tensor& t) {  // larger weights: a non-trivial function
      if (n.find("norm") == std::string::npos) ops::scale(t, 20.0, t);
    });
    LlamaModel model(c, w, true);
    const int64_t B = 2, T = 3;
    Var x(Tensor::randn({B * T, c.dim}, 5, 1.0, DType::F64), true);
    Var r(Tensor::randn({B * T, c.dim}, 6, 1.0, DType::F64));
    auto loss_fn = [&] { return sum(mul(model.block_forward(1, x, B, T), r)); };
    backward(loss_fn());
    std::vector<Var> params{x};
    auto& b = model.block(1);
    for (const Var& v : {b.attn_norm, b.ffn_norm, b.q_norm, b.k_norm})
      if (v.defined()) params.push_back(v);
    for (auto& [name, lin] : b.linears())
      for (auto& p : (*lin)->parameters()) params.push_back(p);
    EXPECT_EQ(params.size(), qwen ? 15u : 10u);
    const double h = 1e-6;
    for (auto& p : params) {
      Tensor val = p.mutable_value();
      for (int64_t i = 0; i < val.numel(); i += 3) {
        NoGradGuard ng;
        const double orig = val.item(i);
        val.set_item(i, orig + h);
        const double fp = loss_fn().value().item();
        val.set_item(i, orig - h);
        const double fm = loss_fn().value().item();
        val.set_item(i, orig);
        const double num = (fp - fm) / (2 * h);
        ASSERT_NEAR(p.grad().item(i), num, 1e-6 * std::max(1.0, std::fabs(num))) << "qwen=" << qwen << " element " << i;
      }
    }
  }
}

TEST(ModelTrain, LossFallsOnAFixedBatch) {
  LlamaConfig c = grad_check_config();
  c.dim = 32;
  c.hidden_dim = 64;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 37;
  LlamaModel model(c, random_weights(c, 1), true);
  std::vector<int32_t> ids;
  for (int i = 0; i < 2 * 17; ++i) ids.push_back((i * 7 + 3) % c.vocab_size);
  Tensor all = Tensor::from_vector(ids, {2, 17});
  Tensor in = all.slice(1, 0, 16).contiguous(), tgt = all.slice(1, 1, 17).contiguous().view({-1});
  AdamW opt(model.parameters(), AdamWOptions{3e-3, 0.9, 0.95, 1e-8, 0.0});
  double first = 0, last = 0;
  for (int step = 0; step < 60; ++step) {
    Var loss = cross_entropy(model.forward(in), tgt);
    if (step == 0) first = loss.value().item();
    last = loss.value().item();
    opt.zero_grad();
    backward(loss);
    clip_grad_norm(model.parameters(), 1.0);
    opt.step();
  }
  EXPECT_NEAR(first, std::log(double(c.vocab_size)), 0.2);  // random init: about uniform
  EXPECT_LT(last, 0.25 * first);
}
