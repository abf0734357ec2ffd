// llama2.c's tokenizer.bin (karpathy/llama2.c run.c): a sentencepiece BPE vocabulary exported
// as pieces + scores, encoded by greedy best-score merging.
//
// File format (little endian): int32 max_token_length, then per token: float32 score,
// int32 len, len bytes of the piece (U+2581 already replaced by ' '). The file does not store
// the vocabulary size; llama2.c takes it from the model checkpoint.
#pragma once
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "lowbit/tokenizer/tokenizer.h"

namespace lowbit {

class Llama2cTokenizer final : public Tokenizer {
 public:
  // Reads `path`. vocab_size > 0 reads exactly that many entries (as llama2.c does; trailing
  // bytes are ignored); vocab_size <= 0 reads entries until the end of the file.
  explicit Llama2cTokenizer(const std::string& path, int vocab_size = 0);
  // The same from bytes in memory; `name` is used in error messages.
  static Llama2cTokenizer from_bytes(std::string_view data, const std::string& name,
                                     int vocab_size = 0);
  // From pieces in llama2.c form (spaces, not U+2581), e.g. a GGUF loader's
  // tokenizer.ggml.tokens/scores after to_llama2c_piece(). Byte-fallback ids are 3 + byte,
  // as in run.c, so pieces 3..258 should be <0x00>..<0xFF>.
  Llama2cTokenizer(std::vector<std::string> pieces, std::vector<float> scores, int bos_id = 1,
                   int eos_id = 2);
  // A sentencepiece piece as llama2.c's exporter writes it: U+2581 -> ' '.
  static std::string to_llama2c_piece(std::string_view sentencepiece_piece);

  // index_ holds views into pieces_: moving keeps them valid (the vector's buffer moves with
  // it), copying would not.
  Llama2cTokenizer(Llama2cTokenizer&&) = default;
  Llama2cTokenizer& operator=(Llama2cTokenizer&&) = default;
  Llama2cTokenizer(const Llama2cTokenizer&) = delete;
  Llama2cTokenizer& operator=(const Llama2cTokenizer&) = delete;

  int vocab_size() const override { return static_cast<int>(pieces_.size()); }
  // run.c encode(): optional BOS, a dummy-prefix " " token when text is non-empty, one token per
  // UTF-8 character (bytes as 3 + byte when the character is not a piece), then greedy merges
  // of the adjacent pair whose concatenation is the piece with the highest score. EOS is not
  // added (run.c's generate() passes eos=0). Unlike run.c's C strings, a NUL byte does not end
  // the text.
  std::vector<int> encode(std::string_view text, bool add_special) const override;
  std::vector<int> encode_long(std::string_view text, const std::function<void(size_t)>& progress) const override;
  // Concatenates decode_piece() with prev starting at BOS, so the dummy-prefix space of the
  // first piece is dropped like sentencepiece does; BOS/EOS are skipped.
  std::string decode(const std::vector<int>& ids) const override;
  // run.c decode(): the piece, without its leading space when prev is BOS (1 in run.c; here
  // bos_id()), and "<0xNN>" pieces as the raw byte.
  std::string decode_piece(int prev, int id) const override;
  int bos_id() const override { return bos_id_; }
  int eos_id() const override { return eos_id_; }
  std::string kind() const override { return "llama2c"; }

  const std::string& piece(int id) const;
  std::string token_text(int id) const override {
    return id >= 0 && id < vocab_size() ? pieces_[size_t(id)] : std::string();
  }
  float score(int id) const;
  int max_token_length() const { return max_token_length_; }

 private:
  Llama2cTokenizer() = default;
  void build_index();
  int lookup(std::string_view s) const;
  std::vector<int> encode_impl(std::string_view text, bool add_special,
                               const std::function<void(size_t)>* progress) const;

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string_view, int> index_;  // views into pieces_: first id wins
  std::vector<uint8_t> mergeable_;  // id is half of some piece = piece + piece (else it never merges)
  int max_token_length_ = 0;
  int bos_id_ = 1, eos_id_ = 2;
};

// run.c safe_printf(): a piece that is a single byte which is neither printable ASCII nor
// whitespace is not printed (returns ""); otherwise the piece up to its first NUL (printf %s).
std::string printable_piece(const std::string& piece);

}  // namespace lowbit
