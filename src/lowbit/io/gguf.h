// GGUF files (ggml docs/gguf.md), versions 1, 2 and 3, little-endian:
//   char magic[4] = "GGUF"; u32 version;
//   u64 tensor_count; u64 metadata_kv_count;                 (u32 in version 1)
//   metadata_kv_count x { string key; u32 value_type; value }
//   tensor_count x { string name; u32 n_dims; u64 ne[n_dims]; u32 ggml_type; u64 offset }
//                                                             (ne[] are u32 in version 1)
//   padding to general.alignment (default 32), then the tensor data; each offset is relative to
//   the start of the data and a multiple of the alignment.
// A string is { u64 len; len bytes of UTF-8 } (u32 len in version 1). An array value is
// { u32 element_type; u64 count; elements } (u32 count in version 1), elements may be arrays.
// Dimensions are listed innermost first: ne[0] is the row length (in_features of a weight), so a
// PyTorch [out, in] weight has ne = {in, out}.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lowbit/core/tensor.h"
#include "lowbit/io/checkpoint.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

namespace io {
class MappedFile;
}

enum class GgufType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12,
};
const char* gguf_type_name(GgufType t);

// One metadata value. Scalars keep their declared type; integers are stored widened.
struct GgufValue {
  GgufType type = GgufType::U8;
  uint64_t u = 0;   // U8..U64 (and BOOL as 0/1)
  int64_t i = 0;    // I8..I64
  double f = 0;     // F32, F64
  std::string str;  // STRING
  GgufType elem_type = GgufType::U8;  // ARRAY
  std::vector<GgufValue> array;       // ARRAY

  static GgufValue u32(uint32_t v);
  static GgufValue i32(int32_t v);
  static GgufValue f32(float v);
  static GgufValue boolean(bool v);
  static GgufValue string(std::string v);
  static GgufValue string_array(const std::vector<std::string>& v);
  static GgufValue f32_array(const std::vector<float>& v);
  static GgufValue i32_array(const std::vector<int32_t>& v);

  bool is_integer() const;
  bool is_float() const { return type == GgufType::F32 || type == GgufType::F64; }
  // Checked conversions; `what` (e.g. "file.gguf: key 'llama.block_count'") prefixes errors.
  int64_t as_int(const std::string& what) const;
  double as_float(const std::string& what) const;  // integers convert too
  const std::string& as_string(const std::string& what) const;
  std::vector<std::string> as_string_array(const std::string& what) const;
  std::vector<float> as_float_array(const std::string& what) const;
  std::vector<int32_t> as_int32_array(const std::string& what) const;
};

using GgufMetadata = std::vector<std::pair<std::string, GgufValue>>;  // in file order

// ggml tensor types: one row per type, so adding quantized types is data, not code
// (ids and sizes from ggml.h / ggml.c type_traits; ids never reused).
struct GgmlTypeTraits {
  uint32_t id;
  const char* name;
  int block_size;  // elements per block
  int type_size;   // bytes per block
  std::optional<DType> dtype;  // the lowbit dtype holding it unquantized, if any
};
const GgmlTypeTraits* ggml_type_traits(uint32_t id);  // nullptr for unknown ids
const GgmlTypeTraits& ggml_type_for(DType t);          // throws when none

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // innermost first, as in the file
  uint32_t ggml_type = 0;
  uint64_t offset = 0;  // relative to the data section
  uint64_t nbytes = 0;
  Shape shape() const { return Shape(ne.rbegin(), ne.rend()); }  // PyTorch order
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t x : ne) n *= x;
    return n;
  }
};

class GgufFile {
 public:
  // Maps and validates the file (structure, bounds, overlaps); throws naming it and the problem.
  static GgufFile open(const std::string& path);

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }
  const GgufMetadata& metadata() const { return kv_; }
  const GgufValue* find(const std::string& key) const;
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(const std::string& name) const;
  // A copy converted to f32, shape in PyTorch order. ggml block types with a row in the format
  // table (quant_format_for_ggml_type: Q4_0 ... Q6_K, TQ1_0, TQ2_0, IQ4_NL, IQ4_XS) are
  // dequantized exactly (bit-identical with gguf-py). Throws naming the tensor and the ggml type
  // for the types lowbit cannot decode.
  Tensor load_f32(const std::string& name) const;
  // A 2-D tensor in a ggml block type as a packed QuantizedTensor ([out, in] = [ne[1], ne[0]],
  // codes = the raw blocks, copied). Throws naming the tensor for other types.
  QuantizedTensor load_quantized(const std::string& name) const;
  // Raw bytes of a tensor (for pass-through of types lowbit cannot decode).
  const uint8_t* tensor_bytes(const GgufTensorInfo& t) const;

 private:
  std::string path_;
  std::shared_ptr<io::MappedFile> file_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32, data_offset_ = 0;
  GgufMetadata kv_;
  std::map<std::string, size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

