// Rotations (model/rotation.h, issue 16): the randomized Hadamard rotation is orthogonal, a rotated
// model computes the same function as the original (random models and stories260K, every forward
// path), KIVI fake quantization agrees between the batched forward and token-by-token decoding,
// and activation quantization follows its per-token formula.
#include <gtest/gtest.h>

#include <cmath>

#include "common/small_model.h"
#include "common/test_util.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/model/rotation.h"
#include "lowbit/model/weights.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/ops/ops.h"

using namespace lowbit;

using test::cached_logits;

namespace {
double rot_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.numel(), b.numel());
  double d = 0;
  for (int64_t i = 0; i < a.numel(); ++i) d = std::max(d, std::abs(a.item(i) - b.item(i)));
  return d;
}
double max_abs(const Tensor& a) {
  double d = 0;
  for (int64_t i = 0; i < a.numel(); ++i) d = std::max(d, std::abs(a.item(i)));
  return d;
}
Tensor tokens_of(int64_t B, int64_t T, int V, int seed = 1) {
  std::vector<int32_t> v;
  for (int64_t i = 0; i < B * T; ++i) v.push_back(int32_t((i * 7 + seed * 13 + 3) % V));
  return Tensor::from_vector(v, {B, T});
}
// Random norm weights, so that folding them is exercised.
void randomize_norms(LlamaWeights& w, uint64_t seed) {
  auto rnd = [&](Tensor& t) {
    Tensor r = Tensor::uniform(t.shape(), seed++, 0.5, 1.5);
    t = r;
  };
  rnd(w.final_norm);
  for (auto& l : w.layers) {
    rnd(l.attn_norm);
    rnd(l.ffn_norm);
  }
}
}  // namespace

TEST(Hadamard, RandomRotationIsOrthogonalAndInverts) {
  for (int64_t n : {1, 7, 64, 96, 576, 1536}) {
    const HadamardRotation r = random_hadamard(n, 42);
    ASSERT_EQ(r.size(), n);
    if (n <= 96) {  // explicitly; larger sizes through norms and the round trip below
      const Tensor R = r.matrix();
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double d = 0;
          for (int64_t k = 0; k < n; ++k) d += R.item(i * n + k) * R.item(j * n + k);
          ASSERT_NEAR(d, i == j ? 1.0 : 0.0, 1e-6) << "n=" << n << " " << i << "," << j;
        }
    }
    const Tensor x = Tensor::randn({5, n}, 3);
    const Tensor xr = r.apply(x);
    for (int64_t i = 0; i < 5; ++i) {  // |x R| = |x| per row
      double a = 0, b = 0;
      for (int64_t j = 0; j < n; ++j) a += x.item(i * n + j) * x.item(i * n + j), b += xr.item(i * n + j) * xr.item(i * n + j);
      ASSERT_NEAR(std::sqrt(b), std::sqrt(a), 1e-5 * std::sqrt(a));
    }
    const Tensor back = r.apply(xr, true);  // x R R^T = x
    for (int64_t i = 0; i < x.numel(); ++i) ASSERT_NEAR(back.item(i), x.item(i), 1e-5);
    // Same seed, same rotation; another seed, another one.
    const HadamardRotation again = random_hadamard(n, 42), other = random_hadamard(n, 43);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(again.signs.item(i), r.signs.item(i));
    if (n >= 64) {
      int differ = 0;
      for (int64_t i = 0; i < n; ++i) differ += other.signs.item(i) != r.signs.item(i);
      EXPECT_GT(differ, 0);
    }
  }
}

