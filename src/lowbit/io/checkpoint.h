// A model checkpoint as loaded from any supported file format, and the one front door that
// detects the format of a path and loads or saves it.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "lowbit/core/dtype.h"

#include "lowbit/model/config.h"
#include "lowbit/model/weights.h"

namespace lowbit {

// A tokenizer vocabulary embedded in a checkpoint (GGUF tokenizer.ggml.* metadata), kept so that
// conversions carry it along and a Tokenizer can be built from it.
struct TokenizerVocab {
  std::string model;                // tokenizer.ggml.model: "llama" (sentencepiece), "gpt2" (byte-level BPE), ...
  std::string pre;                  // tokenizer.ggml.pre (pre-tokenizer name), may be empty
  std::vector<std::string> tokens;  // pieces as stored (sentencepiece pieces keep U+2581)
  std::vector<float> scores;        // empty or one per token
  std::vector<int32_t> token_types; // empty or one per token (1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte)
  std::vector<std::string> merges;  // BPE merges "a b", may be empty
  int bos_id = -1, eos_id = -1, unk_id = -1, pad_id = -1;
  int add_bos = -1, add_eos = -1;   // tokenizer.ggml.add_{bos,eos}_token: 1/0, -1 when absent (model default)
  int add_space_prefix = -1;        // tokenizer.ggml.add_space_prefix ("llama" vocabularies): 1/0, -1 absent (yes)
  std::string chat_template;        // tokenizer.chat_template, may be empty
  bool empty() const { return tokens.empty(); }
};

// Config + f32 CPU weights + where they came from. Weights are owned tensors (loaders copy out
// of their memory maps), so the source file may be replaced or deleted after loading.
struct Checkpoint {
  LlamaConfig config;
  LlamaWeights weights;
  std::string source;  // the path it was loaded from
  TokenizerVocab vocab;  // embedded tokenizer (GGUF); empty for formats that carry none
};

class Tokenizer;

enum class CheckpointFormat { Auto, Llama2c, Gguf, HfDir };
const char* checkpoint_format_name(CheckpointFormat f);

// What a path holds, from its contents (magic bytes, header plausibility), not its extension:
// a directory with config.json -> HfDir; a file starting with "GGUF" -> Gguf; a file whose
// llama2.c header exactly describes its size -> Llama2c; a safetensors file -> HfDir when its
// directory has config.json (a bare safetensors file carries no model config). Throws naming the
// path otherwise.
CheckpointFormat detect_checkpoint_format(const std::string& path);

// Loads any supported checkpoint (see detect_checkpoint_format). A safetensors file loads the
// model directory it is in.
Checkpoint load_checkpoint(const std::string& path);

// The output format a path asks for: ".bin" -> Llama2c, ".gguf" -> Gguf, anything else (a
// directory, existing or not) -> HfDir. ".safetensors" is refused: a model needs its config.json,
// so give the directory instead.
CheckpointFormat format_for_output(const std::string& path);

// Saves `ckpt` in `format` (Auto: format_for_output). `dtype` (f32, f16, bf16) applies to GGUF and
// HF outputs; llama2.c is f32 only. GGUF output embeds ckpt.vocab when it has one. Refuses to write
// over ckpt.source. Every file is written atomically.
void save_checkpoint(const std::string& path, const Checkpoint& ckpt, CheckpointFormat format = CheckpointFormat::Auto,
                     DType dtype = DType::F32);

// The tokenizer file that belongs to a model path: for a model directory (or a safetensors file in
// one) its tokenizer.json, else tokenizer.model; "" when there is none. A tokenizer.bin next to a
// llama2.c .bin is not a convention, so it is not guessed. (GGUF files embed theirs: see
// tokenizer_from_vocab.)
std::string tokenizer_path_for(const std::string& model_path);

// A Tokenizer built from an embedded vocabulary (io/vocab_tokenizer.cpp):
//   "gpt2"  byte-level BPE (tokens + merges) as an HfTokenizer, with the pre-tokenizer that
//           tokenizer.ggml.pre names as llama.cpp defines it: smollm (and starcoder, refact,
//           command-r, codeshell, exaone, minerva), gpt2 (mpt, olmo, jais), llama-bpe (llama3,
//           llama-v3, dbrx, smaug-bpe), qwen2 (stablelm2, hunyuan), default (also an absent key).
//           Control (3) and user-defined (4) tokens are matched in the text as added tokens
//           (control ones special: skipped by decode). add_bos_token (default: true for
//           llama-bpe, false otherwise) makes encode(..., add_special=true) prepend BOS.
//   "llama" sentencepiece BPE with scores and <0xNN> byte fallback, as llama2.c encodes it.
// Throws naming `source` and the problem otherwise (unknown model or pre-tokenizer, bad ids).
std::unique_ptr<Tokenizer> tokenizer_from_vocab(const TokenizerVocab& vocab, const std::string& source);

// The vocabulary to embed in a GGUF file, from a tokenizer file: a sentencepiece .model (model
// "llama": pieces, scores, token types, add_bos) or a byte-level BPE tokenizer.json (model "gpt2":
// tokens, merges, added tokens as control/user-defined types, the pre-tokenizer name that
// describes its pre_tokenizer, add_bos from its post-processor), with the chat template found
// next to it (chat_template_for). `vocab_size` > 0 pads with unused "[PAD<id>]" tokens up to the
// model's vocabulary (and refuses a larger tokenizer). Throws naming the file otherwise.
TokenizerVocab vocab_from_tokenizer_file(const std::string& path, int vocab_size = 0);

// A "gpt2" (byte-level BPE) vocabulary as Hugging Face files: tokenizer.json (the pipeline lowbit
// itself runs for it) and tokenizer_config.json (bos/eos tokens, add_bos_token, chat_template), for
// exports that transformers loads. Throws for other models and for the "default" pre-tokenizer,
// whose llama.cpp regex list has no tokenizer.json form.
struct HfTokenizerFiles {
  std::string tokenizer_json, tokenizer_config_json;
};
HfTokenizerFiles hf_tokenizer_files_from_vocab(const TokenizerVocab& vocab, const std::string& source);

// The vocabulary embedded in a GGUF file, read from its metadata only (tensors are not decoded,
// so files with tensor types lowbit cannot load still give their tokenizer).
TokenizerVocab read_gguf_vocab(const std::string& path);

// A tokenizer from a path: a GGUF file's embedded one, else load_tokenizer (tokenizer.json,
// *.model, tokenizer.bin or a directory holding one).
std::unique_ptr<Tokenizer> open_tokenizer_file(const std::string& path);

// The chat template that belongs to a model or tokenizer path: a GGUF file's
// tokenizer.chat_template; for a directory (or a file in one) chat_template.jinja, else
// tokenizer_config.json's "chat_template" (a string; a list of named templates takes "default").
// "" when there is none.
std::string chat_template_for(const std::string& path);

}  // namespace lowbit
