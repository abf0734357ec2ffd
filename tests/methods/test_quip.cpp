// QuIP's incoherence processing (quant/incoherence.h, `quantize --method quip`, issue 16): the
// per-layer transforms are orthogonal at SmolLM2's sizes, a QuantLinear holding W' computes the
// function of R_out Q(W') R_in^T on its packed path, GPTQ int8 through the transforms keeps a small
// model's function, the transforms round-trip through the quantized checkpoint and the pipeline's
// resumable state, and malformed records are refused.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "common/checkpoint_tamper.h"
#include "common/expect_message.h"
#include "common/small_model.h"
#include "common/stories_fixture.h"
#include "common/test_util.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/io/rope_layout.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/methods/registry.h"
#include "lowbit/model/tensor_parallel.h"
#include "lowbit/ops/ops.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/incoherence.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"

using namespace lowbit;
namespace fs = std::filesystem;

namespace {
Tensor calibration(int V) {
  std::vector<int32_t> stream;
  for (int i = 0; i < 400; ++i) stream.push_back((i * 13 + 5) % V);
  return sample_calibration(stream, 4, 24, 1);
}

double frob(const Tensor& t) {
  const Tensor c = t.contiguous().to(DType::F64);
  double s = 0;
  for (int64_t i = 0; i < c.numel(); ++i) s += c.data<double>()[i] * c.data<double>()[i];
  return std::sqrt(s);
}

// y = x W^T in f64.
Tensor product(const Tensor& x, const Tensor& w) {
  Tensor y = Tensor::zeros({x.size(0), w.size(0)}, DType::F64);
  ops::gemm(x.to(DType::F64), false, w.to(DType::F64), true, y, 1.0, 0.0);
  return y;
}

// A small random model quantized by `method` in `format` (the pipeline on synthetic calibration).
std::unique_ptr<LlamaModel> quantized_small(BlockMethod& method, const char* format, const LlamaWeights& w,
                                            const LlamaConfig& c, const Tensor& calib) {
  auto m = std::make_unique<LlamaModel>(c, w);
  const QuantFormat& f = parse_quant_format(format);
  PipelineOptions o;
  o.progress = false;
  run_blockwise(*m, calib, method, f, o);
  return m;
}
}  // namespace

TEST(Quip, TransformsAreOrthogonalAtSmolLM2Sizes) {
  // SmolLM2-135M: D 576 = 64 x 9, F 1536 = 512 x 3, k/v out 192 = 64 x 3, head 64.
  const std::pair<int64_t, int64_t> shapes[] = {{576, 576}, {1536, 576}, {576, 1536}, {192, 576}, {64, 64}};
  for (const auto& [out, in] : shapes) {
    SCOPED_TRACE(std::to_string(out) + "x" + std::to_string(in));
    const Incoherence t = make_incoherence(out, in, 11);
    ASSERT_TRUE(t.in.defined() && t.out.defined());
    validate_incoherence(t, out, in, true, "test", "layer");
    const Tensor w = Tensor::randn({out, in}, 3, 1.0, DType::F64);
    const Tensor wp = t.weight(w);
    // Orthogonal on both sides (to the f32 rounding of the small factors the checkpoint stores).
    EXPECT_NEAR(frob(wp), frob(w), 1e-6 * frob(w));
    EXPECT_LT(max_abs_diff(t.unweight(wp), w), 1e-5);
    // y = x W^T = ((x R_in) W'^T) R_out^T
    const Tensor x = Tensor::randn({5, in}, 4, 1.0, DType::F64);
    EXPECT_LT(max_abs_diff(t.output(product(t.input(x), wp)), product(x, w)), 1e-4);
    // The transformed weight is spread: max |W'| / rms(W') well below the planted outlier's.
    Tensor spiky = w.clone();
    spiky.data<double>()[7] = 100.0 * std::sqrt(double(in));
    const Tensor sp = t.weight(spiky);
    double mx = 0;
    for (int64_t i = 0; i < sp.numel(); ++i) mx = std::max(mx, std::fabs(sp.data<double>()[i]));
    EXPECT_LT(mx, 0.2 * spiky.data<double>()[7]);
  }
  // H' = R_in^T H R_in against the explicit matrices.
  const int64_t n = 192;
  const Incoherence t = make_incoherence(64, n, 5);
  const Tensor x = Tensor::randn({300, n}, 6, 1.0, DType::F64);
  Tensor h = Tensor::zeros({n, n}, DType::F64);
  ops::gemm(x, true, x, false, h, 1.0, 0.0);
  const Tensor R = t.in.matrix();
  Tensor hr = Tensor::zeros({n, n}, DType::F64), want = Tensor::zeros({n, n}, DType::F64);
  ops::gemm(h, false, R, false, hr, 1.0, 0.0);
  ops::gemm(R, true, hr, false, want, 1.0, 0.0);
  EXPECT_LT(max_abs_diff(t.hessian(h), want), 1e-6 * frob(h));
  // Seeds: per layer and linear, deterministic.
  EXPECT_EQ(incoherence_seed(0, 3, "mlp.up_proj"), incoherence_seed(0, 3, "mlp.up_proj"));
  EXPECT_NE(incoherence_seed(0, 3, "mlp.up_proj"), incoherence_seed(0, 3, "mlp.gate_proj"));
  EXPECT_NE(incoherence_seed(0, 3, "mlp.up_proj"), incoherence_seed(0, 4, "mlp.up_proj"));
  EXPECT_NE(incoherence_seed(0, 3, "mlp.up_proj"), incoherence_seed(1, 3, "mlp.up_proj"));
}

