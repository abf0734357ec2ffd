// Hugging Face tokenizer.json with a BPE model: byte-level BPE (GPT-2, Llama 3, Qwen 2/3) and
// sentencepiece-style BPE with byte fallback (Llama 2, Mistral), following the `tokenizers`
// library's pipeline: added-token split -> normalizer -> pre-tokenizer -> BPE -> post-processor,
// and the decoder chain for ids -> text.
//
// Supported components (anything else is rejected at load time with the component's name):
//   normalizer     Sequence, Prepend, Replace (String pattern), NFC
//   pre_tokenizer  Sequence, Split (Llama 3 / Qwen 2 / GPT-2 regexes, Isolated), ByteLevel,
//                  Metaspace, Digits
//   model          BPE (byte_fallback, fuse_unk, ignore_merges, unk_token; no subword
//                  prefix/suffix; dropout ignored)
//   post_processor TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence
//   decoder        Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace
#pragma once
#include <memory>
#include <string>
#include <string_view>

#include "lowbit/tokenizer/tokenizer.h"

namespace lowbit {

class HfTokenizer final : public Tokenizer {
 public:
  // Reads `path` and, when present, tokenizer_config.json in the same directory (for the
  // bos_token / eos_token names).
  explicit HfTokenizer(const std::string& path);
  // From JSON text; `name` is used in error messages; `config_json` may be empty.
  static std::unique_ptr<HfTokenizer> from_json(std::string_view tokenizer_json,
                                                const std::string& name,
                                                std::string_view config_json = {});
  ~HfTokenizer() override;

  int vocab_size() const override;  // 1 + the largest id of the vocabulary and added tokens
  // Added tokens (special or not) are split out of the text first, as `tokenizers` does;
  // add_special applies the file's post-processor (e.g. Llama 2's TemplateProcessing adds <s>;
  // a ByteLevel post-processor adds nothing).
  std::vector<int> encode(std::string_view text, bool add_special) const override;
  std::vector<int> encode_long(std::string_view text, const std::function<void(size_t)>& progress) const override;
  // The file's decoder chain; special added tokens are skipped, invalid UTF-8 becomes U+FFFD.
  std::string decode(const std::vector<int>& ids) const override;
  // Raw bytes of one token for streaming (no U+FFFD substitution, so multi-byte characters can
  // be reassembled by the caller); special tokens give "". When the decoder strips the space
  // of a sentencepiece dummy prefix (Strip / Metaspace), that space is dropped after BOS.
  std::string decode_piece(int prev, int id) const override;
  int bos_id() const override;
  int eos_id() const override;
  std::string kind() const override;  // "hf-bpe" (byte-level) or "hf-bpe-sp"

  int token_to_id(std::string_view token) const;  // as written in the file; -1 when absent
  std::string id_to_token(int id) const;          // as written in the file
  std::string token_text(int id) const override;
  bool is_special(int id) const;

 private:
  HfTokenizer();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lowbit
