#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "common/test_util.h"
#include "io_test_util.h"
#include "lowbit/io/hf.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/rope_layout.h"
#include "lowbit/io/safetensors.h"

using namespace lowbit;
using namespace lowbit::test;
using json = nlohmann::json;

namespace {

// A raw safetensors file from a header object and a data buffer (no validation: for bad files).
std::vector<uint8_t> raw_file(const std::string& header, const std::vector<uint8_t>& data) {
  const uint64_t n = header.size();
  std::vector<uint8_t> b(8 + header.size() + data.size());
  std::memcpy(b.data(), &n, 8);
  if (!header.empty()) std::memcpy(b.data() + 8, header.data(), header.size());
  if (!data.empty()) std::memcpy(b.data() + 8 + header.size(), data.data(), data.size());
  return b;
}

std::string open_error(const std::vector<uint8_t>& bytes) {
  auto dir = temp_dir("st-bad");
  const std::string p = (dir / "bad.safetensors").string();
  write_bytes(p, bytes);
  std::string msg;
  try {
    auto f = SafetensorsFile::open(p);
    for (const auto& t : f.tensors())
      if (t.dtype) f.load_f32(t.name);
  } catch (const Error& e) {
    msg = e.what();
  }
  std::filesystem::remove_all(dir);
  return msg;
}

std::vector<uint8_t> small_valid_file() {
  auto dir = temp_dir("st-small");
  const std::string p = (dir / "a.safetensors").string();
  save_safetensors(p,
                   {{"a", Tensor::from_vector(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3})},
                    {"b", Tensor::from_vector(std::vector<float>{7, 8}, {2}).to(DType::BF16)},
                    {"c", Tensor::from_vector(std::vector<int32_t>{9, 10, 11}, {3})}},
                   {{"format", "pt"}});
  auto b = read_bytes(p);
  std::filesystem::remove_all(dir);
  return b;
}

}  // namespace

TEST(Safetensors, WriteReadAllDtypes) {
  auto dir = temp_dir("st-rt");
  const std::string p = (dir / "t.safetensors").string();
  Tensor f = Tensor::randn({3, 5}, 1);
  std::vector<std::pair<std::string, Tensor>> ts = {
      {"f32", f}, {"f16", f.to(DType::F16)}, {"bf16", f.to(DType::BF16)}, {"f64", f.to(DType::F64)},
      {"i8", Tensor::from_vector(std::vector<int32_t>{-1, 2, -3}, {3}).to(DType::I8)},
      {"i32", Tensor::from_vector(std::vector<int32_t>{-100000, 5}, {2})},
      {"empty", Tensor::empty({0, 4})}, {"scalar", Tensor::full({}, 2.5)},
      {"transposed", f.transpose(0, 1)},
  };
  save_safetensors(p, ts, {{"format", "pt"}, {"note", "héllo"}});
  auto bytes = read_bytes(p);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);  // header padded so the data is 8-byte aligned
  auto file = SafetensorsFile::open(p);
  EXPECT_EQ(file.metadata().at("note"), "héllo");
  ASSERT_EQ(file.tensors().size(), ts.size());
  for (const auto& [name, t] : ts) {
    const auto* info = file.find(name);
    ASSERT_NE(info, nullptr) << name;
    Tensor back = file.load(name);
    EXPECT_TRUE(bit_identical(back, t.contiguous())) << name;
  }
  EXPECT_EQ(file.find("bf16")->dtype_name, "BF16");
  EXPECT_TRUE(allclose(file.load_f32("f16"), f, 1e-3, 1e-3));
  EXPECT_EQ(file.load_f32("i32").item(0), -100000);
  EXPECT_THROW(file.load("nope"), Error);
  std::filesystem::remove_all(dir);
}

