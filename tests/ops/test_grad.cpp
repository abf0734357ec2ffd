// Every differentiable op against finite differences (f64).
#include <gtest/gtest.h>

#include <cstring>
#include <map>

#include "grad_check.h"
#include "lowbit/autograd/leaf_hook.h"
#include "lowbit/autograd/optim.h"
#include "lowbit/ops/device_init.h"
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
  const Tensor b = rnd({3, 4}, 3), w = rnd({3, 4}, 4);
  grad_check([&](const std::vector<Var>& v) { return weighted_sq_err(v[0], b, w, 0.37); }, {rnd({3, 4}, 1)});
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

TEST(Grad, HadamardTransform) {
  const Tensor signs = Tensor::from_vector(std::vector<double>{1, -1, -1, 1, 1, 1, -1, 1, -1, 1, 1, -1}, {12});
  const Tensor small = rnd({3, 3}, 9);
  for (bool transpose : {false, true})
    grad_check([&](const std::vector<Var>& v) { return project(hadamard_transform(v[0], signs, small, transpose)); },
               {rnd({3, 12}, 1)});
  grad_check([](const std::vector<Var>& v) { return project(hadamard_transform(v[0], Tensor(), Tensor())); },
             {rnd({2, 8}, 2)});
}

TEST(Grad, RegistryCoversEveryDifferentiableOp) {
  // Each op listed with a backward has a gradient check above (names kept in step by hand; this
  // test fails when an op is added to the registry without one).
  const std::vector<std::string> checked = {"gemm", "add", "sub", "mul", "scale", "sum", "rmsnorm", "rope",
                                            "attention", "silu", "swiglu", "embedding", "cross_entropy", "kl_div", "mse", "weighted_sq_err", "cast",
                                            "hadamard_transform",
                                            // The QAT quantizers' backwards are straight-through surrogates: their
                                            // f64 finite-difference checks (of the surrogate, through the autograd
                                            // functions of the quant layer, which call these ops) are
                                            // tests/quant/test_lsq.cpp (lsq_quant, group_scale) and
                                            // tests/quant/test_paretoq.cpp (seq_quant).
                                            "lsq_quant", "group_scale", "seq_quant"};
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

TEST(Autograd, LeafHookSeesFinalGradientsOnce) {
  // A composite graph where leaves are used at several depths (w0 twice, x through a residual):
  // the hook must see each leaf once, with the gradient plain backward() leaves, and may drop it.
  const auto graph = [](const Var& x, const Var& w0, const Var& w1, const Var& g) {
    Var h = rmsnorm(x, g, 1e-5);
    Var y = linear(swiglu(linear(h, w0), linear(h, w1)), w0);
    return sum(mul(add(x, y), add(x, y)));
  };
  const std::vector<Tensor> init = {rnd({3, 4}, 1), rnd({4, 4}, 2, 0.5), rnd({4, 4}, 3, 0.5), rnd({4}, 4)};
  std::vector<Var> a, b;
  for (const Tensor& t : init) {
    a.emplace_back(t.clone(), true);
    b.emplace_back(t.clone(), true);
  }
  backward(graph(a[0], a[1], a[2], a[3]));
  std::map<Node*, int> calls;
  std::map<Node*, Tensor> seen;
  backward_with_leaf_hook(graph(b[0], b[1], b[2], b[3]), [&](Node& leaf) {
    ++calls[&leaf];
    seen[&leaf] = leaf.grad;
    leaf.grad = Tensor();
  });
  ASSERT_EQ(calls.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    Node* n = b[i].node().get();
    EXPECT_EQ(calls[n], 1) << i;
    EXPECT_FALSE(b[i].grad().defined()) << i;  // dropped by the hook
    ASSERT_TRUE(seen[n].defined()) << i;
    for (int64_t k = 0; k < seen[n].numel(); ++k) EXPECT_EQ(seen[n].item(k), a[i].grad().item(k)) << i << " " << k;
  }
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

// ---- cast (autograd/functions.h) -----------------------------------------------------------------
TEST(Grad, CastF64F32) {
  // Through an f32 round trip the function is the identity up to f32 rounding (~6e-8 relative),
  // so the finite difference needs a large step: h = 1e-2 keeps the rounding term near 1e-5.
  grad_check([](const std::vector<Var>& v) { return project(cast(cast(v[0], DType::F32), DType::F64)); },
             {rnd({3, 5}, 1)}, 1e-4, 1e-2);
  // The backward is the cast back: d/dx of sum(r * f64(f32(x))) is f64(f32(r)) exactly.
  Var x(rnd({4, 3}, 2), true);
  Var z = cast(cast(x, DType::F32), DType::F64);
  Tensor r = Tensor::randn({4, 3}, 7, 1.0, DType::F64);
  backward(sum(mul(z, Var(r))));
  ASSERT_EQ(x.grad().dtype(), DType::F64);
  for (int64_t i = 0; i < r.numel(); ++i) EXPECT_EQ(x.grad().item(i), double(float(r.item(i))));
  // f32 -> f64: the gradient arrives in f32.
  Var y(Tensor::randn({5}, 3, 1.0, DType::F32), true);
  backward(sum(cast(y, DType::F64)));
  ASSERT_EQ(y.grad().dtype(), DType::F32);
  for (int64_t i = 0; i < 5; ++i) EXPECT_EQ(y.grad().item(i), 1.0);
  // Same dtype: the Var itself, no node.
  EXPECT_EQ(cast(x, DType::F64).node().get(), x.node().get());
}

TEST(CastParity, F32Bf16OnTheGpu) {
  if (!init_cuda()) GTEST_SKIP() << "no CUDA device (or a CPU-only build): GPU cast parity skipped";
  // Odd sizes exercise the scalar tail after the 8-element packs; values span many binades.
  for (int64_t n : {int64_t(1), int64_t(7), int64_t(1003), int64_t(65536 + 5)}) {
    Tensor x = Tensor::randn({n}, uint64_t(n), 3.0, DType::F32);
    x.set_item(0, 1.00390625);  // exactly halfway between two bf16 values: rounds to even (1.0)
    Tensor xg = x.to(Device::CUDA), bg = Tensor::empty({n}, DType::BF16, Device::CUDA);
    bg.fill_(7.0);  // poison
    ops::cast(xg, bg);
    Tensor b_cpu = x.to(DType::BF16), b_gpu = bg.to(Device::CPU);
    ASSERT_EQ(0, std::memcmp(b_cpu.raw_data(), b_gpu.raw_data(), size_t(n) * 2)) << "f32 -> bf16, n = " << n;
    Tensor fg = Tensor::empty({n}, DType::F32, Device::CUDA);
    fg.fill_(7.0);
    ops::cast(bg, fg);
    Tensor f_cpu = b_cpu.to(DType::F32), f_gpu = fg.to(Device::CPU);
    ASSERT_EQ(0, std::memcmp(f_cpu.raw_data(), f_gpu.raw_data(), size_t(n) * 4)) << "bf16 -> f32, n = " << n;
  }
  // Autograd on the GPU: the bf16 gradient comes back to the f32 input as f32.
  Var x(Tensor::randn({33, 8}, 5, 1.0, DType::F32).to(Device::CUDA), true);
  Tensor r = Tensor::randn({33, 8}, 6, 1.0, DType::F32);
  Var y = cast(x, DType::BF16);
  ASSERT_EQ(y.value().dtype(), DType::BF16);
  backward(y, r.to(DType::BF16).to(Device::CUDA));
  ASSERT_EQ(x.grad().dtype(), DType::F32);
  Tensor g = x.grad().to(Device::CPU), want = r.to(DType::BF16).to(DType::F32);
  ASSERT_EQ(0, std::memcmp(g.raw_data(), want.raw_data(), size_t(want.numel()) * 4));
}

// Tensor::fill_ of a device tensor (a kernel per element size) and sum's backward (the 0-d gradient
// broadcast on the device, no host read) against the CPU.
TEST(DeviceFill, FillAndSumBackwardOnTheGpu) {
  if (!init_cuda()) GTEST_SKIP() << "no CUDA device (or a CPU-only build): GPU fill skipped";
  for (DType dt : {DType::F32, DType::F64, DType::BF16, DType::F16, DType::I32})
    for (int64_t n : {int64_t(1), int64_t(1000), int64_t(1 << 20) + 3}) {
      Tensor g = Tensor::empty({n}, dt, Device::CUDA);
      g.fill_(-2.5 + (dt == DType::I32 ? 0.5 : 0.0));
      Tensor want = Tensor::full({n}, -2.5 + (dt == DType::I32 ? 0.5 : 0.0), dt), got = g.to(Device::CPU);
      ASSERT_EQ(0, std::memcmp(want.raw_data(), got.raw_data(), size_t(n) * size_t(dtype_size(dt))))
          << dtype_name(dt) << " n = " << n;
    }
  Tensor zero_d = Tensor::empty({}, DType::F32, Device::CUDA);
  zero_d.fill_(3.0);
  EXPECT_EQ(zero_d.item(), 3.0);
  Var x(Tensor::randn({37, 5}, 9, 1.0, DType::F32).to(Device::CUDA), true);
  backward(scale(sum(x), 0.75));
  Tensor gx = x.grad().to(Device::CPU);
  for (int64_t i = 0; i < gx.numel(); ++i) ASSERT_EQ(gx.data<float>()[i], 0.75f) << i;
}
