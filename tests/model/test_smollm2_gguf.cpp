// SmolLM2-135M-Instruct from its GGUF (Q4_1 linears, Q8_0 tied embedding): the f32 path
// (load_checkpoint, every block type dequantized exactly) reproduces the transformers reference
// logits and greedy continuation of ../shared/models/smollm2-135m-instruct (README there); the
// packed path (load_gguf_quantized + make_quantized_model, QuantLinear layers holding the raw Q4_1
// blocks) computes the same logits; on a GPU (skipped without one) the f32 weights reproduce the
// reference in f32 and, under bf16 autocast, within the parity suite's bf16 tolerance. Skipped
// without ../shared.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common/test_util.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/io/checkpoint.h"
#include "lowbit/io/gguf.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/model/llama.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/quant/quant_linear.h"

using namespace lowbit;

namespace {

constexpr const char* kDir = "models/smollm2-135m-instruct/";

struct RefLogits {
  std::vector<int32_t> tokens;
  std::vector<float> logits;  // [n, V]
  int64_t V = 0;
};

RefLogits read_ref(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  char magic[8];
  f.read(magic, 8);
  EXPECT_EQ(std::string(magic, 8), "LBREF002");
  int32_t n = 0, V = 0;
  f.read(reinterpret_cast<char*>(&n), 4);
  f.read(reinterpret_cast<char*>(&V), 4);
  RefLogits r;
  r.V = V;
  r.tokens.resize(size_t(n));
  r.logits.resize(size_t(n) * size_t(V));
  f.read(reinterpret_cast<char*>(r.tokens.data()), std::streamsize(4 * size_t(n)));
  f.read(reinterpret_cast<char*>(r.logits.data()), std::streamsize(4 * r.logits.size()));
  EXPECT_TRUE(f.good()) << path << " is truncated";
  return r;
}

Tensor forward(const LlamaModel& m, const std::vector<int32_t>& ids) {
  NoGradGuard ng;
  return m.forward(Tensor::from_vector(ids, {1, int64_t(ids.size())})).value();
}

double max_diff_to_ref(const Tensor& logits, const RefLogits& r) {
  const float* p = logits.data<float>();
  double m = 0;
  for (size_t i = 0; i < r.logits.size(); ++i) m = std::max(m, double(std::fabs(p[i] - r.logits[i])));
  return m;
}

int argmax_row(const Tensor& logits, int64_t row) {
  const int64_t V = logits.size(1);
  const float* p = logits.data<float>() + row * V;
  return int(std::max_element(p, p + V) - p);
}

}  // namespace

TEST(SmolLM2Gguf, F32PathReproducesReferenceLogitsAndGreedyIds) {
  LOWBIT_REQUIRE_SHARED(gguf, std::string(kDir) + "SmolLM2-135M-Instruct.Q4_1.gguf");
  LOWBIT_REQUIRE_SHARED(ref_path, std::string(kDir) + "ref-logits.bin");
  LOWBIT_REQUIRE_SHARED(greedy_path, std::string(kDir) + "ref-greedy-ids.json");
  const Checkpoint ck = load_checkpoint(gguf);
  EXPECT_TRUE(ck.config.tied_embeddings);
  EXPECT_EQ(ck.config.n_layers, 30);
  LlamaModel model(ck.config, ck.weights);

  const RefLogits ref = read_ref(ref_path);
  ASSERT_EQ(ref.V, ck.config.vocab_size);
  const Tensor logits = forward(model, ref.tokens);
  const double err = max_diff_to_ref(logits, ref);
  std::printf("SmolLM2 f32 path: max |logit - transformers| over %zu x %lld = %.3g\n", ref.tokens.size(),
              static_cast<long long>(ref.V), err);
  EXPECT_LE(err, 2e-3);

  // Greedy continuation with the KV cache (no BOS), 64 new tokens.
  std::ifstream jf(greedy_path);
  const nlohmann::json j = nlohmann::json::parse(jf);
  const auto prompt = j.at("prompt_ids").get<std::vector<int32_t>>();
  const auto want = j.at("generated_ids").get<std::vector<int32_t>>();
  ASSERT_EQ(want.size(), 64u);
  NoGradGuard ng;
  KVCache cache = model.make_cache(int64_t(prompt.size() + want.size()));
  Tensor l = model.forward_cached(Tensor::from_vector(prompt, {int64_t(prompt.size())}), cache).value();
  std::vector<int32_t> got;
  int next = argmax_row(l, l.size(0) - 1);
  for (size_t s = 0; s < want.size(); ++s) {
    got.push_back(next);
    if (s + 1 == want.size()) break;
    l = model.forward_cached(Tensor::from_vector(std::vector<int32_t>{next}, {1}), cache).value();
    next = argmax_row(l, 0);
  }
  EXPECT_EQ(got, want);
}

