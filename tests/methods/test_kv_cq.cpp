// Coupled Quantization of the KV cache (issue 16; methods/kv_cq.h, ops/coupled_quant.h,
// model/rotation.h KVQuantSpec): k-means on worked examples (nearest-centroid assignment, the
// objective non-increasing, centroids the means of their points, weights), codebooks learned on a
// small model and applied in the attention path (batched forward = decoding through the cache;
// codebooks that hold every key/value exactly change nothing; the window), a checkpoint with CQ
// reloads to identical outputs, and malformed CQ records are refused with the field named.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "common/checkpoint_tamper.h"
#include "common/expect_message.h"
#include "common/small_model.h"
#include "common/test_util.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/kv_cq.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/model/rotation.h"
#include "lowbit/ops/coupled_quant.h"
#include "lowbit/quant/format.h"

using namespace lowbit;
namespace fs = std::filesystem;

using test::cached_logits;
using test::pattern_tokens;

namespace {

// The transforms t with CQ (bits per channel, channels a group) from codebooks learned on `calib`.
ModelTransforms with_cq(LlamaModel& m, ModelTransforms t, int bits, int channels, const Tensor& calib,
                        int64_t group, int64_t window, bool f16 = true) {
  KVCodebookOptions o;
  o.channels = channels;
  o.code_bits = bits * channels;
  o.f16 = f16;
  const KVCodebookReport r = learn_kv_codebooks(m, calib, o);
  t.kv.bits = bits;
  t.kv.cq_channels = channels;
  t.kv.cq_keys = r.keys;
  t.kv.cq_values = r.values;
  t.kv.group = group;
  t.kv.window = window;
  return t;
}

// m quantized by RTN int4g32 through the pipeline, given codebooks of `bits` x `channels` (group 2,
// window 3) learned on 4 x 24 pattern tokens (f16 or f32 centroids), saved as a checkpoint in dir.
void save_rtn_with_cq(LlamaModel& m, const std::filesystem::path& dir, int bits, int channels, bool f16) {
  const QuantFormat& f = parse_quant_format("int4g32");
  const Tensor calib = pattern_tokens(4, 24, m.config().vocab_size, 4);
  RtnMethod rtn(f);
  PipelineOptions po;
  po.progress = false;
  run_blockwise(m, calib, rtn, f, po);
  m.set_transforms(with_cq(m, ModelTransforms{}, bits, channels, calib, 2, 3, f16));
  save_quantized_model(dir.string(), m, "rtn", f);
}

using test::expect_message;
}  // namespace

TEST(KMeans, WorkedExample) {
  // 1-D points {0, 1, 10, 11, 12}, k = 2: the optimum {0.5, 11} with objective 0.25+0.25+1+0+1 = 2.5,
  // reached from any seeding of two distinct clusters.
  const Tensor x = Tensor::from_vector(std::vector<float>{0, 1, 10, 11, 12}, {5, 1});
  const KMeansResult r = kmeans(x, 2);
  std::vector<float> cs = {r.centroids.data<float>()[0], r.centroids.data<float>()[1]};
  std::sort(cs.begin(), cs.end());
  EXPECT_FLOAT_EQ(cs[0], 0.5f);
  EXPECT_FLOAT_EQ(cs[1], 11.0f);
  EXPECT_NEAR(r.objective.back(), 2.5, 1e-9);
  EXPECT_EQ(r.assignment[0], r.assignment[1]);
  EXPECT_EQ(r.assignment[2], r.assignment[4]);
  EXPECT_NE(r.assignment[0], r.assignment[2]);
  // Weighted: one centroid is the weighted mean ((3 * 0 + 1 * 1) / 4).
  const Tensor two = Tensor::from_vector(std::vector<float>{0, 1}, {2, 1});
  const KMeansResult w = kmeans(two, 1, {}, Tensor::from_vector(std::vector<double>{3, 1}, {2}));
  EXPECT_FLOAT_EQ(w.centroids.data<float>()[0], 0.25f);
  EXPECT_NEAR(w.objective.back(), 3 * 0.0625 + 0.5625, 1e-9);
  // More centroids than distinct points: every point is a centroid, the objective is 0.
  const KMeansResult many = kmeans(x, 8);
  EXPECT_EQ(many.objective.back(), 0.0);
  // Bad input names the problem.
  expect_message([&] { kmeans(x, 0); }, "centroids");
  expect_message([&] { kmeans(x, 300); }, "centroids");
  expect_message([&] { kmeans(two, 1, {}, Tensor::from_vector(std::vector<double>{-1, 1}, {2})); }, "weight 0");
}

