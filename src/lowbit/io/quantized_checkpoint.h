// Quantized checkpoints: a Hugging Face-style directory whose linear layers are stored packed.
//
//   config.json        the model's HF config plus
//                      "quantization_config": {"quant_method": "lowbit", "format": "int4g128",
//                        "bits": 4, "group_size": 128, "sym": false, "method": "gptq",
//                        "version": 1, "modules_not_to_convert": ["lm_head"]}
//   model.safetensors  for each quantized linear <m> (e.g. model.layers.0.self_attn.q_proj):
//                        <m>.qweight       U8  [out, row_bytes(in)]  packed codes (quant/format.h)
//                        <m>.scales        F16 or U8 [out, n_groups]  (absent for ternary)
//                        <m>.qzeros        F16 [out, n_groups]        (asymmetric int only)
//                        <m>.tensor_scale  F32 [1]                    (ternary, nvfp4)
//                        <m>.col_mask      U8  [ceil(in/8)]           (ptq161: salient columns)
//                        <m>.col_scales    F16 [in - salient]         (ptq161: binary columns' r_j;
//                                                                      onebit: F16 [in], the column values g)
//                        <m>.bias          F32 [out]                  (when the layer has one)
//                        <m>.lora_A        F16 [rank, in]             LoRA adapters (ApiQ, SAPR):
//                        <m>.lora_B        F16 [out, rank]            y = x Ŵ^T + (x A^T) B^T
//                      a layer saved with LoraStorage::Merged has instead
//                        <m>.weight        F16 or F32 [out, in]       dequantize(q) + B A, dense
//                      every other tensor (embeddings, norms, lm_head) in f32 under its HF name.
// Rows of q_proj/k_proj (and of their lora_B) are in the Hugging Face (rotate-half) order, as in
// any HF checkpoint.
//
// Mixed formats (--format-map / --preset, quant/format_map.h): "format" is the plan's base and
//   quantization_config.layer_formats = {"model.layers.0.self_attn.v_proj": "q6_k", ...}
// names every linear stored in another format; quantization_config.format_plan records the plan
// ({"origin": "preset q4_k_m" | "format-map FILE", "text": the rule file, "llama_ftype": N,
// "vocab_formats": {"model.embed_tokens": "q8_0", ...}}). The vocabulary matrices stay dense f32
// here; vocab_formats are applied (round to nearest) when the directory is exported to GGUF.
//
// A model with transforms (model/rotation.h: rotation, activation / KV-cache quantization) also has
//   quantization_config.transforms = {"rotation": "hadamard" | "none", "rotation_seed": N,
//                                     "act": "int8" | "int4" | "int8-asym" | "int4-asym" | "none",
//                                     "act_clip": 1.0, "kv_quant": "int4" | "int2" | "cq1" | "cq2" | "wkv4" | "wkv2" | "none",
//                                     "kv_group": 32, "kv_window": 128,
//                                     "act_clips": [..]  (only with `--act-clip search`: n_layers x 4
//                                                         ratios, ActQuantSpec::clips)}
//   lowbit.rotation.{ffn,head,o_in}.signs  F32 [n] the online rotations (rotated models only)
//   lowbit.rotation.{ffn,head,o_in}.small  F32 [m, m] (when n is not a power of two)
// Coupled KV quantization ("kv_quant": "cq1" | "cq2") also records "kv_cq_channels" (8 | 4) and its
// codebooks (model/rotation.h KVQuantSpec):
//   lowbit.kv_cq.{keys,values}  F32 [n_layers, KVH*head_dim/channels, 256, channels]
// WKVQuant ("kv_quant": "wkv4" | "wkv2") records its per-channel smoothing:
//   lowbit.kv_wkv.{shift,scale}  F32 [n_layers, 2 (keys, values), KVH*head_dim]  (scale > 0)
// and the stored weights are the rotated ones, so the checkpoint reloads to identical outputs.
// Readers that cannot apply the transforms (GGUF / GPTQ / AWQ export, convert) refuse such a
// checkpoint.
//
// QuIP's incoherence processing (`quantize --method quip`, quant/incoherence.h) is per layer: the
// packed codes are those of W' = R_out^T W R_in, and
//   quantization_config.incoherence = {"<m>": {"seed": N, "sides": "both" | "input"}, ...}
//   <m>.incoherence.in_signs   F32 [in]   R_in's signs      <m>.incoherence.in_small   F32 [k, k]
//   <m>.incoherence.out_signs  F32 [out]  R_out's signs     <m>.incoherence.out_small  F32 [k, k]
// (the small factors only where the size is not a power of two; out_* only for "both"). The loader
// checks every listed layer's tensors (sizes, signs +-1, orthogonal factors), refuses incoherence
// tensors of an unlisted layer, and gives the transforms to the layers' QuantLinear; the dense view
// is R_out Q(W') R_in^T. refuse_transforms refuses these checkpoints too.
//
// Bits per weight with adapters. Separate adapters add 16 * rank * (in + out) bits to a layer's
// packed storage (Llama-2-7B, rank 64: about +0.5 bit per weight; they stay trainable for LoRA
// finetuning). Merged layers are dense: 16 (f16) or 32 (f32) bits per weight, so merging trades
// the low-bit storage for a single dense matmul and is meant for evaluation/export, not compression.
// The code layout is lowbit's own (documented in quant/format.h); it is not GPTQ's int32 packing.
// Earlier versions wrote ptq161 layers in their own container (<m>.ptq161_{mask,signs,q4,rows,cols},
// listed in quantization_config.ptq161_layers, "format": "int4pc"); such checkpoints still load:
// the layers become `ptq161` QuantizedTensors (quant/ptq161_tensor.h ptq161_from_legacy).
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "lowbit/io/checkpoint.h"
#include "lowbit/model/llama.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/incoherence.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

