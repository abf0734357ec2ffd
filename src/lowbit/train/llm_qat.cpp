#include "lowbit/train/llm_qat.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "lowbit/autograd/functions.h"
#include "lowbit/core/progress.h"
#include "lowbit/io/file_util.h"
#include "lowbit/quant/fake_quant.h"
#include "lowbit/quant/quantize.h"

namespace lowbit {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

uint64_t splitmix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_error(path, ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<int32_t> read_ids(const std::string& path, int64_t vocab) {
  const std::string s = read_all(path);
  if (s.size() % 4 != 0) throw_error(path, ": ", s.size(), " bytes is not a whole number of int32 token ids");
  std::vector<int32_t> v(s.size() / 4);
  std::memcpy(v.data(), s.data(), s.size());
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i] < 0 || v[i] >= vocab)
      throw_error(path, ": token ", v[i], " at position ", i, " is outside the model's vocabulary (", vocab, ")");
  return v;
}

void write_ids_atomic(const std::string& path, const std::vector<int32_t>& v) {
  io::AtomicFileWriter w(path);
  w.write(v.data(), v.size() * sizeof(int32_t));
  w.commit();
}

void write_text_atomic(const std::string& path, const std::string& text) {
  io::AtomicFileWriter w(path);
  w.write(text.data(), text.size());
  w.commit();
}

// The next token of one sequence from its logits row: greedy (top-1, lowest id on ties) or a draw
// from the top-k softmax at the temperature with the uniform u in [0, 1).
int32_t pick_token(const float* logits, int64_t V, bool greedy, int64_t top_k, double temperature, double u,
                   std::vector<int32_t>& idx) {
  if (greedy) {
    int64_t best = 0;
    for (int64_t j = 1; j < V; ++j)
      if (logits[j] > logits[best]) best = j;
    return int32_t(best);
  }
  const int64_t k = top_k <= 0 || top_k > V ? V : top_k;
  idx.resize(size_t(V));
  std::iota(idx.begin(), idx.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), by_logit);
  const double mx = double(logits[idx[0]]);
  std::vector<double> p(static_cast<size_t>(k));
  double sum = 0;
  for (int64_t j = 0; j < k; ++j) sum += p[size_t(j)] = std::exp((double(logits[idx[size_t(j)]]) - mx) / temperature);
  double acc = 0;
  const double target = u * sum;
  for (int64_t j = 0; j < k; ++j) {
    acc += p[size_t(j)];
    if (target < acc) return idx[size_t(j)];
  }
  return idx[size_t(k - 1)];
}

}  // namespace

int64_t self_gen_greedy_tokens(int64_t i) { return 2 + i % 3; }

std::string self_gen_key(const LlamaModel& fp, const SelfGenOptions& o) {
  const LlamaConfig& c = fp.config();
  std::ostringstream k;
  k.precision(17);
  k << "selfgen/v1,rule=bos+random+greedy(3+i%3)+top-k,sequences=" << o.sequences << ",length=" << o.length
    << ",top_k=" << o.top_k << ",temperature=" << o.temperature << ",seed=" << o.seed << ",model=" << o.model_id
    << ",vocab=" << c.vocab_size << ",dim=" << c.dim << ",layers=" << c.n_layers << ",bos=" << c.bos_id;
  return k.str();
}

