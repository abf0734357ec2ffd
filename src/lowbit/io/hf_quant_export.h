// Export of a lowbit quantized directory (integer group formats) to the safetensors layouts of
// AutoGPTQ / GPTQModel ("gptq") and AutoAWQ's GEMM kernels ("awq"), which transformers, vLLM,
// AutoGPTQ, GPTQModel and AutoAWQ load. Only the packing changes: the codes, f16 scales and
// integer zero points are lowbit's, so the dequantized weights are identical.
//
// Notation: a linear weight W [out, in], code q[o][i] of weight W[o][i], group g = i / G along the
// input dimension, w = (q - z[o][g]) * s[o][g]. lowbit's symmetric formats have z = 2^(B-1).
//
// ---- gptq (AutoGPTQ's "gptq" checkpoint format, GPTQModel's "gptq_v2") -----------------------
//   <m>.qweight  I32 [in * B / 32, out]  column o is the little-endian bit stream of q[o][0..in):
//                                         code i at bits [i*B, (i+1)*B) of the stream, word k of
//                                         the stream is qweight[k][o]. For B = 2, 4, 8 a code never
//                                         straddles two words (32/B codes a word); for B = 3 the
//                                         stream runs through 3 words per 32 codes (AutoGPTQ's
//                                         pack: codes 10 and 21 straddle).  Needs in % (32/B) == 0
//                                         (B = 3: in % 32 == 0).
//   <m>.qzeros   I32 [n_groups, out * B / 32]  row g is the bit stream of the zeros of group g over
//                                         o, as above. checkpoint_format "gptq" stores z - 1 (the
//                                         historical AutoGPTQ offset; loaders add 1 back); when a
//                                         layer has a zero point 0 (z - 1 cannot be stored), the
//                                         whole export is written as "gptq_v2" with z itself.
//                                         Needs out % (32/B) == 0 (B = 3: out % 32 == 0).
//   <m>.scales   F16 [n_groups, out]     s[o][g]
//   <m>.g_idx    I32 [in]                i / G (0 for per-channel formats): no act-order
//                                         permutation is stored (lowbit's act-order keeps static
//                                         groups), desc_act = false.
//   <m>.bias     F16 [out]               when the layer has one
//   quantize_config.json and config.json "quantization_config": quant_method "gptq", bits,
//   group_size (-1 per channel), desc_act false, sym, checkpoint_format, true_sequential, damp_percent.
//   Formats: lowbit's int2/int3/int4 (asymmetric and "s" symmetric, any group size or per channel)
//   and int8pc.
//
// ---- awq (AutoAWQ's WQLinear_GEMM, "version": "gemm") -----------------------------------------
//   <m>.qweight  I32 [in, out / 8]       word j of row i packs q[8j + p][i], p = (0, 2, 4, 6, 1, 3,
//                                         5, 7)[k], in the nibble at bits [4k, 4k+4)
//   <m>.qzeros   I32 [in / G, out / 8]   the zeros z[o][g] (stored as they are), packed the same way
//   <m>.scales   F16 [in / G, out]
//   config.json "quantization_config": quant_method "awq", bits 4, group_size, zero_point true,
//   version "gemm"; quant_config.json the same in AutoAWQ's names (w_bit, q_group_size).
//   Formats: 4-bit groups only (int4gG, int4gGs; symmetric ones are written with z = 8), with
//   in % G == 0 and out % 8 == 0.
//
// Every other tensor (embeddings, norms, lm_head) is written in f16 under its HF name, config.json
// gets torch_dtype float16. LoRA adapters (ApiQ/SAPR) and ggml block, ternary, fp4 formats cannot
// be held: a clear lowbit::Error lists what can.
#pragma once
#include <string>
#include <string_view>

namespace lowbit {

enum class HfQuantLayout { Gptq, Awq };

HfQuantLayout parse_hf_quant_layout(std::string_view name);  // "gptq" | "awq", else throws
const char* hf_quant_layout_name(HfQuantLayout layout);

struct HfQuantExportInfo {
  std::string checkpoint_format;  // "gptq", "gptq_v2" or "gemm"
  int layers = 0;                 // packed linears written
};

// Reads the lowbit quantized directory `dir` (never modified) and writes out_dir/model.safetensors,
// out_dir/config.json and the layout's own config file (each atomically). out_dir must not be
// `dir`. Throws lowbit::Error naming the layer and the reason when the layout cannot hold it.
HfQuantExportInfo export_hf_quant_layout(const std::string& dir, const std::string& out_dir, HfQuantLayout layout);

}  // namespace lowbit