// How LoRA adapters of QuantLinear layers are written.
enum class LoraStorage {
  Separate,  // packed codes + <m>.lora_A / <m>.lora_B (default)
  Merged,    // dense <m>.weight = dequantize(q) + B A in the merge dtype; no packed codes
};

struct LoraAdapters {
  Tensor A;  // F32 [rank, in]
  Tensor B;  // F32 [out, rank]
};

struct QuantizedCheckpoint {
  // config (rope Half) + f32 weights, quantized linears dequantized (+ B A) — or, when loaded with
  // dense_view = false, quantized linears as untouched placeholders of the right shape (never read;
  // make_quantized_model replaces them).
  Checkpoint dense;
  std::string method;
  QuantFormatId format = QuantFormatId::Int4G128;
  // By module name; "model.embed_tokens" / "lm_head" when the vocabulary matrices are packed
  // (GGUF inference loads).
  std::map<std::string, QuantizedTensor> quantized;
  std::map<std::string, LoraAdapters> lora;          // by module name (separate adapters only)
  ModelTransforms transforms;  // rotation, activation and KV-cache quantization (none by default)
  // QuIP incoherence processing (quant/incoherence.h), by module name: the layers whose packed
  // weight is W' = R_out^T W R_in (make_quantized_model gives them to their QuantLinear).
  std::map<std::string, Incoherence> incoherence;
};

// Throws lowbit::Error naming `what` when the checkpoint has transforms (a reader that would
// silently drop them: exports to other formats, conversion).
void refuse_transforms(const QuantizedCheckpoint& q, const std::string& what);

// Writes `model` (whose linears are QuantLinear or dense) atomically into `dir`, with its transforms.
// `extra` is merged into quantization_config (e.g. the calibration settings). Layers with LoRA
// adapters are written according to `lora`; merged layers use `merged_dtype` (F16 or F32).
void save_quantized_model(const std::string& dir, const LlamaModel& model, const std::string& method,
                          const QuantFormat& format, const nlohmann::json& extra = {},
                          LoraStorage lora = LoraStorage::Separate, DType merged_dtype = DType::F16);

