#include "lowbit/io/quantized_checkpoint.h"

#include <sys/mman.h>

#include <cmath>
#include <cstdio>
#include <algorithm>
#include <filesystem>
#include <fstream>

#include "lowbit/io/hf.h"
#include "lowbit/io/rope_layout.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/io/tensor_parallel_load.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"
#include "lowbit/quant/ptq161_tensor.h"

namespace lowbit {

namespace fs = std::filesystem;

namespace {

bool is_qk(const std::string& module) {
  return module.ends_with("self_attn.q_proj") || module.ends_with("self_attn.k_proj");
}

// Applies a row permutation (interleaved <-> half) to every per-row tensor of a quantized layer.
QuantizedTensor permute_rows(const QuantizedTensor& q, int heads, int head_dim, bool to_half) {
  auto f = [&](const Tensor& t) {
    if (!t.defined() || t.dim() != 2) return t;
    return to_half ? rope_rows_interleaved_to_half(t, heads, head_dim) : rope_rows_half_to_interleaved(t, heads, head_dim);
  };
  QuantizedTensor r = q;
  r.codes = f(q.codes);
  r.scales = f(q.scales);
  r.zeros = f(q.zeros);
  return r;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw_error(path, ": cannot open");
  nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
  if (j.is_discarded()) throw_error(path, ": not valid JSON");
  return j;
}

// quantization_config.transforms (see the header) and the rotation tensors.
ModelTransforms read_transforms(const nlohmann::json& j, SafetensorsFile& f, const LlamaConfig& c,
                                const std::string& cfg_path, const std::string& st_path) {
  if (!j.is_object()) throw_error(cfg_path, ": quantization_config.transforms is not an object");
  auto str = [&](const char* key) -> std::string {
    if (!j.contains(key) || !j[key].is_string())
      throw_error(cfg_path, ": quantization_config.transforms.", key, " is missing or not a string");
    return j[key].get<std::string>();
  };
  auto num = [&](const char* key, bool integer) -> double {
    if (!j.contains(key) || !j[key].is_number() || (integer && !j[key].is_number_integer()))
      throw_error(cfg_path, ": quantization_config.transforms.", key, " is missing or not ", integer ? "an integer" : "a number");
    return j[key].get<double>();
  };
  ModelTransforms t;
  try {
    const std::string rot = str("rotation");
    if (rot != "none") {
      if (rot != "hadamard" && rot != "h-bitlinear")
        throw_error("rotation '", rot, "' is unknown (expected hadamard, h-bitlinear or none)");
      t.rotation = rot;
      if (!j.contains("rotation_seed") || !j["rotation_seed"].is_number_unsigned())
        throw_error("rotation_seed is missing or not a non-negative integer");
      t.rotation_seed = j["rotation_seed"].get<uint64_t>();
    }
    t.act = parse_act_quant(str("act"), "act");
    t.act.clip = num("act_clip", false);
    if (j.contains("act_clips")) {  // searched per (layer, point); validate_transforms checks the count and range
      if (!j["act_clips"].is_array()) throw_error("act_clips is not an array");
      for (const auto& v : j["act_clips"]) {
        if (!v.is_number()) throw_error("act_clips holds a non-number");
        t.act.clips.push_back(v.get<double>());
      }
    }
    const std::string kvq = str("kv_quant");
    t.kv.bits = parse_kv_quant_bits(kvq, "kv_quant");
    if (kv_quant_channels(kvq) > 0) {  // CQ: the group width is recorded too and must match the name
      const double ch = num("kv_cq_channels", true);
      if (ch != kv_quant_channels(kvq))
        throw_error("kv_cq_channels ", ch, " does not match kv_quant ", kvq, " (", kv_quant_channels(kvq), " channels)");
      t.kv.cq_channels = int(ch);
    }
    t.kv.wkv = kv_quant_wkv(kvq);
    const double group = num("kv_group", true), window = num("kv_window", true);
    if (group < 1 || group > 4096 || window < 0 || window > double(int64_t(1) << 30))
      throw_error("kv_group ", group, " / kv_window ", window, " out of range");
    t.kv.group = int64_t(group);
    t.kv.window = int64_t(window);
    if (j.contains("kv_token_quant")) t.kv_token_bits = parse_kv_token_bits(str("kv_token_quant"), "kv_token_quant");
  } catch (const Error& e) {
    throw_error(cfg_path, ": quantization_config.transforms: ", e.what());
  }
  for (const auto& [name, r] :
       {std::pair<const char*, HadamardRotation*>{"ffn", &t.ffn}, {"head", &t.head}, {"o_in", &t.o_in}}) {
    const std::string base = std::string("lowbit.rotation.") + name;
    if (f.find(base + ".signs")) r->signs = f.load_f32(base + ".signs");
    if (f.find(base + ".small")) r->small = f.load_f32(base + ".small");
  }
  if (t.kv.coupled()) {  // the codebooks (validate_transforms checks their shapes and values)
    for (const auto& [name, dst] : {std::pair<const char*, Tensor*>{"lowbit.kv_cq.keys", &t.kv.cq_keys},
                                    {"lowbit.kv_cq.values", &t.kv.cq_values}}) {
      if (!f.find(name))
        throw_error(st_path, ": ", name, " is missing (", cfg_path, " records kv_quant ", kv_quant_name(t.kv),
                    ", whose codebooks it holds)");
      try {
        *dst = f.load_f32(name);
      } catch (const Error& e) {
        throw_error(st_path, ": ", name, ": ", e.what());
      }
    }
  } else {
    for (const char* name : {"lowbit.kv_cq.keys", "lowbit.kv_cq.values"})
      if (f.find(name)) throw_error(st_path, ": ", name, " is present but ", cfg_path, " records no coupled KV quantization");
  }
  if (t.kv.smoothed()) {  // WKVQuant's smoothing (validate_transforms checks shapes and values)
    for (const auto& [name, dst] : {std::pair<const char*, Tensor*>{"lowbit.kv_wkv.shift", &t.kv.wkv_shift},
                                    {"lowbit.kv_wkv.scale", &t.kv.wkv_scale}}) {
      if (!f.find(name))
        throw_error(st_path, ": ", name, " is missing (", cfg_path, " records kv_quant ", kv_quant_name(t.kv),
                    ", whose smoothing it holds)");
      try {
        *dst = f.load_f32(name);
      } catch (const Error& e) {
        throw_error(st_path, ": ", name, ": ", e.what());
      }
    }
  } else {
    for (const char* name : {"lowbit.kv_wkv.shift", "lowbit.kv_wkv.scale"})
      if (f.find(name)) throw_error(st_path, ": ", name, " is present but ", cfg_path, " records no WKVQuant KV quantization");
  }
  validate_transforms(c, t, st_path);
  return t;
}

}  // namespace

namespace {

// The tensors of block i's linears as save_quantized_model writes them, with the counts the
// config records.
struct BlockTensors {
  std::vector<std::pair<std::string, Tensor>> ts;
  int n_quant = 0, n_lora = 0;
  int64_t max_rank = 0;
  nlohmann::json layer_formats = nlohmann::json::object();  // layers not in `format` (mixed plans)
  // QuIP incoherence processing: module -> {"seed": N, "sides": "both" | "input"} (quant/incoherence.h)
  nlohmann::json incoherence = nlohmann::json::object();
};

// The tensors of a layer's incoherence transform (see the header).
void incoherence_tensors(const std::string& m, const Incoherence& t, std::vector<std::pair<std::string, Tensor>>& ts) {
  for (const auto& [side, r] : {std::pair<const char*, const HadamardRotation*>{"in", &t.in}, {"out", &t.out}}) {
    if (!r->defined()) continue;
    ts.emplace_back(m + ".incoherence." + side + "_signs", r->signs.contiguous());
    if (r->small.defined()) ts.emplace_back(m + ".incoherence." + side + "_small", r->small.contiguous());
  }
}

void block_linear_tensors(const LlamaModel& model, int i, const QuantFormat& format, LoraStorage lora,
                          DType merged_dtype, BlockTensors& out) {
  const LlamaConfig& c = model.config();
  const bool permute = c.rope_style == RopeStyle::Interleaved;
  const int hd = c.resolved_head_dim();
  auto& b = const_cast<LlamaModel&>(model).block(i);
  for (auto& [name, slot] : b.linears()) {
    const std::string m = "model.layers." + std::to_string(i) + "." + name;
    const int heads = name == "self_attn.q_proj" ? c.n_heads : c.n_kv_heads;
    Tensor bias = (*slot)->bias();
    auto* ql = dynamic_cast<const QuantLinear*>(slot->get());
    if (ql && ql->has_lora()) {
      ++out.n_lora;
      out.max_rank = std::max(out.max_rank, ql->lora_rank());
    }
    if (ql && ql->has_lora() && lora == LoraStorage::Merged) {
      // Dense Ŵ + B A: the layer is no longer packed (see the bits-per-weight note in the header).
      Tensor wt = ql->effective_weight().to(Device::CPU).contiguous();
      if (permute && is_qk(m)) wt = rope_rows_interleaved_to_half(wt, heads, hd);
      out.ts.emplace_back(m + ".weight", wt.to(merged_dtype));
      ++out.n_quant;
    } else if (ql) {
      if (ql->packed().format != format.id) out.layer_formats[m] = ql->packed().fmt().name;
      QuantizedTensor q = permute && is_qk(m) ? permute_rows(ql->quantized(), heads, hd, true) : ql->quantized();
      out.ts.emplace_back(m + ".qweight", q.codes);
      if (q.scales.defined()) out.ts.emplace_back(m + ".scales", q.scales);
      if (q.zeros.defined()) out.ts.emplace_back(m + ".qzeros", q.zeros);
      if (q.tensor_scale.defined()) out.ts.emplace_back(m + ".tensor_scale", q.tensor_scale);
      if (q.col_mask.defined()) out.ts.emplace_back(m + ".col_mask", q.col_mask);  // per column: not permuted
      if (q.col_scales.defined()) out.ts.emplace_back(m + ".col_scales", q.col_scales);
      if (ql->incoherence().defined()) {
        // The transforms mix all rows: a model whose q/k rows are permuted on writing cannot carry them.
        if (permute && is_qk(m))
          throw_error("save_quantized_model: ", m, " has an incoherence transform and the model's q/k rows are in the "
                      "interleaved RoPE order, which the checkpoint stores permuted; quantize a Hugging Face-order model");
        incoherence_tensors(m, ql->incoherence(), out.ts);
        out.incoherence[m] = {{"seed", ql->incoherence().seed}, {"sides", ql->incoherence().out.defined() ? "both" : "input"}};
      }
      if (ql->has_lora()) {
        Tensor b = ql->lora_B().to(Device::CPU).contiguous();
        if (permute && is_qk(m)) b = rope_rows_interleaved_to_half(b, heads, hd);
        out.ts.emplace_back(m + ".lora_A", ql->lora_A().to(Device::CPU).contiguous().to(DType::F16));
        out.ts.emplace_back(m + ".lora_B", b.to(DType::F16));
      }
      ++out.n_quant;
    } else {
      Tensor wt = (*slot)->effective_weight().to(Device::CPU).contiguous();
      if (permute && is_qk(m)) wt = rope_rows_interleaved_to_half(wt, heads, hd);
      out.ts.emplace_back(m + ".weight", wt);
    }
    if (bias.defined()) {
      Tensor bt = bias.to(Device::CPU).contiguous();
      if (permute && is_qk(m)) bt = rope_rows_interleaved_to_half(bt, heads, hd);
      out.ts.emplace_back(m + ".bias", bt);
    }
  }
}

nlohmann::json quantized_config_json(const LlamaConfig& c, const std::string& method, const QuantFormat& format,
                                     const BlockTensors& agg, LoraStorage lora, DType merged_dtype,
                                     const ModelTransforms& tr, const nlohmann::json& extra) {
  if (agg.n_quant == 0) throw_error("save_quantized_model: the model has no quantized layer");
  LlamaConfig hc = c;
  hc.rope_style = RopeStyle::Half;
  nlohmann::json cfg = config_to_hf_json(hc, "float32");
  nlohmann::json qc = {{"quant_method", "lowbit"},
                       {"version", 1},
                       {"format", format.name},
                       {"bits", format.bits},
                       {"group_size", format.group_size},
                       {"sym", format.kind != QuantKind::IntAsym},  // as quant/qconfig.cpp checks it
                       {"method", method},
                       {"modules_not_to_convert", {"lm_head", "model.embed_tokens"}}};
  if (!agg.layer_formats.empty()) qc["layer_formats"] = agg.layer_formats;
  if (!agg.incoherence.empty()) qc["incoherence"] = agg.incoherence;
  if (agg.n_lora > 0) {
    qc["lora"] = lora == LoraStorage::Merged ? "merged" : "separate";
    qc["lora_rank"] = agg.max_rank;
    if (lora == LoraStorage::Merged) qc["lora_merged_dtype"] = dtype_name(merged_dtype);
  }
  if (tr.any())
    qc["transforms"] = {{"rotation", tr.rotation.empty() ? "none" : tr.rotation},
                        {"rotation_seed", tr.rotation_seed},
                        {"act", act_quant_name(tr.act)},
                        {"act_clip", tr.act.clip},
                        {"kv_quant", kv_quant_name(tr.kv)},
                        {"kv_group", tr.kv.group},
                        {"kv_window", tr.kv.window},
                        {"kv_token_quant", tr.kv_token_bits ? "int" + std::to_string(tr.kv_token_bits) : "none"}};
  if (tr.any() && !tr.act.clips.empty()) qc["transforms"]["act_clips"] = tr.act.clips;
  if (tr.kv.coupled()) qc["transforms"]["kv_cq_channels"] = tr.kv.cq_channels;
  for (auto& [k, v] : extra.items()) qc[k] = v;
  cfg["quantization_config"] = qc;
  return cfg;
}

// The online rotations' tensors (rotated models).
void rotation_tensors(const ModelTransforms& tr, std::vector<std::pair<std::string, Tensor>>& ts) {
  if (!tr.any()) return;
  for (const auto& [name, r] :
       {std::pair<const char*, const HadamardRotation*>{"ffn", &tr.ffn}, {"head", &tr.head}, {"o_in", &tr.o_in}}) {
    if (!r->defined()) continue;
    ts.emplace_back(std::string("lowbit.rotation.") + name + ".signs", r->signs.contiguous());
    if (r->small.defined()) ts.emplace_back(std::string("lowbit.rotation.") + name + ".small", r->small.contiguous());
  }
  if (tr.kv.coupled()) {  // CQ codebooks [layers, groups, centroids, channels]: f16 when every value is
                          // one (KVCodebookOptions::f16, the default: half the bytes), else f32; read as f32
    for (const auto& [name, cb] :
         {std::pair<const char*, const Tensor*>{"lowbit.kv_cq.keys", &tr.kv.cq_keys}, {"lowbit.kv_cq.values", &tr.kv.cq_values}}) {
      const Tensor c = cb->contiguous();
      const Tensor h = c.to(DType::F16);
      ts.emplace_back(name, max_abs_diff(h.to(DType::F32), c) == 0.0 ? h : c);
    }
  }
  if (tr.kv.smoothed()) {  // WKVQuant smoothing, f32 [layers, 2 (keys, values), channels]
    ts.emplace_back("lowbit.kv_wkv.shift", tr.kv.wkv_shift.contiguous());
    ts.emplace_back("lowbit.kv_wkv.scale", tr.kv.wkv_scale.contiguous());
  }
}

const std::map<std::string, std::string> kCheckpointMetadata = {{"format", "pt"}, {"quantizer", "lowbit"}};

void write_config_json(const std::string& dir, const nlohmann::json& cfg) {
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  {
    std::ofstream o(cfg_path + ".tmp");
    o << cfg.dump(2) << "\n";
    if (!o) throw_error(cfg_path, ": write failed");
  }
  fs::rename(cfg_path + ".tmp", cfg_path);
}

}  // namespace

void save_quantized_model(const std::string& dir, const LlamaModel& model, const std::string& method,
                          const QuantFormat& format, const nlohmann::json& extra, LoraStorage lora,
                          DType merged_dtype) {
  if (merged_dtype != DType::F16 && merged_dtype != DType::F32)
    throw_error("save_quantized_model: merged LoRA layers are written in f16 or f32, not ", dtype_name(merged_dtype));
  const LlamaConfig& c = model.config();
  std::vector<std::pair<std::string, Tensor>> ts;
  LlamaWeights w = model.weights();
  // Non-linear tensors in HF layout (norms are per channel and do not need permuting, except
  // Qwen3 q/k norms, which the helper below handles with the weights).
  LlamaWeights hfw = weights_with_rope_style(c, w, RopeStyle::Half);
  for_each_weight(hfw, [&](const std::string& name, const Tensor& t) {
    if (name.find("_proj.") != std::string::npos) return;  // linears below
    ts.emplace_back(name, t.to(Device::CPU).contiguous());
  });
  BlockTensors agg;
  agg.ts = std::move(ts);
  for (int i = 0; i < model.n_layers(); ++i) block_linear_tensors(model, i, format, lora, merged_dtype, agg);
  const nlohmann::json cfg = quantized_config_json(c, method, format, agg, lora, merged_dtype, model.transforms(), extra);
  rotation_tensors(model.transforms(), agg.ts);
  fs::create_directories(dir);
  save_safetensors((fs::path(dir) / "model.safetensors").string(), agg.ts, kCheckpointMetadata);
  write_config_json(dir, cfg);
}

QuantizedBlockWriter::QuantizedBlockWriter(std::string parts_dir, LlamaConfig config, const QuantFormat& format,
                                           LoraStorage lora, DType merged_dtype)
    : parts_dir_(std::move(parts_dir)), config_(std::move(config)), format_(&format), lora_(lora), merged_dtype_(merged_dtype) {
  if (merged_dtype != DType::F16 && merged_dtype != DType::F32)
    throw_error("QuantizedBlockWriter: merged LoRA layers are written in f16 or f32, not ", dtype_name(merged_dtype));
  if (config_.rope_style != RopeStyle::Half)
    throw_error("QuantizedBlockWriter: the model's q/k rows are not in the Hugging Face order (streamed models come from "
                "Hugging Face directories)");
}

std::string QuantizedBlockWriter::part_path(int i) const {
  char buf[40];
  std::snprintf(buf, sizeof buf, "block-%05d.safetensors", i);
  return (fs::path(parts_dir_) / buf).string();
}

void QuantizedBlockWriter::write_block(const LlamaModel& model, int i,
                                       const std::map<std::string, std::string>& metadata) const {
  LlamaBlock& b = const_cast<LlamaModel&>(model).block(i);
  const std::string p = "model.layers." + std::to_string(i) + ".";
  BlockTensors bt;
  // The norms in for_each_weight's order (the order save_quantized_model writes them in).
  bt.ts.emplace_back(p + "input_layernorm.weight", b.attn_norm.value().to(Device::CPU).contiguous());
  if (config_.qk_norm) {
    bt.ts.emplace_back(p + "self_attn.q_norm.weight", b.q_norm.value().to(Device::CPU).contiguous());
    bt.ts.emplace_back(p + "self_attn.k_norm.weight", b.k_norm.value().to(Device::CPU).contiguous());
  }
  bt.ts.emplace_back(p + "post_attention_layernorm.weight", b.ffn_norm.value().to(Device::CPU).contiguous());
  const size_t norms = bt.ts.size();
  block_linear_tensors(model, i, *format_, lora_, merged_dtype_, bt);
  std::map<std::string, std::string> md = metadata;
  md["norms"] = std::to_string(norms);
  md["n_quant"] = std::to_string(bt.n_quant);
  md["n_lora"] = std::to_string(bt.n_lora);
  md["max_rank"] = std::to_string(bt.max_rank);
  md["layer_formats"] = bt.layer_formats.dump();
  if (!bt.incoherence.empty()) md["incoherence"] = bt.incoherence.dump();
  fs::create_directories(parts_dir_);
  save_safetensors(part_path(i), bt.ts, md);
}

bool QuantizedBlockWriter::has_block(int i, const std::string& key) const {
  std::error_code ec;
  if (!fs::exists(part_path(i), ec)) return false;
  const SafetensorsFile f = SafetensorsFile::open(part_path(i));
  auto it = f.metadata().find("key");
  return it != f.metadata().end() && it->second == key;
}

void QuantizedBlockWriter::assemble(const std::string& dir, const std::string& method, const nlohmann::json& extra,
                                    const ModelTransforms& transforms, const DenseSource& dense) const {
  const LlamaConfig& c = config_;
  BlockTensors agg;  // counts only
  struct Part {
    std::shared_ptr<SafetensorsFile> file;
    std::vector<const SafetensorsTensorInfo*> order;  // data order = the order written
    size_t norms = 0;
  };
  std::vector<Part> parts(size_t(c.n_layers));
  for (int i = 0; i < c.n_layers; ++i) {
    Part& part = parts[size_t(i)];
    const std::string path = part_path(i);
    part.file = std::make_shared<SafetensorsFile>(SafetensorsFile::open(path));
    const auto& md = part.file->metadata();
    auto get = [&](const char* k) -> const std::string& {
      auto it = md.find(k);
      if (it == md.end()) throw_error(path, ": part file lacks metadata '", k, "'");
      return it->second;
    };
    try {
      part.norms = size_t(std::stoul(get("norms")));
      agg.n_quant += std::stoi(get("n_quant"));
      agg.n_lora += std::stoi(get("n_lora"));
      agg.max_rank = std::max<int64_t>(agg.max_rank, std::stoll(get("max_rank")));
    } catch (const std::logic_error&) {
      throw_error(path, ": part file has a malformed count in its metadata");
    }
    const auto lf = nlohmann::json::parse(get("layer_formats"), nullptr, false);
    if (!lf.is_object()) throw_error(path, ": part file has a malformed layer list in its metadata");
    for (const auto& [m, f] : lf.items()) agg.layer_formats[m] = f;
    if (md.count("incoherence")) {
      const auto inc = nlohmann::json::parse(md.at("incoherence"), nullptr, false);
      if (!inc.is_object()) throw_error(path, ": part file has a malformed incoherence list in its metadata");
      for (const auto& [m, v] : inc.items()) agg.incoherence[m] = v;
    }
    for (const auto& t : part.file->tensors()) part.order.push_back(&t);
    std::sort(part.order.begin(), part.order.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
    if (part.norms > part.order.size()) throw_error(path, ": part file lists ", part.norms, " norms but holds fewer tensors");
    for (const auto* t : part.order)
      if (!t->dtype) throw_error(path, ": tensor '", t->name, "' has dtype ", t->dtype_name, ", which lowbit does not write");
  }
  const nlohmann::json cfg = quantized_config_json(c, method, *format_, agg, lora_, merged_dtype_, transforms, extra);
  std::vector<SafetensorsStreamEntry> entries;
  auto add_dense = [&](const std::string& name, const Shape& shape) {
    entries.push_back({name, DType::F32, shape, [&dense, name, shape](const std::function<void(const void*, size_t)>& out) {
                         dense(name, shape, out);
                       }});
  };
  auto add_part = [&](const Part& part, const SafetensorsTensorInfo* t) {
    auto file = part.file;
    const std::string name = t->name;
    const uint64_t n = t->end - t->begin;
    entries.push_back({name, *t->dtype, t->shape, [file, name, n](const std::function<void(const void*, size_t)>& out) {
                         std::vector<uint8_t> buf(size_t(std::min<uint64_t>(n, 4u << 20)));
                         for (uint64_t at = 0; at < n; at += buf.size()) {
                           const uint64_t k = std::min<uint64_t>(buf.size(), n - at);
                           file->read_bytes(name, at, k, buf.data());
                           out(buf.data(), size_t(k));
                         }
                       }});
  };
  // save_quantized_model's order: the non-linear tensors (for_each_weight order), every block's
  // linears, the rotations' tensors.
  add_dense("model.embed_tokens.weight", {c.vocab_size, c.dim});
  for (const Part& part : parts)
    for (size_t k = 0; k < part.norms; ++k) add_part(part, part.order[k]);
  add_dense("model.norm.weight", {c.dim});
  if (!c.tied_embeddings) add_dense("lm_head.weight", {c.vocab_size, c.dim});
  for (const Part& part : parts)
    for (size_t k = part.norms; k < part.order.size(); ++k) add_part(part, part.order[k]);
  std::vector<std::pair<std::string, Tensor>> rot;
  rotation_tensors(transforms, rot);
  for (const auto& [name, t] : rot) {
    Tensor ct = t.to(Device::CPU).contiguous();
    entries.push_back({name, ct.dtype(), ct.shape(), [ct](const std::function<void(const void*, size_t)>& out) {
                         out(ct.raw_data(), ct.nbytes());
                       }});
  }
  fs::create_directories(dir);
  save_safetensors_streamed((fs::path(dir) / "model.safetensors").string(), entries, kCheckpointMetadata);
  write_config_json(dir, cfg);
}

bool is_lowbit_quantized_dir(const std::string& dir) {
  const auto p = fs::path(dir) / "config.json";
  if (!fs::is_regular_file(p)) return false;
  std::ifstream f(p);
  nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
  return !j.is_discarded() && j.is_object() && j.contains("quantization_config") &&
         j["quantization_config"].is_object() && j["quantization_config"].value("quant_method", "") == "lowbit";
}

namespace {
// load_quantized_model; with `lazy`, the block linears are not read but recorded there as sources
// (their rows read with pread: codes, scales and zeros of those rows) and the result is lazy->rest.
// vocab_q8_chunk > 0: the vocabulary matrices are packed as pack_vocab(q) packs them (Q8_0), read
// from the file in chunks of about that many f32 bytes and packed chunk by chunk (q8_0 blocks are
// per row, so the result is the same), so the f32 matrices are never held whole.
QuantizedCheckpoint load_quantized_impl(const std::string& dir, bool dense_view, LazyCheckpoint* lazy,
                                        int64_t vocab_q8_chunk = 0) {
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  nlohmann::json cfg = read_json(cfg_path);
  if (!cfg.contains("quantization_config") || !cfg["quantization_config"].is_object())
    throw_error(cfg_path, ": no quantization_config (not a quantized checkpoint)");
  const nlohmann::json& qc = cfg["quantization_config"];
  if (qc.value("quant_method", "") != "lowbit")
    throw_error(cfg_path, ": quantization_config.quant_method is '", qc.value("quant_method", ""),
                "'; lowbit reads its own packed layout ('lowbit') here");
  if (!qc.contains("format") || !qc["format"].is_string()) throw_error(cfg_path, ": quantization_config has no 'format'");
  const QuantFormat* fmt = nullptr;
  try {
    fmt = &parse_quant_format(qc["format"].get<std::string>());
  } catch (const Error& e) {
    throw_error(cfg_path, ": ", e.what());
  }
  // Mixed plans (--format-map / --preset): the layers whose format is not `format`.
  std::map<std::string, const QuantFormat*> layer_fmt;
  if (qc.contains("layer_formats")) {
    if (!qc["layer_formats"].is_object())
      throw_error(cfg_path, ": quantization_config.layer_formats must be an object {module: format}");
    for (const auto& [m, v] : qc["layer_formats"].items()) {
      if (!v.is_string()) throw_error(cfg_path, ": quantization_config.layer_formats['", m, "'] is not a string");
      try {
        layer_fmt[m] = &parse_quant_format(v.get<std::string>());
      } catch (const Error& e) {
        throw_error(cfg_path, ": quantization_config.layer_formats['", m, "']: ", e.what());
      }
    }
  }
  // QuIP incoherence processing: the layers with transforms (quant/incoherence.h).
  std::map<std::string, bool> inc_sides;  // module -> two-sided
  std::map<std::string, uint64_t> inc_seed;
  if (qc.contains("incoherence")) {
    const nlohmann::json& ij = qc["incoherence"];
    if (!ij.is_object()) throw_error(cfg_path, ": quantization_config.incoherence must be an object {module: {seed, sides}}");
    for (const auto& [m, v] : ij.items()) {
      const std::string where = cfg_path + ": quantization_config.incoherence['" + m + "']";
      if (!v.is_object()) throw_error(where, " is not an object");
      if (!v.contains("seed") || !v["seed"].is_number_unsigned()) throw_error(where, ".seed is missing or not a non-negative integer");
      if (!v.contains("sides") || !v["sides"].is_string() || (v["sides"] != "both" && v["sides"] != "input"))
        throw_error(where, ".sides is missing or not 'both' or 'input'");
      inc_sides[m] = v["sides"] == "both";
      inc_seed[m] = v["seed"].get<uint64_t>();
    }
  }
  QuantizedCheckpoint out;
  out.format = fmt->id;
  out.method = qc.value("method", "");
  out.dense.source = dir;
  out.dense.config = config_from_hf_json(cfg, cfg_path);
  const LlamaConfig& c = out.dense.config;
  const std::string st_path = (fs::path(dir) / "model.safetensors").string();
  const auto fp = std::make_shared<SafetensorsFile>(SafetensorsFile::open(st_path));
  SafetensorsFile& f = *fp;
  auto load = [&](const std::string& name) -> Tensor {
    if (!f.find(name)) throw_error(st_path, ": missing tensor '", name, "'");
    return f.load(name);
  };
  // f32 copies read with pread, not through the mapping: the file's pages of the dense tensors
  // (the vocabulary matrices above all) do not join the resident set next to their copies.
  auto loadf = [&](const std::string& name) -> Tensor {
    if (!f.find(name)) throw_error(st_path, ": missing tensor '", name, "'");
    return f.read_f32(name);
  };
  // Every incoherence tensor belongs to a listed layer (a record cannot be half removed).
  for (const auto& t : f.tensors()) {
    const size_t at = t.name.find(".incoherence.");
    if (at != std::string::npos && !inc_sides.count(t.name.substr(0, at)))
      throw_error(st_path, ": tensor '", t.name, "' is an incoherence transform of '", t.name.substr(0, at),
                  "', which quantization_config.incoherence does not list");
  }
  if (lazy && !inc_sides.empty())
    throw_error(dir, ": a checkpoint with QuIP incoherence processing (quantize --method quip) cannot be loaded in "
                "tensor-parallel pieces (its transforms mix all rows and columns of a layer)");
  auto load_incoherence = [&](const std::string& m, int64_t rows, int64_t cols) {
    Incoherence t;
    t.seed = inc_seed.at(m);
    const bool both = inc_sides.at(m);
    for (const auto& [side, r] : {std::pair<const char*, HadamardRotation*>{"in", &t.in}, {"out", &t.out}}) {
      const std::string base = m + ".incoherence." + side;
      if (std::string(side) == "out" && !both) {
        if (f.find(base + "_signs") || f.find(base + "_small"))
          throw_error(st_path, ": incoherence of ", m, ": an output transform given for an input-side-only record");
        continue;
      }
      r->signs = load(base + "_signs");
      if (f.find(base + "_small")) r->small = load(base + "_small");
    }
    validate_incoherence(t, rows, cols, both, st_path, m);
    return t;
  };
  LlamaWeights& w = out.dense.weights;
  w = LlamaWeights{};
  auto vocab = [&](const std::string& module, Tensor* slot) {
    const std::string name = module + ".weight";
    const QuantFormat& qf = quant_format(QuantFormatId::Q8_0);
    const SafetensorsTensorInfo* info = f.find(name);
    if (vocab_q8_chunk <= 0 || !info || info->shape.size() != 2 || !qf.row_fits(info->shape[1])) {
      *slot = loadf(name);  // as pack_vocab: a width that is not whole blocks stays dense
      return;
    }
    const int64_t V = info->shape[0], D = info->shape[1], rb = qf.row_bytes(D);
    const int64_t chunk = std::max<int64_t>(1, vocab_q8_chunk / (D * 4));
    Tensor blocks = Tensor::empty({V, rb}, DType::U8);
    std::vector<float> buf(size_t(std::min(V, chunk) * D));
    for (int64_t r0 = 0; r0 < V; r0 += chunk) {
      const int64_t n = std::min(V, r0 + chunk) - r0;
      f.read_f32(name, r0 * D, n * D, buf.data());
      for (int64_t i = 0; i < n * D; ++i)
        if (!std::isfinite(buf[size_t(i)]))
          throw_error(st_path, ": tensor '", name, "' has a non-finite value (", buf[size_t(i)], ") at index ", r0 * D + i);
      for (int64_t r = 0; r < n; ++r) qf.quantize_row(buf.data() + r * D, D, blocks.data<uint8_t>() + (r0 + r) * rb);
    }
    out.quantized[module] = make_ggml_quantized_tensor(qf, V, D, blocks, st_path + ": " + name);
    *slot = zero_placeholder({V, D});
  };
  vocab("model.embed_tokens", &w.tok_embeddings);
  w.final_norm = loadf("model.norm.weight");
  if (!c.tied_embeddings) vocab("lm_head", &w.output);
  const int64_t D = c.dim, F = c.hidden_dim, h = c.resolved_head_dim();
  const int64_t Q = int64_t(c.n_heads) * h, KV = int64_t(c.n_kv_heads) * h;
  for (int i = 0; i < c.n_layers; ++i) {
    LayerWeights l;
    const std::string p = "model.layers." + std::to_string(i) + ".";
    l.attn_norm = loadf(p + "input_layernorm.weight");
    l.ffn_norm = loadf(p + "post_attention_layernorm.weight");
    if (c.qk_norm) {
      l.q_norm = loadf(p + "self_attn.q_norm.weight");
      l.k_norm = loadf(p + "self_attn.k_norm.weight");
    }
    struct Lin {
      const char* name;
      Tensor* w;
      Tensor* b;
      int64_t out, in;
    } lins[] = {{"self_attn.q_proj", &l.wq, &l.bq, Q, D},  {"self_attn.k_proj", &l.wk, &l.bk, KV, D},
                {"self_attn.v_proj", &l.wv, &l.bv, KV, D}, {"self_attn.o_proj", &l.wo, nullptr, D, Q},
                {"mlp.gate_proj", &l.w_gate, nullptr, F, D}, {"mlp.up_proj", &l.w_up, nullptr, F, D},
                {"mlp.down_proj", &l.w_down, nullptr, D, F}};
    for (auto& lin : lins) {
      const std::string m = p + lin.name;
      if (f.find(m + ".ptq161_mask") || f.find(m + ".qweight")) {
        QuantizedTensor q;
        if (f.find(m + ".ptq161_mask")) {
          // The container of earlier versions (see the header): converted to the ptq161 format.
          q = ptq161_from_legacy(lin.out, lin.in, load(m + ".ptq161_mask"), load(m + ".ptq161_signs"),
                                 load(m + ".ptq161_q4"), load(m + ".ptq161_rows"), load(m + ".ptq161_cols"),
                                 st_path + ": ptq161 layer '" + m + "'");
          layer_fmt.erase(m);
        } else {
          auto lf = layer_fmt.find(m);
          q.format = lf != layer_fmt.end() ? lf->second->id : fmt->id;
          if (lf != layer_fmt.end()) layer_fmt.erase(lf);
          q.shape = {lin.out, lin.in};
          q.codes = f.map(m + ".qweight");
          if (f.find(m + ".scales")) q.scales = f.map(m + ".scales");
          if (f.find(m + ".qzeros")) q.zeros = f.map(m + ".qzeros");
          if (f.find(m + ".tensor_scale")) q.tensor_scale = load(m + ".tensor_scale");
          if (f.find(m + ".col_mask")) q.col_mask = load(m + ".col_mask");
          if (f.find(m + ".col_scales")) q.col_scales = load(m + ".col_scales");
          try {
            q.validate();
            if (!lazy) q.check_codes();
          } catch (const Error& e) {
            throw_error(st_path, ": quantized layer '", m, "': ", e.what());
          }
        }
        if (lazy) {
          LinearSource src;
          src.out = lin.out, src.in = lin.in;
          if (f.find(m + ".qweight")) {
            // Rows of codes / scales / zeros read on demand; the per-tensor fields kept (small).
            QuantizedTensor head = q;
            head.codes = head.scales = head.zeros = Tensor();
            const int64_t rb = q.row_bytes();
            const Tensor sc = q.scales, ze = q.zeros;
            const DType sdt = sc.defined() ? sc.dtype() : DType::U8, zdt = ze.defined() ? ze.dtype() : DType::U8;
            const int64_t scols = sc.defined() ? sc.size(1) : 0, zcols = ze.defined() ? ze.size(1) : 0;
            src.packed_rows = [fp, m, head, rb, sdt, zdt, scols, zcols, st_path](int64_t r0, int64_t r1) {
              const int64_t n = r1 - r0;
              QuantizedTensor p = head;
              p.shape = {n, head.in_features()};
              auto rows = [&](const std::string& name, int64_t cols, DType dt) {
                Tensor t = Tensor::empty({n, cols}, dt);
                const int64_t row = cols * int64_t(dtype_size(dt));
                fp->read_bytes(name, uint64_t(r0 * row), uint64_t(n * row), t.raw_data());
                return t;
              };
              p.codes = rows(m + ".qweight", rb, DType::U8);
              if (scols) p.scales = rows(m + ".scales", scols, sdt);
              if (zcols) p.zeros = rows(m + ".qzeros", zcols, zdt);
              try {
                p.validate();
                p.check_codes();
              } catch (const Error& e) {
                throw_error(st_path, ": quantized layer '", m, "': ", e.what());
              }
              return p;
            };
          } else {  // the legacy ptq161 container, converted whole: its rows
            src.packed_rows = [q](int64_t r0, int64_t r1) { return q.slice_rows(r0, r1); };
          }
          lazy->linears.emplace(m, std::move(src));
        }
        if (inc_sides.count(m)) {
          if (f.find(m + ".lora_A") || f.find(m + ".lora_B"))
            throw_error(st_path, ": '", m, "' has both LoRA adapters and an incoherence transform, which lowbit never writes");
          out.incoherence.emplace(m, load_incoherence(m, lin.out, lin.in));
          inc_sides.erase(m);
        }
        // Without a dense view: a zero placeholder of the right shape (no resident memory). The dense
        // view is the function the layer computes (for incoherence processing: R_out Q(W') R_in^T).
        if (!lazy) {
          auto inc = out.incoherence.find(m);
          *lin.w = !dense_view ? zero_placeholder({lin.out, lin.in})
                   : inc != out.incoherence.end() ? inc->second.unweight(q.dequantize())
                                                  : q.dequantize();
        }
        if (f.find(m + ".lora_A") || f.find(m + ".lora_B")) {
          LoraAdapters ad{loadf(m + ".lora_A"), loadf(m + ".lora_B")};
          if (ad.A.dim() != 2 || ad.A.size(1) != lin.in || ad.B.dim() != 2 || ad.B.size(0) != lin.out ||
              ad.B.size(1) != ad.A.size(0))
            throw_error(st_path, ": LoRA of '", m, "': lora_A ", ad.A.describe(), " and lora_B ", ad.B.describe(),
                        " do not fit a [", lin.out, ", ", lin.in, "] layer (expected [r, ", lin.in, "] and [", lin.out,
                        ", r])");
          // The dense view of the checkpoint is the function the layer computes: Ŵ + B A.
          if (dense_view) {
            const float *pa = ad.A.data<float>(), *pb = ad.B.data<float>();
            float* pw = lin.w->data<float>();
            const int64_t r = ad.A.size(0);
            for (int64_t o = 0; o < lin.out; ++o)
              for (int64_t k = 0; k < r; ++k) {
                const float b = pb[o * r + k];
                for (int64_t j = 0; j < lin.in; ++j) pw[o * lin.in + j] += b * pa[k * lin.in + j];
              }
          }
          out.lora.emplace(m, std::move(ad));
        }
        if (!lazy) out.quantized.emplace(m, std::move(q));
      } else if (lazy) {
        const std::string name = m + ".weight";
        if (!f.find(name)) throw_error(st_path, ": missing tensor '", name, "'");
        if (f.find(name)->shape != Shape{lin.out, lin.in})
          throw_error(st_path, ": tensor '", name, "' has shape ", shape_str(f.find(name)->shape), ", the config needs [",
                      lin.out, ", ", lin.in, "]");
        LinearSource src;
        src.out = lin.out, src.in = lin.in;
        const int64_t in = lin.in;
        src.dense_rows = [fp, name, in](int64_t r0, int64_t r1) {
          Tensor t = Tensor::empty({r1 - r0, in});
          fp->read_f32(name, r0 * in, (r1 - r0) * in, t.data<float>());
          return t;
        };
        lazy->linears.emplace(m, std::move(src));
      } else {
        *lin.w = loadf(m + ".weight");
      }
      if (lin.b && c.attn_bias) *lin.b = loadf(m + ".bias");
    }
    w.layers.push_back(std::move(l));
  }
  if (!layer_fmt.empty())
    throw_error(cfg_path, ": quantization_config.layer_formats names '", layer_fmt.begin()->first,
                "', which is not a packed linear of the model");
  if (!inc_sides.empty())
    throw_error(cfg_path, ": quantization_config.incoherence names '", inc_sides.begin()->first,
                "', which is not a packed linear of the model");
  if (!lazy) validate_weights(c, w, dir);
  if (qc.contains("transforms")) out.transforms = read_transforms(qc["transforms"], f, c, cfg_path, st_path);
  return out;
}
}  // namespace

QuantizedCheckpoint load_quantized_model(const std::string& dir, bool dense_view) {
  return load_quantized_impl(dir, dense_view, nullptr);
}

LazyCheckpoint open_quantized_dir_lazily(const std::string& dir, bool pack_vocab, int64_t chunk_bytes) {
  LazyCheckpoint z;
  z.rest = load_quantized_impl(dir, /*dense_view=*/false, &z, pack_vocab ? chunk_bytes : 0);
  return z;
}

void refuse_transforms(const QuantizedCheckpoint& q, const std::string& what) {
  const ModelTransforms& t = q.transforms;
  if (!q.incoherence.empty())
    throw_error(q.dense.source, ": ", what, " cannot carry this checkpoint's QuIP incoherence transforms (",
                q.incoherence.size(), " layers, e.g. ", q.incoherence.begin()->first,
                "): the result would compute another function; use lowbit eval / generate / serve on it instead");
  if (!t.any()) return;
  throw_error(q.dense.source, ": ", what, " cannot carry this checkpoint's transforms (rotation ",
              t.rotation.empty() ? "none" : t.rotation, ", activations ", act_quant_name(t.act), ", KV cache ",
              kv_quant_name(t.kv), ", per-token KV ",
              t.kv_token_bits ? "int" + std::to_string(t.kv_token_bits) : "none",
              "): the result would compute another function; use lowbit eval / generate / serve on it instead");
}

Tensor zero_placeholder(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  const size_t bytes = std::max<size_t>(size_t(n) * sizeof(float), 1);
  void* p = mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw_error("zero_placeholder: cannot map ", bytes, " bytes for a ", shape_str(shape), " placeholder");
  std::shared_ptr<void> owner(p, [bytes](void* q) { munmap(q, bytes); });
  return Tensor::from_blob(p, shape, DType::F32, owner);
}

std::unique_ptr<LlamaModel> make_quantized_model(const QuantizedCheckpoint& q, Device device) {
  LlamaWeights w = q.dense.weights;
  // Packed vocabulary: the table and the head stay packed (on the GPU too, for the formats with a
  // GPU form), their dense views are placeholders that never move.
  auto emb = q.quantized.find("model.embed_tokens");
  auto out = q.quantized.find(q.dense.config.tied_embeddings ? "model.embed_tokens" : "lm_head");
  const bool packed_vocab =
      emb != q.quantized.end() && out != q.quantized.end() &&
      (device == Device::CPU || (ops::cuda_packed_enabled() && ops::quant_matmul_has_cuda_layout(emb->second.packed_view()) &&
                                 ops::quant_matmul_has_cuda_layout(out->second.packed_view())));
  if (device != Device::CPU)
    for_each_weight(w, [&](const std::string& name, Tensor& t) {
      const std::string base = name.size() > 7 ? name.substr(0, name.size() - 7) : name;  // minus ".weight"
      const bool vocab = base == "model.embed_tokens" || base == "lm_head";
      auto it = q.quantized.find(base);
      if (it != q.quantized.end() && (!vocab || packed_vocab)) return;  // placeholder of a packed tensor: stays
      // A packed vocabulary without a GPU form: its dense values on the device (not the placeholder).
      t = (it != q.quantized.end() ? it->second.dequantize() : t).to(device);
    });
  auto model = std::make_unique<LlamaModel>(q.dense.config, w, false);
  model->set_transforms(q.transforms);
  for (int i = 0; i < model->n_layers(); ++i)
    for (auto& [name, slot] : model->block(i).linears()) {
      const std::string m = "model.layers." + std::to_string(i) + "." + name;
      auto it = q.quantized.find(m);
      if (it == q.quantized.end()) continue;
      auto lit = q.lora.find(m);
      if (lit != q.lora.end()) {
        *slot = std::make_shared<QuantLinear>(it->second, (*slot)->bias(), device, lit->second.A, lit->second.B);
      } else {
        auto ql = std::make_shared<QuantLinear>(it->second, (*slot)->bias(), device);
        if (auto inc = q.incoherence.find(m); inc != q.incoherence.end()) ql->set_incoherence(inc->second);
        *slot = ql;
      }
    }
  // A packed vocabulary (GGUF token_embd / output in a ggml block type): embeddings decoded row by
  // row (on the GPU: ops::quant_embedding from the uploaded table), the output projection through
  // quant_matmul.
  if (packed_vocab) {
    auto table = std::make_shared<QuantizedTensor>(emb->second);
    table->validate();
    LlamaModel::EmbedIdsFn ids_fn;
    if (device != Device::CPU) {
      table->upload_to_device();
      ids_fn = [table, device](const Tensor& ids) {
        Tensor e = Tensor::empty({ids.numel(), table->in_features()}, DType::F32, device);
        ops::quant_embedding(table->packed_view(), ids, e);
        return e;
      };
    }
    model->set_packed_vocab(std::make_shared<QuantLinear>(out->second, Tensor(), device),
                            [table](int64_t id, float* dst) { table->dequantize_row(id, dst); }, ids_fn);
  }
  return model;
}

int64_t pack_vocab(QuantizedCheckpoint& q, const std::map<std::string, QuantFormatId>& formats) {
  int64_t bytes = 0;
  LlamaWeights& w = q.dense.weights;
  const bool tied = q.dense.config.tied_embeddings;
  for (const auto& [name, id] : formats) {
    Tensor* t = name == "model.embed_tokens" ? &w.tok_embeddings : name == "lm_head" && !tied ? &w.output : nullptr;
    if (!t) throw_error(q.dense.source, ": vocabulary format for '", name, "', which the model has not",
                        tied ? " (its output is tied to model.embed_tokens)" : "");
    const QuantFormat& f = quant_format(id);
    if (q.quantized.count(name)) throw_error(q.dense.source, ": '", name, "' is packed already");
    if (!t->defined() || t->dim() != 2) throw_error(q.dense.source, ": '", name, "' has no dense [vocab, dim] weight");
    if (!f.is_ggml_block()) throw_error(q.dense.source, ": '", name, "' is packed in ggml block types only, not ", f.name);
    f.check_row_length(t->size(1), name);
    QuantizedTensor packed = quantize(*t, f);
    bytes += packed.nbytes();
    q.quantized.emplace(name, std::move(packed));
    *t = zero_placeholder(t->shape());
  }
  return bytes;
}

int64_t pack_vocab(QuantizedCheckpoint& q, QuantFormatId format) {
  if (q.quantized.count("model.embed_tokens")) return 0;
  const QuantFormat& f = quant_format(format);
  LlamaWeights& w = q.dense.weights;
  const bool tied = q.dense.config.tied_embeddings;
  if (!w.tok_embeddings.defined() || (!tied && !w.output.defined())) return 0;
  if (!f.is_ggml_block() || w.tok_embeddings.dim() != 2 || !f.row_fits(w.tok_embeddings.size(1))) return 0;
  int64_t bytes = 0;
  for (auto [name, t] : {std::pair<const char*, Tensor*>{"model.embed_tokens", &w.tok_embeddings}, {"lm_head", &w.output}}) {
    if (!tied || t == &w.tok_embeddings) {
      QuantizedTensor packed = quantize(*t, f);
      bytes += packed.nbytes();
      q.quantized.emplace(name, std::move(packed));
      *t = zero_placeholder(t->shape());
    }
  }
  return bytes;
}

}  // namespace lowbit