TEST(Rotation, RandomModelKeepsItsOutputs) {
  struct Case {
    const char* name;
    LlamaConfig c;
  };
  std::vector<Case> cases;
  cases.push_back({"gqa tied", test::small_config(RopeStyle::Half)});
  LlamaConfig untied = test::small_config(RopeStyle::Interleaved);
  untied.tied_embeddings = false;
  untied.dim = 48;  // 16 x 3
  untied.n_heads = 4;
  untied.n_kv_heads = 4;
  untied.hidden_dim = 80;  // 16 x 5
  cases.push_back({"untied mha", untied});
  LlamaConfig qwen = test::small_config(RopeStyle::Half);
  qwen.attn_bias = true;
  qwen.qk_norm = true;
  qwen.head_dim = 24;  // 8 x 3, q width 96 != dim
  cases.push_back({"bias qk-norm head_dim", qwen});
  for (auto& [name, c] : cases) {
    LlamaWeights w = random_weights(c, 11, 0.1);
    randomize_norms(w, 5);
    LlamaModel ref(c, w);
    LlamaConfig rc = c;
    LlamaWeights rw = w;
    const ModelTransforms t = rotate_weights(rc, rw, 7);
    EXPECT_FALSE(rc.tied_embeddings);
    LlamaModel rot(rc, rw);
    rot.set_transforms(t);
    const Tensor tok = tokens_of(2, 12, c.vocab_size);
    const Tensor a = test::logits_of(ref, tok), b = test::logits_of(rot, tok);
    EXPECT_LE(rot_diff(a, b), 1e-4) << name << " (logits up to " << max_abs(a) << ")";
    // The weights really changed (the residual stream is rotated).
    EXPECT_GT(rot_diff(rw.layers[0].wq, w.layers[0].wq), 1e-3) << name;
    // The cached and the batched decode paths too.
    const Tensor one = tok.slice(0, 0, 1).contiguous();
    EXPECT_LE(rot_diff(cached_logits(rot, one, 5), test::logits_of(ref, one)), 1e-4) << name;
    NoGradGuard ng;
    KVCache c1 = rot.make_cache(4, KVCacheType::F32), c2 = rot.make_cache(4, KVCacheType::F32);
    const Tensor lb = rot.forward_batch(Tensor::from_vector(std::vector<int32_t>{3, 9}, {2}), {&c1, &c2}).value();
    const Tensor lr = ref.forward(Tensor::from_vector(std::vector<int32_t>{3, 9}, {2, 1})).value();
    EXPECT_LE(rot_diff(lb, lr), 1e-4) << name;
  }
}

TEST(Rotation, Stories260KKeepsItsOutputs) {
  LOWBIT_REQUIRE_SHARED(path, "models/stories260K/stories260K.bin");
  Checkpoint ck = load_llama2c(path);
  LlamaModel ref(ck.config, ck.weights);
  LlamaConfig rc = ck.config;
  LlamaWeights rw = ck.weights;
  const ModelTransforms t = rotate_weights(rc, rw, 1234);
  LlamaModel rot(rc, rw);
  rot.set_transforms(t);
  const Tensor tok = tokens_of(1, 64, ck.config.vocab_size, 3);
  const Tensor a = test::logits_of(ref, tok), b = test::logits_of(rot, tok);
  EXPECT_LE(rot_diff(a, b), 1e-4) << "logits up to " << max_abs(a);
  // hidden_dim 172 = 4 x 43: the online rotation before down_proj is H_4 (x) a 43 x 43 matrix.
  EXPECT_EQ(t.ffn.small.size(0), 43);
}

