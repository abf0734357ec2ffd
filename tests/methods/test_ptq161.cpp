// PTQ1.61 (methods/ptq161.h): the structured mask on a worked example, the closed-form binarization
// scale, the salient part against the int4pc codec, the monotone scale optimization, the exact
// storage count, the registry entry, and stories260K end to end (quantize, perplexity, resume after
// a kill, quantized-checkpoint round trip of the packed ptq161 layers, malformed tensors rejected,
// the container of earlier versions still loading).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "common/expect_message.h"
#include "common/stories_fixture.h"
#include "lowbit/io/gguf.h"
#include "lowbit/io/hf_quant_export.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/methods/gptq.h"
#include "lowbit/methods/ptq161.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/methods/registry.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/quant/ptq161_tensor.h"
#include "lowbit/quant/quant_linear.h"

using namespace lowbit;

TEST(Ptq161, MaskPicksTheLargestActivationChannels) {
  const float score[] = {0.1f, 5.0f, 2.0f, 7.0f, 0.5f};
  EXPECT_EQ(ptq161_salient_count(5, 0.4), 2);
  EXPECT_EQ(ptq161_select_channels(score, 5, 0.4), (std::vector<uint8_t>{0, 1, 0, 1, 0}));
  EXPECT_EQ(ptq161_select_channels(score, 5, 0.6), (std::vector<uint8_t>{0, 1, 1, 1, 0}));
  EXPECT_EQ(ptq161_select_channels(score, 5, 0.0), (std::vector<uint8_t>(5, 0)));
  const float tie[] = {3.0f, 3.0f, 1.0f, 3.0f};  // ties: the lower index first
  EXPECT_EQ(ptq161_select_channels(tie, 4, 0.5), (std::vector<uint8_t>{1, 1, 0, 0}));
  // 20 % of 576 (SmolLM2's hidden size) and of 4096.
  EXPECT_EQ(ptq161_salient_count(576, 0.2), 115);
  EXPECT_EQ(ptq161_salient_count(4096, 0.2), 819);
  EXPECT_THROW(ptq161_select_channels(score, 5, 1.5), Error);
}

TEST(Ptq161, BinarizationScaleIsTheClosedForm) {
  // Non-salient {1, -2, 3, 0.5}: mu = 0.625, w - mu = {0.375, -2.625, 2.375, -0.125},
  // alpha = mean |w - mu| = 5.5 / 4 = 1.375 (the L2 optimum for these signs and this mean).
  const float w[] = {1.0f, -2.0f, 3.0f, 0.5f, 4.0f};
  const uint8_t mask[] = {0, 0, 0, 0, 1};
  double alpha = 0, mu = 0;
  int8_t s[5];
  ptq161_binarize_row(w, mask, 5, alpha, mu, s);
  EXPECT_DOUBLE_EQ(mu, 0.625);
  EXPECT_DOUBLE_EQ(alpha, 1.375);
  EXPECT_EQ(std::vector<int8_t>(s, s + 5), (std::vector<int8_t>{1, -1, 1, -1, 0}));
  // d/dalpha sum (w - mu - alpha s)^2 = 0 at the closed form.
  double g = 0;
  for (int j = 0; j < 4; ++j) g += (double(w[j]) - mu - alpha * s[j]) * s[j];
  EXPECT_NEAR(g, 0.0, 1e-12);
}

TEST(Ptq161, SalientColumnsUseTheInt4pcCodecAndTheRestIsBinary) {
  const Tensor w = Tensor::randn({3, 10}, 7, 0.05);
  std::vector<float> score(10, 1.0f);
  score[2] = 9, score[7] = 8;  // ratio 0.2 of 10 columns: channels 2 and 7
  Ptq161Options o;
  Ptq161Layer l = ptq161_init(w, score.data(), o);
  EXPECT_EQ(l.mask, (std::vector<uint8_t>{0, 0, 1, 0, 0, 0, 0, 1, 0, 0}));
  const QuantFormat& f4 = parse_quant_format("int4pc");
  const Tensor d = l.dequantize();
  for (int64_t i = 0; i < 3; ++i) {
    const float a = w.data<float>()[i * 10 + 2], b = w.data<float>()[i * 10 + 7];
    const GroupParams p = f4.codec->params_from_range(f4, std::min(a, b), std::max(a, b), 1.0f);
    EXPECT_EQ(d.data<float>()[i * 10 + 2], f4.codec->decode(f4, f4.codec->encode(f4, a, p), p));
    EXPECT_EQ(d.data<float>()[i * 10 + 7], f4.codec->decode(f4, f4.codec->encode(f4, b, p), p));
    // Non-salient columns take exactly two values per row: mu +- alpha (r = 1 before the fit).
    std::set<float> vals;
    for (int64_t j = 0; j < 10; ++j)
      if (!l.mask[size_t(j)]) vals.insert(d.data<float>()[i * 10 + j]);
    EXPECT_LE(vals.size(), 2u);
  }
}