TEST(Quip, QuantLinearRunsThePackedProductBetweenTheTransforms) {
  const int64_t out = 96, in = 64;
  const Tensor w = Tensor::randn({out, in}, 8, 0.1);
  for (bool two_sided : {true, false}) {
    SCOPED_TRACE(two_sided ? "both sides" : "input side");
    const Incoherence t = make_incoherence(out, in, 21, two_sided);
    QuantLinear l(quantize(t.weight(w), parse_quant_format("int8g32")));
    l.set_incoherence(t);
    ops::QuantMatmulOptions exact;  // f32 activations (Auto would round 7 rows to int8)
    exact.path = ops::QuantMatmulPath::Exact;
    l.set_matmul_options(exact);
    const Tensor x = Tensor::randn({7, in}, 9, 1.0);
    NoGradGuard ng;
    const Tensor y = l.forward(Var(x, false)).value();
    // The packed path equals the product with the layer's weight in x's basis...
    const Tensor weff = l.effective_weight();
    EXPECT_LT(max_abs_diff(y, product(x, weff).to(DType::F32)), 1e-4);
    // ... which is W to int8 rounding (the transforms are the inverse of each other).
    EXPECT_LT(max_abs_diff(weff, w), 2e-3);
    EXPECT_LT(max_abs_diff(y, product(x, w).to(DType::F32)), 2e-2);
    ops::PackedWeight pw;
    ops::QuantMatmulOptions po;
    EXPECT_FALSE(l.packed_product(Var(x, false), pw, po));  // never fused with the plain products
    test::expect_message([&] { l.shard(ShardAxis::Rows, 0, out / 2, Device::CPU); }, "incoherence");
  }
  QuantLinear l(quantize(w, parse_quant_format("int8g32")));
  test::expect_message([&] { l.set_incoherence(make_incoherence(in, out, 1)); }, "incoherence transform of 96 inputs");
}

