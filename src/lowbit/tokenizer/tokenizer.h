// One interface for every tokenizer lowbit reads: llama2.c tokenizer.bin, sentencepiece .model,
// Hugging Face tokenizer.json (byte-level BPE as in Llama 3 / Qwen, and sentencepiece-style BPE
// with byte fallback as in Llama 2).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace lowbit {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual int vocab_size() const = 0;
  // Text -> ids. add_special: prepend BOS (and whatever the tokenizer's post-processor adds).
  virtual std::vector<int> encode(std::string_view text, bool add_special) const = 0;
  // encode(text, false) for long texts such as whole training files: the same ids, in time
  // linear in the text, with progress(bytes_done) called now and then (bytes of `text`, roughly).
  virtual std::vector<int> encode_long(std::string_view text, const std::function<void(size_t)>& progress) const;
  // Ids -> text (special tokens skipped).
  virtual std::string decode(const std::vector<int>& ids) const = 0;
  // Text of `id` when it follows `prev`, for streaming output (llama2.c semantics: the leading
  // space of the first piece after BOS is dropped; byte tokens <0xNN> become raw bytes).
  virtual std::string decode_piece(int prev, int id) const = 0;
  // The token's text as the vocabulary spells it (e.g. "<|im_start|>", "<s>"), for chat templates'
  // bos_token / eos_token; "" for an id outside the vocabulary.
  virtual std::string token_text(int id) const = 0;
  virtual int bos_id() const = 0;  // -1 when the tokenizer has none
  virtual int eos_id() const = 0;
  virtual std::string kind() const = 0;  // "llama2c", "sentencepiece", "hf-bpe", ...
};

// Opens a tokenizer from a file (tokenizer.bin, *.model, tokenizer.json) or a model directory
// (tokenizer.json preferred, then tokenizer.model). Throws lowbit::Error naming the path.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& file_or_dir);

}  // namespace lowbit