TEST(KMeans, ObjectiveDecreasesAndAssignmentIsNearest) {
  // 600 points in 4 dimensions around 6 random centres, 16 centroids.
  std::mt19937 rng(7);
  std::normal_distribution<float> n(0.0f, 1.0f);
  const int64_t N = 600, c = 4, k = 16;
  std::vector<float> centres(6 * c), pts(N * c);
  for (float& v : centres) v = 5 * n(rng);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t d = 0; d < c; ++d) pts[size_t(i * c + d)] = centres[size_t((i % 6) * c + d)] + n(rng);
  const Tensor x = Tensor::from_vector(pts, {N, c});
  const KMeansResult r = kmeans(x, k, KMeansOptions{50, 3});
  ASSERT_GE(r.objective.size(), 2u);
  for (size_t i = 1; i < r.objective.size(); ++i) EXPECT_LE(r.objective[i], r.objective[i - 1] * (1 + 1e-9)) << i;
  EXPECT_LT(r.objective.back(), r.objective.front());
  const float* C = r.centroids.data<float>();
  std::vector<double> sum(size_t(k * c), 0.0), cnt(size_t(k), 0.0);
  for (int64_t i = 0; i < N; ++i) {
    // The assignment is the nearest centroid (brute force, f64).
    double best = 1e300;
    int64_t bj = -1;
    for (int64_t j = 0; j < k; ++j) {
      double s = 0;
      for (int64_t d = 0; d < c; ++d) s += (double(pts[size_t(i * c + d)]) - C[j * c + d]) * (double(pts[size_t(i * c + d)]) - C[j * c + d]);
      if (s < best - 1e-9) {
        best = s;
        bj = j;
      }
    }
    EXPECT_EQ(r.assignment[size_t(i)], bj) << "point " << i;
    cnt[size_t(bj)] += 1;
    for (int64_t d = 0; d < c; ++d) sum[size_t(bj * c + d)] += pts[size_t(i * c + d)];
  }
  if (r.iterations < 50) {  // converged: every centroid is the mean of its points
    for (int64_t j = 0; j < k; ++j) {
      if (cnt[size_t(j)] == 0) continue;
      for (int64_t d = 0; d < c; ++d) EXPECT_NEAR(C[j * c + d], sum[size_t(j * c + d)] / cnt[size_t(j)], 1e-4);
    }
  }
  // Deterministic for a seed.
  const KMeansResult again = kmeans(x, k, KMeansOptions{50, 3});
  EXPECT_EQ(max_abs_diff(again.centroids, r.centroids), 0.0);
}

TEST(KvCq, CodebooksInTheAttentionPath) {
  for (bool rotated : {false, true}) {
    LlamaConfig c = test::small_config(RopeStyle::Half);
    LlamaWeights w = random_weights(c, 5, 0.15);
    ModelTransforms t;
    if (rotated) t = rotate_weights(c, w, 2);
    LlamaModel m(c, w);
    m.set_transforms(t);
    const Tensor tok = pattern_tokens(1, 30, c.vocab_size, 1);
    const Tensor fp = test::logits_of(m, tok);
    // Codebooks learned on the evaluated tokens themselves (30 points a group, 256 centroids): every
    // key/value is a centroid, so quantizing them all changes nothing (f32 centroids; f16 ones are
    // the keys/values rounded to f16, a small change).
    {
      ModelTransforms q16 = with_cq(m, t, 1, 8, tok, 1, 0);
      for (const Tensor* cb : {&q16.kv.cq_keys, &q16.kv.cq_values})  // f16 values, stored as such
        EXPECT_EQ(max_abs_diff(cb->to(DType::F16).to(DType::F32), *cb), 0.0);
      m.set_transforms(q16);
      const double d16 = max_abs_diff(test::logits_of(m, tok), fp);
      EXPECT_GT(d16, 0.0) << "rotated " << rotated;
      EXPECT_LE(d16, 2e-2) << "rotated " << rotated;
      m.set_transforms(t);
      ModelTransforms q = with_cq(m, t, 1, 8, tok, 1, 0, false);
      const int64_t G = int64_t(c.n_kv_heads) * c.resolved_head_dim() / 8;
      EXPECT_EQ(q.kv.cq_keys.shape(), (Shape{c.n_layers, G, 256, 8}));
      m.set_transforms(q);
      EXPECT_EQ(kv_quant_name(m.transforms().kv), "cq1");
      EXPECT_LE(max_abs_diff(test::logits_of(m, tok), fp), 1e-4) << "rotated " << rotated;
    }
    // Codebooks from other tokens quantize for real; the batched forward equals decoding through
    // the cache (any chunking); nothing changes inside the window.
    const Tensor calib = pattern_tokens(4, 24, c.vocab_size, 9);
    for (int bits : {2, 1}) {
      ModelTransforms q = with_cq(m, t, bits, bits == 1 ? 8 : 4, calib, 1, 0);
      m.set_transforms(q);
      const Tensor batched = test::logits_of(m, tok);
      for (int64_t chunk : {1, 7, 30}) EXPECT_LE(max_abs_diff(cached_logits(m, tok, chunk), batched), 1e-4) << bits << " " << chunk;
      EXPECT_GT(max_abs_diff(batched, fp), 1e-3) << "bits " << bits;
      // The window: KIVI's rule L(t) with group 4, window 5: positions below 8 read nothing quantized.
      q.kv.group = 4;
      q.kv.window = 5;
      m.set_transforms(q);
      const Tensor win = test::logits_of(m, tok);
      EXPECT_LE(max_abs_diff(win.slice(0, 0, 8).contiguous(), fp.slice(0, 0, 8).contiguous()), 1e-5);
      EXPECT_GT(max_abs_diff(win.slice(0, 8, 9).contiguous(), fp.slice(0, 8, 9).contiguous()), 1e-7);
      EXPECT_LE(max_abs_diff(cached_logits(m, tok, 3), win), 1e-4);
      q.kv.window = 64;  // nothing leaves the window
      m.set_transforms(q);
      EXPECT_LE(max_abs_diff(test::logits_of(m, tok), fp), 1e-5);
    }
    // Learning leaves the model's transforms as they were.
    ModelTransforms q = with_cq(m, t, 2, 4, calib, 32, 128);
    m.set_transforms(q);
    (void)with_cq(m, t, 1, 8, calib, 1, 0);
    EXPECT_EQ(kv_quant_name(m.transforms().kv), "cq2");
  }
}