TEST(SmolLM2Gguf, PackedPathKeepsBlocksAndMatchesTheF32Path) {
  LOWBIT_REQUIRE_SHARED(gguf, std::string(kDir) + "SmolLM2-135M-Instruct.Q4_1.gguf");
  LOWBIT_REQUIRE_SHARED(ref_path, std::string(kDir) + "ref-logits.bin");
  const QuantizedCheckpoint q = load_gguf_quantized(gguf);
  EXPECT_EQ(q.quantized.size(), 30u * 7u);  // every linear of every block is Q4_1
  EXPECT_EQ(q.format, QuantFormatId::Q4_1);
  const QuantizedTensor& wq = q.quantized.at("model.layers.0.self_attn.q_proj");
  EXPECT_EQ(wq.codes.nbytes(), size_t(576 * 576 / 32 * 20));  // the raw blocks, nothing else
  EXPECT_FALSE(wq.scales.defined());
  auto model = make_quantized_model(q);
  ASSERT_NE(dynamic_cast<const QuantLinear*>(model->block(0).linears().front().second->get()), nullptr);
  const RefLogits ref = read_ref(ref_path);
  std::vector<int32_t> ids(ref.tokens.begin(), ref.tokens.begin() + 32);
  RefLogits ref32 = ref;
  ref32.logits.resize(32 * size_t(ref.V));
  const double err = max_diff_to_ref(forward(*model, ids), ref32);
  std::printf("SmolLM2 packed path: max |logit - transformers| over 32 positions = %.3g\n", err);
  EXPECT_LE(err, 2e-3);
}

// The GPU: the f32 path (TF32 off, fp32 GEMMs) to the CPU's 2e-3, and bf16 autocast (bf16 tensor
// cores, fp32 accumulation) within twice the parity suite's per-op bf16 tolerance (normalised max
// error max |gpu - ref| / max |ref| <= 2e-2; tests/ops/test_parity.cpp allows 1e-2 for one op, and
// 30 layers compound it: an H100 measured 1.12e-2 on 2026-12-06), plus the same argmax at >= 95 % of
// the positions (124/128 measured).
TEST(SmolLM2Gguf, CudaLogitsMatchTheReference) {
  LOWBIT_REQUIRE_SHARED(gguf, std::string(kDir) + "SmolLM2-135M-Instruct.Q4_1.gguf");
  LOWBIT_REQUIRE_SHARED(ref_path, std::string(kDir) + "ref-logits.bin");
  if (!init_cuda()) GTEST_SKIP() << "no CUDA device (or a CPU-only build)";
  const Checkpoint ck = load_checkpoint(gguf);
  LlamaModel model(ck.config, weights_to(ck.weights, Device::CUDA), false);
  const RefLogits ref = read_ref(ref_path);
  ASSERT_EQ(ref.V, ck.config.vocab_size);
  double ref_max = 0;
  for (float x : ref.logits) ref_max = std::max(ref_max, double(std::fabs(x)));
  for (bool bf16 : {false, true}) {
    Tensor logits;
    {
      AutocastBf16Guard autocast(bf16);
      logits = forward(model, ref.tokens).to(Device::CPU).to(DType::F32).contiguous();
    }
    const double err = max_diff_to_ref(logits, ref);
    int same = 0;
    for (int64_t r = 0; r < int64_t(ref.tokens.size()); ++r) {
      const float* p = ref.logits.data() + r * ref.V;
      same += argmax_row(logits, r) == int(std::max_element(p, p + ref.V) - p);
    }
    std::printf("SmolLM2 CUDA %s: max |logit - transformers| = %.3g (normalised %.3g), argmax equal at %d/%zu\n",
                bf16 ? "bf16 autocast" : "f32", err, err / ref_max, same, ref.tokens.size());
    if (bf16) EXPECT_LE(err / ref_max, 2e-2);
    else EXPECT_LE(err, 2e-3);
    EXPECT_GE(same, int(0.95 * double(ref.tokens.size())));
  }
}