TEST(Ptq161, ScaleOptimizationNeverIncreasesTheLayerError) {
  const int64_t out = 24, in = 40, n = 300;
  const Tensor w = Tensor::randn({out, in}, 3, 0.05);
  Tensor x = Tensor::randn({n, in}, 4, 1.0);
  for (int64_t t = 0; t < n; ++t) x.data<float>()[t * in + 5] *= 8, x.data<float>()[t * in + 17] *= 4;  // outlier channels
  HessianAccumulator acc(in);
  acc.add(x);
  const std::vector<double> h = ptq161_damped_hessian(acc.hessian(), 0.01);
  std::vector<float> score(size_t(in), 0.0f);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < in; ++j) score[size_t(j)] = std::max(score[size_t(j)], std::fabs(x.data<float>()[t * in + j]));
  Ptq161Layer l = ptq161_init(w, score.data(), Ptq161Options{});
  EXPECT_EQ(l.mask[5], 1);
  EXPECT_EQ(l.mask[17], 1);
  const double e0 = ptq161_layer_error(w, l.dequantize(false), h);
  const std::vector<double> errs = ptq161_optimize(w, h, l, 5);
  ASSERT_EQ(errs.size(), 11u);  // before + 2 steps per sweep
  EXPECT_NEAR(errs[0], e0, 1e-9 * e0);
  for (size_t i = 1; i < errs.size(); ++i) EXPECT_LE(errs[i], errs[i - 1]) << "step " << i;
  const double e1 = ptq161_layer_error(w, l.dequantize(false), h);
  EXPECT_NEAR(e1, errs.back(), 1e-9 * e0);
  EXPECT_LT(e1, 0.95 * e0);
  // A sweep ends with the column step, the exact optimum of r for the row factors: moving any
  // binary column's factor does not help.
  Ptq161Layer p = ptq161_init(w, score.data(), Ptq161Options{});
  ptq161_optimize(w, h, p, 1);
  const double base = ptq161_layer_error(w, p.dequantize(false), h);
  for (int64_t j = 0, tried = 0; j < in && tried < 4; ++j) {
    if (p.mask[size_t(j)]) continue;
    ++tried;
    for (double eps : {-1e-3, 1e-3}) {
      Ptq161Layer r = p;
      r.col[size_t(j)] += eps;
      EXPECT_GE(ptq161_layer_error(w, r.dequantize(false), h), base * (1 - 1e-12)) << "column " << j;
    }
  }
}

TEST(Ptq161, StorageBitsAreExact) {
  // 4096 x 4096 at 20 %: 1 bit x 3277 + 4 bits x 819 per row, 4 f16 per row, per column 1 mask bit
  // and an f16 factor on the 3277 binary columns.
  const int64_t bits = ptq161_storage_bits(4096, 4096, 819);
  EXPECT_EQ(bits, 4096 * 3277 + 4 * 4096 * 819 + 64 * 4096 + 4096 + 16 * 3277);
  EXPECT_NEAR(double(bits) / (4096.0 * 4096.0), 1.6189, 1e-4);
  EXPECT_EQ(ptq161_storage_bits(2, 4, 0), 2 * 4 + 128 + 4 + 64);
}

