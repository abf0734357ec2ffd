#include "lowbit/io/hf.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "lowbit/core/threads.h"
#include "lowbit/io/file_util.h"
#include "lowbit/io/rope_layout.h"
#include "lowbit/io/tensor_parallel_load.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/io/weight_names.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace lowbit {

namespace {

void warn(const std::string& msg) { std::fprintf(stderr, "lowbit: warning: %s\n", msg.c_str()); }

json read_json_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw_error(path, ": cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    throw_error(path, ": invalid JSON: ", e.what());
  }
}

// An integer field: absent or null gives `def` (or an error when required).
int get_int(const json& j, const char* key, const std::string& src, std::optional<int> def = std::nullopt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (!def) throw_error(src, ": config.json lacks required field '", key, "'");
    return *def;
  }
  if (!it->is_number_integer()) throw_error(src, ": config.json field '", key, "' must be an integer, got ", it->dump());
  const int64_t v = it->get<int64_t>();
  if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max())
    throw_error(src, ": config.json field '", key, "' = ", v, " is out of range");
  return int(v);
}

float get_float(const json& j, const char* key, const std::string& src, float def) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  if (!it->is_number()) throw_error(src, ": config.json field '", key, "' must be a number, got ", it->dump());
  return it->get<float>();
}

bool get_bool(const json& j, const char* key, const std::string& src, bool def) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  if (!it->is_boolean()) throw_error(src, ": config.json field '", key, "' must be true or false, got ", it->dump());
  return it->get<bool>();
}

// bos/eos ids may be an int, a list of ints (Llama 3 instruct: several EOS; the first is used)
// or null.
int get_token_id(const json& j, const char* key, const std::string& src, int def) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  if (it->is_array()) {
    if (it->empty()) return def;
    json first = (*it)[0];
    return get_int(json{{key, first}}, key, src, def);
  }
  return get_int(j, key, src, def);
}

struct ArchInfo {
  const char* hf_class;
  const char* model_type;
  const char* arch;
};
constexpr ArchInfo kArchs[] = {
    {"LlamaForCausalLM", "llama", "llama"},
    {"MistralForCausalLM", "mistral", "mistral"},
    {"Qwen2ForCausalLM", "qwen2", "qwen2"},
    {"Qwen3ForCausalLM", "qwen3", "qwen3"},
};

const ArchInfo& arch_of(const json& j, const std::string& src) {
  std::string names;
  if (auto a = j.find("architectures"); a != j.end() && a->is_array()) {
    for (const auto& n : *a) {
      if (!n.is_string()) continue;
      for (const auto& ai : kArchs)
        if (n.get<std::string>() == ai.hf_class) return ai;
      names += (names.empty() ? "" : ", ") + n.get<std::string>();
    }
  }
  if (names.empty()) {
    if (auto m = j.find("model_type"); m != j.end() && m->is_string()) {
      for (const auto& ai : kArchs)
        if (m->get<std::string>() == ai.model_type) return ai;
      names = "model_type " + m->get<std::string>();
    }
  }
  throw_error(src, ": unsupported architecture (", names.empty() ? "none given" : names,
              "); lowbit reads LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM");
}

const char* torch_dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    default: throw_error("Hugging Face checkpoints are saved as f32, f16 or bf16, not ", dtype_name(t));
  }
}

// Which file of the directory holds each tensor (model.safetensors.index.json's weight_map, or the
// tensors of model.safetensors, which is then opened into *files).
std::map<std::string, std::string> weight_map(const std::string& dir, std::map<std::string, SafetensorsFile>* files) {
  const fs::path d(dir);
  std::error_code ec;
  std::map<std::string, std::string> where;
  const fs::path index_path = d / "model.safetensors.index.json", single = d / "model.safetensors";
  if (fs::exists(index_path, ec)) {
    const json idx = read_json_file(index_path.string());
    auto wm = idx.is_object() ? idx.find("weight_map") : idx.end();
    if (wm == idx.end() || !wm->is_object()) throw_error(index_path.string(), ": missing 'weight_map' object");
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string()) throw_error(index_path.string(), ": weight_map entry '", it.key(), "' is not a file name");
      const std::string file = it.value().get<std::string>();
      // Shards live next to the index; refuse paths that would escape the directory.
      if (file.empty() || file.find('/') != std::string::npos || file.find('\\') != std::string::npos || file == "." ||
          file == "..")
        throw_error(index_path.string(), ": weight_map entry '", it.key(), "' names '", file, "', not a file in the directory");
      where[it.key()] = file;
    }
  } else if (fs::exists(single, ec)) {
    files->emplace("model.safetensors", SafetensorsFile::open(single.string()));
    for (const auto& t : files->at("model.safetensors").tensors()) where[t.name] = "model.safetensors";
  } else if (fs::exists(d / "pytorch_model.bin", ec) || fs::exists(d / "pytorch_model.bin.index.json", ec)) {
    throw_error(dir, ": PyTorch pickle checkpoints (pytorch_model.bin) are not supported; convert the model to safetensors");
  } else {
    throw_error(dir, ": no model.safetensors or model.safetensors.index.json");
  }
  return where;
}

}  // namespace

