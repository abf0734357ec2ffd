// The stories260K quantization fixture shared by the method tests: calibration on the first 32
// sampled sequences of ../shared/models/stories260K/sample-tokens.i32, perplexity on the other 32.
#pragma once
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "lowbit/eval/perplexity.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/pipeline.h"

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
  std::string model_path;
  std::vector<int32_t> calib_stream, eval_stream;
  int64_t calib_windows = 32, calib_len = 256;  // calibration windows drawn by quantize()
};

}  // namespace lowbit::test
