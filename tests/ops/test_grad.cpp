// Every differentiable op against finite differences (f64).
#include <gtest/gtest.h>

#include "grad_check.h"
#include "lowbit/autograd/optim.h"
#include "lowbit/ops/ops.h"
#include "lowbit/ops/registry.h"

using namespace lowbit;
using lowbit::test::grad_check;
using lowbit::test::project;

static Tensor rnd(Shape s, uint64_t seed, double std = 1.0) { return Tensor::randn(s, seed, std, DType::F64); }

TEST(Grad, Matmul) {
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      Tensor a = ta ? rnd({2, 4, 3}, 1) : rnd({2, 3, 4}, 1);
      Tensor b = tb ? rnd({2, 5, 4}, 2) : rnd({2, 4, 5}, 2);
      grad_check([&](const std::vector<Var>& v) { return project(matmul(v[0], v[1], ta, tb)); }, {a, b});
    }
  // 2-D b broadcast over a's batch.
  grad_check([](const std::vector<Var>& v) { return project(matmul(v[0], v[1], false, true)); },
             {rnd({2, 3, 4}, 3), rnd({5, 4}, 4)});
}

TEST(Grad, LinearWithBias) {
  grad_check([](const std::vector<Var>& v) { return project(linear(v[0], v[1], v[2])); },
             {rnd({5, 4}, 1), rnd({3, 4}, 2), rnd({3}, 3)});
}

TEST(Grad, Elementwise) {
  grad_check([](const std::vector<Var>& v) { return project(add(v[0], v[1])); }, {rnd({3, 4}, 1), rnd({3, 4}, 2)});
  grad_check([](const std::vector<Var>& v) { return project(sub(v[0], v[1])); }, {rnd({3, 4}, 1), rnd({4}, 2)});
  grad_check([](const std::vector<Var>& v) { return project(mul(v[0], v[1])); }, {rnd({3, 4}, 1), rnd({4}, 2)});
  grad_check([](const std::vector<Var>& v) { return project(mul(v[0], v[0])); }, {rnd({3, 4}, 1)});
  grad_check([](const std::vector<Var>& v) { return project(scale(v[0], -1.7)); }, {rnd({3, 4}, 1)});
  grad_check([](const std::vector<Var>& v) { return sum(v[0]); }, {rnd({3, 4}, 1)});
  grad_check([](const std::vector<Var>& v) { return mean(v[0]); }, {rnd({3, 4}, 1)});
  grad_check([](const std::vector<Var>& v) { return project(reshape(v[0], {4, 3})); }, {rnd({3, 4}, 1)});
}

TEST(Grad, RmsNorm) {
  grad_check([](const std::vector<Var>& v) { return project(rmsnorm(v[0], v[1], 1e-5)); },
             {rnd({4, 7}, 1), rnd({7}, 2)});
}

TEST(Grad, Rope) {
  for (auto style : {RopeStyle::Interleaved, RopeStyle::Half})
    grad_check([style](const std::vector<Var>& v) { return project(rope(v[0], 2, 3, 2, 4, 5, 10000.0, style)); },
               {rnd({6, 8}, 1)});
}

TEST(Grad, AttentionGqa) {
  // B=2, T=5, H=4, KVH=2, hd=3.
  grad_check([](const std::vector<Var>& v) { return project(attention(v[0], v[1], v[2], 2, 5, 5, 4, 2, 3)); },
             {rnd({10, 12}, 1), rnd({10, 6}, 2), rnd({10, 6}, 3)});
  // Fewer queries than keys (the KV-cache case): Tq=2, Tk=5.
  grad_check([](const std::vector<Var>& v) { return project(attention(v[0], v[1], v[2], 1, 2, 5, 2, 1, 4)); },
             {rnd({2, 8}, 4), rnd({5, 4}, 5), rnd({5, 4}, 6)});
}