std::shared_ptr<HfTensorSource> HfTensorSource::open(const std::string& dir) {
  auto s = std::make_shared<HfTensorSource>();
  s->dir_ = dir;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw_error(dir, ": not a directory");
  const std::string config_path = (fs::path(dir) / "config.json").string();
  if (!fs::exists(config_path, ec)) throw_error(dir, ": no config.json: not a Hugging Face model directory");
  s->config_ = config_from_hf_json(read_json_file(config_path), config_path);
  s->config_.validate(config_path);
  std::map<std::string, SafetensorsFile> files;
  s->where_ = weight_map(dir, &files);
  for (auto& [name, f] : files) s->files_.emplace(name, std::make_shared<SafetensorsFile>(std::move(f)));
  for (const auto& [t, fname] : s->where_)
    if (!s->files_.count(fname))
      s->files_.emplace(fname, std::make_shared<SafetensorsFile>(SafetensorsFile::open((fs::path(dir) / fname).string())));
  return s;
}

const SafetensorsFile& HfTensorSource::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw_error(dir_, ": missing tensor '", name, "' (", config_.summary(), ")");
  const SafetensorsFile& f = *files_.at(it->second);
  if (!f.find(name)) throw_error(f.path(), ": tensor '", name, "' listed in the index is not in this file");
  return f;
}

Tensor HfTensorSource::read_f32(const std::string& name, const Shape& shape) const {
  const SafetensorsFile& f = file_of(name);
  const SafetensorsTensorInfo* info = f.find(name);
  if (info->shape != shape)
    throw_error(f.path(), ": tensor '", name, "' has shape ", shape_str(info->shape), ", the config needs ", shape_str(shape));
  Tensor t = f.read_f32(name);
  const float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i)
    if (!std::isfinite(p[i])) throw_error(f.path(), ": tensor '", name, "' has a non-finite value (", p[i], ") at index ", i);
  return t;
}

LayerWeights HfTensorSource::read_layer(int i) const {
  if (i < 0 || i >= config_.n_layers) throw_error(dir_, ": no layer ", i, " (the model has ", config_.n_layers, ")");
  LlamaWeights w;
  const std::string prefix = "model.layers." + std::to_string(i) + ".";
  for (auto& slot : io::weight_slots(config_, w))
    if (slot.hf_name.compare(0, prefix.size(), prefix) == 0) *slot.tensor = read_f32(slot.hf_name, slot.shape);
  return std::move(w.layers.at(size_t(i)));
}

LazyCheckpoint open_hf_dir_lazily(const std::string& dir) {
  const std::shared_ptr<HfTensorSource> src = HfTensorSource::open(dir);
  LazyCheckpoint z;
  Checkpoint& ck = z.rest.dense;
  ck.source = dir;
  ck.config = src->config();
  z.rest.method = "hf";
  for (auto& slot : io::weight_slots(ck.config, ck.weights)) {
    const std::string& name = slot.hf_name;
    if (!io::is_block_linear_weight(name)) {  // replicated (and q/k/v biases, cut later): read whole, with pread
      *slot.tensor = src->read_f32(name, slot.shape);
      continue;
    }
    const SafetensorsFile& f = src->file_of(name);
    if (f.find(name)->shape != slot.shape)
      throw_error(f.path(), ": tensor '", name, "' has shape ", shape_str(f.find(name)->shape), ", the config needs ",
                  shape_str(slot.shape));
    LinearSource ls;
    ls.out = slot.shape[0], ls.in = slot.shape[1];
    const int64_t in = ls.in;
    ls.dense_rows = [src, name, in](int64_t r0, int64_t r1) {
      Tensor t = Tensor::empty({r1 - r0, in});
      src->file_of(name).read_f32(name, r0 * in, (r1 - r0) * in, t.data<float>());
      return t;
    };
    z.linears.emplace(name.substr(0, name.size() - std::string(".weight").size()), std::move(ls));
  }
  return z;
}