TEST(Quip, GptqInt8ThroughTheTransformsKeepsTheFunction) {
  // The transforms alone change nothing: GPTQ int8 (nearly lossless) with incoherence processing
  // leaves the logits as close to the FP model's as plain GPTQ int8; and the quantized model's
  // packed path computes what its dense view (R_out Q(W') R_in^T per layer) computes, to 1e-4.
  LlamaConfig c = test::small_config(RopeStyle::Half);
  const LlamaWeights w = random_weights(c, 3, 0.1);
  const Tensor calib = calibration(c.vocab_size);
  const Tensor tokens = calib.slice(0, 0, 2).contiguous();
  const Tensor fp = test::logits_of(LlamaModel(c, w), tokens);
  GptqMethod gptq(parse_quant_format("int8g32"), GptqOptions{});
  QuipMethod quip(parse_quant_format("int8g32"), GptqOptions{}, QuipOptions{});
  auto mg = quantized_small(gptq, "int8g32", w, c, calib);
  auto mq = quantized_small(quip, "int8g32", w, c, calib);
  const double eg = max_abs_diff(test::logits_of(*mg, tokens), fp), eq = max_abs_diff(test::logits_of(*mq, tokens), fp);
  EXPECT_LT(eq, 3 * eg + 1e-3) << "quip " << eq << ", gptq " << eg;
  LlamaWeights dense = w;
  int transformed = 0;
  for (int i = 0; i < c.n_layers; ++i)
    for (auto& [name, slot] : mq->block(i).linears()) {
      auto* ql = dynamic_cast<const QuantLinear*>(slot->get());
      ASSERT_TRUE(ql);
      transformed += ql->incoherence().defined();
    }
  EXPECT_EQ(transformed, 7 * c.n_layers);
  for (int i = 0; i < c.n_layers; ++i) {
    auto& l = dense.layers[size_t(i)];
    auto lin = mq->block(i).linears();
    Tensor* ts[] = {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down};
    ASSERT_EQ(lin.size(), 7u);
    for (size_t k = 0; k < 7; ++k) *ts[k] = (*lin[k].second)->effective_weight();
  }
  ops::set_quant_matmul_default(ops::QuantMatmulPath::Exact);  // f32 activations on every path
  const Tensor one = tokens.slice(0, 0, 1).contiguous();
  const Tensor ref = test::logits_of(*mq, tokens);
  EXPECT_LT(max_abs_diff(test::logits_of(LlamaModel(c, dense), tokens), ref), 1e-4);
  // Decoding through the KV cache (one row per product) computes the same.
  EXPECT_LT(max_abs_diff(test::cached_logits(*mq, one, 5), test::logits_of(*mq, one).view({-1, c.vocab_size})), 1e-4);
  ops::set_quant_matmul_default(ops::QuantMatmulPath::Auto);
}

TEST(Quip, CheckpointAndStateRoundTrip) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  const LlamaWeights w = random_weights(c, 4, 0.1);
  const Tensor calib = calibration(c.vocab_size);
  const Tensor tokens = calib.slice(0, 0, 1).contiguous();
  for (bool two_sided : {true, false}) {
    SCOPED_TRACE(two_sided ? "both sides" : "input side");
    QuipMethod quip(parse_quant_format("int4g32"), GptqOptions{}, QuipOptions{7, two_sided});
    auto m = quantized_small(quip, "int4g32", w, c, calib);
    auto dir = test::temp_dir("quip-ckpt");
    save_quantized_model(dir.string(), *m, "quip", parse_quant_format("int4g32"));
    QuantizedCheckpoint q = load_quantized_model(dir.string());
    ASSERT_EQ(q.incoherence.size(), size_t(7 * c.n_layers));
    const auto* ql = dynamic_cast<const QuantLinear*>(m->block(1).linears()[6].second->get());
    const Incoherence& loaded = q.incoherence.at("model.layers.1.mlp.down_proj");
    EXPECT_EQ(loaded.seed, ql->incoherence().seed);
    EXPECT_EQ(max_abs_diff(loaded.in.signs, ql->incoherence().in.signs), 0.0);
    EXPECT_EQ(loaded.out.defined(), two_sided);
    auto packed = make_quantized_model(q);
    const Tensor ref = test::logits_of(*m, tokens);
    EXPECT_LT(max_abs_diff(test::logits_of(*packed, tokens), ref), 1e-5);
    // The dense view is the function in x's basis; the codes without the transforms are another one.
    EXPECT_LT(max_abs_diff(test::logits_of(LlamaModel(q.dense.config, q.dense.weights), tokens), ref), 1e-4);
    QuantizedCheckpoint bare = q;
    bare.incoherence.clear();
    EXPECT_GT(max_abs_diff(test::logits_of(*make_quantized_model(bare), tokens), ref), 1e-2);
    test::expect_message([&] { refuse_transforms(q, "a GGUF file"); }, "incoherence");
    // The pipeline's resumable state: stopped after one block and resumed, the same model.
    auto sdir = test::temp_dir("quip-state");
    PipelineOptions o;
    o.progress = false;
    o.state_dir = sdir.string();
    o.stop_after_blocks = 1;
    o.checkpoint_seconds = 1e9;
    const QuantFormat& f = parse_quant_format("int4g32");
    {
      LlamaModel part(c, w);
      QuipMethod q1(f, GptqOptions{}, QuipOptions{7, two_sided});
      EXPECT_FALSE(run_blockwise(part, calib, q1, f, o).complete);
    }
    o.stop_after_blocks = 0;
    LlamaModel resumed(c, w);
    QuipMethod q2(f, GptqOptions{}, QuipOptions{7, two_sided});
    EXPECT_EQ(run_blockwise(resumed, calib, q2, f, o).resumed_from_block, 1);
    EXPECT_LT(max_abs_diff(test::logits_of(resumed, tokens), ref), 1e-5);
    fs::remove_all(sdir);
    fs::remove_all(dir);
  }
}

