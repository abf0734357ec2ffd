#include "lowbit/tokenizer/sentencepiece_tokenizer.h"

#include <sentencepiece_processor.h>

#include <filesystem>

#include "lowbit/core/error.h"

namespace lowbit {

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& path)
    : name_(path), sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  LB_CHECK(std::filesystem::is_regular_file(path), "[tokenizer] ", path, ": no such file");
  const auto st = sp_->Load(path);
  LB_CHECK(st.ok(), "[tokenizer] ", path, ": not a valid sentencepiece model: ", st.ToString());
  LB_CHECK(sp_->GetPieceSize() > 0, "[tokenizer] ", path, ": sentencepiece model has no pieces");
}

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::from_serialized(
    std::string_view proto, const std::string& name) {
  std::unique_ptr<SentencePieceTokenizer> t(new SentencePieceTokenizer());
  t->name_ = name;
  t->sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto st = t->sp_->LoadFromSerializedProto(proto);
  LB_CHECK(st.ok(), "[tokenizer] ", name, ": not a valid sentencepiece model: ", st.ToString());
  LB_CHECK(t->sp_->GetPieceSize() > 0, "[tokenizer] ", name,
           ": sentencepiece model has no pieces");
  return t;
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

int SentencePieceTokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int SentencePieceTokenizer::bos_id() const { return sp_->bos_id(); }
int SentencePieceTokenizer::eos_id() const { return sp_->eos_id(); }

void SentencePieceTokenizer::check_id(int id) const {
  LB_CHECK(id >= 0 && id < vocab_size(), "[tokenizer] ", name_, ": token id ", id,
           " out of range [0, ", vocab_size(), ")");
}

std::vector<int> SentencePieceTokenizer::encode(std::string_view text, bool add_special) const {
  std::vector<int> ids;
  const auto st = sp_->Encode(text, &ids);
  LB_CHECK(st.ok(), "[tokenizer] ", name_, ": sentencepiece encode failed: ", st.ToString());
  if (add_special && bos_id() >= 0) ids.insert(ids.begin(), bos_id());
  return ids;
}

std::string SentencePieceTokenizer::decode(const std::vector<int>& ids) const {
  for (int id : ids) check_id(id);
  std::string out;
  const auto st = sp_->Decode(ids, &out);
  LB_CHECK(st.ok(), "[tokenizer] ", name_, ": sentencepiece decode failed: ", st.ToString());
  return out;
}

std::string SentencePieceTokenizer::id_to_piece(int id) const {
  check_id(id);
  return sp_->IdToPiece(id);
}

float SentencePieceTokenizer::score(int id) const {
  check_id(id);
  return sp_->GetScore(id);
}

int SentencePieceTokenizer::piece_type(int id) const {
  check_id(id);
  if (sp_->IsUnknown(id)) return 2;
  if (sp_->IsControl(id)) return 3;
  if (sp_->IsUnused(id)) return 5;
  if (sp_->IsByte(id)) return 6;
  return 1;
}
int SentencePieceTokenizer::unk_id() const { return sp_->unk_id(); }
int SentencePieceTokenizer::pad_id() const { return sp_->pad_id(); }

std::string SentencePieceTokenizer::decode_piece(int prev, int id) const {
  check_id(id);
  if (sp_->IsControl(id)) return {};
  const std::string& p = sp_->IdToPiece(id);
  if (sp_->IsByte(id) && p.size() == 6) {  // "<0xNN>"
    return std::string(1, static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16)));
  }
  std::string out;
  for (size_t i = 0; i < p.size();) {
    if (p.compare(i, 3, "\xE2\x96\x81") == 0) {
      out += ' ';
      i += 3;
    } else {
      out += p[i++];
    }
  }
  if (prev == bos_id() && !out.empty() && out[0] == ' ') out.erase(0, 1);
  return out;
}

}  // namespace lowbit