LlamaConfig config_from_hf_json(const json& j, const std::string& src) {
  if (!j.is_object()) throw_error(src, ": config.json is not a JSON object");
  const ArchInfo& ai = arch_of(j, src);
  LlamaConfig c;
  c.arch = ai.arch;
  c.dim = get_int(j, "hidden_size", src);
  c.hidden_dim = get_int(j, "intermediate_size", src);
  c.n_layers = get_int(j, "num_hidden_layers", src);
  c.n_heads = get_int(j, "num_attention_heads", src);
  c.n_kv_heads = get_int(j, "num_key_value_heads", src, c.n_heads);
  c.head_dim = get_int(j, "head_dim", src, 0);
  if (c.n_heads > 0 && c.head_dim * c.n_heads == c.dim) c.head_dim = 0;  // the default; keep configs canonical
  c.vocab_size = get_int(j, "vocab_size", src, 0);  // 0: not given (a training config may take it from the tokenizer)
  c.max_seq_len = get_int(j, "max_position_embeddings", src, 2048);
  c.rope_theta = get_float(j, "rope_theta", src, 10000.0f);
  c.norm_eps = get_float(j, "rms_norm_eps", src, 1e-6f);
  // transformers' LlamaConfig/MistralConfig/Qwen2Config/Qwen3Config all default to untied.
  c.tied_embeddings = get_bool(j, "tie_word_embeddings", src, false);
  c.rope_style = RopeStyle::Half;
  c.bos_id = get_token_id(j, "bos_token_id", src, -1);
  c.eos_id = get_token_id(j, "eos_token_id", src, -1);

  const std::string arch = c.arch;
  const bool attention_bias = get_bool(j, "attention_bias", src, false);
  if (arch == "qwen2") {
    c.attn_bias = true;  // Qwen2Attention: q/k/v always have biases, o_proj none
  } else if (attention_bias) {
    // Llama/Qwen3 attention_bias adds a bias to o_proj as well, which LlamaWeights cannot hold.
    throw_error(src, ": attention_bias = true (", arch, ": biases on q/k/v/o projections) is not supported");
  }
  c.qk_norm = arch == "qwen3";
  if (get_bool(j, "mlp_bias", src, false)) throw_error(src, ": mlp_bias = true is not supported");
  if (auto a = j.find("hidden_act"); a != j.end() && !(a->is_string() && a->get<std::string>() == "silu"))
    throw_error(src, ": hidden_act ", a->dump(), " is not supported (only silu)");
  if (auto rs = j.find("rope_scaling"); rs != j.end() && !rs->is_null()) {
    std::string type = "?";
    if (rs->is_object()) {
      if (auto t = rs->find("rope_type"); t != rs->end() && t->is_string()) type = t->get<std::string>();
      else if (auto t2 = rs->find("type"); t2 != rs->end() && t2->is_string()) type = t2->get<std::string>();
    }
    if (type == "llama3") {
      auto num = [&](const char* key) {
        auto it = rs->find(key);
        if (it == rs->end() || !it->is_number()) throw_error(src, ": rope_scaling llama3 needs a number '", key, "'");
        return it->get<double>();
      };
      c.rope_scaling.factor = num("factor");
      c.rope_scaling.low_freq_factor = num("low_freq_factor");
      c.rope_scaling.high_freq_factor = num("high_freq_factor");
      c.rope_scaling.original_max_position = num("original_max_position_embeddings");
    } else if (type != "default")
      throw_error(src, ": rope_scaling type '", type, "' is not supported (lowbit implements 'llama3' and 'default')");
  }
  if (auto sw = j.find("sliding_window"); sw != j.end() && sw->is_number_integer()) {
    // Qwen2/3 configs carry a sliding_window that only applies with use_sliding_window = true.
    const bool used = (arch == "qwen2" || arch == "qwen3") ? get_bool(j, "use_sliding_window", src, false) : true;
    if (used && sw->get<int64_t>() < c.max_seq_len)
      warn(src + ": sliding_window = " + std::to_string(sw->get<int64_t>()) +
           " is ignored: lowbit uses full attention (identical for contexts up to the window)");
  }
  return c;
}