TEST(Rotation, TransformsAreValidated) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaModel m(c, random_weights(c, 1));
  ModelTransforms t;
  t.rotation = "hadamard";
  EXPECT_THROW(m.set_transforms(t), Error);  // online rotations missing
  t.ffn = random_hadamard(c.hidden_dim, 1);
  t.head = random_hadamard(c.resolved_head_dim() * 2, 1);
  EXPECT_THROW(m.set_transforms(t), Error);  // wrong head size
  t.head = random_hadamard(c.resolved_head_dim(), 1);
  EXPECT_NO_THROW(m.set_transforms(t));
  ModelTransforms bad = t;
  bad.ffn.small = t.ffn.small.clone();
  bad.ffn.small.data<float>()[0] += 0.5f;  // no longer orthogonal
  EXPECT_THROW(m.set_transforms(bad), Error);
  bad = t;
  bad.ffn.signs = t.ffn.signs.clone();
  bad.ffn.signs.data<float>()[1] = 0.5f;
  EXPECT_THROW(m.set_transforms(bad), Error);
  bad = t;
  bad.act.bits = 3;
  EXPECT_THROW(m.set_transforms(bad), Error);
  bad = t;
  bad.kv.bits = 4;
  bad.kv.group = 0;
  EXPECT_THROW(m.set_transforms(bad), Error);
  ModelTransforms none;
  none.ffn = t.ffn;  // a rotation for a model that is not rotated
  EXPECT_THROW(m.set_transforms(none), Error);
  EXPECT_EQ(parse_act_quant("int4-asym").bits, 4);
  EXPECT_TRUE(parse_act_quant("int4-asym").asymmetric);
  EXPECT_EQ(act_quant_name(parse_act_quant("int8")), "int8");
  EXPECT_THROW(parse_act_quant("int3"), Error);
  EXPECT_EQ(parse_kv_quant_bits("int2"), 2);
  EXPECT_THROW(parse_kv_quant_bits("q8"), Error);
}

// KIVI fake quantization: the batched forward (every query sees the cache as it would be when
// that query is decoded) equals decoding through the KV cache token by token and in chunks; a
// window longer than the sequence quantizes nothing; quantization changes the logits, 2 bits more
// than 4.
TEST(KvQuant, BatchedForwardEqualsDecoding) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  c.max_seq_len = 64;
  LlamaWeights w = random_weights(c, 21, 0.15);
  for (bool rotated : {false, true}) {
    LlamaConfig rc = c;
    LlamaWeights rw = w;
    ModelTransforms t;
    if (rotated) t = rotate_weights(rc, rw, 3);
    LlamaModel m(rc, rw);
    m.set_transforms(t);
    const Tensor tok = tokens_of(1, 40, c.vocab_size);
    const Tensor fp = test::logits_of(m, tok);
    double prev_err = 0;
    for (int bits : {4, 2}) {
      ModelTransforms q = t;
      q.kv.bits = bits;
      q.kv.group = 8;
      q.kv.window = 5;
      m.set_transforms(q);
      const Tensor batched = test::logits_of(m, tok);
      for (int64_t chunk : {1, 7, 40})
        EXPECT_LE(rot_diff(cached_logits(m, tok, chunk), batched), 1e-4) << "bits " << bits << " chunk " << chunk;
      const double err = rot_diff(batched, fp);
      EXPECT_GT(err, prev_err) << "bits " << bits;
      prev_err = err;
      // Two sequences in one batch: each as if alone.
      const Tensor two = tokens_of(2, 40, c.vocab_size);
      const Tensor both = test::logits_of(m, two);
      const Tensor second = test::logits_of(m, two.slice(0, 1, 2).contiguous());
      EXPECT_LE(rot_diff(both.slice(0, 40, 80).contiguous(), second), 1e-5);
      q.kv.window = 64;  // nothing leaves the window
      m.set_transforms(q);
      EXPECT_LE(rot_diff(test::logits_of(m, tok), fp), 1e-5);
    }
    // The first window + group - 1 positions see no quantized token at all.
    ModelTransforms q = t;
    q.kv.bits = 2;
    q.kv.group = 8;
    q.kv.window = 5;
    m.set_transforms(q);
    const Tensor batched = test::logits_of(m, tok);
    EXPECT_LE(rot_diff(batched.slice(0, 0, 12).contiguous(), fp.slice(0, 0, 12).contiguous()), 1e-5);
    EXPECT_GT(rot_diff(batched.slice(0, 12, 13).contiguous(), fp.slice(0, 12, 13).contiguous()), 1e-6);
    // Window 0 (`--kv-window 0`): only the newest incomplete group stays in full precision, so the
    // quantized keys start at position group - 1; decoding through the cache gives the same.
    q.kv.window = 0;
    m.set_transforms(q);
    const Tensor w0 = test::logits_of(m, tok);
    EXPECT_LE(rot_diff(w0.slice(0, 0, 7).contiguous(), fp.slice(0, 0, 7).contiguous()), 1e-5);
    EXPECT_GT(rot_diff(w0.slice(0, 7, 8).contiguous(), fp.slice(0, 7, 8).contiguous()), 1e-6);
    EXPECT_LE(rot_diff(cached_logits(m, tok, 1), w0), 1e-4);
  }
}

