// The block-wise pipeline with RTN, GPTQ and AWQ on the real stories260K model.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>

#include "common/stories_fixture.h"
#include "lowbit/eval/perplexity.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/quant/quant_linear.h"

using namespace lowbit;

using PtqStories = lowbit::test::StoriesPtq;

namespace {
// GPTQ and AWQ beat RTN in perplexity, and GPTQ in mean per-layer error, at each of `formats`,
// calibrated on the fixture's calib_windows x calib_len windows.
void gptq_and_awq_beat_rtn(const PtqStories& t, std::initializer_list<const char*> formats) {
  const std::string& model_path = t.model_path;
  auto ppl = [&](const LlamaModel& m) { return t.ppl(m); };
  auto quantize = [&](LlamaModel& m, BlockMethod& method, const QuantFormat& f) { return t.quantize(m, method, f); };
  Checkpoint ck = load_llama2c(model_path);
  const double fp = ppl(LlamaModel(ck.config, ck.weights));
  for (const char* fmt : formats) {
    const QuantFormat& f = parse_quant_format(fmt);
    LlamaModel rtn_m(ck.config, ck.weights), gptq_m(ck.config, ck.weights), awq_m(ck.config, ck.weights);
    RtnMethod rtn(f);
    GptqMethod gptq(f, GptqOptions{});
    AwqMethod awq(f, AwqOptions{}, true);
    PipelineReport r1 = quantize(rtn_m, rtn, f), r2 = quantize(gptq_m, gptq, f);
    PipelineReport r3 = quantize(awq_m, awq, f);
    std::printf("seconds: rtn %.2f gptq %.2f awq %.2f\n", r1.seconds, r2.seconds, r3.seconds);
    EXPECT_EQ(r1.linears.size(), 35u);
    const double p_rtn = ppl(rtn_m), p_gptq = ppl(gptq_m), p_awq = ppl(awq_m);
    std::printf("%s: fp %.3f rtn %.3f gptq %.3f awq %.3f  (bpw %.3f)\n", fmt, fp, p_rtn, p_gptq, p_awq, r1.bits_per_weight);
    EXPECT_LT(p_gptq, p_rtn) << fmt;
    EXPECT_LT(p_awq, p_rtn) << fmt;
    EXPECT_GT(p_rtn, fp);
    // GPTQ minimises each layer's output error: on average below RTN's.
    double e1 = 0, e2 = 0;
    for (size_t i = 0; i < r1.linears.size(); ++i) {
      e1 += r1.linears[i].rel_error;
      e2 += r2.linears[i].rel_error;
    }
    EXPECT_LT(e2, e1);
  }
}
}  // namespace

// The suite's version: int3g32 on 8 calibration windows of 128 tokens.
TEST_F(PtqStories, GptqAndAwqBeatRtnAt3Bits) {
  calib_windows = 8;
  calib_len = 128;
  gptq_and_awq_beat_rtn(*this, {"int3g32"});
}

// The full check (int4g32 and int3g32, 32 windows of 256 tokens): LOWBIT_LONG_TESTS=1.
TEST_F(PtqStories, GptqAndAwqBeatRtnAt4And3BitsFull) {
  LOWBIT_LONG_TEST();
  gptq_and_awq_beat_rtn(*this, {"int4g32", "int3g32"});
}

TEST_F(PtqStories, KilledRunResumesToTheSameModel) {
  calib_windows = 4;  // exactness does not depend on the amount of data
  calib_len = 64;
  Checkpoint ck = load_llama2c(model_path);
  const QuantFormat& f = parse_quant_format("int3g32");
  LlamaModel full(ck.config, ck.weights);
  GptqMethod m1(f, GptqOptions{});
  quantize(full, m1, f);
  auto dir = test::temp_dir("pipeline-resume");
  PipelineOptions o;
  o.state_dir = dir.string();
  o.stop_after_blocks = 2;
  o.checkpoint_seconds = 1e9;  // no timed save: the state is still saved before the early stop
  {
    LlamaModel part(ck.config, ck.weights);
    GptqMethod m2(f, GptqOptions{});
    PipelineReport r = quantize(part, m2, f, o);
    EXPECT_FALSE(r.complete);
    EXPECT_EQ(r.checkpoints_saved, 1);
  }
  o.stop_after_blocks = 0;
  o.checkpoint_seconds = 0;  // save after every block but the last (the output follows it)
  LlamaModel resumed(ck.config, ck.weights);
  GptqMethod m3(f, GptqOptions{});
  PipelineReport r = quantize(resumed, m3, f, o);
  EXPECT_EQ(r.resumed_from_block, 2);
  EXPECT_TRUE(r.complete);
  EXPECT_EQ(r.checkpoints_saved, ck.config.n_layers - 2 - 1);
  // The report lists every block's layers, also those done before the restart (kept in the state).
  EXPECT_EQ(r.linears.size(), 35u);
  LlamaWeights a = full.weights(), b = resumed.weights();
  for (int i = 0; i < ck.config.n_layers; ++i) {
    EXPECT_EQ(max_abs_diff(a.layers[i].wq, b.layers[i].wq), 0.0) << "layer " << i;
    EXPECT_EQ(max_abs_diff(a.layers[i].w_down, b.layers[i].w_down), 0.0) << "layer " << i;
  }
  // A state from another run is refused rather than mixed in.
  LlamaModel other(ck.config, ck.weights);
  RtnMethod rtn(f);
  EXPECT_THROW(quantize(other, rtn, f, o), Error);
  // So is one of the same method with other hyper-parameters (they are part of the resume key).
  GptqOptions damp;
  damp.percdamp = 0.05;
  GptqMethod gptq_other(f, damp);
  try {
    quantize(other, gptq_other, f, o);
    ADD_FAILURE() << "a state written with percdamp 0.01 was resumed with percdamp 0.05";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("different run"), std::string::npos) << e.what();
  }
}
