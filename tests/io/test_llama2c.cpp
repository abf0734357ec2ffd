#include <cmath>
#include <cstring>

#include "common/test_util.h"
#include "io_test_util.h"
#include "lowbit/io/llama2c.h"

using namespace lowbit;
using namespace lowbit::test;

TEST(Llama2c, LoadsStories260K) {
  LOWBIT_REQUIRE_SHARED(path, "models/stories260K/stories260K.bin");
  Checkpoint ck = load_llama2c(path);
  const auto& c = ck.config;
  EXPECT_EQ(c.dim, 64);
  EXPECT_EQ(c.hidden_dim, 172);
  EXPECT_EQ(c.n_layers, 5);
  EXPECT_EQ(c.n_heads, 8);
  EXPECT_EQ(c.n_kv_heads, 4);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.max_seq_len, 512);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_EQ(c.rope_style, RopeStyle::Interleaved);
  EXPECT_EQ(c.rope_theta, 10000.0f);
  EXPECT_EQ(c.norm_eps, 1e-5f);
  EXPECT_EQ(c.bos_id, 1);
  EXPECT_EQ(c.eos_id, 2);
  EXPECT_EQ(ck.source, path);
  ASSERT_EQ(ck.weights.layers.size(), 5u);
  EXPECT_EQ(ck.weights.layers[0].wk.shape(), (Shape{32, 64}));
  EXPECT_FALSE(ck.weights.output.defined());
  // First embedding value straight from the file bytes (offset 28).
  auto bytes = read_bytes(path);
  float first;
  std::memcpy(&first, bytes.data() + 28, 4);
  EXPECT_EQ(ck.weights.tok_embeddings.data<float>()[0], first);
  // rms_final is the float right before the RoPE table.
  const size_t rope_floats = 512 * 4 * 2;
  float last_norm;
  std::memcpy(&last_norm, bytes.data() + bytes.size() - rope_floats * 4 - 4, 4);
  EXPECT_EQ(ck.weights.final_norm.data<float>()[63], last_norm);
}

TEST(Llama2c, SaveLoadRoundTripIsBitIdentical) {
  LOWBIT_REQUIRE_SHARED(path, "models/stories260K/stories260K.bin");
  Checkpoint a = load_llama2c(path);
  auto dir = temp_dir("llama2c-rt");
  const std::string out = (dir / "copy.bin").string();
  save_llama2c(out, a.config, a.weights);
  EXPECT_FALSE(std::filesystem::exists(out + ".tmp"));
  Checkpoint b = load_llama2c(out);
  expect_same_config(a.config, b.config);
  expect_same_weights(a.weights, b.weights);
  // Everything but the recomputed RoPE table is byte-identical to the original file.
  auto orig = read_bytes(path), copy = read_bytes(out);
  ASSERT_EQ(orig.size(), copy.size());
  const size_t rope_bytes = 512 * 4 * 2 * 4;
  EXPECT_EQ(0, std::memcmp(orig.data(), copy.data(), orig.size() - rope_bytes));
  // The recomputed table matches the exported one to float rounding.
  float max_diff = 0;
  for (size_t off = orig.size() - rope_bytes; off < orig.size(); off += 4) {
    float x, y;
    std::memcpy(&x, orig.data() + off, 4);
    std::memcpy(&y, copy.data() + off, 4);
    max_diff = std::max(max_diff, std::fabs(x - y));
  }
  EXPECT_LT(max_diff, 1e-3f);
  std::filesystem::remove_all(dir);
}

TEST(Llama2c, UntiedRoundTrip) {
  LlamaConfig c = tiny_config(/*tied=*/false);
  LlamaWeights w = random_weights(c, 7);
  auto dir = temp_dir("llama2c-untied");
  const std::string out = (dir / "m.bin").string();
  save_llama2c(out, c, w);
  auto bytes = read_bytes(out);
  int32_t vocab;
  std::memcpy(&vocab, bytes.data() + 20, 4);
  EXPECT_EQ(vocab, -32);  // negative vocab = unshared classifier
  Checkpoint b = load_llama2c(out);
  EXPECT_FALSE(b.config.tied_embeddings);
  expect_same_weights(w, b.weights);
  std::filesystem::remove_all(dir);
}