TEST(Ptq161, RegisteredWithCalibrationAndItsFormat) {
  const MethodInfo& m = find_method("ptq161");
  EXPECT_TRUE(m.needs_calibration);
  EXPECT_FALSE(m.trains_adapters);
  EXPECT_EQ(m.default_format, "ptq161");
  MethodConfig c;
  c.format = &parse_quant_format("ptq161");
  EXPECT_EQ(make_method("ptq161", c)->name(), "ptq161");
  EXPECT_EQ(make_method("rtn", c)->name(), "rtn");  // data-free quantize()
  try {
    make_method("gptq", c);
    ADD_FAILURE() << "gptq accepted ptq161";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("written by --method ptq161"), std::string::npos) << e.what();
  }
  for (const char* other : {"int2g64", "int4pc"}) {
    c.format = &parse_quant_format(other);
    try {
      make_method("ptq161", c);
      ADD_FAILURE() << other << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("use --format ptq161"), std::string::npos) << e.what();
    }
  }
  c.format = &parse_quant_format("ptq161");
  c.ptq161.salient_ratio = 2;
  EXPECT_THROW(make_method("ptq161", c), Error);
}

using Ptq161Stories = test::StoriesPtq;

TEST_F(Ptq161Stories, QuantizesEvaluatesRoundTripsAndResumes) {
  // f32 activations in the evaluations too (--matmul exact): the comparisons below are between the
  // decoded and the packed weights, bit for bit; Auto sends ptq161's prompt-sized products to the
  // Int8 body outside the pipeline (tests/quant/test_quant_matmul.cpp bounds that body).
  struct ExactMatmul {
    ExactMatmul() { ops::set_quant_matmul_default(ops::QuantMatmulPath::Exact); }
    ~ExactMatmul() { ops::set_quant_matmul_default(ops::QuantMatmulPath::Auto); }
  } exact;
  calib_windows = 8;
  calib_len = 128;
  Checkpoint ck = load_llama2c(model_path);
  const QuantFormat& f4 = parse_quant_format("ptq161");
  LlamaModel fp(ck.config, ck.weights), a(ck.config, ck.weights), b(ck.config, ck.weights), c(ck.config, ck.weights);
  Ptq161Method ptq(f4, Ptq161Options{});
  Ptq161Options closed;
  closed.opt_iters = 0;
  Ptq161Method ptq_closed(f4, closed);
  const PipelineReport r1 = quantize(a, ptq, f4), r2 = quantize(b, ptq_closed, f4);
  const QuantFormat& i2 = parse_quant_format("int2g64");
  RtnMethod rtn(i2);
  quantize(c, rtn, i2);
  ASSERT_EQ(r1.linears.size(), 35u);
  double e1 = 0, e2 = 0;
  for (size_t i = 0; i < r1.linears.size(); ++i) e1 += r1.linears[i].rel_error, e2 += r2.linears[i].rel_error;
  const double p_fp = ppl(fp), p_ptq = ppl(a), p_closed = ppl(b), p_rtn = ppl(c);
  std::printf("stories260K: ppl fp %.3f, ptq161 %.3f, closed form %.3f, rtn int2g64 %.3f; mean rel. error %.4g vs "
              "%.4g; %.4f bpw\n", p_fp, p_ptq, p_closed, p_rtn, e1 / 35, e2 / 35, r1.bits_per_weight);
  EXPECT_LT(e1, e2);
  EXPECT_LT(p_ptq, p_rtn);
  // stories260K's 64-wide rows: 4 f16 per row of 64 weights is 1 bit per weight of metadata alone.
  // Stored bytes: mask 8, codes 64 x (7 + 7) (51 binary columns, 13 salient), scales and zeros
  // 64 x 4 each, col_scales 51 x 2.
  EXPECT_EQ(ptq161_salient_count(64, 0.2), 13);
  EXPECT_NEAR(r1.linears[0].bits_per_weight, double(8 + 64 * 7 + 64 * 7 + 64 * 8 + 51 * 2) * 8 / 4096.0, 1e-12);
  for (auto& [name, slot] : a.block(0).linears()) {
    auto* ql = dynamic_cast<const QuantLinear*>(slot->get());
    ASSERT_TRUE(ql) << name;
    EXPECT_EQ(ql->quantized().format, QuantFormatId::PTQ161) << name;
    EXPECT_EQ(max_abs_diff(ql->effective_weight(), ql->quantized().dequantize()), 0.0) << name;
  }

  // Quantized checkpoint: the one QuantizedTensor serialiser (qweight, scales, qzeros, col_mask,
  // col_scales), format ptq161; the packed layers load back bit for bit.
  auto dir = test::temp_dir("ptq161-ckpt");
  save_quantized_model(dir.string(), a, "ptq161", f4);
  nlohmann::json cfg = nlohmann::json::parse(std::ifstream(dir / "config.json"));
  EXPECT_EQ(cfg.at("quantization_config").at("format"), "ptq161");
  EXPECT_FALSE(cfg.at("quantization_config").contains("ptq161_layers"));
  EXPECT_FALSE(cfg.at("quantization_config").contains("layer_formats"));
  QuantizedCheckpoint qc = load_quantized_model(dir.string());
  ASSERT_EQ(qc.quantized.size(), 35u);
  LlamaWeights wa = a.weights();
  for (int i = 0; i < ck.config.n_layers; ++i) {
    EXPECT_EQ(max_abs_diff(wa.layers[i].wv, qc.dense.weights.layers[i].wv), 0.0) << "layer " << i;
    EXPECT_EQ(max_abs_diff(wa.layers[i].w_down, qc.dense.weights.layers[i].w_down), 0.0) << "layer " << i;
  }
  {
    const QuantizedTensor& l0 = qc.quantized.at("model.layers.0.mlp.up_proj");
    EXPECT_EQ(l0.format, QuantFormatId::PTQ161);
    EXPECT_EQ(l0.salient(), 13);
  }
  LlamaModel loaded(qc.dense.config, qc.dense.weights);
  EXPECT_NEAR(ppl(loaded), p_ptq, 1e-5 * p_ptq);
  std::unique_ptr<LlamaModel> packed = make_quantized_model(qc);  // packed layers: quant_matmul
  EXPECT_NEAR(ppl(*packed), p_ptq, 1e-5 * p_ptq);

  // The container of earlier versions (<m>.ptq161_{mask,signs,q4,rows,cols}, format int4pc,
  // ptq161_layers): rewritten from this checkpoint, it loads to the same weights.
  const std::string st = (dir / "model.safetensors").string();
  {
    auto legacy = test::temp_dir("ptq161-legacy");
    std::vector<std::pair<std::string, Tensor>> ts;
    SafetensorsFile f0 = SafetensorsFile::open(st);
    nlohmann::json layers = nlohmann::json::array();
    for (const auto& t : f0.tensors()) {
      const std::string& n = t.name;
      if (!n.ends_with(".qweight")) {
        if (!n.ends_with(".scales") && !n.ends_with(".qzeros") && !n.ends_with(".col_mask") &&
            !n.ends_with(".col_scales"))
          ts.emplace_back(n, f0.load(n).clone());
        continue;
      }
      const std::string m = n.substr(0, n.size() - 8);
      const QuantizedTensor& q = qc.quantized.at(m);
      const int64_t out = q.out_features(), k = q.salient(), sb = (q.in_features() - k + 7) / 8, qb = (k + 1) / 2;
      Tensor signs = Tensor::empty({out, sb}, DType::U8), q4 = Tensor::empty({out, qb}, DType::U8);
      Tensor rows = Tensor::empty({out, 4}, DType::F16);
      for (int64_t i = 0; i < out; ++i) {
        std::memcpy(signs.data<uint8_t>() + i * sb, q.codes.data<uint8_t>() + i * (sb + qb), size_t(sb));
        std::memcpy(q4.data<uint8_t>() + i * qb, q.codes.data<uint8_t>() + i * (sb + qb) + sb, size_t(qb));
        auto* r = static_cast<uint16_t*>(rows.raw_data()) + 4 * i;
        const auto* sc = static_cast<const uint16_t*>(q.scales.raw_data()) + 2 * i;
        const auto* z = static_cast<const uint16_t*>(q.zeros.raw_data()) + 2 * i;
        r[0] = sc[0], r[1] = z[0], r[2] = sc[1], r[3] = z[1];
      }
      ts.emplace_back(m + ".ptq161_mask", q.col_mask);
      ts.emplace_back(m + ".ptq161_signs", signs);
      ts.emplace_back(m + ".ptq161_q4", q4);
      ts.emplace_back(m + ".ptq161_rows", rows);
      ts.emplace_back(m + ".ptq161_cols", q.col_scales);
      layers.push_back(m);
    }
    save_safetensors((legacy / "model.safetensors").string(), ts);
    nlohmann::json lc = cfg;
    lc["quantization_config"]["format"] = "int4pc";
    lc["quantization_config"]["ptq161_layers"] = layers;
    std::ofstream(legacy / "config.json") << lc.dump(2);
    QuantizedCheckpoint old = load_quantized_model(legacy.string());
    ASSERT_EQ(old.quantized.size(), 35u);
    for (const auto& [m, q] : qc.quantized) {
      EXPECT_EQ(old.quantized.at(m).format, QuantFormatId::PTQ161) << m;
      EXPECT_EQ(max_abs_diff(old.quantized.at(m).dequantize(), q.dequantize()), 0.0) << m;
    }
    std::filesystem::remove_all(legacy);
  }

  // GGUF and the GPTQ / AWQ layouts cannot hold the format: refused, naming it.
  for (int layout = 0; layout < 3; ++layout) {
    try {
      if (layout == 0) save_gguf_quantized((dir / "x.gguf").string(), qc, nullptr, "{}");
      else export_hf_quant_layout(dir.string(), (dir / "hf").string(), layout == 1 ? HfQuantLayout::Gptq : HfQuantLayout::Awq);
      ADD_FAILURE() << "export " << layout << " accepted ptq161";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("ptq161"), std::string::npos) << e.what();
    }
  }

  // Malformed ptq161 tensors: the load names the layer and the field.
  std::vector<std::pair<std::string, Tensor>> all;
  {
    SafetensorsFile f0 = SafetensorsFile::open(st);
    for (const auto& t : f0.tensors()) all.emplace_back(t.name, f0.load(t.name).clone());
  }
  auto rewrite_and_expect = [&](const std::string& drop, const std::string& shrink, const std::string& needle) {
    std::vector<std::pair<std::string, Tensor>> ts;
    for (auto& [n, t] : all) {
      if (n == drop) continue;
      ts.emplace_back(n, n == shrink ? t.slice(1, 0, t.size(1) - 1).contiguous() : t);
    }
    save_safetensors(st, ts);
    test::expect_message([&] { load_quantized_model(dir.string()); }, needle);
  };
  rewrite_and_expect("model.layers.1.mlp.up_proj.col_scales", "", "lacks its 'col_scales'");
  rewrite_and_expect("model.layers.1.mlp.up_proj.col_mask", "", "model.layers.1.mlp.up_proj");
  rewrite_and_expect("", "model.layers.0.self_attn.v_proj.qweight", "'codes'");
  rewrite_and_expect("", "model.layers.2.mlp.down_proj.scales", "model.layers.2.mlp.down_proj");
  std::filesystem::remove_all(dir);

  test::expect_resume_identical(*this, [](const QuantFormat& f) { return std::make_unique<Ptq161Method>(f, Ptq161Options{}); },
                                "ptq161");
}

// The block-wise step (AdamW on the scales against the FP block output) is kept only where it lowers
// the block's error; on stories260K it lowers the perplexity, and a killed run resumes identically.
TEST_F(Ptq161Stories, BlockwiseRefinementHelpsAndResumes) {
  calib_windows = 8;
  calib_len = 128;
  Checkpoint ck = load_llama2c(model_path);
  const QuantFormat& f4 = parse_quant_format("ptq161");
  LlamaModel a(ck.config, ck.weights), b(ck.config, ck.weights);
  Ptq161Options blk;
  blk.block_epochs = 2;
  Ptq161Method layerwise(f4, Ptq161Options{}), blockwise(f4, blk);
  quantize(a, layerwise, f4);
  const PipelineReport r = quantize(b, blockwise, f4);
  ASSERT_EQ(r.linears.size(), 35u);
  const double p_layer = ppl(a), p_block = ppl(b);
  std::printf("stories260K ptq161: layer-wise fit %.3f, + block-wise AdamW (2 passes) %.3f\n", p_layer, p_block);
  EXPECT_LT(p_block, p_layer);
  test::expect_resume_identical(*this, [blk](const QuantFormat& f) { return std::make_unique<Ptq161Method>(f, blk); },
                                "ptq161");
}