TEST(Safetensors, WriterRejectsBadInput) {
  auto dir = temp_dir("st-wbad");
  const std::string p = (dir / "t.safetensors").string();
  Tensor t = Tensor::zeros({2});
  EXPECT_THROW(save_safetensors(p, {{"a", t}, {"a", t}}), Error);
  EXPECT_THROW(save_safetensors(p, {{"__metadata__", t}}), Error);
  EXPECT_THROW(save_safetensors(p, {{std::string("bad\xff"), t}}), Error);
  EXPECT_FALSE(std::filesystem::exists(p));
  EXPECT_FALSE(std::filesystem::exists(p + ".tmp"));
  std::filesystem::remove_all(dir);
}

TEST(Safetensors, MalformedHeadersAreErrors) {
  const std::vector<uint8_t> d24(24, 0);
  struct Case {
    std::string header;
    std::vector<uint8_t> data;
    const char* expect;
  } cases[] = {
      {"", {}, "does not start with"},
      {"[1,2]", {}, "does not start with '{'"},
      {"{\"a\":", {}, "not valid JSON"},
      {"{\"a\": 5}", {}, "not a JSON object"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", std::vector<uint8_t>(16), "duplicate"},
      {R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", std::vector<uint8_t>(8), "unknown dtype 'Q4'"},
      {R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", std::vector<uint8_t>(8), "non-negative"},
      {R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", std::vector<uint8_t>(8), "non-negative"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", std::vector<uint8_t>(8), "data_offsets"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", std::vector<uint8_t>(8), "end before begin"},
      {R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::vector<uint8_t>(8), "needs 12"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::vector<uint8_t>(4), "past the end"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[1000000,1000008]}})", std::vector<uint8_t>(8), "past the end"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::vector<uint8_t>(12), "overlaps"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::vector<uint8_t>(8), "overlaps"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::vector<uint8_t>(12), "unused bytes"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::vector<uint8_t>(12), "after the last tensor"},
      {R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})", std::vector<uint8_t>(8), "overflows"},
      {R"({"a":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]}})", std::vector<uint8_t>(4), "dimensions"},
      {R"({"__metadata__":{"a":1}})", {}, "not a string"},
      {"{\"a\xff\":{}}", {}, "not valid JSON"},  // invalid UTF-8
      {R"({"a":{"dtype":"F32","shape":[2]}})", {}, "data_offsets"},
  };
  for (const auto& cs : cases) {
    std::string msg = open_error(raw_file(cs.header, cs.data));
    EXPECT_NE(msg.find(cs.expect), std::string::npos) << "header " << cs.header << " gave: " << msg;
    EXPECT_NE(msg.find("bad.safetensors"), std::string::npos) << msg;
  }
  // Header length past the end of the file, and absurd.
  auto b = small_valid_file();
  uint64_t big = b.size();
  std::memcpy(b.data(), &big, 8);
  EXPECT_NE(open_error(b).find("exceeds the file"), std::string::npos);
  big = ~uint64_t(0);
  std::memcpy(b.data(), &big, 8);
  EXPECT_NE(open_error(b).find("exceeds the file"), std::string::npos);
  // Deeply nested JSON must not overflow the stack.
  EXPECT_NE(open_error(raw_file("{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}", {})), "");
  // Unsupported-but-valid dtypes can be listed; loading them is a clear error.
  auto dir = temp_dir("st-bool");
  const std::string p = (dir / "b.safetensors").string();
  write_bytes(p, raw_file(R"({"m":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})", {1, 0, 1}));
  auto f = SafetensorsFile::open(p);
  EXPECT_FALSE(f.find("m")->dtype.has_value());
  EXPECT_THROW(f.load_f32("m"), Error);
  std::filesystem::remove_all(dir);
}

TEST(Safetensors, TruncationsAndByteFlipsNeverCrash) {
  const auto good = small_valid_file();
  ASSERT_EQ(open_error(good), "");
  Rng rng(5);
  for (int k = 0; k < 150; ++k) {
    std::vector<uint8_t> b(good.begin(), good.begin() + long(rng.below(good.size())));
    EXPECT_NE(open_error(b), "") << "truncated to " << b.size();
  }
  for (int k = 0; k < 300; ++k) {
    auto b = good;
    int flips = 1 + int(rng.below(3));
    for (int j = 0; j < flips; ++j) b[rng.below(b.size())] ^= uint8_t(1 + rng.below(255));
    open_error(b);  // any outcome but a crash
  }
}

// ---- Hugging Face directories ---------------------------------------------------------------

TEST(HfDir, ConfigParsing) {
  json j = {{"architectures", {"Qwen2ForCausalLM"}}, {"hidden_size", 64}, {"intermediate_size", 128},
            {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
            {"vocab_size", 100}, {"max_position_embeddings", 4096}, {"rope_theta", 1000000.0},
            {"rms_norm_eps", 1e-6}, {"tie_word_embeddings", true}, {"bos_token_id", 5},
            {"eos_token_id", {7, 8}}, {"rope_scaling", nullptr}, {"sliding_window", 4096},
            {"use_sliding_window", false}, {"hidden_act", "silu"}};
  LlamaConfig c = config_from_hf_json(j, "config.json");
  EXPECT_EQ(c.arch, "qwen2");
  EXPECT_TRUE(c.attn_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.rope_style, RopeStyle::Half);
  EXPECT_EQ(c.rope_theta, 1e6f);
  EXPECT_EQ(c.norm_eps, 1e-6f);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_EQ(c.bos_id, 5);
  EXPECT_EQ(c.eos_id, 7);
  EXPECT_EQ(c.max_seq_len, 4096);
  EXPECT_EQ(c.resolved_head_dim(), 16);

  json q3 = j;
  q3["architectures"] = {"Qwen3ForCausalLM"};
  q3["head_dim"] = 32;
  c = config_from_hf_json(q3, "config.json");
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.attn_bias);
  EXPECT_EQ(c.resolved_head_dim(), 32);

  auto err = [&](json bad) {
    try {
      config_from_hf_json(bad, "cfg/config.json").validate("cfg/config.json");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  json bad = j;
  bad["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};  // the other three fields are missing
  EXPECT_NE(err(bad).find("rope_scaling llama3 needs a number 'low_freq_factor'"), std::string::npos);
  bad["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 8.0}};
  EXPECT_NE(err(bad).find("rope_scaling type 'yarn' is not supported"), std::string::npos);
  bad["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 4.0}, {"high_freq_factor", 1.0},
                         {"original_max_position_embeddings", 8192}};
  EXPECT_NE(err(bad).find("low_freq_factor < high_freq_factor"), std::string::npos);
  {  // Llama 3.1's values are accepted and written back.
    json l31 = j;
    l31["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                           {"original_max_position_embeddings", 8192}};
    const LlamaConfig c31 = config_from_hf_json(l31, "config.json");
    EXPECT_EQ(c31.rope_scaling.factor, 8.0);
    EXPECT_EQ(c31.rope_scaling.original_max_position, 8192.0);
    const json back = config_to_hf_json(c31, "float32");
    EXPECT_EQ(back.at("rope_scaling").at("rope_type"), "llama3");
    EXPECT_EQ(back.at("rope_scaling").at("high_freq_factor"), 4.0);
    EXPECT_EQ(config_from_hf_json(back, "back").rope_scaling.low_freq_factor, 1.0);
  }
  bad = j;
  bad["architectures"] = {"GPT2LMHeadModel"};
  EXPECT_NE(err(bad).find("GPT2LMHeadModel"), std::string::npos);
  bad = j;
  bad.erase("hidden_size");
  EXPECT_NE(err(bad).find("hidden_size"), std::string::npos);
  bad = j;
  bad["num_attention_heads"] = "four";
  EXPECT_NE(err(bad).find("num_attention_heads"), std::string::npos);
  bad = j;
  bad["num_key_value_heads"] = 3;
  EXPECT_NE(err(bad).find("n_kv_heads"), std::string::npos);
  bad = j;
  bad["hidden_act"] = "gelu";
  EXPECT_NE(err(bad).find("hidden_act"), std::string::npos);
  bad = j;
  bad["architectures"] = {"LlamaForCausalLM"};
  bad["attention_bias"] = true;
  EXPECT_NE(err(bad).find("attention_bias"), std::string::npos);
  bad = j;
  bad["hidden_size"] = 1e12;
  EXPECT_NE(err(bad), "");
}

TEST(HfDir, RoundTripAllArchitectures) {
  for (std::string arch : {"llama", "mistral", "qwen2", "qwen3"}) {
    for (bool tied : {true, false}) {
      LlamaConfig c = tiny_config(tied);
      c.arch = arch;
      c.attn_bias = arch == "qwen2";
      c.qk_norm = arch == "qwen3";
      c.rope_style = RopeStyle::Half;
      c.norm_eps = 1e-6f;
      c.rope_theta = 1e6f;
      LlamaWeights w = random_weights(c, 9);
      auto dir = temp_dir("hf-rt-" + arch);
      save_hf_dir(dir.string(), c, w);
      EXPECT_TRUE(looks_like_hf_dir(dir.string()));
      Checkpoint b = load_hf_dir(dir.string());
      EXPECT_EQ(b.config.arch, arch);
      expect_same_config(c, b.config);
      expect_same_weights(w, b.weights);
      std::filesystem::remove_all(dir);
    }
  }
}

TEST(HfDir, ShardedAndDtypes) {
  LlamaConfig c = tiny_config(false);
  c.rope_style = RopeStyle::Half;
  LlamaWeights w = random_weights(c, 4);
  auto dir = temp_dir("hf-shard");
  save_hf_dir(dir.string(), c, w, {DType::F32, 3000});
  EXPECT_TRUE(std::filesystem::exists(dir / "model.safetensors.index.json"));
  EXPECT_FALSE(std::filesystem::exists(dir / "model.safetensors"));
  Checkpoint b = load_hf_dir(dir.string());
  expect_same_weights(w, b.weights);
  // Re-saving unsharded removes the stale shards and index.
  save_hf_dir(dir.string(), c, w, {DType::BF16});
  EXPECT_FALSE(std::filesystem::exists(dir / "model.safetensors.index.json"));
  int n = 0;
  for (auto& e : std::filesystem::directory_iterator(dir)) n += e.path().extension() == ".safetensors";
  EXPECT_EQ(n, 1);
  b = load_hf_dir(dir.string());
  EXPECT_TRUE(allclose(b.weights.layers[1].w_up, w.layers[1].w_up, 1e-3, 1e-2));
  EXPECT_EQ(SafetensorsFile::open((dir / "model.safetensors").string()).find("lm_head.weight")->dtype_name, "BF16");
  // f16 overflow is refused rather than written as inf.
  w.layers[0].wv.set_item(0, 1e6);
  EXPECT_THROW(save_hf_dir((dir / "f16").string(), c, w, {DType::F16}), Error);
  std::filesystem::remove_all(dir);
}

TEST(HfDir, BrokenDirectories) {
  LlamaConfig c = tiny_config();
  c.rope_style = RopeStyle::Half;
  auto dir = temp_dir("hf-broken");
  EXPECT_THROW(load_hf_dir(dir.string()), Error);  // no config.json
  save_hf_dir(dir.string(), c, random_weights(c, 1));
  // Wrong shape in config.
  auto cfg = json::parse(read_bytes((dir / "config.json").string()));
  auto bad = cfg;
  bad["intermediate_size"] = 25;
  auto s = bad.dump();
  write_bytes((dir / "config.json").string(), std::vector<uint8_t>(s.begin(), s.end()));
  try {
    load_hf_dir(dir.string());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("mlp.gate_proj.weight' has shape [24, 16], the config needs [25, 16]"), std::string::npos) << e.what();
  }
  // Untied config but no lm_head.
  bad = cfg;
  bad["tie_word_embeddings"] = false;
  s = bad.dump();
  write_bytes((dir / "config.json").string(), std::vector<uint8_t>(s.begin(), s.end()));
  EXPECT_THROW(load_hf_dir(dir.string()), Error);
  // Index escaping the directory.
  s = cfg.dump();
  write_bytes((dir / "config.json").string(), std::vector<uint8_t>(s.begin(), s.end()));
  std::string idx = R"({"weight_map": {"model.embed_tokens.weight": "../x.safetensors"}})";
  write_bytes((dir / "model.safetensors.index.json").string(), std::vector<uint8_t>(idx.begin(), idx.end()));
  EXPECT_THROW(load_hf_dir(dir.string()), Error);
  std::filesystem::remove_all(dir);
}

TEST(HfDir, Stories260KThroughHfPermutesQK) {
  LOWBIT_REQUIRE_SHARED(path, "models/stories260K/stories260K.bin");
  Checkpoint a = load_llama2c(path);
  auto dir = temp_dir("hf-stories");
  save_hf_dir((dir / "hf").string(), a.config, a.weights);
  Checkpoint h = load_hf_dir((dir / "hf").string());
  EXPECT_EQ(h.config.rope_style, RopeStyle::Half);
  // q rows are permuted (not equal), v rows are not.
  EXPECT_FALSE(bit_identical(h.weights.layers[0].wq, a.weights.layers[0].wq));
  EXPECT_TRUE(bit_identical(h.weights.layers[0].wv, a.weights.layers[0].wv));
  EXPECT_TRUE(bit_identical(h.weights.layers[0].wq,
                            rope_rows_interleaved_to_half(a.weights.layers[0].wq, 8, 8)));
  // Back to llama2.c: bit-identical to the original.
  save_llama2c((dir / "back.bin").string(), h.config, h.weights);
  Checkpoint b = load_llama2c((dir / "back.bin").string());
  expect_same_weights(a.weights, b.weights);
  std::filesystem::remove_all(dir);
}

// Block-wise streaming's readers and writers (methods/stream.h).
TEST(Safetensors, PreadRangesMatchLoadAndStreamedWriterMatchesSaver) {
  auto dir = temp_dir("st-stream");
  const std::string p = (dir / "t.safetensors").string(), q = (dir / "s.safetensors").string();
  Tensor f = Tensor::randn({7, 300}, 2);
  std::vector<std::pair<std::string, Tensor>> ts = {{"f32", f}, {"f16", f.to(DType::F16)}, {"bf16", f.to(DType::BF16)},
                                                    {"f64", f.to(DType::F64)}, {"empty", Tensor::empty({0, 4})}};
  save_safetensors(p, ts, {{"format", "pt"}});
  auto file = SafetensorsFile::open(p);
  for (const char* name : {"f32", "f16", "bf16", "f64"}) {
    EXPECT_TRUE(bit_identical(file.read_f32(name), file.load_f32(name))) << name;
    std::vector<float> part(450);
    file.read_f32(name, 1000, 450, part.data());
    const Tensor all = file.load_f32(name);
    EXPECT_EQ(std::memcmp(part.data(), all.data<float>() + 1000, 450 * 4), 0) << name;
  }
  EXPECT_EQ(file.read_f32("empty").numel(), 0);
  // Out of range, unknown names: errors naming the file and the tensor.
  std::vector<float> buf(8);
  try {
    file.read_f32("f32", 2100 - 4, 8, buf.data());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'f32': elements [2096, 2104) are outside its 2100"), std::string::npos) << e.what();
  }
  EXPECT_THROW(file.read_f32("f32", -1, 2, buf.data()), Error);
  EXPECT_THROW(file.read_bytes("f16", 4200, 1, buf.data()), Error);
  EXPECT_THROW(file.read_f32("nope"), Error);
  // The streamed writer, fed in odd-sized pieces, writes the same bytes as save_safetensors.
  std::vector<SafetensorsStreamEntry> entries;
  for (const auto& [name, t] : ts) {
    Tensor c = t.contiguous();
    entries.push_back({name, c.dtype(), c.shape(), [c](const std::function<void(const void*, size_t)>& out) {
                         const auto* b = static_cast<const uint8_t*>(c.raw_data());
                         for (size_t at = 0; at < size_t(c.nbytes()); at += 333) out(b + at, std::min<size_t>(333, c.nbytes() - at));
                       }});
  }
  save_safetensors_streamed(q, entries, {{"format", "pt"}});
  EXPECT_EQ(read_bytes(p), read_bytes(q));
  // A source that gives too few or too many bytes is an error, and nothing is left behind.
  const std::string r = (dir / "r.safetensors").string();
  for (size_t n : {size_t(7), size_t(9)}) {
    std::vector<SafetensorsStreamEntry> bad = {{"x", DType::F32, {2}, [n](const std::function<void(const void*, size_t)>& out) {
                                                  const uint8_t z[16] = {};
                                                  out(z, n);
                                                }}};
    EXPECT_THROW(save_safetensors_streamed(r, bad), Error);
    EXPECT_FALSE(std::filesystem::exists(r));
    EXPECT_FALSE(std::filesystem::exists(r + ".tmp"));
  }
  std::filesystem::remove_all(dir);
}

TEST(HfDir, RandomModelIsShardedDeterministicAndStreamable) {
  LlamaConfig c = tiny_config(false);
  c.rope_style = RopeStyle::Half;
  auto dir = temp_dir("hf-random");
  RandomModelOptions o;
  o.seed = 9;
  o.std = 0.5;
  o.max_shard_bytes = 2000;
  const uint64_t bytes = write_random_hf_model((dir / "sharded").string(), c, o);
  EXPECT_TRUE(std::filesystem::exists(dir / "sharded" / "model.safetensors.index.json"));
  o.max_shard_bytes = uint64_t(1) << 40;
  o.dtype = DType::F32;
  EXPECT_EQ(write_random_hf_model((dir / "one").string(), c, o), 2 * bytes);
  EXPECT_TRUE(std::filesystem::exists(dir / "one" / "model.safetensors"));
  const Checkpoint a = load_hf_dir((dir / "sharded").string()), b = load_hf_dir((dir / "one").string());
  EXPECT_EQ(a.config.summary(), c.summary());
  // The same values whatever the sharding (bf16 of the f32 values), norms 1, spread as asked.
  EXPECT_TRUE(allclose(a.weights.layers[1].w_up, b.weights.layers[1].w_up, 1e-2, 1e-2));
  EXPECT_EQ(a.weights.layers[0].attn_norm.item(0), 1.0);
  const Tensor& w = b.weights.layers[0].w_gate;
  double ss = 0;
  for (int64_t i = 0; i < w.numel(); ++i) ss += w.data<float>()[i] * double(w.data<float>()[i]);
  EXPECT_NEAR(std::sqrt(ss / double(w.numel())), 0.5, 0.1);
  // HfTensorSource reads what load_hf_dir loads, layer by layer.
  auto src = HfTensorSource::open((dir / "sharded").string());
  const LayerWeights l = src->read_layer(1);
  EXPECT_TRUE(bit_identical(l.w_down, a.weights.layers[1].w_down));
  EXPECT_TRUE(bit_identical(l.ffn_norm, a.weights.layers[1].ffn_norm));
  EXPECT_THROW(src->read_layer(c.n_layers), Error);
  EXPECT_THROW(src->read_f32("model.layers.0.mlp.up_proj.weight", {1, 2}), Error);
  EXPECT_THROW(src->file_of("nope"), Error);
  EXPECT_THROW(write_random_hf_model((dir / "bad").string(), c, {DType::I32}), Error);
  std::filesystem::remove_all(dir);
}