// The ggml names of the block types lowbit decodes ("Q4_0, Q4_1, ...") for messages.
std::string ggml_block_type_names();

// Writes a GGUF version 3 file atomically. Tensors are given in PyTorch shape order and written
// with the ggml type of their dtype (F32, F16, BF16, I8, I16, I32, I64, F64). `quantized` tensors
// (ggml block formats only) are written as their raw blocks with their ggml type; quantized
// tensors come first in the file, then `tensors`. `general.alignment` is added
// when alignment != 32.
void write_gguf(const std::string& path, const GgufMetadata& metadata,
                const std::vector<std::pair<std::string, Tensor>>& tensors, uint32_t alignment = 32,
                const std::vector<std::pair<std::string, QuantizedTensor>>& quantized = {});

// ---- Llama-family models (io/gguf_llama.cpp) -----------------------------------------------------
// Architectures "llama" (also used by llama.cpp for Mistral; q/k in Meta's interleaved RoPE
// layout), "qwen2" and "qwen3" (rotate-half layout). Weights are converted to f32 (ggml block
// types dequantized exactly: the "f32 path").
Checkpoint load_gguf(const std::string& path);

// The packed path: every linear weight of the decoder blocks stored in a ggml block type stays
// packed (QuantizedCheckpoint::quantized, by HF module name, rows in the HF (rotate-half) order:
// llama's q/k rows are un-permuted, a pure row permutation of the raw blocks); `dense` holds the
// config (rope_style Half) and f32 weights of everything (quantized linears dequantized). Feed it
// to make_quantized_model. method = "gguf"; format = the format of the first packed tensor.
struct QuantizedCheckpoint;
// dense_view = false: the packed linears are not dequantized into `dense` (shape-only placeholders
// that are never read), so no f32 copy of a packed weight is made (inference).
QuantizedCheckpoint load_gguf_quantized(const std::string& path, bool dense_view = true);

// True when `path` is a .gguf file whose linear weights (ffn_down) use a ggml block type: inference
// loads keep it packed (load_gguf_quantized).
bool gguf_has_packed_linears(const std::string& path);

// The config implied by a GGUF file's metadata and tensors (no weights loaded).
LlamaConfig gguf_llama_config(const GgufFile& f);
// The embedded tokenizer vocabulary (empty when the file has none).
TokenizerVocab gguf_tokenizer_vocab(const GgufFile& f);

struct GgufSaveOptions {
  DType dtype = DType::F32;  // F32, F16 or BF16 for matrices; 1-D tensors stay F32 (as llama.cpp's converter)
  std::string name;          // general.name (optional)
  const TokenizerVocab* vocab = nullptr;  // tokenizer metadata to embed; none: tokenizer.ggml.model = "none"
  // Linear weights stored packed in a ggml block type, by HF module name ("model.layers.0.mlp.up_proj"),
  // rows in the HF (rotate-half) order as in a QuantizedCheckpoint. Their raw blocks are written with
  // their ggml type (llama's q/k rows permuted, whole rows of blocks, so bit-exact); every other
  // tensor follows `dtype`. general.file_type names the block type of the first one.
  const std::map<std::string, QuantizedTensor>* quantized = nullptr;
  GgufMetadata extra;  // appended after the standard keys (e.g. lowbit.quantization.*)
  int file_type = -1;  // general.file_type (llama_ftype, e.g. 15 = Q4_K_M); -1: from the tensors as above
};

// Writes a GGUF v3 file llama.cpp can load: general.architecture, the <arch>.* hyperparameters,
// tokenizer metadata, tensors with llama.cpp names. q/k rows are permuted to the layout the
// architecture expects (interleaved for llama/mistral, half for qwen2/qwen3).
void save_gguf(const std::string& path, const LlamaConfig& config, const LlamaWeights& weights,
               const GgufSaveOptions& options = {});

// Writes a lowbit quantized checkpoint (io/quantized_checkpoint.h) whose packed layers are all in
// ggml block formats as a GGUF file llama.cpp loads: packed layers as their raw blocks, everything
// else (embeddings, tied or separate output.weight, norms, dense layers) f32, the tokenizer `vocab`
// (may be null) embedded, and the metadata lowbit.quantization.method / .format / .config (the
// checkpoint's quantization_config as JSON text) plus `extra`. Throws naming `path` for formats
// GGUF cannot hold (listing those it can), separate LoRA adapters (merge them: --lora merge), or an
// output path that is a directory. Written atomically.
void save_gguf_quantized(const std::string& path, const QuantizedCheckpoint& q, const TokenizerVocab* vocab,
                         const std::string& quantization_config_json, const GgufMetadata& extra = {});

// True when the file starts with the GGUF magic.
bool looks_like_gguf(const std::string& path);

}  // namespace lowbit