TEST(Llama2c, HalfRopeWeightsArePermutedBackOnSave) {
  LlamaConfig c = tiny_config();
  LlamaWeights w = random_weights(c, 3);
  LlamaConfig half = c;
  half.rope_style = RopeStyle::Half;
  // Pretend w is in the HF layout: saving must un-permute q/k rows; loading gives Interleaved.
  auto dir = temp_dir("llama2c-half");
  const std::string out = (dir / "m.bin").string();
  save_llama2c(out, half, w);
  Checkpoint b = load_llama2c(out);
  EXPECT_EQ(b.config.rope_style, RopeStyle::Interleaved);
  const int h = c.resolved_head_dim();
  // HF row (head, a*h/2 + i) = Meta row (head, 2i + a).
  for (int head = 0; head < c.n_heads; ++head)
    for (int a = 0; a < 2; ++a)
      for (int i = 0; i < h / 2; ++i)
        for (int col = 0; col < c.dim; ++col)
          ASSERT_EQ(w.layers[1].wq.item((head * h + a * h / 2 + i) * c.dim + col),
                    b.weights.layers[1].wq.item((head * h + 2 * i + a) * c.dim + col));
  expect_same_weights(LlamaWeights{w.tok_embeddings, w.final_norm, w.output, {}},
                      LlamaWeights{b.weights.tok_embeddings, b.weights.final_norm, b.weights.output, {}});
  EXPECT_TRUE(bit_identical(w.layers[0].wv, b.weights.layers[0].wv));
  std::filesystem::remove_all(dir);
}

TEST(Llama2c, SaveRefusesWhatTheFormatCannotHold) {
  auto dir = temp_dir("llama2c-refuse");
  const std::string out = (dir / "m.bin").string();
  LlamaConfig c = tiny_config();
  c.attn_bias = true;
  EXPECT_THROW(save_llama2c(out, c, random_weights(c, 1)), Error);
  c = tiny_config();
  c.rope_theta = 500000.0f;
  EXPECT_THROW(save_llama2c(out, c, random_weights(c, 1)), Error);
  c = tiny_config();
  LlamaWeights w = random_weights(c, 1);
  w.layers[1].w_up.set_item(5, std::nan(""));
  EXPECT_THROW(save_llama2c(out, c, w), Error);
  EXPECT_FALSE(std::filesystem::exists(out));
  EXPECT_FALSE(std::filesystem::exists(out + ".tmp"));
  std::filesystem::remove_all(dir);
}

TEST(Llama2c, FailedSaveLeavesExistingFileIntact) {
  auto dir = temp_dir("llama2c-keep");
  const std::string out = (dir / "m.bin").string();
  write_bytes(out, {1, 2, 3});
  LlamaConfig c = tiny_config();
  LlamaWeights w = random_weights(c, 1);
  w.layers[0].wq = Tensor();  // missing tensor
  EXPECT_THROW(save_llama2c(out, c, w), Error);
  EXPECT_EQ(read_bytes(out), (std::vector<uint8_t>{1, 2, 3}));
  std::filesystem::remove_all(dir);
}

// ---- malformed files -------------------------------------------------------------------------

static std::vector<uint8_t> tiny_file(bool tied = true) {
  auto dir = temp_dir("llama2c-tiny");
  const std::string p = (dir / "t.bin").string();
  LlamaConfig c = tiny_config(tied);
  save_llama2c(p, c, random_weights(c, 11));
  auto b = read_bytes(p);
  std::filesystem::remove_all(dir);
  return b;
}

static void set_header(std::vector<uint8_t>& b, int field, int32_t v) { std::memcpy(b.data() + 4 * field, &v, 4); }

static std::string load_error(const std::vector<uint8_t>& bytes, const std::string& name = "bad.bin") {
  auto dir = temp_dir("llama2c-bad");
  const std::string p = (dir / name).string();
  write_bytes(p, bytes);
  std::string msg;
  try {
    load_llama2c(p);
  } catch (const Error& e) {
    msg = e.what();
  }
  std::filesystem::remove_all(dir);
  return msg;
}