std::vector<int32_t> self_generate(const LlamaModel& fp, const SelfGenOptions& o, const std::string& path,
                                   bool* complete) {
  const LlamaConfig& c = fp.config();
  const int64_t V = c.vocab_size, N = o.sequences, L = o.length;
  if (N < 1) throw_error("--self-generate: the number of sequences must be >= 1, got ", N);
  if (L < 3 || L > c.max_seq_len)
    throw_error("--gen-length: ", L, " tokens per sequence is not in [3, ", c.max_seq_len, "] (the model's context)");
  if (o.top_k < 0) throw_error("--gen-top-k must be >= 0, got ", o.top_k);
  if (!(o.temperature > 0)) throw_error("self-generation temperature must be > 0, got ", o.temperature);
  if (c.bos_id < 0 || c.bos_id >= V) throw_error("self-generation: the model's BOS id ", c.bos_id, " is not in its vocabulary");
  if (complete) *complete = true;
  const std::string key = self_gen_key(fp, o), meta = path + ".json", partial = path + ".partial";
  if (auto parent = fs::path(path).parent_path(); !parent.empty()) fs::create_directories(parent);
  auto check_meta = [&] {
    if (!fs::exists(meta))
      throw_error(path, ": exists but was not written by --self-generate (no ", meta,
                  "); remove it or give another --gen-tokens path");
    auto j = nlohmann::json::parse(read_all(meta), nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("key") || !j["key"].is_string())
      throw_error(meta, ": not a self-generation record (no 'key')");
    if (j["key"].get<std::string>() != key)
      throw_error(path, ": was generated with other settings (", meta, ": ", j["key"].get<std::string>(),
                  "; this run: ", key, "); remove it or give another --gen-tokens path");
  };
  if (fs::exists(path)) {
    check_meta();
    std::vector<int32_t> v = read_ids(path, V);
    if (int64_t(v.size()) != N * L)
      throw_error(path, ": holds ", v.size(), " tokens, expected ", N, " sequences x ", L, " = ", N * L);
    return v;
  }
  std::vector<int32_t> out;
  if (fs::exists(partial)) {
    check_meta();
    out = read_ids(partial, V);
    if (int64_t(out.size()) % L != 0 || int64_t(out.size()) > N * L)
      throw_error(partial, ": holds ", out.size(), " tokens, not a whole number of at most ", N, " sequences of ", L);
  } else {
    nlohmann::json j = {{"key", key},
                        {"sequences", N},
                        {"length", L},
                        {"layout", "raw int32 little-endian token ids, sequences x length"},
                        {"rule", "BOS, a uniformly random token, then greedy (top-1) to a prefix of 3 + i % 3 tokens "
                                 "(BOS not counted), then top-k sampling (LLM-QAT, arXiv 2305.17888, Section 2.1)"},
                        {"top_k", o.top_k},
                        {"temperature", o.temperature},
                        {"seed", o.seed}};
    write_text_atomic(meta, j.dump(2) + "\n");
  }
  int64_t done = int64_t(out.size()) / L, run = 0;
  std::optional<ProgressBar> bar;
  if (o.progress) {
    bar.emplace("self-generate", N, "sequences");
    bar->update(done);
  }
  auto last_save = Clock::now();
  std::vector<int32_t> idx;
  while (done < N) {
    int64_t B = std::min<int64_t>(std::max<int64_t>(o.batch, 1), N - done);
    if (o.stop_after > 0) B = std::min(B, o.stop_after - run);
    std::vector<KVCache> caches;
    std::vector<KVCache*> cp;
    std::vector<std::mt19937_64> rng;
    std::vector<std::vector<int32_t>> seq(static_cast<size_t>(B));
    caches.reserve(size_t(B));
    for (int64_t b = 0; b < B; ++b) {
      caches.push_back(fp.make_cache(L, KVCacheType::F32));
      rng.emplace_back(splitmix(o.seed * 0x2545F4914F6CDD1Dull ^ splitmix(uint64_t(done + b))));
      seq[size_t(b)].push_back(int32_t(c.bos_id));
      seq[size_t(b)].push_back(int32_t(rng.back()() % uint64_t(V)));  // the random first token
    }
    for (auto& k : caches) cp.push_back(&k);
    {
      NoGradGuard ng;
      // Feed BOS (its prediction is replaced by the random token), then each token in turn.
      for (int64_t t = 0; t + 1 < L; ++t) {
        Tensor tok = Tensor::empty({B}, DType::I32);
        for (int64_t b = 0; b < B; ++b) tok.data<int32_t>()[b] = seq[size_t(b)][size_t(t)];
        Tensor logits = fp.forward_batch(tok, cp).value().to(DType::F32).contiguous();
        if (t == 0) continue;
        for (int64_t b = 0; b < B; ++b) {
          const int64_t i = done + b;
          // Token t + 1 (position 1 is the random one): greedy while within the prefix.
          const bool greedy = t + 1 <= 1 + self_gen_greedy_tokens(i);
          const double u = double(rng[size_t(b)]() >> 11) * 0x1.0p-53;
          seq[size_t(b)].push_back(
              pick_token(logits.data<float>() + b * V, V, greedy, o.top_k, o.temperature, u, idx));
        }
      }
    }
    for (auto& s : seq) out.insert(out.end(), s.begin(), s.end());
    done += B;
    run += B;
    if (bar) bar->update(done);
    const bool stop = o.stop_after > 0 && run >= o.stop_after && done < N;
    if (done < N && (stop || std::chrono::duration<double>(Clock::now() - last_save).count() >= o.checkpoint_seconds)) {
      write_ids_atomic(partial, out);
      last_save = Clock::now();
    }
    if (stop) {
      if (bar) bar->finish();
      if (complete) *complete = false;
      return out;
    }
  }
  if (bar) bar->finish();
  write_ids_atomic(path, out);
  std::error_code ec;
  fs::remove(partial, ec);
  return out;
}

bool llm_qat_supports(const QuantFormat& f) { return f.kind == QuantKind::IntSym; }

Var minmax_fake_quant(const Var& w, const QuantFormat& f) {
  LB_CHECK(llm_qat_supports(f), "llm-qat: format ", f.name,
           " is not a symmetric integer format; the paper's MinMax quantizer is symmetric (use intBgGs or intBpcs: "
           "int4g128s, int4pcs, int2g64s, ...)");
  return fake_quant(w, f);
}

MinMaxQatLinear::MinMaxQatLinear(const Tensor& weight, const Tensor& bias, const QuantFormat& f) : format_(f) {
  LB_CHECK(llm_qat_supports(f), "llm-qat: format ", f.name, " is not a symmetric integer format (intBgGs, intBpcs)");
  LB_CHECK(weight.defined() && weight.dim() == 2 && weight.numel() > 0, "llm-qat: weight must be a non-empty [out, in]");
  out_ = weight.size(0);
  in_ = weight.size(1);
  weight_ = Var(weight.to(Device::CPU).to(DType::F32).contiguous().clone(), true);
  if (bias.defined()) bias_ = Var(bias.to(Device::CPU).to(DType::F32).contiguous().clone(), false);
}

Var MinMaxQatLinear::forward(const Var& x) const {
  return linear(x, minmax_fake_quant(weight_, format_), bias_);
}

Tensor MinMaxQatLinear::effective_weight() const { return fake_quantize(weight_.value(), format_); }

QuantizedTensor MinMaxQatLinear::encode() const { return quantize(weight_.value(), format_); }

}  // namespace lowbit