json config_to_hf_json(const LlamaConfig& c, const std::string& torch_dtype) {
  const ArchInfo* ai = nullptr;
  for (const auto& a : kArchs)
    if (c.arch == a.arch) ai = &a;
  if (!ai) throw_error("cannot write a Hugging Face config for architecture '", c.arch, "'");
  if (c.attn_bias && c.arch != "qwen2")
    throw_error("a ", c.arch, " model with q/k/v biases has no Hugging Face equivalent (only qwen2 has them)");
  if (c.arch == "qwen2" && !c.attn_bias) throw_error("a qwen2 model without q/k/v biases has no Hugging Face equivalent");
  if (c.qk_norm != (c.arch == "qwen3"))
    throw_error("q/k norms ", c.qk_norm ? "on" : "off", " do not match Hugging Face architecture ", c.arch);
  json j;
  j["architectures"] = {ai->hf_class};
  j["model_type"] = ai->model_type;
  j["hidden_size"] = c.dim;
  j["intermediate_size"] = c.hidden_dim;
  j["num_hidden_layers"] = c.n_layers;
  j["num_attention_heads"] = c.n_heads;
  j["num_key_value_heads"] = c.n_kv_heads;
  j["head_dim"] = c.resolved_head_dim();
  j["vocab_size"] = c.vocab_size;
  j["max_position_embeddings"] = c.max_seq_len;
  j["rope_theta"] = c.rope_theta;
  j["rms_norm_eps"] = c.norm_eps;
  j["tie_word_embeddings"] = c.tied_embeddings;
  j["hidden_act"] = "silu";
  j["rope_scaling"] = nullptr;
  if (c.rope_scaling.active())
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", c.rope_scaling.factor},
                         {"low_freq_factor", c.rope_scaling.low_freq_factor},
                         {"high_freq_factor", c.rope_scaling.high_freq_factor},
                         {"original_max_position_embeddings", int64_t(c.rope_scaling.original_max_position)}};
  if (c.arch == "llama" || c.arch == "qwen3") j["attention_bias"] = false;
  if (c.arch == "llama") j["mlp_bias"] = false;
  if (c.arch == "qwen2" || c.arch == "qwen3") j["use_sliding_window"] = false;
  j["bos_token_id"] = c.bos_id >= 0 ? json(c.bos_id) : json(nullptr);
  j["eos_token_id"] = c.eos_id >= 0 ? json(c.eos_id) : json(nullptr);
  j["torch_dtype"] = torch_dtype;
  j["transformers_version"] = "4.44.0";
  return j;
}