TEST(Llama2c, TruncatedAnywhereIsAnError) {
  const auto good = tiny_file(false);
  ASSERT_EQ(load_error(good), "");
  Rng rng(1);
  for (int k = 0; k < 60; ++k) {
    size_t cut = k < 30 ? size_t(k) : size_t(rng.below(good.size()));
    std::vector<uint8_t> b(good.begin(), good.begin() + long(cut));
    std::string msg = load_error(b);
    EXPECT_NE(msg, "") << "cut at " << cut;
    EXPECT_NE(msg.find("bad.bin"), std::string::npos) << msg;
  }
}

TEST(Llama2c, ErrorMessageStatesSizes) {
  auto good = tiny_file();
  std::vector<uint8_t> b(good.begin(), good.begin() + 1000);
  std::string msg = load_error(b, "stories.bin");
  EXPECT_NE(msg.find("stories.bin: file is 1000 bytes but the llama2.c header (dim=16"), std::string::npos) << msg;
  EXPECT_NE(msg.find("needs exactly " + std::to_string(good.size()) + " bytes"), std::string::npos) << msg;
  b = good;
  b.push_back(0);
  EXPECT_NE(load_error(b).find("trailing data"), std::string::npos);
}

TEST(Llama2c, LyingAndInvalidHeaders) {
  const auto good = tiny_file();
  struct Case {
    int field;
    int32_t value;
    const char* expect;
  } cases[] = {
      {0, 0, "dim"},          {0, -16, "dim"},        {0, 17, ""},                {1, 0, "hidden_dim"},
      {2, -1, "n_layers"},    {3, 0, "n_heads"},      {3, 3, "does not divide dim"}, {4, 0, "n_kv_heads"},
      {4, 3, "n_kv_heads"},   {4, 8, "n_kv_heads"},   {5, 0, "vocab_size"},       {5, INT32_MIN, "vocab_size"},
      {6, 0, "max_seq_len"},  {6, -5, "max_seq_len"}, {0, INT32_MAX, "dim"},      {2, INT32_MAX, "n_layers"},
      {1, 1 << 19, "needs exactly"}, {5, 1 << 24, "needs exactly"}, {6, 1 << 24, "needs exactly"},
      {5, -32, "needs exactly"},  // claims an untied classifier that is not there
  };
  for (const auto& cs : cases) {
    auto b = good;
    set_header(b, cs.field, cs.value);
    std::string msg = load_error(b);
    EXPECT_NE(msg, "") << "field " << cs.field << " = " << cs.value;
    EXPECT_NE(msg.find(cs.expect), std::string::npos) << msg;
  }
}

TEST(Llama2c, NonFiniteWeightsAreRejected) {
  auto b = tiny_file();
  const float nan = std::nanf(""), inf = INFINITY;
  std::memcpy(b.data() + 28 + 4 * 100, &nan, 4);
  EXPECT_NE(load_error(b).find("non-finite"), std::string::npos);
  b = tiny_file();
  std::memcpy(b.data() + b.size() - 8 * 2 * 2 * 4 - 4, &inf, 4);  // last rms_final value (RoPE table: seq 8 x h/2 2 x 2)
  EXPECT_NE(load_error(b).find("model.norm.weight"), std::string::npos);
}

TEST(Llama2c, RandomByteFlipsNeverCrash) {
  const auto good = tiny_file(false);
  Rng rng(42);
  int errors = 0;
  for (int k = 0; k < 200; ++k) {
    auto b = good;
    int flips = 1 + int(rng.below(4));
    for (int j = 0; j < flips; ++j) {
      // Bias half of the flips into the header, where they matter most.
      size_t at = (k % 2) ? rng.below(28) : rng.below(b.size());
      b[at] ^= uint8_t(1 + rng.below(255));
    }
    if (!load_error(b).empty()) ++errors;
  }
  EXPECT_GT(errors, 0);
}

TEST(Llama2c, MissingFileAndDirectory) {
  EXPECT_THROW(load_llama2c("/nonexistent/x.bin"), Error);
  auto dir = temp_dir("llama2c-dir");
  EXPECT_THROW(load_llama2c(dir.string()), Error);
  std::filesystem::remove_all(dir);
}