TEST(KvCq, BadSpecsAreRefused) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaModel m(c, random_weights(c, 5, 0.15));
  const Tensor calib = pattern_tokens(2, 16, c.vocab_size, 2);
  ModelTransforms q = with_cq(m, ModelTransforms{}, 2, 4, calib, 32, 128);
  ModelTransforms bad = q;
  bad.kv.cq_keys = Tensor();
  expect_message([&] { m.set_transforms(bad); }, "keys codebook is missing");
  bad = q;
  bad.kv.cq_values = q.kv.cq_values.slice(2, 0, 128).contiguous();
  expect_message([&] { m.set_transforms(bad); }, "values codebook is f32[2, 8, 128, 4]");
  bad = q;
  bad.kv.cq_channels = 3;
  expect_message([&] { m.set_transforms(bad); }, "do not divide head_dim");
  bad = q;
  bad.kv.cq_keys = q.kv.cq_keys.clone();
  bad.kv.cq_keys.data<float>()[5] = std::numeric_limits<float>::infinity();
  expect_message([&] { m.set_transforms(bad); }, "non-finite");
  expect_message([] { parse_kv_quant_bits("cq3"); }, "'cq3' is not a KV-cache quantization");
  KVCodebookOptions o;
  o.channels = 5;
  expect_message([&] { learn_kv_codebooks(m, calib, o); }, "do not divide head_dim");
}

