#include "lowbit/quant/qconfig.h"

#include "lowbit/core/error.h"

namespace lowbit {

namespace {

const char* scale_type_name(ScaleType t) {
  switch (t) {
    case ScaleType::F16: return "float16";
    case ScaleType::E8M0: return "e8m0";
    case ScaleType::E4M3: return "e4m3";
    case ScaleType::None: break;
  }
  return "none";
}

const char* element_type_name(QuantKind k) {
  switch (k) {
    case QuantKind::IntAsym:
    case QuantKind::IntSym: return "int";
    case QuantKind::Ternary: return "ternary";
    case QuantKind::FP4_MX:
    case QuantKind::FP4_NV: return "e2m1";
    case QuantKind::GgmlBlock: return "ggml";
    case QuantKind::TritPlanes: return "trit-planes";
    case QuantKind::SalientBinary: return "salient-binary";
    case QuantKind::SignValue: return "sign-value";
  }
  return "?";
}

// group_size as written in the config: HF/GPTQ use -1 for "whole row".
int64_t config_group_size(const QuantFormat& f) {
  return f.granularity == ScaleGranularity::PerChannel ? -1 : f.group_size;
}

template <class T>
T get(const nlohmann::json& j, const char* key, const char* what) {
  try {
    return j.at(key).get<T>();
  } catch (const nlohmann::json::exception& e) {
    throw_error("quantization_config: key '", key, "' ", j.contains(key) ? "has the wrong type" : "is missing", " (",
                what, ")");
  }
}

// The lowbit integer format with the given arithmetic, or an error listing what exists.
const QuantFormat& int_format_for(int bits, int64_t group_size, bool sym, const char* source) {
  for (const QuantFormat& f : all_quant_formats()) {
    bool is_int = f.kind == QuantKind::IntAsym || f.kind == QuantKind::IntSym;
    if (is_int && f.bits == bits && config_group_size(f) == group_size && (f.kind == QuantKind::IntSym) == sym)
      return f;
  }
  throw_error("quantization_config (", source, "): no lowbit format for bits=", bits, ", group_size=", group_size,
              ", sym=", sym ? "true" : "false", " (lowbit has: ", quant_format_names(), ")");
}

}  // namespace

nlohmann::json to_quantization_config(const QuantConfig& c) {
  LB_CHECK(c.format != nullptr, "to_quantization_config: no format set");
  const QuantFormat& f = *c.format;
  nlohmann::json j;
  j["quant_method"] = "lowbit";
  j["format"] = f.name;
  j["format_id"] = int(f.id);
  j["bits"] = f.bits;
  j["group_size"] = config_group_size(f);
  if (f.granularity == ScaleGranularity::PerTensor) j["per_tensor"] = true;
  j["sym"] = f.kind != QuantKind::IntAsym;
  j["zero_point"] = f.has_zero;
  j["scale_dtype"] = scale_type_name(f.scale_type);
  j["tensor_scale"] = f.has_tensor_scale;
  j["element_type"] = element_type_name(f.kind);
  j["bits_per_weight"] = f.bits_per_weight(4096, 4096);
  j["method"] = c.method;
  j["method_args"] = c.method_args.is_null() ? nlohmann::json::object() : c.method_args;
  j["modules_not_to_convert"] = c.modules_not_to_convert;
  return j;
}

QuantConfig parse_quantization_config(const nlohmann::json& j) {
  LB_CHECK(j.is_object(), "quantization_config must be a JSON object, got ", j.type_name());
  const std::string qm = get<std::string>(j, "quant_method", "which quantizer wrote the checkpoint");
  QuantConfig c;
  if (j.contains("modules_not_to_convert") && !j["modules_not_to_convert"].is_null())
    c.modules_not_to_convert = get<std::vector<std::string>>(j, "modules_not_to_convert", "list of module names");
  if (qm == "lowbit") {
    c.format = &parse_quant_format(get<std::string>(j, "format", "a lowbit format name such as int4g128"));
    const QuantFormat& f = *c.format;
    if (j.contains("format_id"))
      LB_CHECK(get<int>(j, "format_id", "QuantFormatId") == int(f.id), "quantization_config: format '", f.name,
               "' has id ", int(f.id), " but format_id says ", j["format_id"].dump());
    if (j.contains("bits"))
      LB_CHECK(get<int>(j, "bits", "bits per code") == f.bits, "quantization_config: format '", f.name, "' has ",
               f.bits, " bits but 'bits' says ", j["bits"].dump());
    if (j.contains("group_size"))
      LB_CHECK(get<int64_t>(j, "group_size", "group size") == config_group_size(f), "quantization_config: format '",
               f.name, "' has group_size ", config_group_size(f), " but 'group_size' says ", j["group_size"].dump());
    if (j.contains("sym"))
      LB_CHECK(get<bool>(j, "sym", "symmetric") == (f.kind != QuantKind::IntAsym), "quantization_config: format '",
               f.name, "' disagrees with 'sym' = ", j["sym"].dump());
    if (j.contains("method")) c.method = get<std::string>(j, "method", "method name");
    if (j.contains("method_args")) c.method_args = j["method_args"];
    return c;
  }
  if (qm == "gptq" || qm == "awq") {
    const int bits = get<int>(j, "bits", "bits per weight");
    const int64_t group = j.contains("group_size") ? get<int64_t>(j, "group_size", "group size") : -1;
    // GPTQ says "sym"; AutoAWQ says "zero_point" (true = asymmetric).
    bool sym = qm == "gptq" ? (j.contains("sym") ? get<bool>(j, "sym", "symmetric") : true)
                            : !(j.contains("zero_point") ? get<bool>(j, "zero_point", "zero point") : true);
    c.format = &int_format_for(bits, group, sym, qm.c_str());
    c.method = qm;
    nlohmann::json args = j;
    for (const char* k : {"quant_method", "bits", "group_size", "sym", "zero_point", "modules_not_to_convert"})
      args.erase(k);
    c.method_args = args;
    return c;
  }
  throw_error("quantization_config: unsupported quant_method '", qm, "' (expected lowbit, gptq or awq)");
}

}  // namespace lowbit