TEST(Quip, MalformedRecordsAreRefused) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  const LlamaWeights w = random_weights(c, 5, 0.1);
  QuipMethod quip(parse_quant_format("int4g32"), GptqOptions{}, QuipOptions{});
  auto m = quantized_small(quip, "int4g32", w, c, calibration(c.vocab_size));
  auto dir = test::temp_dir("quip-bad");
  save_quantized_model(dir.string(), *m, "quip", parse_quant_format("int4g32"));
  const std::string cfg = (dir / "config.json").string(), st = (dir / "model.safetensors").string();
  nlohmann::json j;
  {
    std::ifstream in(cfg);
    j = nlohmann::json::parse(in);
  }
  auto expect_error = [&](const std::string& needle) {
    test::expect_message([&] { load_quantized_model(dir.string()); }, needle);
  };
  const std::string m0 = "model.layers.0.mlp.gate_proj";  // [96, 64]: R_out has a 3 x 3 factor
  auto edit = [&](const std::function<void(nlohmann::json&)>& change, const std::string& needle) {
    auto bad = j;
    change(bad["quantization_config"]["incoherence"]);
    std::ofstream(cfg) << bad.dump();
    expect_error(needle);
  };
  edit([&](nlohmann::json& i) { i.erase(m0); }, "which quantization_config.incoherence does not list");
  edit([&](nlohmann::json& i) { i[m0]["sides"] = "output"; }, "sides is missing or not 'both' or 'input'");
  edit([&](nlohmann::json& i) { i[m0]["sides"] = "input"; }, "an output transform given for an input-side-only record");
  edit([&](nlohmann::json& i) { i[m0]["seed"] = -1; }, "seed is missing or not a non-negative integer");
  edit([&](nlohmann::json& i) { i[m0] = 3; }, "is not an object");
  edit([&](nlohmann::json& i) { i = "all"; }, "quantization_config.incoherence must be an object");
  edit([&](nlohmann::json& i) { i["model.layers.0.mlp.fc9"] = i[m0]; }, "'model.layers.0.mlp.fc9', which is not a packed linear");
  std::ofstream(cfg) << j.dump();
  EXPECT_NO_THROW(load_quantized_model(dir.string()));
  const test::SafetensorsSnapshot snap(st);
  snap.rewrite(m0 + ".incoherence.in_signs", nullptr);
  expect_error("missing tensor '" + m0 + ".incoherence.in_signs'");
  snap.rewrite(m0 + ".incoherence.out_signs", [](const Tensor& t) { return t.slice(0, 0, t.numel() - 1).contiguous(); });
  expect_error("incoherence of " + m0 + ": output rotation signs");
  snap.rewrite(m0 + ".incoherence.in_signs", [](const Tensor& t) {
    Tensor u = t.clone();
    u.data<float>()[3] = 0.5f;
    return u;
  });
  expect_error("input rotation sign 3 is 0.5, not +-1");
  snap.rewrite(m0 + ".incoherence.out_small", [](const Tensor& t) {
    Tensor u = t.clone();
    u.data<float>()[0] += 0.3f;
    return u;
  });
  expect_error("output rotation matrix is not orthogonal");
  snap.rewrite(m0 + ".incoherence.out_small", nullptr);
  expect_error("output rotation matrix is missing");
  snap.rewrite("", {});
  EXPECT_NO_THROW(load_quantized_model(dir.string()));
  fs::remove_all(dir);
}