TEST(KvCq, CheckpointReloadsToIdenticalOutputsAndRefusesBadRecords) {
  auto dir = test::temp_dir("kv-cq-ckpt");
  LlamaConfig c = test::small_config(RopeStyle::Interleaved);
  LlamaModel m(c, random_weights(c, 8, 0.12));
  // f32 centroids: the reload runs another RoPE layout, whose last-place differences must not meet a
  // near-tie between two centroids (f16 centroids: KvCq.F16CodebooksAreStoredInF16).
  save_rtn_with_cq(m, dir, 1, 8, false);
  const Tensor tok = pattern_tokens(1, 28, c.vocab_size, 6);
  const Tensor ref = test::logits_of(m, tok);
  {
    QuantizedCheckpoint q = load_quantized_model(dir.string());
    EXPECT_EQ(kv_quant_name(q.transforms.kv), "cq1");
    EXPECT_EQ(q.transforms.kv.group, 2);
    EXPECT_EQ(q.transforms.kv.window, 3);
    EXPECT_EQ(max_abs_diff(q.transforms.kv.cq_keys, m.transforms().kv.cq_keys), 0.0);
    EXPECT_EQ(max_abs_diff(q.transforms.kv.cq_values, m.transforms().kv.cq_values), 0.0);
    auto packed = make_quantized_model(q);
    // The reloaded model runs the Hugging Face RoPE layout (the original: interleaved): the same
    // function to f32 rounding, the keys grouped in the same channel order.
    EXPECT_LE(max_abs_diff(test::logits_of(*packed, tok), ref), 1e-5);
    EXPECT_LE(max_abs_diff(cached_logits(*packed, tok, 1), cached_logits(m, tok, 1)), 1e-5);
    LlamaModel bare(q.dense.config, q.dense.weights);  // without the codebooks: another function
    EXPECT_GT(max_abs_diff(test::logits_of(bare, tok), ref), 1e-3);
  }
  const std::string cfg = (dir / "config.json").string(), st = (dir / "model.safetensors").string();
  nlohmann::json j;
  {
    std::ifstream in(cfg);
    j = nlohmann::json::parse(in);
  }
  auto expect_error = [&](const std::string& needle) {
    expect_message([&] { load_quantized_model(dir.string()); }, needle);
  };
  test::expect_transform_edits_refused(cfg, j,
                                       {{"kv_quant", "cq3", "'cq3' is not a KV-cache quantization"},
                                        {"kv_cq_channels", 4, "kv_cq_channels 4 does not match kv_quant cq1"},
                                        {"kv_cq_channels", "8", "kv_cq_channels"},
                                        {"kv_quant", "int2", "lowbit.kv_cq.keys is present"},
                                        {"kv_quant", "cq2", "kv_cq_channels 8 does not match kv_quant cq2"}},
                                       expect_error);
  {
    auto bad = j;
    bad["quantization_config"]["transforms"].erase("kv_cq_channels");
    std::ofstream(cfg) << bad.dump();
    expect_error("kv_cq_channels is missing");
  }
  std::ofstream(cfg) << j.dump();
  EXPECT_NO_THROW(load_quantized_model(dir.string()));
  // The codebook tensors: missing, truncated (fewer centroids), wrong type, not finite.
  const test::SafetensorsSnapshot snap(st);
  snap.rewrite("lowbit.kv_cq.keys", nullptr);
  expect_error("lowbit.kv_cq.keys is missing");
  snap.rewrite("lowbit.kv_cq.values", [](const Tensor& t) { return t.slice(2, 0, 100).contiguous(); });
  expect_error("values codebook is f32[2, 4, 100, 8]");
  snap.rewrite("lowbit.kv_cq.keys", [](const Tensor& t) { return t.slice(0, 0, 1).contiguous(); });
  expect_error("keys codebook is f32[1, 4, 256, 8]");
  snap.rewrite("lowbit.kv_cq.keys", [](const Tensor& t) {
    Tensor u = t.clone();
    u.data<float>()[17] = std::numeric_limits<float>::quiet_NaN();
    return u;
  });
  expect_error("non-finite");
  // The file cut short inside the codebooks' bytes: the reader names the file.
  snap.rewrite("", nullptr);
  const auto size = fs::file_size(st);
  fs::resize_file(st, size - 1000);
  expect_error("model.safetensors");
}

// The default codebooks are f16 (the CQ paper's): f16-representable centroids, stored as F16 tensors
// (half the bytes of f32), read back to the same values and the same outputs; a NaN in the f16 tensor
// is refused like one in an f32 tensor.
TEST(KvCq, F16CodebooksAreStoredInF16) {
  auto dir = test::temp_dir("kv-cq-f16");
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaModel m(c, random_weights(c, 8, 0.12));
  save_rtn_with_cq(m, dir, 2, 4, true);
  const std::string st = (dir / "model.safetensors").string();
  {
    const SafetensorsFile file = SafetensorsFile::open(st);
    int n = 0;
    for (const auto& t : file.tensors()) {
      if (t.name.rfind("lowbit.kv_cq.", 0) != 0) continue;
      EXPECT_EQ(t.dtype_name, "F16") << t.name;
      ++n;
    }
    EXPECT_EQ(n, 2);
  }
  const Tensor tok = pattern_tokens(1, 28, c.vocab_size, 6);
  QuantizedCheckpoint q = load_quantized_model(dir.string());
  EXPECT_EQ(max_abs_diff(q.transforms.kv.cq_keys, m.transforms().kv.cq_keys), 0.0);
  EXPECT_EQ(max_abs_diff(q.transforms.kv.cq_values, m.transforms().kv.cq_values), 0.0);
  EXPECT_LE(max_abs_diff(test::logits_of(*make_quantized_model(q), tok), test::logits_of(m, tok)), 1e-5);
  const test::SafetensorsSnapshot snap(st);
  snap.rewrite("lowbit.kv_cq.values", [](const Tensor& t) {
    Tensor u = t.to(DType::F32);
    u.data<float>()[5] = std::numeric_limits<float>::quiet_NaN();
    return u.to(DType::F16);
  });
  expect_message([&] { load_quantized_model(dir.string()); }, "non-finite");
}
