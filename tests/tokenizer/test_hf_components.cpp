// HF pipeline components that the three shared tokenizer files do not all exercise: NFC in
// Qwen3 (every reference line is already NFC), the GPT-2 style ByteLevel pre-tokenizer with
// add_prefix_space, Metaspace pre-tokenizer/decoder, byte fallback and unk handling.
#include <gtest/gtest.h>

#include "common/test_util.h"
#include "lowbit/core/error.h"
#include "lowbit/tokenizer/hf_tokenizer.h"
#include "tokenizer/tokenizer_test_util.h"

namespace lowbit {
namespace {

TEST(HfComponents, Qwen3AppliesNfc) {
  LOWBIT_REQUIRE_SHARED(q3, "tokenizers/qwen3/tokenizer.json");
  LOWBIT_REQUIRE_SHARED(l3, "tokenizers/llama3/tokenizer.json");
  const auto& qwen3 = test::cached_tokenizer(q3);
  // "café" with a combining acute accent is tokenized like the precomposed "café".
  EXPECT_EQ(qwen3.encode("cafe\xCC\x81", false), qwen3.encode("caf\xC3\xA9", false));
  EXPECT_EQ(qwen3.decode(qwen3.encode("cafe\xCC\x81", false)), "caf\xC3\xA9");
  // Llama 3's file has no normalizer: the decomposed form stays decomposed.
  const auto& llama3 = test::cached_tokenizer(l3);
  EXPECT_NE(llama3.encode("cafe\xCC\x81", false), llama3.encode("caf\xC3\xA9", false));
  EXPECT_EQ(llama3.decode(llama3.encode("cafe\xCC\x81", false)), "cafe\xCC\x81");
}

// GPT-2 layout: a single ByteLevel pre-tokenizer that adds a prefix space and splits with the
// GPT-2 regex.
TEST(HfComponents, Gpt2ByteLevel) {
  const std::string j = R"({
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": true, "use_regex": true},
    "decoder": {"type": "ByteLevel"},
    "post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 9], "cls": ["<s>", 8]},
    "added_tokens": [{"id": 8, "content": "<s>", "special": true},
                     {"id": 9, "content": "</s>", "special": true}],
    "model": {"type": "BPE", "vocab": {"Ġ": 0, "a": 1, "b": 2, "Ġa": 3, "Ġab": 4, "'": 5, "s": 6,
                                       "!": 7},
              "merges": ["Ġ a", "Ġa b"]}})";
  auto t = HfTokenizer::from_json(j, "gpt2.json");
  EXPECT_EQ(t->kind(), "hf-bpe");
  // "ab ab's!" -> " ab" " ab" "'s" "!" (prefix space added, contraction split off).
  EXPECT_EQ(t->encode("ab ab's!", false), (std::vector<int>{4, 4, 5, 6, 7}));
  EXPECT_EQ(t->encode("ab", true), (std::vector<int>{8, 4, 9}));
  EXPECT_EQ(t->decode({8, 4, 4, 5, 6, 7, 9}), " ab ab's!");
  EXPECT_EQ(t->bos_id(), 8);
  EXPECT_EQ(t->eos_id(), 9);
}

// Newer sentencepiece-style layout: Metaspace pre-tokenizer (prepend on the first piece only)
// and decoder, byte fallback, unk for characters without byte tokens.
TEST(HfComponents, MetaspaceAndByteFallback) {
  const std::string j = R"({
    "added_tokens": [{"id": 0, "content": "<unk>", "special": true},
                     {"id": 1, "content": "<s>", "special": true}],
    "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                      "split": false},
    "decoder": {"type": "Sequence", "decoders": [{"type": "Metaspace", "replacement": "▁",
                "prepend_scheme": "first", "split": false}, {"type": "ByteFallback"},
                {"type": "Fuse"}]},
    "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": true, "byte_fallback": true,
              "vocab": {"<unk>": 0, "<s>": 1, "▁": 2, "a": 3, "b": 4, "▁a": 5, "<0xC3>": 6,
                        "<0xA9>": 7},
              "merges": ["▁ a"]}})";
  auto t = HfTokenizer::from_json(j, "metaspace.json");
  EXPECT_EQ(t->kind(), "hf-bpe-sp");
  EXPECT_EQ(t->encode("a b", false), (std::vector<int>{5, 2, 4}));
  // é has byte tokens; z and q do not, and fuse_unk makes one <unk> of them.
  EXPECT_EQ(t->encode("a\xC3\xA9zq", false), (std::vector<int>{5, 6, 7, 0}));
  // After an added token the prefix is not prepended again (prepend_scheme "first").
  EXPECT_EQ(t->encode("<s>a", false), (std::vector<int>{1, 3}));
  EXPECT_EQ(t->decode({5, 2, 4}), "a b");
  EXPECT_EQ(t->decode({5, 6, 7}), "a\xC3\xA9");
  EXPECT_EQ(t->decode({5, 6}), "a\xEF\xBF\xBD");  // incomplete UTF-8 -> U+FFFD
  // Streaming: raw bytes, leading space dropped after BOS.
  EXPECT_EQ(t->decode_piece(1, 5), "a");
  EXPECT_EQ(t->decode_piece(3, 5), " a");
  EXPECT_EQ(t->decode_piece(3, 6), "\xC3");
}

TEST(HfComponents, AddedTokenOptions) {
  const std::string j = R"({
    "added_tokens": [{"id": 3, "content": "<m>", "special": false, "lstrip": true, "rstrip": true},
                     {"id": 4, "content": "ab", "special": false, "single_word": true}],
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, " ": 2}, "merges": []}})";
  auto t = HfTokenizer::from_json(j, "added.json");
  // lstrip/rstrip: the token absorbs the spaces around it.
  EXPECT_EQ(t->encode("a  <m>  b", false), (std::vector<int>{0, 3, 1}));
  // single_word: "ab" only matches as a whole word.
  EXPECT_EQ(t->encode("ab", false), (std::vector<int>{4}));
  EXPECT_EQ(t->encode("aab", false), (std::vector<int>{0, 0, 1}));
  EXPECT_EQ(t->encode("a ab b", false), (std::vector<int>{0, 2, 4, 2, 1}));
}

}  // namespace
}  // namespace lowbit
