#include <cmath>
#include <cstring>

#include "common/test_util.h"
#include "io_test_util.h"
#include "lowbit/io/gguf.h"
#include "lowbit/io/hf.h"
#include "lowbit/io/llama2c.h"

using namespace lowbit;
using namespace lowbit::test;

namespace {

// Builds raw GGUF bytes field by field (no validation), for malformed files.
struct Raw {
  std::vector<uint8_t> b;
  uint32_t version = 3;
  template <class T>
  Raw& pod(T v) {
    const size_t at = b.size();
    b.resize(at + sizeof(T));
    std::memcpy(b.data() + at, &v, sizeof(T));
    return *this;
  }
  Raw& count(uint64_t n) { return version == 1 ? pod(uint32_t(n)) : pod(n); }
  Raw& str(const std::string& s) {
    count(s.size());
    const size_t at = b.size();
    b.resize(at + s.size());
    if (!s.empty()) std::memcpy(b.data() + at, s.data(), s.size());
    return *this;
  }
  Raw& header(uint64_t n_tensors, uint64_t n_kv) {
    b = {'G', 'G', 'U', 'F'};
    pod(version);
    count(n_tensors);
    return count(n_kv);
  }
  Raw& tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type, uint64_t offset) {
    str(name);
    pod(uint32_t(ne.size()));
    for (auto d : ne) version == 1 ? pod(uint32_t(d)) : pod(d);
    pod(type);
    return pod(offset);
  }
  Raw& pad(size_t align = 32) {
    b.resize((b.size() + align - 1) / align * align);
    return *this;
  }
  Raw& zeros(size_t n) {
    b.resize(b.size() + n);
    return *this;
  }
};

std::string open_error(const std::vector<uint8_t>& bytes, bool as_model = false) {
  auto dir = temp_dir("gguf-bad");
  const std::string p = (dir / "bad.gguf").string();
  write_bytes(p, bytes);
  std::string msg;
  try {
    if (as_model) {
      load_gguf(p);
    } else {
      auto f = GgufFile::open(p);
      for (const auto& t : f.tensors()) f.load_f32(t.name);
    }
  } catch (const Error& e) {
    msg = e.what();
  }
  std::filesystem::remove_all(dir);
  return msg;
}

std::vector<uint8_t> small_model_file() {
  auto dir = temp_dir("gguf-small");
  const std::string p = (dir / "m.gguf").string();
  LlamaConfig c = tiny_config(false);
  TokenizerVocab v;
  v.model = "llama";
  for (int i = 0; i < c.vocab_size; ++i) v.tokens.push_back(std::to_string(i).insert(0, 1, 't'));
  v.scores.assign(size_t(c.vocab_size), -1.0f);
  v.token_types.assign(size_t(c.vocab_size), 1);
  v.bos_id = 1;
  v.eos_id = 2;
  GgufSaveOptions so;
  so.name = "tiny";
  so.vocab = &v;
  save_gguf(p, c, random_weights(c, 21), so);
  auto b = read_bytes(p);
  std::filesystem::remove_all(dir);
  return b;
}

}  // namespace

TEST(Gguf, TypeTable) {
  EXPECT_STREQ(ggml_type_traits(12)->name, "Q4_K");
  EXPECT_EQ(ggml_type_traits(12)->type_size, 144);
  EXPECT_EQ(ggml_type_traits(8)->block_size, 32);
  EXPECT_EQ(ggml_type_traits(30)->dtype, DType::BF16);
  EXPECT_EQ(ggml_type_traits(4), nullptr);  // removed Q4_2
  EXPECT_EQ(ggml_type_for(DType::F16).id, 1u);
}