namespace {

// Hugging Face's shard file names: model.safetensors alone, else model-00001-of-0000N.safetensors.
std::string hf_shard_file_name(size_t i, size_t n) {
  if (n == 1) return "model.safetensors";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

uint64_t write_random_hf_model(const std::string& dir, const LlamaConfig& config, const RandomModelOptions& opt) {
  config.validate(dir);
  if (opt.dtype != DType::F32 && opt.dtype != DType::F16 && opt.dtype != DType::BF16)
    throw_error(dir, ": random model weights are f32, f16 or bf16, not ", dtype_name(opt.dtype));
  if (!(opt.std > 0) || !std::isfinite(opt.std)) throw_error(dir, ": the standard deviation must be > 0, got ", opt.std);
  if (opt.max_shard_bytes == 0) throw_error(dir, ": the shard size must be > 0");
  LlamaConfig c = config;
  c.rope_style = RopeStyle::Half;  // what a Hugging Face directory holds
  const json cfg = config_to_hf_json(c, torch_dtype_name(opt.dtype));
  LlamaWeights w;
  const std::vector<io::WeightSlot> slots = io::weight_slots(c, w);
  const uint64_t es = uint64_t(dtype_size(opt.dtype));
  std::vector<std::vector<const io::WeightSlot*>> shards(1);
  uint64_t shard_bytes = 0, total = 0;
  for (const auto& s : slots) {
    const uint64_t nb = uint64_t(shape_numel(s.shape)) * es;
    if (!shards.back().empty() && shard_bytes + nb > opt.max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(&s);
    shard_bytes += nb;
    total += nb;
  }
  const size_t n = shards.size();
  auto shard_name = [n](size_t i) { return hf_shard_file_name(i, n); };
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!fs::is_directory(dir, ec)) throw_error(dir, ": cannot create directory");
  const float a = float(opt.std * std::sqrt(3.0));  // uniform on [-a, a] has standard deviation std
  json weight_map = json::object();
  for (size_t i = 0; i < n; ++i) {
    std::vector<SafetensorsStreamEntry> entries;
    for (const io::WeightSlot* s : shards[i]) {
      const std::string name = s->hf_name;
      const bool norm = name.find("norm") != std::string::npos, bias = name.size() > 5 && name.ends_with(".bias");
      const int64_t numel = shape_numel(s->shape);
      const DType dt = opt.dtype;
      uint64_t h = opt.seed * 0x2545f4914f6cdd1dull;
      for (char ch : name) h = (h ^ uint8_t(ch)) * 1099511628211ull;  // FNV-1a of the name
      entries.push_back({name, dt, s->shape, [=](const std::function<void(const void*, size_t)>& out) {
                           constexpr int64_t kChunk = 1 << 20;
                           std::vector<float> f(size_t(std::min(numel, kChunk)));
                           std::vector<uint16_t> half(dt == DType::F32 ? 0 : f.size());
                           for (int64_t at = 0; at < numel; at += kChunk) {
                             const int64_t k = std::min(kChunk, numel - at);
                             parallel_for(k, 1 << 14, [&](int64_t lo, int64_t hi) {
                               for (int64_t j = lo; j < hi; ++j) {
                                 float v = norm ? 1.0f : 0.0f;
                                 if (!norm && !bias) {
                                   const uint64_t r = splitmix64(h + uint64_t(at + j));
                                   v = a * (float(double(r >> 11) * 0x1.0p-53) * 2.0f - 1.0f);
                                 }
                                 f[size_t(j)] = v;
                                 if (dt == DType::BF16) half[size_t(j)] = f32_to_bf16(v);
                                 if (dt == DType::F16) half[size_t(j)] = f32_to_f16(v);
                               }
                             });
                             if (dt == DType::F32) out(f.data(), size_t(k) * 4);
                             else out(half.data(), size_t(k) * 2);
                           }
                         }});
      weight_map[name] = shard_name(i);
    }
    save_safetensors_streamed((fs::path(dir) / shard_name(i)).string(), entries, {{"format", "pt"}});
  }
  if (n > 1) {
    json idx = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    const std::string text = idx.dump(2) + "\n";
    io::AtomicFileWriter out((fs::path(dir) / "model.safetensors.index.json").string());
    out.write(text.data(), text.size());
    out.commit();
  } else {
    fs::remove(fs::path(dir) / "model.safetensors.index.json", ec);
  }
  const std::string text = cfg.dump(2) + "\n";
  io::AtomicFileWriter out((fs::path(dir) / "config.json").string());
  out.write(text.data(), text.size());
  out.commit();
  return total;
}

bool looks_like_hf_dir(const std::string& dir) {
  std::error_code ec;
  return fs::is_directory(dir, ec) && fs::is_regular_file(fs::path(dir) / "config.json", ec);
}

Checkpoint load_hf_dir(const std::string& dir) {
  const fs::path d(dir);
  std::error_code ec;
  if (!fs::is_directory(d, ec)) throw_error(dir, ": not a directory");
  const std::string config_path = (d / "config.json").string();
  if (!fs::exists(config_path, ec)) throw_error(dir, ": no config.json: not a Hugging Face model directory");
  Checkpoint ck;
  ck.source = dir;
  ck.config = config_from_hf_json(read_json_file(config_path), config_path);
  ck.config.validate(config_path);

  // Which file holds each tensor.
  std::map<std::string, SafetensorsFile> files;  // by file name
  std::map<std::string, std::string> where = weight_map(dir, &files);  // tensor -> file name
  auto file_of = [&](const std::string& name) -> const SafetensorsFile& {
    const std::string& fname = where.at(name);
    auto it = files.find(fname);
    if (it == files.end()) it = files.emplace(fname, SafetensorsFile::open((d / fname).string())).first;
    return it->second;
  };

  std::set<std::string> used;
  for (auto& slot : io::weight_slots(ck.config, ck.weights)) {
    if (!where.count(slot.hf_name)) throw_error(dir, ": missing tensor '", slot.hf_name, "' (", ck.config.summary(), ")");
    const SafetensorsFile& f = file_of(slot.hf_name);
    const SafetensorsTensorInfo* info = f.find(slot.hf_name);
    if (!info) throw_error(f.path(), ": tensor '", slot.hf_name, "' listed in the index is not in this file");
    if (info->shape != slot.shape)
      throw_error(f.path(), ": tensor '", slot.hf_name, "' has shape ", shape_str(info->shape), ", the config needs ",
                  shape_str(slot.shape));
    *slot.tensor = f.load_f32(slot.hf_name);
    used.insert(slot.hf_name);
  }
  size_t unused = 0;
  std::string example;
  for (const auto& [name, file] : where) {
    if (used.count(name) || name.find("rotary_emb.inv_freq") != std::string::npos) continue;
    if (name == "lm_head.weight" && ck.config.tied_embeddings) continue;  // some tied checkpoints store a copy
    if (unused++ == 0) example = name;
  }
  if (unused) warn(dir + ": " + std::to_string(unused) + " tensors not used by the model are ignored (e.g. '" + example + "')");
  validate_weights(ck.config, ck.weights, dir);
  return ck;
}

void save_hf_dir(const std::string& dir, const LlamaConfig& config, const LlamaWeights& weights, const HfSaveOptions& opt) {
  config.validate(dir);
  const std::string torch_dtype = torch_dtype_name(opt.dtype);
  const json cfg = config_to_hf_json(config, torch_dtype);
  validate_weights(config, weights, dir);
  const LlamaWeights w = weights_with_rope_style(config, weights, RopeStyle::Half);

  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!fs::is_directory(dir, ec)) throw_error(dir, ": cannot create directory");

  // Group tensors (in for_each_weight order) into shards of at most max_shard_bytes.
  std::vector<std::vector<std::pair<std::string, const Tensor*>>> shards(1);
  uint64_t shard_bytes = 0, total = 0;
  for_each_weight(w, [&](const std::string& name, const Tensor& t) {
    if (name == "lm_head.weight" && config.tied_embeddings) return;
    const uint64_t nb = uint64_t(t.numel()) * uint64_t(dtype_size(opt.dtype));
    if (!shards.back().empty() && shard_bytes + nb > opt.max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().emplace_back(name, &t);
    shard_bytes += nb;
    total += nb;
  });
  const size_t n = shards.size();
  auto shard_name = [n](size_t i) { return hf_shard_file_name(i, n); };
  json weight_map = json::object();
  std::set<std::string> written;
  for (size_t i = 0; i < n; ++i) {
    std::vector<std::pair<std::string, Tensor>> ts;
    for (const auto& [name, t] : shards[i]) {
      Tensor c = t->to(Device::CPU).to(DType::F32).contiguous();
      if (opt.dtype == DType::F16) {
        // f16 saturates at 65504; an overflow would silently become inf.
        const float* p = c.data<float>();
        for (int64_t k = 0; k < c.numel(); ++k)
          if (std::fabs(p[k]) > 65504.0f)
            throw_error(dir, ": tensor '", name, "' value ", p[k], " at index ", k, " overflows f16; save as bf16 or f32");
      }
      ts.emplace_back(name, c.to(opt.dtype));
      weight_map[name] = shard_name(i);
    }
    save_safetensors((fs::path(dir) / shard_name(i)).string(), ts, {{"format", "pt"}});
    written.insert(shard_name(i));
  }
  if (n > 1) {
    json idx = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    const std::string text = idx.dump(2) + "\n";
    io::AtomicFileWriter out((fs::path(dir) / "model.safetensors.index.json").string());
    out.write(text.data(), text.size());
    out.commit();
    written.insert("model.safetensors.index.json");
  }
  {
    const std::string text = cfg.dump(2) + "\n";
    io::AtomicFileWriter out((fs::path(dir) / "config.json").string());
    out.write(text.data(), text.size());
    out.commit();
  }
  // Weight files left by an earlier save with a different shard layout would be picked up by
  // loaders (an index beats model.safetensors); remove them.
  // "model-DDDDD-of-DDDDD.safetensors", Hugging Face's shard names.
  auto is_shard_name = [](const std::string& f) {
    const std::string pat = "model-#####-of-#####.safetensors";
    if (f.size() != pat.size()) return false;
    for (size_t i = 0; i < f.size(); ++i)
      if (pat[i] == '#' ? !std::isdigit(static_cast<unsigned char>(f[i])) : f[i] != pat[i]) return false;
    return true;
  };
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string fname = e.path().filename().string();
    const bool weight_file = fname == "model.safetensors" || fname == "model.safetensors.index.json" ||
                             is_shard_name(fname);
    if (weight_file && !written.count(fname)) fs::remove(e.path(), ec);
  }
}

}  // namespace lowbit
