// A sentencepiece-style vocabulary given as arrays (GGUF tokenizer.ggml.model = "llama": pieces,
// scores, token types), encoded as sentencepiece's BPE model and llama.cpp's llm_tokenizer_spm do:
//
//   1. Special pieces are cut out of the text first and become their own ids: user-defined
//      (type 4), control (type 3) and unknown (type 2) pieces, longest match first (as Hugging
//      Face tokenizers match added tokens; plain text never contains them by accident).
//   2. Each piece of text between them: a space is prepended when add_space_prefix and the piece is
//      the first or follows a special (sentencepiece's dummy prefix), ' ' becomes U+2581.
//   3. Symbols start as UTF-8 characters; the adjacent pair whose concatenation is a vocabulary
//      piece with the highest score merges first (ties: the leftmost), until no pair merges.
//   4. A final symbol that is not a piece (an unknown character) becomes its bytes' <0xNN> pieces
//      (byte fallback), or the unknown piece when the vocabulary has no byte pieces.
//   add_special: BOS first when add_bos, EOS last when add_eos (tokenizer.ggml.add_{bos,eos}_token;
//   llama.cpp's defaults for this model type: BOS yes, EOS no, space prefix yes).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "lowbit/tokenizer/tokenizer.h"

namespace lowbit {

struct SpmVocab {
  std::vector<std::string> pieces;  // as stored (U+2581 for spaces, "<0x0A>" byte pieces)
  std::vector<float> scores;        // one per piece (empty: all 0)
  std::vector<int32_t> types;       // one per piece (empty: all normal): 1 normal, 2 unknown,
                                    // 3 control, 4 user-defined, 5 unused, 6 byte
  int bos_id = -1, eos_id = -1, unk_id = -1;
  bool add_bos = true, add_eos = false, add_space_prefix = true;
};

class SpmTokenizer final : public Tokenizer {
 public:
  // Validates the arrays (sizes, ids in range, no empty piece); `source` names the origin in errors.
  SpmTokenizer(SpmVocab vocab, const std::string& source);

  int vocab_size() const override { return int(v_.pieces.size()); }
  std::vector<int> encode(std::string_view text, bool add_special) const override;
  // Control pieces vanish, byte pieces become their byte, U+2581 a space; the dummy-prefix space of
  // the first piece is dropped (as sentencepiece's Decode).
  std::string decode(const std::vector<int>& ids) const override;
  // The text of `id`; its leading space is dropped when prev is BOS (or -1: the start).
  std::string decode_piece(int prev, int id) const override;
  std::string token_text(int id) const override;
  int bos_id() const override { return v_.bos_id; }
  int eos_id() const override { return v_.eos_id; }
  std::string kind() const override { return "spm"; }

  bool add_bos() const { return v_.add_bos; }
  bool add_eos() const { return v_.add_eos; }

 private:
  int type(int id) const { return v_.types.empty() ? 1 : v_.types[size_t(id)]; }
  void encode_text(std::string_view text, std::vector<int>& out) const;  // steps 2-4
  void merge_segment(std::string_view text, std::vector<int>& out) const;  // steps 3-4 (escaped text)

  SpmVocab v_;
  std::unordered_map<std::string_view, int> index_;  // piece -> first id (views into v_.pieces)
  std::unordered_set<std::string_view> merge_chars_;  // characters of pieces of 2+ characters
  int byte_ids_[256];                                 // id of "<0xNN>", -1 when absent
  std::vector<int> specials_;                         // special ids, longest text first
  std::vector<int> specials_by_first_[256];           // the same, by their first byte
};

}  // namespace lowbit