// Activation quantization: per-token fake quantization of every block linear's input. A one-layer
// model checked by hand: the logits equal the block computed with each linear's input quantized by
// fake_quant; int4 moves the logits more than int8; decoding through the cache gives the same.
TEST(ActQuant, QuantizesEveryLinearInputPerToken) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  c.n_layers = 1;
  LlamaModel m(c, random_weights(c, 4, 0.2));
  const int64_t T = 6;
  const Tensor tok = tokens_of(1, T, c.vocab_size);
  const Tensor fp = test::logits_of(m, tok);
  double int8_err = 0;
  for (const char* fmt : {"int8", "int4-asym", "int4"}) {
    ModelTransforms t;
    t.act = parse_act_quant(fmt);
    m.set_transforms(t);
    const Tensor q = test::logits_of(m, tok);
    const double err = rot_diff(q, fp);
    EXPECT_GT(err, 0) << fmt;
    if (std::string(fmt) == "int8") int8_err = err;
    else EXPECT_GT(err, int8_err) << fmt;
    NoGradGuard ng;
    auto fq = [&](const Var& x) { return fake_quant(x, t.act.bits, t.act.asymmetric, 1.0, x.value().size(1)); };
    const LlamaBlock& b = m.block(0);
    const int64_t H = c.n_heads, KVH = c.n_kv_heads, hd = c.resolved_head_dim();
    Var x = m.embed(tok);
    Var h = fq(rmsnorm(x, b.attn_norm, c.norm_eps));
    Var qv = rope(b.wq->forward(h), 1, T, H, hd, 0, c.rope_theta, c.rope_style);
    Var kv = rope(b.wk->forward(h), 1, T, KVH, hd, 0, c.rope_theta, c.rope_style);
    Var att = attention(qv, kv, b.wv->forward(h), 1, T, T, H, KVH, hd);
    Var x1 = add(x, b.wo->forward(fq(att)));
    Var h2 = fq(rmsnorm(x1, b.ffn_norm, c.norm_eps));
    Var y = add(x1, b.w_down->forward(fq(swiglu(b.w_gate->forward(h2), b.w_up->forward(h2)))));
    EXPECT_LE(rot_diff(m.head(y).value(), q), 1e-5) << fmt;
    EXPECT_LE(rot_diff(cached_logits(m, tok, 1), q), 1e-4) << fmt;
  }
}

// Gradients pass through the online rotation and the activation quantizer (straight through).
TEST(Rotation, RotatedModelTrains) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaConfig rc = c;
  LlamaWeights rw = random_weights(c, 8, 0.1);
  ModelTransforms t = rotate_weights(rc, rw, 2);
  t.act = parse_act_quant("int8");
  LlamaModel m(rc, rw, /*trainable=*/true);
  m.set_transforms(t);
  const Tensor tok = tokens_of(1, 8, c.vocab_size);
  Var loss = cross_entropy(m.forward(tok), Tensor::from_vector(std::vector<int32_t>(8, 1), {8}));
  backward(loss);
  double g = 0;
  for (const Var& p : m.parameters())
    if (p.grad().defined()) g += ops::sum_squares(p.grad());
  EXPECT_GT(g, 0);
}

