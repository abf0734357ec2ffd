// A sentencepiece .model (protobuf), encoded and decoded by libsentencepiece itself.
#pragma once
#include <memory>
#include <string>
#include <string_view>

#include "lowbit/tokenizer/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace lowbit {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::string& path);
  // From the serialized ModelProto in memory; `name` is used in error messages.
  static std::unique_ptr<SentencePieceTokenizer> from_serialized(std::string_view proto,
                                                                 const std::string& name);
  ~SentencePieceTokenizer() override;

  int vocab_size() const override;
  // sentencepiece's own normalization and segmentation; add_special prepends BOS (Llama's
  // add_bos_token; EOS is never added).
  std::vector<int> encode(std::string_view text, bool add_special) const override;
  // sentencepiece Decode(): control tokens (BOS/EOS) vanish, byte pieces are reassembled, the
  // dummy-prefix space is removed.
  std::string decode(const std::vector<int>& ids) const override;
  // The piece with U+2581 -> ' ', "<0xNN>" byte pieces as the raw byte, control tokens as "",
  // and the leading space dropped when prev is BOS (llama2.c semantics).
  std::string decode_piece(int prev, int id) const override;
  int bos_id() const override;
  int eos_id() const override;
  std::string kind() const override { return "sentencepiece"; }

  std::string id_to_piece(int id) const;  // raw sentencepiece piece (with U+2581)
  std::string token_text(int id) const override { return id >= 0 && id < vocab_size() ? id_to_piece(id) : std::string(); }
  float score(int id) const;
  // GGUF tokenizer.ggml.token_type of a piece: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte
  // (libsentencepiece does not expose user-defined pieces; they read as normal).
  int piece_type(int id) const;
  int unk_id() const;
  int pad_id() const;

 private:
  SentencePieceTokenizer() = default;
  void check_id(int id) const;
  std::string name_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

}  // namespace lowbit
