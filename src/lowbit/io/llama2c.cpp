#include "lowbit/io/llama2c.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <vector>

#include "lowbit/io/file_util.h"
#include "lowbit/io/rope_layout.h"
#include "lowbit/io/tensor_parallel_load.h"

namespace lowbit {

namespace {

constexpr size_t kHeaderBytes = 7 * sizeof(int32_t);

struct Header {
  int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
};

std::string header_str(const Header& h) {
  return detail::concat("dim=", h.dim, ", hidden_dim=", h.hidden_dim, ", n_layers=", h.n_layers, ", n_heads=", h.n_heads,
                        ", n_kv_heads=", h.n_kv_heads, ", vocab_size=", h.vocab_size, ", seq_len=", h.seq_len);
}

// Config implied by a header; validated (positive, plausible, divisibility) before any size is
// computed from it.
LlamaConfig config_from_header(const Header& h, const std::string& path) {
  LlamaConfig c;
  c.arch = "llama";
  c.dim = h.dim;
  c.hidden_dim = h.hidden_dim;
  c.n_layers = h.n_layers;
  c.n_heads = h.n_heads;
  c.n_kv_heads = h.n_kv_heads;
  // INT32_MIN has no positive counterpart; treat it as invalid (0) rather than overflow.
  c.vocab_size = h.vocab_size == INT32_MIN ? 0 : std::abs(h.vocab_size);
  c.tied_embeddings = h.vocab_size > 0;
  c.max_seq_len = h.seq_len;
  c.head_dim = 0;  // llama2.c: head_size = dim / n_heads
  c.rope_theta = 10000.0f;
  c.norm_eps = 1e-5f;
  c.rope_style = RopeStyle::Interleaved;
  c.bos_id = 1;
  c.eos_id = 2;
  try {
    c.validate(path);
  } catch (const Error& e) {
    throw_error(e.what(), " (llama2.c header: ", header_str(h), ")");
  }
  if (h.n_kv_heads > h.n_heads)
    throw_error(path, ": n_kv_heads = ", h.n_kv_heads, " exceeds n_heads = ", h.n_heads, " (llama2.c header: ", header_str(h), ")");
  return c;
}

// One f32 array of the file, in file order.
struct Section {
  const char* name;
  uint64_t count;  // floats
};

std::vector<Section> sections(const LlamaConfig& c, const std::string& path) {
  const uint64_t D = c.dim, F = c.hidden_dim, L = c.n_layers, V = c.vocab_size, S = c.max_seq_len;
  const uint64_t h = c.resolved_head_dim(), KV = uint64_t(c.n_kv_heads) * h;
  auto mul = [&](std::initializer_list<uint64_t> xs, const char* what) {
    uint64_t r = 1;
    for (auto x : xs) r = io::checked_mul(r, x, path, what);
    return r;
  };
  std::vector<Section> s = {
      {"token_embedding", mul({V, D}, "token_embedding")},
      {"rms_att", mul({L, D}, "rms_att")},
      {"wq", mul({L, D, D}, "wq")},
      {"wk", mul({L, KV, D}, "wk")},
      {"wv", mul({L, KV, D}, "wv")},
      {"wo", mul({L, D, D}, "wo")},
      {"rms_ffn", mul({L, D}, "rms_ffn")},
      {"w1", mul({L, F, D}, "w1")},
      {"w2", mul({L, D, F}, "w2")},
      {"w3", mul({L, F, D}, "w3")},
      {"rms_final", D},
      {"freq_cis_real", mul({S, h / 2}, "freq_cis_real")},
      {"freq_cis_imag", mul({S, h / 2}, "freq_cis_imag")},
  };
  if (!c.tied_embeddings) s.push_back({"wcls", mul({V, D}, "wcls")});
  return s;
}

uint64_t expected_file_size(const std::vector<Section>& secs, const std::string& path) {
  uint64_t floats = 0;
  for (const auto& s : secs) floats = io::checked_add(floats, s.count, path, "the weights");
  return io::checked_add(kHeaderBytes, io::checked_mul(floats, 4, path, "the weights"), path, "the file");
}

}  // namespace

namespace {
// load_llama2c; with `lazy`, the block linears are not read but recorded there as sources (pread at
// their offsets) and lazy->rest gets the other tensors.
Checkpoint load_llama2c_impl(const std::string& path, LazyCheckpoint* lazy) {
  auto file = io::MappedFile::open(path);
  if (file->size() < kHeaderBytes)
    throw_error(path, ": file is ", file->size(), " bytes, too small for a llama2.c header (", kHeaderBytes, " bytes)");
  Header h;
  std::memcpy(&h, file->data(), kHeaderBytes);
  LlamaConfig c = config_from_header(h, path);
  const auto secs = sections(c, path);
  const uint64_t need = expected_file_size(secs, path);
  if (file->size() != need)
    throw_error(path, ": file is ", file->size(), " bytes but the llama2.c header (", header_str(h), ") needs exactly ", need,
                " bytes", file->size() > need ? " (trailing data: not a legacy llama2.c checkpoint, or a corrupt header)" : "");

  // Every section is in bounds now (exact size checked above with overflow-checked arithmetic).
  io::ByteReader r(file->data(), file->size(), path);
  r.seek(kHeaderBytes);
  const int64_t D = c.dim, F = c.hidden_dim, L = c.n_layers, V = c.vocab_size, h_dim = c.resolved_head_dim();
  const int64_t Q = int64_t(c.n_heads) * h_dim, KV = int64_t(c.n_kv_heads) * h_dim;
  // Reads one [L, rows, cols] array and splits it into per-layer tensors.
  // linear: the HF module name of a block linear ("self_attn.q_proj"), whose rows are read lazily.
  auto per_layer = [&](const char* what, int64_t rows, int64_t cols, Tensor LayerWeights::*field, Checkpoint& ck,
                       const char* linear = nullptr) {
    for (int64_t l = 0; l < L; ++l) {
      Shape shape = rows > 0 ? Shape{rows, cols} : Shape{cols};
      const uint64_t n = uint64_t(rows > 0 ? rows : 1) * uint64_t(cols);
      if (lazy && linear) {
        const uint64_t offset = r.pos();
        r.take(n * 4, what);  // bounds only: not read
        LinearSource src;
        src.out = rows, src.in = cols;
        src.dense_rows = [path, offset, cols, what](int64_t r0, int64_t r1) {
          Tensor t = Tensor::empty({r1 - r0, cols});
          io::pread_exact(path, offset + uint64_t(r0 * cols) * 4, uint64_t((r1 - r0) * cols) * 4, t.raw_data(), what);
          return t;
        };
        lazy->linears.emplace("model.layers." + std::to_string(l) + "." + linear, std::move(src));
        continue;
      }
      ck.weights.layers[l].*field = io::tensor_from_bytes_f32(r.take(n * 4, what), DType::F32, shape);
    }
  };
  Checkpoint ck;
  ck.config = c;
  ck.source = path;
  ck.weights.layers.resize(size_t(L));
  ck.weights.tok_embeddings = io::tensor_from_bytes_f32(r.take(uint64_t(V * D) * 4, "token_embedding"), DType::F32, {V, D});
  per_layer("rms_att", 0, D, &LayerWeights::attn_norm, ck);
  per_layer("wq", Q, D, &LayerWeights::wq, ck, "self_attn.q_proj");
  per_layer("wk", KV, D, &LayerWeights::wk, ck, "self_attn.k_proj");
  per_layer("wv", KV, D, &LayerWeights::wv, ck, "self_attn.v_proj");
  per_layer("wo", D, Q, &LayerWeights::wo, ck, "self_attn.o_proj");
  per_layer("rms_ffn", 0, D, &LayerWeights::ffn_norm, ck);
  per_layer("w1", F, D, &LayerWeights::w_gate, ck, "mlp.gate_proj");
  per_layer("w2", D, F, &LayerWeights::w_down, ck, "mlp.down_proj");
  per_layer("w3", F, D, &LayerWeights::w_up, ck, "mlp.up_proj");
  ck.weights.final_norm = io::tensor_from_bytes_f32(r.take(uint64_t(D) * 4, "rms_final"), DType::F32, {D});
  // The RoPE table (freq_cis_real, freq_cis_imag) is skipped, as run.c does: it is a function of
  // seq_len and head_size alone.
  r.take(uint64_t(c.max_seq_len) * uint64_t(h_dim / 2) * 4 * 2, "freq_cis");
  if (!c.tied_embeddings)
    ck.weights.output = io::tensor_from_bytes_f32(r.take(uint64_t(V * D) * 4, "wcls"), DType::F32, {V, D});
  if (!lazy) validate_weights(ck.config, ck.weights, path);
  return ck;
}
}  // namespace

Checkpoint load_llama2c(const std::string& path) { return load_llama2c_impl(path, nullptr); }

LazyCheckpoint open_llama2c_lazily(const std::string& path) {
  LazyCheckpoint z;
  z.rest.dense = load_llama2c_impl(path, &z);
  z.rest.method = "llama2.c";
  return z;
}

bool looks_like_llama2c(const std::string& path) {
  try {
    auto file = io::MappedFile::open(path);
    if (file->size() < kHeaderBytes) return false;
    Header h;
    std::memcpy(&h, file->data(), kHeaderBytes);
    LlamaConfig c = config_from_header(h, path);
    return expected_file_size(sections(c, path), path) == file->size();
  } catch (const Error&) {
    return false;
  }
}

void save_llama2c(const std::string& path, const LlamaConfig& config, const LlamaWeights& weights) {
  config.validate(path);
  const int h_dim = config.resolved_head_dim();
  if (config.head_dim != 0 && config.head_dim * config.n_heads != config.dim)
    throw_error(path, ": llama2.c format needs head_dim = dim / n_heads; this model has head_dim ", config.head_dim,
                ", dim ", config.dim, ", n_heads ", config.n_heads);
  if (config.attn_bias) throw_error(path, ": llama2.c format cannot store attention biases (", config.arch, " model)");
  if (config.qk_norm) throw_error(path, ": llama2.c format cannot store q/k norms (", config.arch, " model)");
  if (config.rope_theta != 10000.0f)
    throw_error(path, ": llama2.c format implies rope_theta 10000; this model has ", config.rope_theta);
  if (config.norm_eps != 1e-5f)
    throw_error(path, ": llama2.c format implies norm_eps 1e-5; this model has ", config.norm_eps);
  validate_weights(config, weights, path);
  const LlamaWeights w = weights_with_rope_style(config, weights, RopeStyle::Interleaved);

  io::AtomicFileWriter out(path);
  const int32_t header[7] = {config.dim,     config.hidden_dim,
                             config.n_layers, config.n_heads,
                             config.n_kv_heads, config.tied_embeddings ? config.vocab_size : -config.vocab_size,
                             config.max_seq_len};
  out.write(header, sizeof(header));
  auto put = [&](const Tensor& t) {
    Tensor c = t.to(Device::CPU).to(DType::F32).contiguous();
    out.write(c.raw_data(), c.nbytes());
  };
  put(w.tok_embeddings);
  for (const auto& l : w.layers) put(l.attn_norm);
  for (const auto& l : w.layers) put(l.wq);
  for (const auto& l : w.layers) put(l.wk);
  for (const auto& l : w.layers) put(l.wv);
  for (const auto& l : w.layers) put(l.wo);
  for (const auto& l : w.layers) put(l.ffn_norm);
  for (const auto& l : w.layers) put(l.w_gate);
  for (const auto& l : w.layers) put(l.w_down);
  for (const auto& l : w.layers) put(l.w_up);
  put(w.final_norm);
  // RoPE table as llama2.c's export.py computes it (precompute_freqs_cis):
  //   freqs[i] = 1 / theta^(2i / h),  cos/sin(t * freqs[i]) for t < seq_len.
  const int half = h_dim / 2;
  std::vector<float> re(size_t(config.max_seq_len) * half), im(re.size());
  for (int t = 0; t < config.max_seq_len; ++t)
    for (int i = 0; i < half; ++i) {
      const float freq = 1.0f / std::pow(10000.0f, float(2 * i) / float(h_dim));
      const float angle = float(t) * freq;
      re[size_t(t) * half + i] = std::cos(angle);
      im[size_t(t) * half + i] = std::sin(angle);
    }
  out.write(re.data(), re.size() * 4);
  out.write(im.data(), im.size() * 4);
  if (!config.tied_embeddings) put(w.output);
  out.commit();
}

}  // namespace lowbit