TEST(Grad, Activations) {
  grad_check([](const std::vector<Var>& v) { return project(silu(v[0])); }, {rnd({3, 5}, 1, 2.0)});
  grad_check([](const std::vector<Var>& v) { return project(swiglu(v[0], v[1])); }, {rnd({3, 5}, 1, 2.0), rnd({3, 5}, 2)});
}

TEST(Grad, Embedding) {
  Tensor ids = Tensor::from_vector(std::vector<int32_t>{3, 0, 3, 1}, {4});
  grad_check([&](const std::vector<Var>& v) { return project(embedding(v[0], ids)); }, {rnd({5, 3}, 1)});
}

TEST(Grad, Losses) {
  Tensor t = Tensor::from_vector(std::vector<int32_t>{2, -1, 0, 4}, {4});
  grad_check([&](const std::vector<Var>& v) { return cross_entropy(v[0], t); }, {rnd({4, 5}, 1, 2.0)});
  grad_check([](const std::vector<Var>& v) { return kl_div(v[0], v[1]); }, {rnd({3, 6}, 1, 2.0), rnd({3, 6}, 2, 2.0)});
  grad_check([](const std::vector<Var>& v) { return mse(v[0], v[1]); }, {rnd({3, 4}, 1), rnd({3, 4}, 2)});
}

TEST(Grad, Composite) {
  // A gated MLP with a norm and a residual: exercises gradient accumulation on a shared input.
  grad_check(
      [](const std::vector<Var>& v) {
        Var h = rmsnorm(v[0], v[1], 1e-5);
        Var y = linear(swiglu(linear(h, v[2]), linear(h, v[3])), v[4]);
        return project(add(v[0], y));
      },
      {rnd({3, 4}, 1), rnd({4}, 2), rnd({6, 4}, 3, 0.5), rnd({6, 4}, 4, 0.5), rnd({4, 6}, 5, 0.5)});
}

TEST(Grad, RegistryCoversEveryDifferentiableOp) {
  // Each op listed with a backward has a gradient check above (names kept in step by hand; this
  // test fails when an op is added to the registry without one).
  const std::vector<std::string> checked = {"gemm", "add", "sub", "mul", "scale", "sum", "rmsnorm", "rope",
                                            "attention", "silu", "swiglu", "embedding", "cross_entropy", "kl_div", "mse"};
  for (const auto& op : ops::op_registry()) {
    if (!op.has_backward) continue;
    EXPECT_NE(std::find(checked.begin(), checked.end(), std::string(op.name)), checked.end())
        << "op '" << op.name << "' has a backward but no gradient check";
  }
}

TEST(Autograd, AccumulatesAndFreesGraph) {
  Var w(Tensor::from_vector(std::vector<double>{1, 2}, {2}), true);
  backward(sum(mul(w, w)));
  backward(sum(w));
  EXPECT_DOUBLE_EQ(w.grad().item(0), 3.0);  // 2*1 + 1
  EXPECT_DOUBLE_EQ(w.grad().item(1), 5.0);  // 2*2 + 1
  {
    NoGradGuard ng;
    Var y = mul(w, w);
    EXPECT_FALSE(y.requires_grad());
    EXPECT_TRUE(y.node()->inputs.empty());
  }
  Var y = sum(mul(w, w));
  EXPECT_FALSE(y.node()->inputs.empty());
  backward(y);
  EXPECT_TRUE(y.node()->inputs.empty());  // graph released
  EXPECT_THROW(backward(sum(Var(Tensor::zeros({2}, DType::F64)))), Error);
}

TEST(Autograd, SharedGradientIsNotAliased) {
  // add() hands the same gradient tensor to both inputs; clipping one's gradient must not
  // change the other's.
  Var a(Tensor::zeros({2}, DType::F64), true), b(Tensor::zeros({2}, DType::F64), true);
  backward(sum(add(a, b)));
  clip_grad_norm({a}, 0.5);
  EXPECT_NEAR(a.grad().item(0), 0.5 / std::sqrt(2.0), 1e-6);
  EXPECT_DOUBLE_EQ(b.grad().item(0), 1.0);
}