// Batched decoding (forward_batch, as `lowbit serve` runs it) with every transform on equals
// decoding each sequence alone.
TEST(Rotation, ForwardBatchWithTransformsEqualsSeparateDecodes) {
  LlamaConfig c = test::small_config(RopeStyle::Interleaved);
  LlamaWeights w = random_weights(c, 12, 0.1);
  ModelTransforms t = rotate_weights(c, w, 4);
  t.act = parse_act_quant("int8-asym");
  t.kv.bits = 4;
  t.kv.group = 2;
  t.kv.window = 2;
  LlamaModel m(c, w);
  m.set_transforms(t);
  NoGradGuard ng;
  const std::vector<int> lens = {3, 7};
  std::vector<KVCache> batched, single;
  for (size_t s = 0; s < lens.size(); ++s) {
    std::vector<int32_t> prompt;
    for (int i = 0; i < lens[s]; ++i) prompt.push_back(int32_t((s * 11 + size_t(i) * 5 + 1) % size_t(c.vocab_size)));
    const Tensor p = Tensor::from_vector(prompt, {int64_t(prompt.size())});
    batched.push_back(m.make_cache(16, KVCacheType::F32));
    single.push_back(m.make_cache(16, KVCacheType::F32));
    m.forward_cached(p, batched.back());
    m.forward_cached(p, single.back());
  }
  std::vector<int32_t> next = {4, 9};
  for (int step = 0; step < 5; ++step) {
    const Tensor lb = m.forward_batch(Tensor::from_vector(next, {2}), {&batched[0], &batched[1]}).value().contiguous();
    for (size_t s = 0; s < 2; ++s) {
      const Tensor ls = m.forward_cached(Tensor::from_vector(std::vector<int32_t>{next[s]}, {1}), single[s]).value();
      EXPECT_LE(rot_diff(lb.slice(0, int64_t(s), int64_t(s) + 1).contiguous(), ls), 1e-4) << "step " << step;
      next[s] = int32_t((next[s] * 7 + step + 1) % c.vocab_size);
    }
  }
}

// A rotated model with integer activation quantization on the GPU (the Hadamard transform and the
// quantizers' CUDA bodies): its logits follow the CPU's (the products' summation order differs, which
// may move an activation across a rounding boundary: 1e-3 of the largest logit); FP activation formats
// and KV-cache quantization are refused there by name. Skips without a GPU.
TEST(Rotation, CudaRotatedActQuantModelFollowsTheCpu) {
  if (!init_cuda()) GTEST_SKIP() << "no CUDA device (or a CPU-only build)";
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaWeights w = random_weights(c, 11, 0.1);
  randomize_norms(w, 5);
  ModelTransforms t = rotate_weights(c, w, 7);
  const Tensor tok = tokens_of(2, 12, c.vocab_size);
  LlamaWeights wg = w;
  for_each_weight(wg, [](const std::string&, Tensor& x) { x = x.to(Device::CUDA); });
  for (const char* act : {"none", "int8", "int4-asym", "int4-absmean"}) {
    t.act = parse_act_quant(act);
    LlamaModel cpu(c, w), gpu(c, wg);
    cpu.set_transforms(t);
    gpu.set_transforms(t);
    const Tensor a = test::logits_of(cpu, tok), b = test::logits_of(gpu, tok).to(Device::CPU);
    EXPECT_LE(rot_diff(a, b), 1e-3 * max_abs(a)) << act;
  }
  LlamaModel gpu(c, wg);
  ModelTransforms fp = t;
  fp.act = parse_act_quant("fp8");
  EXPECT_THROW(gpu.set_transforms(fp), Error);
  ModelTransforms kv = t;
  kv.act = parse_act_quant("none");
  kv.kv.bits = 4;
  EXPECT_THROW(gpu.set_transforms(kv), Error);
}