// Block-wise streaming's output (methods/stream.h): each block is written to a part file of its own
// as soon as it is final (so the quantized model is never held whole either), and the checkpoint is
// assembled from the parts at the end: model.safetensors equal byte for byte to what
// save_quantized_model writes for the same model, and the same config.json. Models in the Hugging
// Face (Half) q/k row order only (what a Hugging Face input gives).
//   parts_dir/block-00012.safetensors: block 12's norms then its linears' tensors, under their
//   checkpoint names; __metadata__ holds the caller's entries (the run's key) and the counts the
//   config records.
class QuantizedBlockWriter {
 public:
  // Writes the f32 bytes of a non-block tensor (model.embed_tokens.weight, model.norm.weight,
  // lm_head.weight) to `out`, in pieces (never held whole).
  using DenseSource =
      std::function<void(const std::string& name, const Shape& shape, const std::function<void(const void*, size_t)>& out)>;

  QuantizedBlockWriter(std::string parts_dir, LlamaConfig config, const QuantFormat& format,
                       LoraStorage lora = LoraStorage::Separate, DType merged_dtype = DType::F16);
  const std::string& parts_dir() const { return parts_dir_; }
  std::string part_path(int i) const;
  // Writes block i of `model` (atomic: temporary + rename), with `metadata` added.
  void write_block(const LlamaModel& model, int i, const std::map<std::string, std::string>& metadata) const;
  // True when block i's part exists and its metadata `key` is `key`.
  bool has_block(int i, const std::string& key) const;
  // dir/model.safetensors and dir/config.json (each atomic) from the parts of every block, the
  // non-block tensors from `dense`, the transforms' tensors and `extra` as save_quantized_model.
  void assemble(const std::string& dir, const std::string& method, const nlohmann::json& extra,
                const ModelTransforms& transforms, const DenseSource& dense) const;

 private:
  std::string parts_dir_;
  LlamaConfig config_;
  const QuantFormat* format_;
  LoraStorage lora_;
  DType merged_dtype_;
};

// Reads a directory written by save_quantized_model. Throws lowbit::Error naming the file and
// the tensor for missing scales, wrong packed sizes, unknown format names, etc. The packed tensors
// are mapped from the file (zero copy where aligned). dense_view = false skips dequantizing the
// quantized linears into `dense` (inference: no f32 copy of a packed weight is ever made).
QuantizedCheckpoint load_quantized_model(const std::string& dir, bool dense_view = true);

// An f32 tensor of `shape` that reads as zeros and is backed by no memory of its own (a private
// read-only anonymous mapping: reads map the kernel's zero page, so it adds nothing to the RSS).
// Stands in for the dense weight of a layer that is kept packed. Never write to it.
Tensor zero_placeholder(const Shape& shape);

// True when dir/config.json has a lowbit quantization_config.
bool is_lowbit_quantized_dir(const std::string& dir);

// A frozen model whose quantized linears are QuantLinear layers (with their adapters), on `device`,
// with the checkpoint's transforms.
std::unique_ptr<LlamaModel> make_quantized_model(const QuantizedCheckpoint& q, Device device = Device::CPU);

// Inference loads of lowbit directories, whose embedding and output matrices are stored dense:
// quantizes them (round to nearest, ggml's reference quantize_row) into `format`, a ggml block
// type (default Q8_0, the type GGUF files of small models use for token_embd), as
// q.quantized["model.embed_tokens"] (and "lm_head" when untied), and replaces the dense tensors by
// zero placeholders, so make_quantized_model runs them packed (LlamaModel::set_packed_vocab).
// Returns the packed bytes; 0 (nothing changed) when the vocabulary is already packed or the
// model width is not a multiple of the format's block.
int64_t pack_vocab(QuantizedCheckpoint& q, QuantFormatId format = QuantFormatId::Q8_0);
// The same with a format per matrix ({"model.embed_tokens": q6_k, "lm_head": q6_k}: a preset's or
// format map's vocabulary types, applied at GGUF export). Round to nearest (as llama-quantize);
// throws naming the matrix for one the model lacks (lm_head of a tied model), a format that is
// not a ggml block type or whose blocks do not fit the row.
int64_t pack_vocab(QuantizedCheckpoint& q, const std::map<std::string, QuantFormatId>& formats);

}  // namespace lowbit