TEST(Quip, InterleavedQkRowsAreRefusedOnSaving) {
  LlamaConfig c = test::small_config(RopeStyle::Interleaved);
  QuipMethod quip(parse_quant_format("int4g32"), GptqOptions{}, QuipOptions{});
  auto m = quantized_small(quip, "int4g32", random_weights(c, 6, 0.1), c, calibration(c.vocab_size));
  auto dir = test::temp_dir("quip-interleaved");
  test::expect_message([&] { save_quantized_model(dir.string(), *m, "quip", parse_quant_format("int4g32")); },
                       "interleaved RoPE order");
  fs::remove_all(dir);
}

TEST(Quip, RegistryAndKey) {
  MethodConfig mc;
  mc.format = &parse_quant_format("int2g64");
  mc.quip = QuipOptions{3, false};
  auto m = make_method("quip", mc);
  EXPECT_EQ(m->name(), "quip");
  EXPECT_NE(m->options_key().find("quip_seed=3,quip_sides=input"), std::string::npos);
  EXPECT_TRUE(find_method("quip").needs_calibration);
}

// stories260K, GPTQ int2g32 with and without incoherence processing (both sides, input side): each
// runs, saves and reloads to the same outputs. Only that is asserted (no quality order: on this
// 64-wide model the two-sided transform is worse than plain GPTQ and the input-side one a little
// better, docs/results/quip.md — neither margin is a stable test); the perplexities are printed.
using QuipStories = test::StoriesPtq;
TEST_F(QuipStories, Int2WithAndWithoutIncoherenceRunAndReload) {
  Checkpoint ck = load_llama2c(model_path);
  // llama2.c's q/k rows are in the interleaved RoPE order; QuIP's output transforms mix rows, so the
  // model is put in the Hugging Face order first (what `lowbit quantize --method quip` does).
  ck.weights = weights_with_rope_style(ck.config, ck.weights, RopeStyle::Half);
  ck.config.rope_style = RopeStyle::Half;
  const QuantFormat& f = parse_quant_format("int2g32");
  calib_windows = 8;
  calib_len = 128;
  const Tensor tokens = Tensor::from_vector(std::vector<int32_t>(eval_stream.begin(), eval_stream.begin() + 40), {1, 40});
  for (int inc : {0, 1, 2}) {  // gptq, quip (both sides), quip --quip-sides input
    const char* what = inc == 0 ? "gptq" : inc == 1 ? "quip" : "quip --quip-sides input";
    SCOPED_TRACE(what);
    LlamaModel m(ck.config, ck.weights);
    std::unique_ptr<BlockMethod> method =
        inc ? std::unique_ptr<BlockMethod>(new QuipMethod(f, GptqOptions{}, QuipOptions{0, inc == 1}))
            : std::unique_ptr<BlockMethod>(new GptqMethod(f, GptqOptions{}));
    const PipelineReport r = quantize(m, *method, f);
    for (const auto& l : r.linears) EXPECT_TRUE(std::isfinite(l.rel_error)) << l.name;
    const double p = ppl(m);
    EXPECT_TRUE(std::isfinite(p) && p > 1);
    std::printf("stories260K int2g32 %s: ppl %.3f\n", what, p);
    auto dir = test::temp_dir("quip-stories");
    save_quantized_model(dir.string(), m, method->name(), f);
    auto re = make_quantized_model(load_quantized_model(dir.string(), false));
    EXPECT_LT(max_abs_diff(test::logits_of(*re, tokens), test::logits_of(m, tokens)), 1e-4);
    fs::remove_all(dir);
  }
}
