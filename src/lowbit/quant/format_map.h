// Mixed number formats per tensor (issue 12): a rule file (--format-map) or one of llama.cpp's
// mixtures (--preset q4_k_m, ...) turned into a FormatPlan, the format of every linear of a model
// (and of its vocabulary matrices when they are to be packed).
//
// Tensors are named by their kind, in llama.cpp's words: attn_q, attn_k, attn_v, attn_output,
// ffn_gate, ffn_up, ffn_down (one per decoder layer), token_embd and output (the vocabulary
// matrices; output exists only when the model does not tie it to token_embd).
//
// Rule file (--format-map FILE), one rule a line, '#' starts a comment:
//     PATTERN [LAYERS] FORMAT
//     default FORMAT
//   PATTERN  a kind, or a glob over the layer kinds with '*' (attn_*, ffn_*, *; token_embd and
//            output are matched by their own name only). A pattern that matches no kind is an error.
//   LAYERS   optional, layers=A-B,C,... (decoder layer indices, inclusive ranges); not allowed
//            for token_embd / output.
//   FORMAT   any lowbit format (quant/format.h); token_embd / output take ggml block types only
//            (they are packed when the model is written as GGUF).
// The first rule that matches a tensor wins. `default` (at most one line) gives the format of the
// linears no rule matches (without it: --format); token_embd / output no rule matches stay f32.
// A rule whose format does not fit a tensor's row width (ggml blocks: a multiple of 32 or 256) is
// an error naming the file, the line and the tensor; the presets apply llama.cpp's fallback instead.
//
// Presets reproduce llama.cpp's type choice (src/llama-quant.cpp, llama_tensor_get_type, read for
// llama-cpp-python 0.3.36's vendored llama.cpp) for dense llama-family models: the ftype's base type,
// raised for attn_v / ffn_down in the layers use_more_bits() picks (first and last eighth, every
// third in between), for attn_output at q2_k / q3_k_m / q3_k_l; output (and token_embd when tied)
// at q6_k, or q8_0 when its width is not a multiple of the base type's block; then the fallback
// for rows that are not a whole number of blocks (llama_fallback_format below). With calibration
// data (`imatrix` true) the rules llama-quantize applies only when given an importance matrix:
// q4_0 / q5_0 put the first n/8 ffn_down in q4_1 / q5_1, iq4_nl / iq4_xs keep them in their base
// type instead of q5_k. MoE and Falcon rules do not apply (no such models).
//
// A single ggml block type (`quantize --format q4_k`, no preset or rule file) follows the same
// fallback for the tensors whose rows it does not fit (plan_from_format), as llama-quantize does for
// every tensor, --pure included (tensor_type_fallback in llama-quant.cpp).
#pragma once
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lowbit/model/config.h"
#include "lowbit/quant/format.h"

namespace lowbit {

enum class TensorKind { AttnQ, AttnK, AttnV, AttnOutput, FfnGate, FfnUp, FfnDown, TokenEmbd, Output };
const char* tensor_kind_name(TensorKind k);  // "attn_q", ..., "output"

// One weight matrix of a model: module (HF) name, kind, decoder layer (-1 for vocabulary matrices)
// and shape [out, in].
struct PlanTensor {
  std::string module;  // model.layers.3.self_attn.v_proj, model.embed_tokens, lm_head
  TensorKind kind;
  int layer = -1;
  int64_t out = 0, in = 0;
};
// The matrices of a llama-family model in llama.cpp's GGUF order (token_embd, output, then layer by
// layer attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down).
std::vector<PlanTensor> plan_tensors(const LlamaConfig& c);
// llama.cpp's tensor name: blk.3.attn_v.weight, token_embd.weight, output.weight.
std::string gguf_tensor_name(const PlanTensor& t);

struct FormatRule {
  std::string pattern;
  std::vector<std::pair<int, int>> layers;  // inclusive ranges; empty: every layer
  QuantFormatId format;
  int line = 0;
  bool matches(TensorKind k, int layer) const;
};

struct FormatMap {
  std::string source;  // file name (errors, metadata)
  std::string text;    // the file's text (recorded in the checkpoint)
  std::vector<FormatRule> rules;
  bool has_default = false;
  QuantFormatId default_format = QuantFormatId::Int4G128;
  int default_line = 0;
};

// Parses a rule file's text; errors name `source` and the line. Throws lowbit::Error.
FormatMap parse_format_map(const std::string& text, const std::string& source);
FormatMap read_format_map(const std::string& path);

struct FormatPlan {
  std::string origin;  // "preset q4_k_m" or "format-map FILE"
  // Module name -> format, for every block linear, and for the vocabulary matrices that are packed.
  std::map<std::string, QuantFormatId> formats;
  std::vector<std::string> notes;  // one per fallback taken ("blk.0.attn_q: q4_k -> q5_0 (576 columns)")
  int llama_ftype = -1;            // llama.cpp's general.file_type of a preset; -1 for rule files
  QuantFormatId base;              // the preset's base type / the map's default
  // The format of a block linear (model.layers.i.<linear>), or null when the plan has none.
  const QuantFormat* find(const std::string& module) const;
  // {"module": "format", ...} of the vocabulary matrices (model.embed_tokens / lm_head) that are packed.
  std::map<std::string, QuantFormatId> vocab_formats() const;
  std::string summary() const;  // "q4_k x 120, q6_k x 30, ..." counted over the linears + vocabulary
};

// The plan of a rule file for a model; `fallback` is the default when the map has no default line.
FormatPlan plan_from_map(const FormatMap& m, const LlamaConfig& c, const QuantFormat& fallback);
// The plan of llama.cpp's mixture `name` (q4_k_m, q4_k_s, q3_k_m, q3_k_s, q3_k_l, q2_k, q5_k_m,
// q5_k_s, q6_k, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, iq4_xs). Throws listing the names for an
// unknown one. `imatrix`: llama-quantize's choice when it is given an importance matrix (above).
FormatPlan plan_from_preset(const std::string& name, const LlamaConfig& c, bool imatrix = false);
// llama.cpp's tensor_type_fallback: the type a tensor with rows of `in` values gets when `f`'s blocks
// do not fit them: iq4_xs -> iq4_nl; q2_k, q3_k, tq1_0, tq2_0 -> q4_0; q4_k -> q5_0; q5_k -> q5_1;
// q6_k -> q8_0; `f` itself when it fits. Throws naming `what` when the fallback does not fit either
// (llama.cpp writes such a tensor in f16, which a lowbit quantized layer cannot hold).
QuantFormatId llama_fallback_format(QuantFormatId f, int64_t in, const std::string& what);
// `--format F` for every linear of a model, a ggml block type: the plan with llama.cpp's fallback
// for the linears whose rows F does not fit, or nullopt when F fits every linear (or is not a ggml
// block type: lowbit's own formats take a short last group).
std::optional<FormatPlan> plan_from_format(const QuantFormat& f, const LlamaConfig& c);
std::string preset_names();
bool is_preset_name(const std::string& name);  // case-insensitive
QuantFormatId preset_base(const std::string& name);  // the preset's base type (q4_k for q4_k_m); throws if unknown

}  // namespace lowbit
