// A QuantFormat <-> a Hugging Face-style `quantization_config` JSON object (the block that sits in
// a checkpoint's config.json).
//
// ---- Written by lowbit -----------------------------------------------------------------------
//   {
//     "quant_method": "lowbit",
//     "format": "int4g128",          // name in the traits table (format.h); the authority
//     "format_id": 11,               // QuantFormatId, stable
//     "bits": 4,
//     "group_size": 128,             // -1: one group per output channel (HF/GPTQ convention);
//                                    //  0 with "per_tensor": true for ternary
//     "sym": false,
//     "zero_point": true,
//     "scale_dtype": "float16",      // "float16" | "e8m0" | "e4m3" | "none"
//     "tensor_scale": false,         // an fp32 per-tensor scale (ternary, nvfp4)
//     "element_type": "int",         // "int" | "ternary" | "e2m1"
//     "bits_per_weight": 4.25,       // nominal, for a 4096-wide layer, including metadata
//     "method": "gptq",              // how the codes were chosen: "rtn" | "gptq" | "awq" | ...
//     "method_args": {...},          // e.g. {"damp_percent": 0.01, "desc_act": true, "static_groups": true}
//     "modules_not_to_convert": ["lm_head"]
//   }
// A suggested tensor layout for a quantized safetensors checkpoint, one entry per quantized
// weight `<name>` ("model.layers.0.self_attn.q_proj.weight" -> prefix "model.layers.0.self_attn.q_proj"):
//   <prefix>.qcodes        U8  [out, row_bytes]    packed codes (format.h)
//   <prefix>.scales        F16 or U8 [out, n_groups]
//   <prefix>.zeros         F16 [out, n_groups]     asymmetric int only
//   <prefix>.tensor_scale  F32 [1]                 ternary and nvfp4 only
// (The checkpoint writer owns the final naming; this header documents only the config block.)
//
// ---- Read --------------------------------------------------------------------------------------
//   * "quant_method": "lowbit" with "format" (checked against bits / group_size / sym if present);
//   * "quant_method": "gptq" or "awq" ({"bits", "group_size", "sym" | "zero_point"}) are mapped to
//     the lowbit integer format with the same bits, group size and symmetry (asymmetric = with a
//     zero point). This picks the format only: GPTQ/AWQ checkpoints pack their tensors differently
//     (int32 qweight / qzeros, g_idx), which a loader has to convert; and GPTQ's symmetric grid
//     (scale 2*absmax/(2^B-1), zero 2^(B-1), so code 0 is used) differs from lowbit's (format.h),
//     so symmetric GPTQ tensors must be converted as asymmetric ones with a fixed zero point.
// Anything else throws lowbit::Error naming the offending key.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "lowbit/quant/format.h"

namespace lowbit {

struct QuantConfig {
  const QuantFormat* format = nullptr;
  std::string method = "rtn";
  nlohmann::json method_args = nlohmann::json::object();
  std::vector<std::string> modules_not_to_convert;
};

nlohmann::json to_quantization_config(const QuantConfig& c);
QuantConfig parse_quantization_config(const nlohmann::json& j);

}  // namespace lowbit
