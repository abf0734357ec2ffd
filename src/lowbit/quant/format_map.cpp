#include "lowbit/quant/format_map.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "lowbit/core/error.h"

namespace lowbit {

namespace {

using Id = QuantFormatId;

constexpr TensorKind kAllKinds[] = {TensorKind::AttnQ,   TensorKind::AttnK,   TensorKind::AttnV,
                                    TensorKind::AttnOutput, TensorKind::FfnGate, TensorKind::FfnUp,
                                    TensorKind::FfnDown, TensorKind::TokenEmbd, TensorKind::Output};

bool is_vocab(TensorKind k) { return k == TensorKind::TokenEmbd || k == TensorKind::Output; }

// Glob with '*' (any run of characters) only.
bool glob_match(const char* p, const char* s) {
  if (*p == '\0') return *s == '\0';
  if (*p == '*') return glob_match(p + 1, s) || (*s != '\0' && glob_match(p, s + 1));
  return *s == *p && glob_match(p + 1, s + 1);
}

std::string gguf_name(const PlanTensor& t) {
  if (t.layer < 0) return std::string(tensor_kind_name(t.kind));
  return "blk." + std::to_string(t.layer) + "." + tensor_kind_name(t.kind);
}

int parse_int(const std::string& s, const std::string& where) {
  if (s.empty() || s.size() > 6 || !std::all_of(s.begin(), s.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
    throw_error(where, ": '", s, "' is not a layer index (a non-negative integer)");
  return std::stoi(s);
}

}  // namespace

const char* tensor_kind_name(TensorKind k) {
  switch (k) {
    case TensorKind::AttnQ: return "attn_q";
    case TensorKind::AttnK: return "attn_k";
    case TensorKind::AttnV: return "attn_v";
    case TensorKind::AttnOutput: return "attn_output";
    case TensorKind::FfnGate: return "ffn_gate";
    case TensorKind::FfnUp: return "ffn_up";
    case TensorKind::FfnDown: return "ffn_down";
    case TensorKind::TokenEmbd: return "token_embd";
    case TensorKind::Output: return "output";
  }
  return "?";
}

std::string gguf_tensor_name(const PlanTensor& t) { return gguf_name(t) + ".weight"; }

std::vector<PlanTensor> plan_tensors(const LlamaConfig& c) {
  const int64_t D = c.dim, F = c.hidden_dim, h = c.resolved_head_dim();
  const int64_t Q = int64_t(c.n_heads) * h, KV = int64_t(c.n_kv_heads) * h;
  std::vector<PlanTensor> t;
  t.push_back({"model.embed_tokens", TensorKind::TokenEmbd, -1, c.vocab_size, D});
  if (!c.tied_embeddings) t.push_back({"lm_head", TensorKind::Output, -1, c.vocab_size, D});
  for (int i = 0; i < c.n_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    t.push_back({p + "self_attn.q_proj", TensorKind::AttnQ, i, Q, D});
    t.push_back({p + "self_attn.k_proj", TensorKind::AttnK, i, KV, D});
    t.push_back({p + "self_attn.v_proj", TensorKind::AttnV, i, KV, D});
    t.push_back({p + "self_attn.o_proj", TensorKind::AttnOutput, i, D, Q});
    t.push_back({p + "mlp.gate_proj", TensorKind::FfnGate, i, F, D});
    t.push_back({p + "mlp.up_proj", TensorKind::FfnUp, i, F, D});
    t.push_back({p + "mlp.down_proj", TensorKind::FfnDown, i, D, F});
  }
  return t;
}

bool FormatRule::matches(TensorKind k, int layer) const {
  // The vocabulary matrices are named, never globbed: `* int4g128` must not pack token_embd.
  if (is_vocab(k) && pattern.find('*') != std::string::npos) return false;
  if (!glob_match(pattern.c_str(), tensor_kind_name(k))) return false;
  if (layers.empty()) return true;
  if (layer < 0) return false;
  for (const auto& [a, b] : layers)
    if (layer >= a && layer <= b) return true;
  return false;
}

FormatMap parse_format_map(const std::string& text, const std::string& source) {
  FormatMap m;
  m.source = source;
  m.text = text;
  std::istringstream in(text);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    const std::string where = source + ":" + std::to_string(n);
    if (auto h = line.find('#'); h != std::string::npos) line.erase(h);
    std::istringstream ls(line);
    std::vector<std::string> tok;
    for (std::string w; ls >> w;) tok.push_back(w);
    if (tok.empty()) continue;
    if (tok.size() > 3)
      throw_error(where, ": expected 'PATTERN [layers=A-B,...] FORMAT' or 'default FORMAT', got ", tok.size(), " words");
    auto format_of = [&](const std::string& s) -> Id {
      try {
        return parse_quant_format(s).id;
      } catch (const Error& e) {
        throw_error(where, ": unknown format '", s, "' (", e.what(), ")");
      }
    };
    if (tok[0] == "default") {
      if (tok.size() != 2) throw_error(where, ": expected 'default FORMAT'");
      if (m.has_default)
        throw_error(where, ": a second 'default' line (the first is line ", m.default_line, ")");
      m.has_default = true;
      m.default_format = format_of(tok[1]);
      m.default_line = n;
      continue;
    }
    if (tok.size() < 2) throw_error(where, ": '", tok[0], "' has no format (expected 'PATTERN [layers=A-B,...] FORMAT')");
    FormatRule r;
    r.pattern = tok[0];
    r.line = n;
    bool any = false;
    for (TensorKind k : kAllKinds) any = any || glob_match(r.pattern.c_str(), tensor_kind_name(k));
    if (!any)
      throw_error(where, ": pattern '", r.pattern, "' matches no tensor kind (attn_q, attn_k, attn_v, attn_output, ",
                  "ffn_gate, ffn_up, ffn_down, token_embd, output; '*' is a wildcard)");
    if (tok.size() == 3) {
      const std::string& l = tok[1];
      if (l.rfind("layers=", 0) != 0 || l.size() == 7)
        throw_error(where, ": '", l, "' is not a layer list (expected layers=A-B,C,...)");
      std::stringstream ss(l.substr(7));
      for (std::string part; std::getline(ss, part, ',');) {
        const auto dash = part.find('-');
        const int a = parse_int(part.substr(0, dash), where);
        const int b = dash == std::string::npos ? a : parse_int(part.substr(dash + 1), where);
        if (b < a) throw_error(where, ": layer range ", part, " is empty (", b, " < ", a, ")");
        r.layers.emplace_back(a, b);
      }
      if (r.layers.empty()) throw_error(where, ": '", l, "' lists no layer");
      if (r.pattern == "token_embd" || r.pattern == "output") throw_error(where, ": ", r.pattern, " is not per layer; it takes no layers=");
    }
    r.format = format_of(tok.back());
    const QuantFormat& f = quant_format(r.format);
    if ((r.pattern == "token_embd" || r.pattern == "output") && !f.is_ggml_block())
      throw_error(where, ": ", r.pattern, " is packed as a ggml block type (q8_0, q6_k, ...), not ", f.name);
    m.rules.push_back(std::move(r));
  }
  return m;
}

FormatMap read_format_map(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_error(path, ": cannot open the format map (--format-map)");
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw_error(path, ": read failed");
  return parse_format_map(ss.str(), path);
}

const QuantFormat* FormatPlan::find(const std::string& module) const {
  auto it = formats.find(module);
  return it == formats.end() ? nullptr : &quant_format(it->second);
}

std::map<std::string, QuantFormatId> FormatPlan::vocab_formats() const {
  std::map<std::string, QuantFormatId> v;
  for (const char* n : {"model.embed_tokens", "lm_head"})
    if (auto it = formats.find(n); it != formats.end()) v.emplace(n, it->second);
  return v;
}

std::string FormatPlan::summary() const {
  std::map<std::string, int> count;
  for (const auto& [m, f] : formats) count[quant_format(f).name]++;
  std::string s;
  for (const auto& [name, k] : count) s += (s.empty() ? "" : ", ") + name + " x " + std::to_string(k);
  return s;
}

FormatPlan plan_from_map(const FormatMap& m, const LlamaConfig& c, const QuantFormat& fallback) {
  FormatPlan p;
  p.origin = "format-map " + m.source;
  p.base = m.has_default ? m.default_format : fallback.id;
  for (const FormatRule& r : m.rules)
    for (const auto& [a, b] : r.layers)
      if (b >= c.n_layers)
        throw_error(m.source, ":", r.line, ": layers ", a, "-", b, " but the model has ", c.n_layers, " layers (0-",
                    c.n_layers - 1, ")");
  for (const PlanTensor& t : plan_tensors(c)) {
    const FormatRule* hit = nullptr;
    for (const FormatRule& r : m.rules)
      if (r.matches(t.kind, t.layer)) {
        hit = &r;
        break;
      }
    if (!hit && is_vocab(t.kind)) continue;  // stays f32
    const QuantFormat& f = quant_format(hit ? hit->format : p.base);
    const int line = hit ? hit->line : m.has_default ? m.default_line : 0;
    const std::string where = line ? m.source + ":" + std::to_string(line) : std::string("--format ") + f.name;
    if (is_vocab(t.kind) && !f.is_ggml_block())
      throw_error(where, ": ", gguf_name(t), " is packed as a ggml block type (q8_0, q6_k, ...), not ", f.name);
    if (!f.row_fits(t.in))
      throw_error(where, ": ", gguf_name(t), " has rows of ", t.in, " values, not a multiple of ", f.name, "'s ",
                  f.group_size, "-value blocks (give that tensor a format whose blocks fit, e.g. q5_0 / q8_0 for ",
                  "rows that are multiples of 32, or use --preset, which falls back as llama.cpp does)");
    p.formats[t.module] = f.id;
  }
  return p;
}

namespace {

// llama.cpp's llama_ftype values (general.file_type) of the presets.
struct Preset {
  const char* name;
  int ftype;
  Id base;
};
constexpr Preset kPresets[] = {
    {"q4_0", 2, Id::Q4_0},    {"q4_1", 3, Id::Q4_1},    {"q8_0", 7, Id::Q8_0},   {"q5_0", 8, Id::Q5_0},
    {"q5_1", 9, Id::Q5_1},    {"q2_k", 10, Id::Q2_K},   {"q3_k_s", 11, Id::Q3_K}, {"q3_k_m", 12, Id::Q3_K},
    {"q3_k_l", 13, Id::Q3_K}, {"q4_k_s", 14, Id::Q4_K}, {"q4_k_m", 15, Id::Q4_K}, {"q5_k_s", 16, Id::Q5_K},
    {"q5_k_m", 17, Id::Q5_K}, {"q6_k", 18, Id::Q6_K},   {"iq4_nl", 25, Id::IQ4_NL}, {"iq4_xs", 30, Id::IQ4_XS},
};

// llama.cpp: the first and last eighth of the layers and every third one in between.
bool use_more_bits(int i, int n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

}  // namespace

std::string preset_names() {
  std::string s;
  for (const Preset& p : kPresets) s += (s.empty() ? "" : ", ") + std::string(p.name);
  return s;
}

namespace {
const Preset* find_preset(const std::string& name_in) {
  std::string name = name_in;
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return char(std::tolower(ch)); });
  for (const Preset& p : kPresets)
    if (name == p.name) return &p;
  return nullptr;
}
}  // namespace

bool is_preset_name(const std::string& name) { return find_preset(name) != nullptr; }

QuantFormatId preset_base(const std::string& name) {
  const Preset* p = find_preset(name);
  if (!p) throw_error("--preset: unknown preset '", name, "' (known: ", preset_names(), ")");
  return p->base;
}

QuantFormatId llama_fallback_format(QuantFormatId id, int64_t in, const std::string& what) {
  const QuantFormat& f = quant_format(id);
  if (f.row_fits(in)) return id;
  Id to = id;
  switch (id) {
    case Id::IQ4_XS: to = Id::IQ4_NL; break;
    case Id::Q2_K:
    case Id::Q3_K:
    case Id::TQ1_0:
    case Id::TQ2_0: to = Id::Q4_0; break;
    case Id::Q4_K: to = Id::Q5_0; break;
    case Id::Q5_K: to = Id::Q5_1; break;
    case Id::Q6_K: to = Id::Q8_0; break;
    default: break;  // a 32-value type: no smaller block to fall back to
  }
  if (!quant_format(to).row_fits(in))
    throw_error(what, " has rows of ", in, " values, not a multiple of ", quant_format(to).group_size,
                to == id ? std::string(" (") + f.name + "'s block)" : std::string(" (") + f.name + "'s fallback " +
                quant_format(to).name + ")",
                ": llama.cpp keeps such a tensor in f16, which lowbit's quantized layers cannot (use --format-map to "
                "choose another format for it)");
  return to;
}

std::optional<FormatPlan> plan_from_format(const QuantFormat& f, const LlamaConfig& c) {
  if (!f.is_ggml_block()) return std::nullopt;
  FormatPlan plan;
  plan.origin = std::string("format ") + f.name;
  plan.base = f.id;
  for (const PlanTensor& t : plan_tensors(c)) {
    if (is_vocab(t.kind)) continue;  // stay f32 with --format (no rule packs them)
    const Id ty = llama_fallback_format(f.id, t.in, std::string("--format ") + f.name + ": " + gguf_name(t));
    if (ty != f.id)
      plan.notes.push_back(gguf_name(t) + ": " + f.name + " -> " + quant_format(ty).name + " (" +
                           std::to_string(t.in) + " columns)");
    plan.formats[t.module] = ty;
  }
  if (plan.notes.empty()) return std::nullopt;
  return plan;
}

FormatPlan plan_from_preset(const std::string& name_in, const LlamaConfig& c, bool imatrix) {
  const Preset* pr = find_preset(name_in);
  if (!pr) throw_error("--preset: unknown preset '", name_in, "' (known: ", preset_names(), ")");
  const std::string ft = pr->name;
  FormatPlan plan;
  plan.origin = "preset " + ft;
  plan.llama_ftype = pr->ftype;
  plan.base = pr->base;
  const int n_gqa = c.n_kv_heads > 0 ? c.n_heads / c.n_kv_heads : 1;
  const int n = c.n_layers;
  // llama.cpp's LLM_TYPE_70B (llama: 80 layers with grouped-query attention).
  const bool is_70b = n == 80 && c.n_heads != c.n_kv_heads;
  for (const PlanTensor& t : plan_tensors(c)) {
    Id ty = pr->base;
    const int i = t.layer;
    if (t.kind == TensorKind::Output || (c.tied_embeddings && t.kind == TensorKind::TokenEmbd)) {
      if (t.in % quant_format(pr->base).group_size != 0) ty = Id::Q8_0;
      else if (pr->base != Id::Q8_0) ty = Id::Q6_K;
    } else if (t.kind == TensorKind::AttnV) {
      if (ft == "q2_k") ty = n_gqa >= 4 ? Id::Q4_K : Id::Q3_K;
      else if (ft == "q3_k_m") ty = i < 2 ? Id::Q5_K : Id::Q4_K;
      else if (ft == "q3_k_l") ty = Id::Q5_K;
      else if ((ft == "q4_k_m" || ft == "q5_k_m") && use_more_bits(i, n)) ty = Id::Q6_K;
      else if (ft == "q4_k_s" && i < 4) ty = Id::Q5_K;
      else if ((ft == "iq4_nl" || ft == "iq4_xs") && n_gqa >= 4) ty = Id::Q5_K;
      if (is_70b && (ty == Id::Q3_K || ty == Id::Q4_K)) ty = Id::Q5_K;
    } else if (t.kind == TensorKind::FfnDown) {
      if (ft == "q2_k") ty = Id::Q3_K;
      else if (ft == "q3_k_m") ty = i < n / 16 ? Id::Q5_K : Id::Q4_K;
      else if (ft == "q3_k_l") ty = Id::Q5_K;
      else if (ft == "q4_k_m") { if (use_more_bits(i, n)) ty = Id::Q6_K; }
      else if (ft == "q5_k_m") { if (use_more_bits(i, n)) ty = Id::Q6_K; }
      else if (ft == "q4_k_s" && i < n / 8) ty = Id::Q5_K;
      else if ((ft == "iq4_nl" || ft == "iq4_xs") && i < n / 8 && !imatrix) ty = Id::Q5_K;
      // llama.cpp: "guard against craziness in the first few ffn_down layers" (with an imatrix only)
      else if ((ft == "q4_0" || ft == "q5_0") && imatrix && i < n / 8) ty = ft == "q4_0" ? Id::Q4_1 : Id::Q5_1;
    } else if (t.kind == TensorKind::AttnOutput) {
      if (ft == "q2_k") ty = Id::Q3_K;
      else if (ft == "q3_k_m") ty = Id::Q4_K;
      else if (ft == "q3_k_l") ty = Id::Q5_K;
    }
    // Rows that are not whole blocks: llama.cpp's fallback types.
    const Id chosen = ty;
    ty = llama_fallback_format(ty, t.in, "--preset " + ft + ": " + gguf_name(t));
    if (ty != chosen) {
      plan.notes.push_back(gguf_name(t) + ": " + quant_format(chosen).name + " -> " + quant_format(ty).name + " (" +
                           std::to_string(t.in) + " columns)");
    }
    plan.formats[t.module] = ty;
  }
  return plan;
}

}  // namespace lowbit
