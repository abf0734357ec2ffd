#include "lowbit/cli/common.h"

#include <cstdio>
#include <filesystem>
#include <chrono>
#include <fstream>
#include <sstream>

#include "lowbit/io/gguf.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/ops/device_init.h"

namespace lowbit::cli {

namespace fs = std::filesystem;

Device parse_device(const std::string& name) {
  if (name == "cpu") return Device::CPU;
  if (name == "cuda" || name == "gpu") {
    if (!init_cuda()) throw_error("--device cuda: no usable CUDA GPU (or lowbit was built without CUDA)");
    return Device::CUDA;
  }
  throw_error("unknown device '", name, "' (expected cpu or cuda)");
}

namespace {
// A .gguf file whose linear weights use a ggml block type (q4_0, q4_1, q8_0, ...).
bool is_packed_gguf(const std::string& path) {
  if (path.size() < 5 || path.compare(path.size() - 5, 5, ".gguf") != 0 || !fs::is_regular_file(path)) return false;
  const GgufFile f = GgufFile::open(path);
  for (const auto& t : f.tensors())
    if (t.name.find("ffn_down.weight") != std::string::npos && quant_format_for_ggml_type(t.ggml_type)) return true;
  return false;
}
}  // namespace

LoadedModel load_model(const std::string& path, Device device, bool dequantize) {
  LoadedModel m;
  if (dequantize && is_lowbit_quantized_dir(path)) {  // the dense view, f32
    QuantizedCheckpoint q = load_quantized_model(path);
    m.checkpoint = std::move(q.dense);
  } else if (is_lowbit_quantized_dir(path)) {  // packed weights: QuantLinear layers
    QuantizedCheckpoint q = load_quantized_model(path, /*dense_view=*/false);
    m.model = make_quantized_model(q, device);
    m.checkpoint = std::move(q.dense);
    for (auto& l : m.checkpoint.weights.layers)  // drop the placeholders of the packed linears
      for (Tensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) *t = Tensor();
    return m;
  }
  if (!dequantize && is_packed_gguf(path)) {  // ggml block types stay packed: QuantLinear layers
    QuantizedCheckpoint q = load_gguf_quantized(path, /*dense_view=*/false);
    m.model = make_quantized_model(q, device);
    m.checkpoint = std::move(q.dense);
    for (auto& l : m.checkpoint.weights.layers)
      for (Tensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) *t = Tensor();
    if (m.model->packed_output()) {
      m.checkpoint.weights.tok_embeddings = m.checkpoint.weights.output = Tensor();
      for (const char* name : {"model.embed_tokens", "lm_head"})
        if (auto it = q.quantized.find(name); it != q.quantized.end()) m.packed_vocab_bytes += it->second.nbytes();
    }
    return m;
  }
  if (!m.checkpoint.weights.tok_embeddings.defined()) m.checkpoint = load_checkpoint(path);
  LlamaWeights w = m.checkpoint.weights;
  if (device != Device::CPU) for_each_weight(w, [&](const std::string&, Tensor& t) { t = t.to(device); });
  m.model = std::make_unique<LlamaModel>(m.checkpoint.config, w, false);
  return m;
}

std::unique_ptr<Tokenizer> open_tokenizer(const std::string& tokenizer_path, const std::string& model_path) {
  if (!tokenizer_path.empty()) return load_tokenizer(tokenizer_path);

  if (!model_path.empty() && fs::is_directory(model_path)) return load_tokenizer(model_path);
  throw_error("no tokenizer: pass --tokenizer FILE (tokenizer.bin, tokenizer.model or tokenizer.json); ", model_path,
              " is not a model directory with one");
}

std::vector<int32_t> read_token_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw_error(path, ": cannot open token file");
  const auto size = static_cast<int64_t>(f.tellg());
  if (size % 4 != 0) throw_error(path, ": ", size, " bytes is not a whole number of int32 token ids");
  std::vector<int32_t> ids(size_t(size / 4));
  f.seekg(0);
  f.read(reinterpret_cast<char*>(ids.data()), size);
  if (!f) throw_error(path, ": read failed");
  return ids;
}

// Tokenizes a text file once and caches the ids (see common.h).
std::vector<int32_t> tokenize_file_cached(const std::string& text_path, const Tokenizer& tok, const std::string& tok_path,
                               const std::string& cache_path) {
  std::error_code ec;
  const auto size = fs::file_size(text_path, ec);
  if (ec) throw_error(text_path, ": cannot read (", ec.message(), ")");
  const auto mtime = fs::last_write_time(text_path).time_since_epoch().count();
  const std::string key = text_path + "|" + std::to_string(size) + "|" + std::to_string(mtime) + "|" + tok_path;
  std::ifstream meta(cache_path + ".key");
  std::string saved;
  std::getline(meta, saved);
  if (saved == key && fs::exists(cache_path)) return read_token_file(cache_path);
  std::ifstream f(text_path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  auto t0 = std::chrono::steady_clock::now();
  std::vector<int> ids = tok.encode(ss.str(), false);
  std::fprintf(stderr, "tokenized %s: %zu tokens in %.1fs\n", text_path.c_str(), ids.size(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  std::vector<int32_t> out(ids.begin(), ids.end());
  {
    std::ofstream o(cache_path + ".tmp", std::ios::binary);
    o.write(reinterpret_cast<const char*>(out.data()), std::streamsize(out.size() * 4));
  }
  fs::rename(cache_path + ".tmp", cache_path);
  std::ofstream(cache_path + ".key") << key << "\n";
  return out;
}

void print_json(const nlohmann::json& j) {
  std::string s = j.dump();
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

}  // namespace lowbit::cli
