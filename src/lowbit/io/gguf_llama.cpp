// The Llama-family mapping of GGUF files (config from metadata, llama.cpp tensor names, the q/k
// row permutation of llama.cpp's converter): load_gguf / load_gguf_quantized / save_gguf. The
// container itself (reader, writer, metadata, tensor table) is gguf.cpp.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>

#include "lowbit/io/file_util.h"
#include "lowbit/io/gguf.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/io/rope_layout.h"
#include "lowbit/io/tensor_parallel_load.h"
#include "lowbit/io/weight_names.h"

namespace lowbit {

namespace {
// llama.cpp's llama_ftype (general.file_type) for a file whose linears are mostly in `ggml_type`.
uint32_t llama_ftype_for_ggml_type(uint32_t t) {
  switch (t) {
    case 2: return 2;    // Q4_0
    case 3: return 3;    // Q4_1
    case 6: return 8;    // Q5_0
    case 7: return 9;    // Q5_1
    case 8: return 7;    // Q8_0
    case 10: return 10;  // Q2_K
    case 11: return 11;  // Q3_K -> Q3_K_S
    case 12: return 14;  // Q4_K -> Q4_K_S
    case 13: return 16;  // Q5_K -> Q5_K_S
    case 14: return 18;  // Q6_K
    case 20: return 25;  // IQ4_NL
    case 23: return 30;  // IQ4_XS
    case 34: return 36;  // TQ1_0
    case 35: return 37;  // TQ2_0
    default: return 0;
  }
}
std::string kv_ctx(const std::string& path, const std::string& key) { return path + ": metadata key '" + key + "'"; }
}  // namespace

// ---- Llama-family models -----------------------------------------------------------------------

namespace {

struct ArchKeys {
  const GgufFile& f;
  std::string prefix;  // "llama."
  const GgufValue* get(const std::string& k) const { return f.find(prefix + k); }
  std::string ctx(const std::string& k) const { return kv_ctx(f.path(), prefix + k); }
  int integer(const std::string& k, std::optional<int> def = std::nullopt) const {
    const GgufValue* v = get(k);
    if (!v) {
      if (!def) throw_error(f.path(), ": missing required metadata key '", prefix + k, "'");
      return *def;
    }
    if (v->type == GgufType::ARRAY)
      throw_error(ctx(k), ": per-layer values (an array) are not supported");
    const int64_t x = v->as_int(ctx(k));
    if (x < INT32_MIN || x > INT32_MAX) throw_error(ctx(k), ": value ", x, " is out of range");
    return int(x);
  }
  float number(const std::string& k, float def) const {
    const GgufValue* v = get(k);
    return v ? float(v->as_float(ctx(k))) : def;
  }
};

int optional_id(const GgufFile& f, const char* key) {
  const GgufValue* v = f.find(key);
  if (!v) return -1;
  const int64_t x = v->as_int(kv_ctx(f.path(), key));
  return (x < 0 || x > INT32_MAX) ? -1 : int(x);
}

}  // namespace

LlamaConfig gguf_llama_config(const GgufFile& f) {
  const GgufValue* archv = f.find("general.architecture");
  if (!archv) throw_error(f.path(), ": missing metadata key 'general.architecture'");
  const std::string arch = archv->as_string(kv_ctx(f.path(), "general.architecture"));
  if (arch != "llama" && arch != "qwen2" && arch != "qwen3")
    throw_error(f.path(), ": unsupported GGUF architecture '", arch, "' (lowbit reads llama, qwen2 and qwen3)");
  ArchKeys k{f, arch + "."};
  LlamaConfig c;
  c.arch = arch;
  c.dim = k.integer("embedding_length");
  c.hidden_dim = k.integer("feed_forward_length");
  c.n_layers = k.integer("block_count");
  c.n_heads = k.integer("attention.head_count");
  c.n_kv_heads = k.integer("attention.head_count_kv", c.n_heads);
  c.max_seq_len = k.integer("context_length", 2048);
  c.rope_theta = k.number("rope.freq_base", 10000.0f);
  c.norm_eps = k.number("attention.layer_norm_rms_epsilon", 1e-5f);
  c.head_dim = k.integer("attention.key_length", 0);
  if (c.head_dim != 0 && k.integer("attention.value_length", c.head_dim) != c.head_dim)
    throw_error(f.path(), ": attention.key_length and value_length differ; not supported");
  if (c.n_heads > 0 && c.head_dim * c.n_heads == c.dim) c.head_dim = 0;
  if (k.get("rope.dimension_count")) {
    const int rot = k.integer("rope.dimension_count");
    const int hd = c.head_dim ? c.head_dim : (c.n_heads > 0 ? c.dim / c.n_heads : 0);
    if (rot != hd)
      throw_error(k.ctx("rope.dimension_count"), ": partial rotary embeddings (", rot, " of ", hd,
                  " channels per head) are not supported");
  }
  if (const GgufValue* rs = k.get("rope.scaling.type")) {
    const std::string t = rs->as_string(k.ctx("rope.scaling.type"));
    if (t != "none")
      throw_error(k.ctx("rope.scaling.type"), ": RoPE scaling '", t, "' is not supported yet (no frequency scaling in lowbit's RoPE)");
  }
  if (f.find_tensor("rope_freqs.weight"))
    throw_error(f.path(), ": tensor 'rope_freqs.weight' (Llama 3.1 RoPE frequency scaling) is not supported yet");
  const GgufTensorInfo* emb = f.find_tensor("token_embd.weight");
  if (!emb) throw_error(f.path(), ": missing tensor 'token_embd.weight'");
  if (emb->ne.size() != 2) throw_error(f.path(), ": tensor 'token_embd.weight' has ", emb->ne.size(), " dimensions, expected 2");
  if (emb->ne[1] > INT32_MAX) throw_error(f.path(), ": vocabulary of ", emb->ne[1], " tokens is too large");
  c.vocab_size = int(emb->ne[1]);
  if (k.get("vocab_size") && k.integer("vocab_size") != c.vocab_size)
    throw_error(k.ctx("vocab_size"), ": ", k.integer("vocab_size"), " does not match token_embd.weight (", c.vocab_size, " rows)");
  c.tied_embeddings = f.find_tensor("output.weight") == nullptr;
  c.attn_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
  c.qk_norm = f.find_tensor("blk.0.attn_q_norm.weight") != nullptr;
  // llama.cpp's converter permutes HF q/k rows back to Meta's layout for "llama" (LLAMA_ROPE_TYPE_NORM);
  // qwen2/qwen3 keep the HF layout and use NEOX-style RoPE.
  c.rope_style = arch == "llama" ? RopeStyle::Interleaved : RopeStyle::Half;
  c.bos_id = optional_id(f, "tokenizer.ggml.bos_token_id");
  c.eos_id = optional_id(f, "tokenizer.ggml.eos_token_id");
  c.validate(f.path());
  return c;
}

TokenizerVocab gguf_tokenizer_vocab(const GgufFile& f) {
  TokenizerVocab v;
  const GgufValue* tokens = f.find("tokenizer.ggml.tokens");
  const GgufValue* model = f.find("tokenizer.ggml.model");
  if (!tokens || !model) return v;
  auto ctx = [&](const char* key) { return kv_ctx(f.path(), key); };
  v.model = model->as_string(ctx("tokenizer.ggml.model"));
  if (const GgufValue* p = f.find("tokenizer.ggml.pre")) v.pre = p->as_string(ctx("tokenizer.ggml.pre"));
  v.tokens = tokens->as_string_array(ctx("tokenizer.ggml.tokens"));
  if (const GgufValue* s = f.find("tokenizer.ggml.scores")) v.scores = s->as_float_array(ctx("tokenizer.ggml.scores"));
  if (const GgufValue* t = f.find("tokenizer.ggml.token_type")) v.token_types = t->as_int32_array(ctx("tokenizer.ggml.token_type"));
  if (const GgufValue* m = f.find("tokenizer.ggml.merges")) v.merges = m->as_string_array(ctx("tokenizer.ggml.merges"));
  if (!v.scores.empty() && v.scores.size() != v.tokens.size())
    throw_error(ctx("tokenizer.ggml.scores"), ": ", v.scores.size(), " scores for ", v.tokens.size(), " tokens");
  if (!v.token_types.empty() && v.token_types.size() != v.tokens.size())
    throw_error(ctx("tokenizer.ggml.token_type"), ": ", v.token_types.size(), " types for ", v.tokens.size(), " tokens");
  v.bos_id = optional_id(f, "tokenizer.ggml.bos_token_id");
  v.eos_id = optional_id(f, "tokenizer.ggml.eos_token_id");
  v.unk_id = optional_id(f, "tokenizer.ggml.unknown_token_id");
  v.pad_id = optional_id(f, "tokenizer.ggml.padding_token_id");
  for (auto [key, out] : {std::pair{"tokenizer.ggml.add_bos_token", &v.add_bos}, {"tokenizer.ggml.add_eos_token", &v.add_eos},
                          {"tokenizer.ggml.add_space_prefix", &v.add_space_prefix}})
    if (const GgufValue* b = f.find(key)) *out = (b->type == GgufType::BOOL ? b->u : uint64_t(b->as_int(ctx(key)))) != 0;
  if (const GgufValue* t = f.find("tokenizer.chat_template")) v.chat_template = t->as_string(ctx("tokenizer.chat_template"));
  return v;
}

namespace {
// True for a linear weight (model.layers.*_proj.weight) stored in a ggml block type lowbit keeps packed.
bool is_packed_linear(const GgufFile& f, const io::WeightSlot& slot) {
  if (!io::is_block_linear_weight(slot.hf_name)) return false;
  const GgufTensorInfo* t = f.find_tensor(slot.gguf_name);
  return t && quant_format_for_ggml_type(t->ggml_type);
}

// True for token_embd / output stored in a ggml block type (kept packed for inference).
bool is_packed_vocab(const GgufFile& f, const io::WeightSlot& slot) {
  if (slot.hf_name != "model.embed_tokens.weight" && slot.hf_name != "lm_head.weight") return false;
  const GgufTensorInfo* t = f.find_tensor(slot.gguf_name);
  return t && quant_format_for_ggml_type(t->ggml_type) && t->ne.size() == 2;
}

bool is_block_linear(const io::WeightSlot& slot) { return io::is_block_linear_weight(slot.hf_name); }

// load_gguf; skip_packed: packed linears are left undefined (the caller fills them); skip_linears:
// every block linear is (rank-local loading reads their pieces).
Checkpoint load_gguf_impl(const std::string& path, bool skip_packed, bool skip_linears = false) {
  GgufFile f = GgufFile::open(path);
  Checkpoint ck;
  ck.source = path;
  ck.config = gguf_llama_config(f);
  ck.vocab = gguf_tokenizer_vocab(f);
  std::set<std::string> used;
  // Old converters (e.g. the version-1 stories260K file) store output.weight even when it is
  // the embedding. When the two are bit-identical the model is exactly a tied one: load it as
  // such (half the memory; saves back without the copy).
  if (const GgufTensorInfo* out = f.find_tensor("output.weight")) {
    const GgufTensorInfo* emb = f.find_tensor("token_embd.weight");
    if (out->ne == emb->ne && out->ggml_type == emb->ggml_type &&
        std::memcmp(f.tensor_bytes(*out), f.tensor_bytes(*emb), size_t(out->nbytes)) == 0) {
      ck.config.tied_embeddings = true;
      used.insert("output.weight");
    }
  }
  for (auto& slot : io::weight_slots(ck.config, ck.weights)) {
    const GgufTensorInfo* t = f.find_tensor(slot.gguf_name);
    if (!t) throw_error(path, ": missing tensor '", slot.gguf_name, "' (", ck.config.summary(), ")");
    if (t->shape() != slot.shape)
      throw_error(path, ": tensor '", slot.gguf_name, "' has ne ", shape_str(t->ne), " (shape ", shape_str(t->shape()),
                  "), the config needs shape ", shape_str(slot.shape));
    if ((!skip_packed || !(is_packed_linear(f, slot) || is_packed_vocab(f, slot))) && !(skip_linears && is_block_linear(slot)))
      *slot.tensor = f.load_f32(slot.gguf_name);
    used.insert(slot.gguf_name);
  }
  size_t unused = 0;
  std::string example;
  for (const auto& t : f.tensors())
    if (!used.count(t.name) && unused++ == 0) example = t.name;
  if (unused)
    std::fprintf(stderr, "lowbit: warning: %s: %zu tensors not used by the model are ignored (e.g. '%s')\n", path.c_str(), unused,
                 example.c_str());
  if (!skip_packed && !skip_linears) validate_weights(ck.config, ck.weights, path);
  return ck;
}
}  // namespace

bool gguf_has_packed_linears(const std::string& path) {
  std::error_code ec;
  if (path.size() < 5 || path.compare(path.size() - 5, 5, ".gguf") != 0 || !std::filesystem::is_regular_file(path, ec))
    return false;
  const GgufFile f = GgufFile::open(path);
  for (const auto& t : f.tensors())
    if (t.name.find("ffn_down.weight") != std::string::npos && quant_format_for_ggml_type(t.ggml_type)) return true;
  return false;
}

LazyCheckpoint open_gguf_lazily(const std::string& path, bool packed) {
  LazyCheckpoint z;
  QuantizedCheckpoint& q = z.rest;
  q.dense = load_gguf_impl(path, packed, /*skip_linears=*/true);
  q.method = "gguf";
  const GgufFile f = GgufFile::open(path);
  const LlamaConfig c = q.dense.config;
  const int64_t hd = c.resolved_head_dim();
  // The packed view puts llama's q/k rows in the HF order (load_gguf_quantized): per head, so a
  // piece of whole heads is permuted on its own.
  const bool permute = packed && c.rope_style == RopeStyle::Interleaved;
  LlamaWeights scratch;
  bool first = true;
  for (auto& slot : io::weight_slots(c, scratch)) {
    if (!is_block_linear(slot)) continue;
    const GgufTensorInfo* t = f.find_tensor(slot.gguf_name);  // present, shape checked by load_gguf_impl
    const std::string& hf = slot.hf_name;
    const bool perm = permute && (hf.find(".self_attn.q_proj.") != std::string::npos ||
                                  hf.find(".self_attn.k_proj.") != std::string::npos);
    const std::string ctx = path + ": tensor '" + slot.gguf_name + "'";
    const uint64_t offset = f.data_offset() + t->offset;
    LinearSource src;
    src.out = slot.shape[0], src.in = slot.shape[1];
    const int64_t in = src.in;
    auto permuted = [perm, hd, ctx](Tensor rows, int64_t r0, int64_t r1) {
      if (!perm) return rows;
      LB_CHECK(r0 % hd == 0 && r1 % hd == 0, ctx, ": rows [", r0, ", ", r1, ") are not whole heads of ", hd);
      return rope_rows_interleaved_to_half(rows, int((r1 - r0) / hd), int(hd));
    };
    const QuantFormat* qf = quant_format_for_ggml_type(t->ggml_type);
    const GgmlTypeTraits* tt = ggml_type_traits(t->ggml_type);
    if (packed && qf) {
      if (first) q.format = qf->id, first = false;
      src.packed_rows = [path, offset, qf, in, ctx, permuted](int64_t r0, int64_t r1) {
        const int64_t rb = qf->row_bytes(in);
        Tensor b = Tensor::empty({r1 - r0, rb}, DType::U8);
        io::pread_exact(path, offset + uint64_t(r0 * rb), uint64_t((r1 - r0) * rb), b.raw_data(), "tensor data");
        return make_ggml_quantized_tensor(*qf, r1 - r0, in, permuted(b, r0, r1), ctx);
      };
    } else if (tt->dtype || qf) {  // f32 rows: converted, or block types dequantized exactly (load_f32)
      src.dense_rows = [path, offset, qf, tt, in, ctx, permuted](int64_t r0, int64_t r1) {
        const int64_t rb = qf ? qf->row_bytes(in) : in * int64_t(dtype_size(*tt->dtype));
        std::vector<uint8_t> raw(size_t((r1 - r0) * rb));
        io::pread_exact(path, offset + uint64_t(r0 * rb), raw.size(), raw.data(), "tensor data");
        Tensor out = Tensor::empty({r1 - r0, in});
        if (qf)
          for (int64_t r = 0; r < r1 - r0; ++r) qf->dequantize_row(raw.data() + r * rb, in, out.data<float>() + r * in);
        else
          io::convert_to_f32(raw.data(), *tt->dtype, (r1 - r0) * in, out.data<float>());
        return permuted(out, r0, r1);
      };
    } else {
      throw_error(ctx, ": ggml type ", tt->name, ", which lowbit cannot load yet");
    }
    z.linears.emplace(hf.substr(0, hf.size() - std::string(".weight").size()), std::move(src));
  }
  if (packed) {
    q.dense.weights = weights_with_rope_style(c, q.dense.weights, RopeStyle::Half);
    q.dense.config.rope_style = RopeStyle::Half;
    for (auto& slot : io::weight_slots(q.dense.config, q.dense.weights))
      if (is_packed_vocab(f, slot)) {
        q.quantized[slot.hf_name.substr(0, slot.hf_name.size() - std::string(".weight").size())] =
            f.load_quantized(slot.gguf_name);
        *slot.tensor = zero_placeholder(slot.shape);
      }
  }
  return z;
}

Checkpoint load_gguf(const std::string& path) { return load_gguf_impl(path, false); }

QuantizedCheckpoint load_gguf_quantized(const std::string& path, bool dense_view) {
  QuantizedCheckpoint q;
  // Every tensor in f32 (block types dequantized exactly), or without the packed linears.
  q.dense = load_gguf_impl(path, !dense_view);
  q.method = "gguf";
  GgufFile f = GgufFile::open(path);
  const LlamaConfig& c = q.dense.config;
  const int hd = c.resolved_head_dim();
  const bool permute = c.rope_style == RopeStyle::Interleaved;
  bool first = true;
  for (auto& slot : io::weight_slots(q.dense.config, q.dense.weights)) {
    const std::string& hf = slot.hf_name;
    if (!is_packed_linear(f, slot)) continue;  // dense in the file: stays dense
    QuantizedTensor qt = f.load_quantized(slot.gguf_name);
    // llama.cpp stores llama's q/k rows in Meta's interleaved order; the model built from `dense`
    // uses the HF order (rope Half), so the rows (whole rows of blocks) are permuted exactly.
    const bool is_q = hf.find(".self_attn.q_proj.") != std::string::npos;
    const bool is_k = hf.find(".self_attn.k_proj.") != std::string::npos;
    if (permute && (is_q || is_k))
      qt.codes = rope_rows_interleaved_to_half(qt.codes, is_q ? c.n_heads : c.n_kv_heads, hd);
    if (first) q.format = qt.format, first = false;
    q.quantized[hf.substr(0, hf.size() - std::string(".weight").size())] = std::move(qt);
  }
  q.dense.weights = weights_with_rope_style(c, q.dense.weights, RopeStyle::Half);
  q.dense.config.rope_style = RopeStyle::Half;
  if (!dense_view) {
    // The vocabulary matrices stay packed too ("model.embed_tokens", "lm_head"; rows are tokens,
    // no rope permutation); make_quantized_model routes embed() and head() through them.
    for (auto& slot : io::weight_slots(q.dense.config, q.dense.weights))
      if (is_packed_vocab(f, slot))
        q.quantized[slot.hf_name.substr(0, slot.hf_name.size() - std::string(".weight").size())] =
            f.load_quantized(slot.gguf_name);
    // Zero placeholders of the right shape for the packed matrices (no resident memory);
    // make_quantized_model replaces those layers.
    for (auto& slot : io::weight_slots(q.dense.config, q.dense.weights))
      if (!slot.tensor->defined()) *slot.tensor = zero_placeholder(slot.shape);
    validate_weights(q.dense.config, q.dense.weights, path);
  }
  return q;
}

void save_gguf(const std::string& path, const LlamaConfig& config, const LlamaWeights& weights, const GgufSaveOptions& opt) {
  config.validate(path);
  validate_weights(config, weights, path);
  if (opt.dtype != DType::F32 && opt.dtype != DType::F16 && opt.dtype != DType::BF16)
    throw_error(path, ": GGUF tensors are saved as f32, f16 or bf16, not ", dtype_name(opt.dtype));
  // Mistral is "llama" in llama.cpp (same graph, same converter path).
  std::string arch = config.arch == "mistral" ? "llama" : config.arch;
  if (arch != "llama" && arch != "qwen2" && arch != "qwen3") throw_error(path, ": cannot write architecture '", config.arch, "' to GGUF");
  if (arch == "llama" && (config.attn_bias || config.qk_norm))
    throw_error(path, ": a llama model with q/k/v biases or q/k norms has no GGUF llama equivalent");
  const RopeStyle style = arch == "llama" ? RopeStyle::Interleaved : RopeStyle::Half;
  LlamaWeights w = weights_with_rope_style(config, weights, style);

  const std::string a = arch + ".";
  GgufMetadata kv;
  kv.emplace_back("general.architecture", GgufValue::string(arch));
  if (!opt.name.empty()) kv.emplace_back("general.name", GgufValue::string(opt.name));
  // general.file_type: LLAMA_FTYPE_ALL_F32 = 0, MOSTLY_F16 = 1, MOSTLY_BF16 = 32.
  uint32_t file_type = opt.dtype == DType::F32 ? 0 : opt.dtype == DType::F16 ? 1 : 32;
  if (opt.quantized && !opt.quantized->empty())
    file_type = llama_ftype_for_ggml_type(uint32_t(opt.quantized->begin()->second.fmt().ggml_type));
  if (opt.file_type >= 0) file_type = uint32_t(opt.file_type);
  kv.emplace_back("general.file_type", GgufValue::u32(file_type));
  kv.emplace_back(a + "context_length", GgufValue::u32(uint32_t(config.max_seq_len)));
  kv.emplace_back(a + "embedding_length", GgufValue::u32(uint32_t(config.dim)));
  kv.emplace_back(a + "block_count", GgufValue::u32(uint32_t(config.n_layers)));
  kv.emplace_back(a + "feed_forward_length", GgufValue::u32(uint32_t(config.hidden_dim)));
  kv.emplace_back(a + "attention.head_count", GgufValue::u32(uint32_t(config.n_heads)));
  kv.emplace_back(a + "attention.head_count_kv", GgufValue::u32(uint32_t(config.n_kv_heads)));
  kv.emplace_back(a + "rope.dimension_count", GgufValue::u32(uint32_t(config.resolved_head_dim())));
  if (config.head_dim != 0 && config.head_dim * config.n_heads != config.dim) {
    kv.emplace_back(a + "attention.key_length", GgufValue::u32(uint32_t(config.head_dim)));
    kv.emplace_back(a + "attention.value_length", GgufValue::u32(uint32_t(config.head_dim)));
  }
  kv.emplace_back(a + "rope.freq_base", GgufValue::f32(config.rope_theta));
  kv.emplace_back(a + "attention.layer_norm_rms_epsilon", GgufValue::f32(config.norm_eps));
  kv.emplace_back(a + "vocab_size", GgufValue::u32(uint32_t(config.vocab_size)));
  if (opt.vocab && !opt.vocab->empty()) {
    const TokenizerVocab& v = *opt.vocab;
    if (int(v.tokens.size()) != config.vocab_size)
      throw_error(path, ": tokenizer has ", v.tokens.size(), " tokens but the model's vocabulary is ", config.vocab_size);
    kv.emplace_back("tokenizer.ggml.model", GgufValue::string(v.model));
    if (!v.pre.empty()) kv.emplace_back("tokenizer.ggml.pre", GgufValue::string(v.pre));
    kv.emplace_back("tokenizer.ggml.tokens", GgufValue::string_array(v.tokens));
    if (!v.scores.empty()) kv.emplace_back("tokenizer.ggml.scores", GgufValue::f32_array(v.scores));
    if (!v.token_types.empty()) kv.emplace_back("tokenizer.ggml.token_type", GgufValue::i32_array(v.token_types));
    if (!v.merges.empty()) kv.emplace_back("tokenizer.ggml.merges", GgufValue::string_array(v.merges));
    if (v.bos_id >= 0) kv.emplace_back("tokenizer.ggml.bos_token_id", GgufValue::u32(uint32_t(v.bos_id)));
    if (v.eos_id >= 0) kv.emplace_back("tokenizer.ggml.eos_token_id", GgufValue::u32(uint32_t(v.eos_id)));
    if (v.unk_id >= 0) kv.emplace_back("tokenizer.ggml.unknown_token_id", GgufValue::u32(uint32_t(v.unk_id)));
    if (v.pad_id >= 0) kv.emplace_back("tokenizer.ggml.padding_token_id", GgufValue::u32(uint32_t(v.pad_id)));
    if (v.add_bos >= 0) kv.emplace_back("tokenizer.ggml.add_bos_token", GgufValue::boolean(v.add_bos != 0));
    if (v.add_eos >= 0) kv.emplace_back("tokenizer.ggml.add_eos_token", GgufValue::boolean(v.add_eos != 0));
    if (v.add_space_prefix >= 0)
      kv.emplace_back("tokenizer.ggml.add_space_prefix", GgufValue::boolean(v.add_space_prefix != 0));
    if (!v.chat_template.empty()) kv.emplace_back("tokenizer.chat_template", GgufValue::string(v.chat_template));
  } else {
    // llama.cpp requires tokenizer.ggml.model; "none" loads the model without a vocabulary.
    kv.emplace_back("tokenizer.ggml.model", GgufValue::string("none"));
    if (config.bos_id >= 0) kv.emplace_back("tokenizer.ggml.bos_token_id", GgufValue::u32(uint32_t(config.bos_id)));
    if (config.eos_id >= 0) kv.emplace_back("tokenizer.ggml.eos_token_id", GgufValue::u32(uint32_t(config.eos_id)));
  }

  for (const auto& e : opt.extra) kv.push_back(e);

  std::vector<std::pair<std::string, Tensor>> tensors;
  std::vector<std::pair<std::string, QuantizedTensor>> packed;
  size_t packed_used = 0;
  const std::string wsuffix = ".weight";
  for (const auto& slot : io::weight_slots(config, w)) {
    const std::string& hf = slot.hf_name;
    if (opt.quantized && hf.size() > wsuffix.size() && hf.compare(hf.size() - wsuffix.size(), wsuffix.size(), wsuffix) == 0) {
      auto it = opt.quantized->find(hf.substr(0, hf.size() - wsuffix.size()));
      if (it != opt.quantized->end()) {
        QuantizedTensor qt = it->second;
        const QuantFormat& qf = qt.fmt();
        if (!qf.is_ggml_block() || qf.ggml_type < 0)
          throw_error(path, ": layer '", it->first, "' is in lowbit's format ", qf.name,
                      ", which GGUF cannot hold; GGUF holds the ggml block types ", ggml_block_type_names());
        if (qt.shape != slot.shape)
          throw_error(path, ": packed layer '", it->first, "' has shape ", shape_str(qt.shape), ", the config needs ",
                      shape_str(slot.shape));
        const bool is_q = hf.find(".self_attn.q_proj.") != std::string::npos;
        const bool is_k = hf.find(".self_attn.k_proj.") != std::string::npos;
        // Packed rows are in the HF order; llama.cpp's llama expects Meta's interleaved q/k rows.
        if (style == RopeStyle::Interleaved && (is_q || is_k))
          qt.codes = rope_rows_half_to_interleaved(qt.codes, is_q ? config.n_heads : config.n_kv_heads,
                                                   config.resolved_head_dim());
        packed.emplace_back(slot.gguf_name, std::move(qt));
        ++packed_used;
        continue;
      }
    }
    Tensor t = slot.tensor->to(Device::CPU).to(DType::F32).contiguous();
    // As llama.cpp's converter: 1-D tensors (norms, biases) stay f32.
    if (t.dim() >= 2 && opt.dtype != DType::F32) {
      if (opt.dtype == DType::F16) {
        const float* p = t.data<float>();
        for (int64_t k = 0; k < t.numel(); ++k)
          if (std::fabs(p[k]) > 65504.0f)
            throw_error(path, ": tensor '", slot.gguf_name, "' value ", p[k], " overflows f16; save as bf16 or f32");
      }
      t = t.to(opt.dtype);
    }
    tensors.emplace_back(slot.gguf_name, std::move(t));
  }
  if (opt.quantized && packed_used != opt.quantized->size())
    throw_error(path, ": ", opt.quantized->size() - packed_used, " packed layers are not linear weights of the model");
  write_gguf(path, kv, tensors, 32, packed);
}

void save_gguf_quantized(const std::string& path, const QuantizedCheckpoint& q, const TokenizerVocab* vocab,
                         const std::string& quantization_config_json, const GgufMetadata& extra) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw_error(path, ": is a directory; give the GGUF file to write (e.g. model-q4_0.gguf)");
  if (!q.lora.empty())
    throw_error(path, ": layer '", q.lora.begin()->first, "' has separate LoRA adapters, which GGUF cannot hold; ",
                "quantize with --lora merge (dense merged layers) to export it");
  for (const auto& [name, qt] : q.quantized) {
    const QuantFormat& f = qt.fmt();
    if (!f.is_ggml_block() || f.ggml_type < 0)
      throw_error(path, ": layer '", name, "' is in lowbit's format ", f.name,
                  ", which has no GGUF equivalent; GGUF holds the ggml block types ", ggml_block_type_names(),
                  " (quantize with --format q4_0, q4_1, q8_0, iq4_nl, q4_k, ...)");
  }
  GgufSaveOptions o;
  o.dtype = DType::F32;
  o.vocab = vocab && !vocab->empty() ? vocab : nullptr;
  o.quantized = &q.quantized;
  // general.file_type: the base format's (packed vocabulary matrices sort first in q.quantized), or
  // the llama_ftype of the preset that chose the types.
  if (quant_format(q.format).ggml_type >= 0)
    o.file_type = int(llama_ftype_for_ggml_type(uint32_t(quant_format(q.format).ggml_type)));
  if (!quantization_config_json.empty()) {
    const nlohmann::json qc = nlohmann::json::parse(quantization_config_json, nullptr, false);
    if (qc.is_object() && qc.contains("format_plan") && qc["format_plan"].is_object()) {
      const nlohmann::json& fp = qc["format_plan"];
      if (fp.contains("llama_ftype") && fp["llama_ftype"].is_number_integer() && fp["llama_ftype"].get<int>() >= 0)
        o.file_type = fp["llama_ftype"].get<int>();
      if (fp.contains("origin") && fp["origin"].is_string())
        o.extra.emplace_back("lowbit.quantization.format_plan", GgufValue::string(fp["origin"].get<std::string>()));
      if (fp.contains("text") && fp["text"].is_string() && !fp["text"].get<std::string>().empty())
        o.extra.emplace_back("lowbit.quantization.format_map", GgufValue::string(fp["text"].get<std::string>()));
    }
  }
  o.extra.emplace_back("lowbit.quantization.method", GgufValue::string(q.method));
  o.extra.emplace_back("lowbit.quantization.format", GgufValue::string(quant_format(q.format).name));
  if (!quantization_config_json.empty())
    o.extra.emplace_back("lowbit.quantization.config", GgufValue::string(quantization_config_json));
  for (const auto& e : extra) o.extra.push_back(e);
  save_gguf(path, q.dense.config, q.dense.weights, o);
}

}  // namespace lowbit