TEST(Gguf, MetadataOfEveryTypeRoundTrips) {
  GgufValue nested;
  nested.type = GgufType::ARRAY;
  nested.elem_type = GgufType::ARRAY;
  nested.array = {GgufValue::i32_array({1, 2}), GgufValue::i32_array({}), GgufValue::i32_array({-3})};
  GgufValue u8v, i8v, u16v, i16v, u64v, i64v, f64v;
  u8v.type = GgufType::U8, u8v.u = 255;
  i8v.type = GgufType::I8, i8v.i = -128;
  u16v.type = GgufType::U16, u16v.u = 65535;
  i16v.type = GgufType::I16, i16v.i = -32768;
  u64v.type = GgufType::U64, u64v.u = ~0ull;
  i64v.type = GgufType::I64, i64v.i = INT64_MIN;
  f64v.type = GgufType::F64, f64v.f = 0.1;
  GgufMetadata kv = {{"a.u8", u8v}, {"a.i8", i8v}, {"a.u16", u16v}, {"a.i16", i16v},
                     {"a.u32", GgufValue::u32(4000000000u)}, {"a.i32", GgufValue::i32(-5)},
                     {"a.f32", GgufValue::f32(1.5f)}, {"a.bool", GgufValue::boolean(true)},
                     {"a.str", GgufValue::string("héllo ▁world")}, {"a.u64", u64v}, {"a.i64", i64v}, {"a.f64", f64v},
                     {"a.strs", GgufValue::string_array({"x", "", "yz"})}, {"a.f32s", GgufValue::f32_array({0.5f, -2})},
                     {"a.nested", nested}};
  auto dir = temp_dir("gguf-kv");
  const std::string p = (dir / "kv.gguf").string();
  Tensor t1 = Tensor::randn({3, 5}, 2), t2 = Tensor::randn({7}, 3).to(DType::F16), t3 = Tensor::randn({2, 3, 4}, 4).to(DType::BF16);
  write_gguf(p, kv, {{"w", t1}, {"h", t2}, {"b", t3}}, 64);
  auto f = GgufFile::open(p);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 64u);
  EXPECT_EQ(f.data_offset() % 64, 0u);
  EXPECT_EQ(f.find("a.u8")->u, 255u);
  EXPECT_EQ(f.find("a.i8")->i, -128);
  EXPECT_EQ(f.find("a.u16")->u, 65535u);
  EXPECT_EQ(f.find("a.i16")->i, -32768);
  EXPECT_EQ(f.find("a.u32")->as_int("x"), 4000000000ll);
  EXPECT_EQ(f.find("a.i32")->as_int("x"), -5);
  EXPECT_EQ(f.find("a.f32")->as_float("x"), 1.5);
  EXPECT_EQ(f.find("a.bool")->u, 1u);
  EXPECT_EQ(f.find("a.str")->as_string("x"), "héllo ▁world");
  EXPECT_EQ(f.find("a.u64")->u, ~0ull);
  EXPECT_THROW(f.find("a.u64")->as_int("x"), Error);
  EXPECT_EQ(f.find("a.i64")->i, INT64_MIN);
  EXPECT_EQ(f.find("a.f64")->f, 0.1);
  EXPECT_EQ(f.find("a.strs")->as_string_array("x"), (std::vector<std::string>{"x", "", "yz"}));
  EXPECT_EQ(f.find("a.f32s")->as_float_array("x"), (std::vector<float>{0.5f, -2}));
  const GgufValue* n = f.find("a.nested");
  ASSERT_EQ(n->array.size(), 3u);
  EXPECT_EQ(n->array[0].as_int32_array("x"), (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(n->array[2].as_int32_array("x"), (std::vector<int32_t>{-3}));
  EXPECT_THROW(f.find("a.str")->as_int("x"), Error);
  ASSERT_EQ(f.tensors().size(), 3u);
  EXPECT_EQ(f.find_tensor("w")->ne, (std::vector<int64_t>{5, 3}));  // innermost first
  EXPECT_TRUE(bit_identical(f.load_f32("w"), t1));
  EXPECT_TRUE(bit_identical(f.load_f32("h"), t2.to(DType::F32)));
  EXPECT_TRUE(bit_identical(f.load_f32("b"), t3.to(DType::F32)));
  for (const auto& t : f.tensors()) EXPECT_EQ(t.offset % 64, 0u);
  std::filesystem::remove_all(dir);
}

TEST(Gguf, LoadsVersion1Stories260KIdenticalToBin) {
  LOWBIT_REQUIRE_SHARED(gguf, "models/stories260K/stories260K-gguf-v1-f32.gguf");
  LOWBIT_REQUIRE_SHARED(bin, "models/stories260K/stories260K.bin");
  auto f = GgufFile::open(gguf);
  EXPECT_EQ(f.version(), 1u);
  Checkpoint g = load_gguf(gguf), b = load_llama2c(bin);
  expect_same_config(b.config, g.config);  // output.weight == token_embd.weight: loaded as tied
  EXPECT_EQ(g.config.rope_style, RopeStyle::Interleaved);
  expect_same_weights(b.weights, g.weights);
  ASSERT_EQ(g.vocab.tokens.size(), 512u);
  EXPECT_EQ(g.vocab.model, "llama");
  EXPECT_EQ(g.vocab.tokens[1], "<s>");
  EXPECT_EQ(g.vocab.tokens[3], "<0x00>");
  EXPECT_EQ(g.vocab.token_types[0], 2);
  EXPECT_EQ(g.vocab.bos_id, 1);
  EXPECT_EQ(g.vocab.eos_id, 2);
  EXPECT_EQ(g.vocab.scores.size(), 512u);
}

TEST(Gguf, RoundTripLlama2cToHfToGgufToLlama2c) {
  LOWBIT_REQUIRE_SHARED(bin, "models/stories260K/stories260K.bin");
  Checkpoint a = load_llama2c(bin);
  auto dir = temp_dir("gguf-chain");
  save_hf_dir((dir / "hf").string(), a.config, a.weights);
  Checkpoint h = load_hf_dir((dir / "hf").string());
  save_gguf((dir / "m.gguf").string(), h.config, h.weights);
  Checkpoint g = load_gguf((dir / "m.gguf").string());
  EXPECT_EQ(g.config.rope_style, RopeStyle::Interleaved);
  expect_same_weights(a.weights, g.weights);  // llama GGUF holds the Meta layout again
  save_llama2c((dir / "back.bin").string(), g.config, g.weights);
  Checkpoint z = load_llama2c((dir / "back.bin").string());
  expect_same_config(a.config, z.config);
  expect_same_weights(a.weights, z.weights);
  std::filesystem::remove_all(dir);
}

TEST(Gguf, QwenArchitecturesAndDtypes) {
  for (std::string arch : {"qwen2", "qwen3"}) {
    LlamaConfig c = tiny_config(false);
    c.arch = arch;
    c.attn_bias = arch == "qwen2";
    c.qk_norm = arch == "qwen3";
    c.rope_style = RopeStyle::Half;
    c.rope_theta = 1e6f;
    c.norm_eps = 1e-6f;
    if (arch == "qwen3") c.head_dim = 8;  // != dim / n_heads, as in real Qwen3 models
    LlamaWeights w = random_weights(c, 5);
    auto dir = temp_dir("gguf-" + arch);
    const std::string p = (dir / "m.gguf").string();
    save_gguf(p, c, w);
    Checkpoint g = load_gguf(p);
    expect_same_config(c, g.config);
    EXPECT_EQ(g.config.rope_style, RopeStyle::Half);
    expect_same_weights(w, g.weights);
    GgufSaveOptions f16;
    f16.dtype = DType::F16;
    save_gguf(p, c, w, f16);
    auto f = GgufFile::open(p);
    EXPECT_EQ(f.find_tensor("blk.0.attn_q.weight")->ggml_type, 1u);
    EXPECT_EQ(f.find_tensor("blk.0.attn_norm.weight")->ggml_type, 0u);  // 1-D stays f32
    g = load_gguf(p);
    EXPECT_TRUE(allclose(g.weights.layers[1].wq, w.layers[1].wq, 1e-4, 1e-3));
    std::filesystem::remove_all(dir);
  }
}

TEST(Gguf, EmbeddedVocabularyIsWritten) {
  auto b = small_model_file();
  auto dir = temp_dir("gguf-vocab");
  const std::string p = (dir / "m.gguf").string();
  write_bytes(p, b);
  auto f = GgufFile::open(p);
  EXPECT_EQ(f.find("general.architecture")->as_string("x"), "llama");
  EXPECT_EQ(f.find("general.name")->as_string("x"), "tiny");
  EXPECT_EQ(f.find("llama.attention.head_count_kv")->as_int("x"), 2);
  TokenizerVocab v = gguf_tokenizer_vocab(f);
  EXPECT_EQ(v.tokens.size(), 32u);
  EXPECT_EQ(v.tokens[5], "t5");
  Checkpoint ck = load_gguf(p);
  EXPECT_FALSE(ck.config.tied_embeddings);
  std::filesystem::remove_all(dir);
}

TEST(Gguf, MalformedFilesAreErrors) {
  // Bad magic, versions.
  EXPECT_NE(open_error({'G', 'G', 'U', 'X', 3, 0, 0, 0}).find("not a GGUF file"), std::string::npos);
  EXPECT_NE(open_error({}).find("not a GGUF file"), std::string::npos);
  Raw r;
  r.version = 4;
  EXPECT_NE(open_error(r.header(0, 0).b).find("unsupported GGUF version 4"), std::string::npos);
  r.version = 0x03000000;
  EXPECT_NE(open_error(r.header(0, 0).b).find("big-endian"), std::string::npos);
  // Absurd counts.
  r = Raw();
  EXPECT_NE(open_error(r.header(~0ull >> 1, 0).b).find("tensors, more than the file"), std::string::npos);
  r = Raw();
  EXPECT_NE(open_error(r.header(0, 1ull << 60).b).find("metadata entries"), std::string::npos);
  // String length larger than the file.
  r = Raw();
  r.header(0, 1).pod(uint64_t(1) << 40).zeros(64);
  EXPECT_NE(open_error(r.b).find("string length"), std::string::npos);
  // Non-UTF-8 key and value.
  r = Raw();
  r.header(0, 1).str("k\xc3\x28").pod(uint32_t(8)).str("v");
  EXPECT_NE(open_error(r.b).find("not valid UTF-8"), std::string::npos);
  r = Raw();
  r.header(0, 1).str("k").pod(uint32_t(8)).str("\xed\xa0\x80");  // UTF-16 surrogate
  EXPECT_NE(open_error(r.b).find("not valid UTF-8"), std::string::npos);
  // Unknown value type, huge array, deep nesting, duplicate key.
  r = Raw();
  r.header(0, 1).str("k").pod(uint32_t(13));
  EXPECT_NE(open_error(r.b).find("unknown metadata value type 13"), std::string::npos);
  r = Raw();
  r.header(0, 1).str("k").pod(uint32_t(9)).pod(uint32_t(10)).pod(uint64_t(1) << 61);
  EXPECT_NE(open_error(r.b).find("cannot fit"), std::string::npos);
  r = Raw();
  r.header(0, 1).str("k").pod(uint32_t(9));
  for (int i = 0; i < 100; ++i) r.pod(uint32_t(9)).pod(uint64_t(1));
  EXPECT_NE(open_error(r.b).find("nested deeper"), std::string::npos) << open_error(r.b);
  r = Raw();
  r.header(0, 2).str("k").pod(uint32_t(4)).pod(uint32_t(1)).str("k").pod(uint32_t(4)).pod(uint32_t(1));
  EXPECT_NE(open_error(r.b).find("duplicate key"), std::string::npos);
  // Bad alignment.
  r = Raw();
  r.header(0, 1).str("general.alignment").pod(uint32_t(4)).pod(uint32_t(24));
  EXPECT_NE(open_error(r.b).find("power of two"), std::string::npos);
  // Tensor infos: too many dims, unknown type, bad block multiple, misaligned, past the end,
  // overlapping, quantized type.
  auto one_tensor = [](std::vector<uint64_t> ne, uint32_t type, uint64_t off, size_t data) {
    Raw x;
    x.header(1, 0).tensor("t", ne, type, off).pad().zeros(data);
    return x.b;
  };
  EXPECT_NE(open_error(one_tensor({1, 1, 1, 1, 1}, 0, 0, 4)).find("5 dimensions"), std::string::npos);
  EXPECT_NE(open_error(one_tensor({4}, 99, 0, 16)).find("unknown ggml type id 99"), std::string::npos);
  EXPECT_NE(open_error(one_tensor({33}, 2, 0, 64)).find("block size 32"), std::string::npos);
  EXPECT_NE(open_error(one_tensor({4}, 0, 8, 64)).find("not a multiple of the alignment"), std::string::npos);
  EXPECT_NE(open_error(one_tensor({4}, 0, 0, 8)).find("past the end"), std::string::npos);
  EXPECT_NE(open_error(one_tensor({4}, 0, 1ull << 62, 16)).find("past the end"), std::string::npos);
  EXPECT_NE(open_error(one_tensor({1ull << 40, 1ull << 40}, 0, 0, 16)).find("overflows"), std::string::npos);
  // A quantized type lowbit has no decoder for (IQ2_XXS: 256-value blocks of 66 bytes).
  EXPECT_NE(open_error(one_tensor({256, 2}, 16, 0, 132)).find("IQ2_XXS, which lowbit cannot load yet"), std::string::npos);
  r = Raw();
  r.header(2, 0).tensor("a", {16}, 0, 0).tensor("b", {16}, 0, 32).pad().zeros(96);
  EXPECT_NE(open_error(r.b).find("overlaps"), std::string::npos);
  r = Raw();
  r.header(2, 0).tensor("a", {4}, 0, 0).tensor("a", {4}, 0, 32).pad().zeros(64);
  EXPECT_NE(open_error(r.b).find("duplicate tensor name"), std::string::npos);
  // Model-level problems: no architecture, unsupported one, missing tensors.
  r = Raw();
  r.header(0, 0);
  EXPECT_NE(open_error(r.b, true).find("general.architecture"), std::string::npos);
  r = Raw();
  r.header(0, 1).str("general.architecture").pod(uint32_t(8)).str("gpt2");
  EXPECT_NE(open_error(r.b, true).find("unsupported GGUF architecture 'gpt2'"), std::string::npos);
}

TEST(Gguf, Version1And2Headers) {
  for (uint32_t v : {1u, 2u}) {
    Raw r;
    r.version = v;
    r.header(1, 1).str("k").pod(uint32_t(9)).pod(uint32_t(8)).count(2).str("ab").str("c");
    r.tensor("t", {3}, 0, 0).pad().zeros(12);
    std::memcpy(r.b.data() + r.b.size() - 12, "\0\0\x80?\0\0\0@\0\0@@", 12);  // 1, 2, 3
    auto dir = temp_dir("gguf-v");
    const std::string p = (dir / "v.gguf").string();
    write_bytes(p, r.b);
    auto f = GgufFile::open(p);
    EXPECT_EQ(f.version(), v);
    EXPECT_EQ(f.find("k")->as_string_array("x"), (std::vector<std::string>{"ab", "c"}));
    EXPECT_EQ(f.load_f32("t").to_vector(), (std::vector<float>{1, 2, 3}));
    std::filesystem::remove_all(dir);
  }
}

TEST(Gguf, TruncationsAndByteFlipsNeverCrash) {
  const auto good = small_model_file();
  ASSERT_EQ(open_error(good, true), "");
  Rng rng(9);
  for (int k = 0; k < 150; ++k) {
    std::vector<uint8_t> b(good.begin(), good.begin() + long(rng.below(good.size())));
    EXPECT_NE(open_error(b, true), "") << "truncated to " << b.size();
  }
  // Flips concentrated in the header (where structure lives), some anywhere.
  size_t header_end = GgufFile::open([&] {
    auto dir = temp_dir("gguf-hdr");
    write_bytes((dir / "g.gguf").string(), good);
    return (dir / "g.gguf").string();
  }()).data_offset();
  for (int k = 0; k < 300; ++k) {
    auto b = good;
    int flips = 1 + int(rng.below(3));
    for (int j = 0; j < flips; ++j) b[rng.below(k % 4 ? header_end : b.size())] ^= uint8_t(1 + rng.below(255));
    open_error(b, true);  // any outcome but a crash
  }
}

TEST(Gguf, RefusesRopeScalingAndPartialRotary) {
  LlamaConfig c = tiny_config();
  auto dir = temp_dir("gguf-rope");
  const std::string p = (dir / "m.gguf").string();
  save_gguf(p, c, random_weights(c, 1));
  auto f = GgufFile::open(p);
  GgufMetadata kv = f.metadata();
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& t : f.tensors()) ts.emplace_back(t.name, f.load_f32(t.name));
  auto with = [&](const std::string& key, GgufValue v) {
    GgufMetadata k2 = kv;
    bool found = false;
    for (auto& [name, val] : k2)
      if (name == key) val = v, found = true;
    if (!found) k2.emplace_back(key, v);
    write_gguf(p, k2, ts);
    try {
      load_gguf(p);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(with("llama.rope.scaling.type", GgufValue::string("linear")).find("RoPE scaling 'linear'"), std::string::npos);
  EXPECT_NE(with("llama.rope.dimension_count", GgufValue::u32(2)).find("partial rotary"), std::string::npos);
  EXPECT_NE(with("llama.block_count", GgufValue::string("two")).find("expected an integer"), std::string::npos);
  EXPECT_NE(with("llama.embedding_length", GgufValue::u32(0)).find("dim"), std::string::npos);
  EXPECT_EQ(with("llama.rope.scaling.type", GgufValue::string("none")), "");
  std::filesystem::remove_all(dir);
}
