// The stories260K quantization fixture shared by the method tests: calibration on the first 32
// sampled sequences of ../shared/models/stories260K/sample-tokens.i32, perplexity on the other 32.
#pragma once
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "lowbit/eval/perplexity.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/pipeline.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"

namespace lowbit::test {

// A file of raw little-endian int32 ids.
inline std::vector<int32_t> read_i32_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  std::vector<int32_t> v(size_t(f.tellg()) / 4);
  f.seekg(0);
  f.read(reinterpret_cast<char*>(v.data()), std::streamsize(v.size() * 4));
  return v;
}

// The long versions of the accuracy checks (the calibration sizes the methods are tuned for) run
// only with LOWBIT_LONG_TESTS=1 (bench/long_tests.sh); the suite runs the same properties on a
// smaller calibration set so that CI stays fast under the sanitizers.
inline bool long_tests() {
  const char* e = std::getenv("LOWBIT_LONG_TESTS");
  return e && *e && std::string(e) != "0";
}
#define LOWBIT_LONG_TEST()                                                                        \
  if (!::lowbit::test::long_tests())                                                              \
  GTEST_SKIP() << "long accuracy check: run with LOWBIT_LONG_TESTS=1 (bench/long_tests.sh); the " \
                  "suite runs its fast version"

struct StoriesPtq : ::testing::Test {
  static constexpr int64_t kSeq = 257;  // BOS + 256 sampled tokens
  void SetUp() override {
    model_path = shared_file("models/stories260K/stories260K.bin");
    const std::string tokens_path = shared_file("models/stories260K/sample-tokens.i32");
    if (model_path.empty() || tokens_path.empty()) GTEST_SKIP() << "stories260K not found under " << shared_root();
    auto all = read_i32_file(tokens_path);  // 64 sequences of 257 tokens
    calib_stream.assign(all.begin(), all.begin() + 32 * kSeq);
    eval_stream.assign(all.begin() + 32 * kSeq, all.end());
  }
  double ppl(const LlamaModel& m) const {
    PerplexityOptions o;
    o.ctx = kSeq;
    o.batch = 8;
    o.progress = false;
    return evaluate_perplexity(m, eval_stream, o).ppl;
  }
  PipelineReport quantize(LlamaModel& m, BlockMethod& method, const QuantFormat& f, PipelineOptions o = {}) const {
    Tensor calib = sample_calibration(calib_stream, calib_windows, calib_len, 0);
    o.progress = false;
    return run_blockwise(m, calib, method, f, o);
  }
  // Every quantized linear's packed tensor, dequantized, in block order (a linear that is not a
  // QuantLinear fails the test).
  static std::vector<Tensor> packed(const LlamaModel& m) {
    std::vector<Tensor> v;
    for (int i = 0; i < m.n_layers(); ++i)
      for (auto& [name, slot] : const_cast<LlamaModel&>(m).block(i).linears()) {
        auto* ql = dynamic_cast<const QuantLinear*>(slot->get());
        EXPECT_TRUE(ql) << name << " is not a QuantLinear";
        if (ql) v.push_back(ql->quantized().dequantize());
      }
    return v;
  }
  // The checkpoint's model with every block linear rounded to nearest in `f`: the baseline a QAT
  // method must beat.
  static std::unique_ptr<LlamaModel> rtn_model(const Checkpoint& ck, const QuantFormat& f) {
    LlamaWeights w = ck.weights;
    for (auto& l : w.layers)
      for (Tensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) *t = lowbit::quantize(*t, f).dequantize();
    return std::make_unique<LlamaModel>(ck.config, w);
  }
  // The packed weights of two models are bit-identical (the resume-after-stop tests).
  static void expect_same_packed(const LlamaModel& a, const LlamaModel& b) {
    const auto pa = packed(a), pb = packed(b);
    ASSERT_EQ(pa.size(), pb.size());
    for (size_t k = 0; k < pa.size(); ++k)
      for (int64_t i = 0; i < pa[k].numel(); ++i) ASSERT_EQ(pa[k].item(i), pb[k].item(i)) << "layer " << k << " element " << i;
  }
  std::string model_path;
  std::vector<int32_t> calib_stream, eval_stream;
  int64_t calib_windows = 32, calib_len = 256;  // calibration windows drawn by quantize()
};

// Quantizes stories260K with `make(format)` at once, and again killed after two blocks and resumed;
// both must give the same weights and norms (the resume tests of the pipeline methods).
template <class Make>
void expect_resume_identical(const StoriesPtq& t, Make make, const char* fmt) {
  Checkpoint ck = load_llama2c(t.model_path);
  const QuantFormat& f = parse_quant_format(fmt);
  LlamaModel full(ck.config, ck.weights);
  auto m1 = make(f);
  t.quantize(full, *m1, f);
  auto dir = temp_dir("stories-resume");
  PipelineOptions o;
  o.state_dir = dir.string();
  o.stop_after_blocks = 2;
  o.checkpoint_seconds = 1e9;
  {
    LlamaModel part(ck.config, ck.weights);
    auto m2 = make(f);
    EXPECT_FALSE(t.quantize(part, *m2, f, o).complete);
  }
  o.stop_after_blocks = 0;
  LlamaModel resumed(ck.config, ck.weights);
  auto m3 = make(f);
  PipelineReport r = t.quantize(resumed, *m3, f, o);
  EXPECT_EQ(r.resumed_from_block, 2);
  EXPECT_EQ(r.linears.size(), 35u);
  LlamaWeights a = full.weights(), b = resumed.weights();
  for (int i = 0; i < ck.config.n_layers; ++i) {
    EXPECT_EQ(max_abs_diff(a.layers[i].wq, b.layers[i].wq), 0.0) << "layer " << i;
    EXPECT_EQ(max_abs_diff(a.layers[i].wv, b.layers[i].wv), 0.0) << "layer " << i;
    EXPECT_EQ(max_abs_diff(a.layers[i].w_down, b.layers[i].w_down), 0.0) << "layer " << i;
    EXPECT_EQ(max_abs_diff(a.layers[i].attn_norm, b.layers[i].attn_norm), 0.0) << "layer " << i;
    EXPECT_EQ(max_abs_diff(a.layers[i].ffn_norm, b.layers[i].ffn_norm), 0.0) << "layer " << i;
  }
  std::filesystem::remove_all(dir);
}

}  // namespace lowbit::test
