#include "lowbit/methods/guided.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <optional>

#include "lowbit/autograd/functions.h"
#include "lowbit/core/progress.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/ops/ops.h"

namespace lowbit {

namespace fs = std::filesystem;

namespace {

std::string module_name(int layer, const std::string& name) {
  return "model.layers." + std::to_string(layer) + "." + name;
}

// Passes a linear's output through unchanged and hands the gradient that reaches it to a callback
// during the backward pass (autograd frees intermediate gradients, so they are read on the way).
class GradTapLinear : public WrappedLinear {
 public:
  GradTapLinear(std::shared_ptr<Linear> inner, std::function<void(const Tensor&)> on_grad)
      : WrappedLinear(std::move(inner)), on_grad_(std::move(on_grad)) {}
  Var forward(const Var& x) const override {
    Var y = inner_->forward(x);
    if (!y.requires_grad()) return y;
    auto cb = on_grad_;
    return make_result(y.value(), {y}, "grad_tap", [y, cb](const Tensor& g) {
      cb(g);
      accumulate_grad(y, g);
    });
  }

 private:
  std::function<void(const Tensor&)> on_grad_;
};

uint64_t tokens_hash(const Tensor& tokens) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the calibration ids
  const Tensor t = tokens.contiguous();
  const int32_t* p = t.data<int32_t>();
  for (int64_t i = 0; i < t.numel(); ++i) h = (h ^ uint32_t(p[i])) * 1099511628211ull;
  return h;
}

// What the statistics depend on: groups, the calibration windows and the model's shape (a state
// directory reused for another model or data is recomputed, never mixed in).
std::string stats_key(const LlamaModel& model, const Tensor& tokens, int64_t groups) {
  const LlamaConfig& c = model.config();
  return "guided-v1|groups=" + std::to_string(groups) + "|tokens=" + std::to_string(tokens.size(0)) + "x" +
         std::to_string(tokens.size(1)) + ":" + std::to_string(tokens_hash(tokens)) + "|model=" +
         std::to_string(c.n_layers) + "x" + std::to_string(c.dim) + "x" + std::to_string(c.hidden_dim) + "x" +
         std::to_string(c.vocab_size);
}

}  // namespace

std::vector<int64_t> row_group_bounds(int64_t out, int64_t groups) {
  if (groups < 1 || out < 0) throw_error("row_group_bounds: need groups >= 1, got ", groups);
  std::vector<int64_t> b(size_t(groups + 1));
  for (int64_t k = 0; k <= groups; ++k) b[size_t(k)] = k * out / groups;
  return b;
}

Tensor group_mean_squares(const Tensor& grad, int64_t groups) {
  if (grad.dim() != 2) throw_error("group_mean_squares: gradient must be [rows, out], got ", grad.describe());
  const Tensor g = grad.to(Device::CPU).to(DType::F32).contiguous();
  const int64_t rows = g.size(0), out = g.size(1);
  const std::vector<int64_t> b = row_group_bounds(out, groups);
  Tensor r = Tensor::zeros({rows, groups});
  const float* pg = g.data<float>();
  float* pr = r.data<float>();
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t k = 0; k < groups; ++k) {
      const int64_t lo = b[size_t(k)], hi = b[size_t(k + 1)];
      if (hi <= lo) continue;
      double s = 0;
      for (int64_t j = lo; j < hi; ++j) s += double(pg[t * out + j]) * double(pg[t * out + j]);
      pr[t * groups + k] = float(s / double(hi - lo));
    }
  return r;
}

void accumulate_row_group_hessians(const Tensor& x, const Tensor& w, std::vector<Tensor>& h) {
  if (x.dim() != 2 || w.dim() != 2 || w.size(0) != x.size(0))
    throw_error("row-group Hessians: inputs ", x.describe(), " and weights ", w.describe(), " do not match");
  const int64_t rows = x.size(0), in = x.size(1), g = w.size(1);
  const Device dev = x.device();
  if (h.empty())
    for (int64_t k = 0; k < g; ++k) h.push_back(Tensor::zeros({in, in}, DType::F32, dev));
  if (int64_t(h.size()) != g) throw_error("row-group Hessians: ", h.size(), " sums for ", g, " groups");
  const Tensor xc = x.dtype() == DType::F32 ? x.contiguous() : x.to(DType::F32).contiguous();
  const Tensor wc = w.to(Device::CPU).to(DType::F32).contiguous();
  const float* pw = wc.data<float>();
  for (int64_t k = 0; k < g; ++k) {
    // sum_t w_tk x_t x_t^T = (diag(w_k) X)^T X
    Tensor xr;
    if (dev == Device::CPU) {
      xr = Tensor::empty({rows, in});
      const float* px = xc.data<float>();
      float* pr = xr.data<float>();
      for (int64_t t = 0; t < rows; ++t) {
        const float s = pw[t * g + k];
        for (int64_t j = 0; j < in; ++j) pr[t * in + j] = px[t * in + j] * s;
      }
    } else {  // the row weights spread over the row on the host, multiplied where x lives
      Tensor e = Tensor::empty({rows, in});
      float* pe = e.data<float>();
      for (int64_t t = 0; t < rows; ++t) std::fill(pe + t * in, pe + (t + 1) * in, pw[t * g + k]);
      xr = Tensor::empty({rows, in}, DType::F32, dev);
      ops::mul(xc, e.to(dev), xr);
    }
    ops::gemm(xr, true, xc, false, h[size_t(k)], 1.0, 1.0);
  }
}

GptqResult stack_row_groups(const std::vector<GptqResult>& parts) {
  if (parts.empty()) throw_error("stack_row_groups: no parts");
  if (parts.size() == 1) return parts[0];
  const QuantizedTensor& q0 = parts[0].q;
  int64_t out = 0;
  for (const auto& p : parts) {
    if (p.q.format != q0.format || p.q.in_features() != q0.in_features())
      throw_error("stack_row_groups: parts differ in format or width");
    if (p.q.tensor_scale.defined())
      throw_error("stack_row_groups: format ", q0.fmt().name, " has a tensor scale; its rows cannot be stacked");
    out += p.q.out_features();
  }
  auto stack = [&](auto field) {
    const Tensor& t0 = parts[0].q.*field;
    if (!t0.defined()) return Tensor();
    Tensor r = Tensor::empty({out, t0.size(1)}, t0.dtype());
    int64_t row = 0;
    for (const auto& p : parts) {
      const Tensor t = (p.q.*field).to(Device::CPU);
      r.slice(0, row, row + t.size(0)).copy_(t);
      row += t.size(0);
    }
    return r;
  };
  GptqResult r;
  r.q.format = q0.format;
  r.q.shape = {out, q0.in_features()};
  r.q.codes = stack(&QuantizedTensor::codes);
  r.q.scales = stack(&QuantizedTensor::scales);
  r.q.zeros = stack(&QuantizedTensor::zeros);
  r.q.validate();
  for (const auto& p : parts) {
    r.loss += p.loss;
    r.dead_columns = std::max(r.dead_columns, p.dead_columns);
  }
  return r;
}

GuidedStats compute_guided_stats(LlamaModel& model, const Tensor& tokens_in, int64_t groups, bool progress) {
  LB_CHECK(tokens_in.dim() == 2 && tokens_in.dtype() == DType::I32 && tokens_in.size(1) >= 2,
           "guided: calibration tokens must be i32 [N, L] with L >= 2, got ", tokens_in.describe());
  if (groups < 1) throw_error("guided: groups must be >= 1, got ", groups);
  const Tensor tokens = tokens_in.contiguous();
  const int64_t N = tokens.size(0), L = tokens.size(1);
  GuidedStats st;
  st.groups = groups;
  st.nsamples = N;
  st.seqlen = L;
  int64_t window = 0;  // the window whose backward pass is running
  double loss_scale = 0;  // gradients of the mean loss -> of the sum of the window's token losses
  std::vector<std::pair<std::shared_ptr<Linear>*, std::shared_ptr<Linear>>> saved;
  for (int i = 0; i < model.n_layers(); ++i)
    for (auto& [name, slot] : model.block(i).linears()) {
      const std::string m = module_name(i, name);
      Tensor& acc = st.weights[m] = Tensor::zeros({N * L, groups});
      saved.emplace_back(slot, *slot);
      *slot = std::make_shared<GradTapLinear>(*slot, [&acc, &window, &loss_scale, groups, L, m](const Tensor& g) {
        if (g.dim() != 2 || g.size(0) != L) throw_error("guided: gradient of ", m, " is ", g.describe());
        Tensor gs = Tensor::empty(g.shape(), DType::F32, g.device());
        ops::scale(g.dtype() == DType::F32 ? g : g.to(DType::F32), loss_scale, gs);
        acc.slice(0, window * L, (window + 1) * L).copy_(group_mean_squares(gs, groups));
      });
    }
  struct Restore {  // the model's own layers again, also when an exception leaves
    std::vector<std::pair<std::shared_ptr<Linear>*, std::shared_ptr<Linear>>>& s;
    ~Restore() {
      for (auto& [slot, orig] : s) *slot = orig;
    }
  } restore{saved};
  std::optional<ProgressBar> bar;
  if (progress) bar.emplace("guided gradients", N, "windows");
  Tensor targets = Tensor::empty({L}, DType::I32);
  for (window = 0; window < N; ++window) {
    const Tensor tw = tokens.slice(0, window, window + 1).contiguous();
    int32_t* pt = targets.data<int32_t>();
    for (int64_t t = 0; t < L; ++t) pt[t] = t + 1 < L ? tw.data<int32_t>()[t + 1] : -1;
    loss_scale = double(L - 1);  // cross_entropy is the mean over the L-1 scored tokens
    // The weights stay constants; only the activations carry gradients (no per-weight gradient).
    Var x(model.embed(tw).value(), true);
    for (int i = 0; i < model.n_layers(); ++i) x = model.block_forward(i, x, 1, L);
    Var loss = cross_entropy(model.head(x), targets.to(x.value().device()));
    backward(loss);
    if (bar) bar->update(window + 1);
  }
  if (bar) bar->finish();
  return st;
}

void save_guided_stats(const std::string& path, const GuidedStats& s, const std::string& key) {
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& [m, t] : s.weights) ts.emplace_back(m, t);
  if (auto parent = fs::path(path).parent_path(); !parent.empty()) fs::create_directories(parent);
  save_safetensors(path, ts,
                   {{"format", "lowbit-guided-stats"}, {"key", key}, {"groups", std::to_string(s.groups)},
                    {"nsamples", std::to_string(s.nsamples)}, {"seqlen", std::to_string(s.seqlen)}});
}

GuidedStats load_guided_stats(const std::string& path, const std::string& key) {
  SafetensorsFile f = SafetensorsFile::open(path);
  const auto& md = f.metadata();
  auto get = [&](const char* k) -> std::string {
    auto it = md.find(k);
    if (it == md.end()) throw_error(path, ": not a guided statistics file (metadata '", k, "' missing)");
    return it->second;
  };
  if (get("format") != "lowbit-guided-stats") throw_error(path, ": not a guided statistics file");
  GuidedStats s;
  if (get("key") != key) return s;  // another run's: recomputed by the caller
  try {
    s.groups = std::stoll(get("groups"));
    s.nsamples = std::stoll(get("nsamples"));
    s.seqlen = std::stoll(get("seqlen"));
  } catch (const std::exception& e) {
    throw_error(path, ": bad guided statistics metadata: ", e.what());
  }
  for (const auto& t : f.tensors()) {
    Tensor v = f.load_f32(t.name);
    if (v.dim() != 2 || v.size(0) != s.nsamples * s.seqlen || v.size(1) != s.groups)
      throw_error(path, ": '", t.name, "' is ", v.describe(), ", expected [", s.nsamples * s.seqlen, ", ", s.groups, "]");
    s.weights.emplace(t.name, v.contiguous());
  }
  return s;
}

GuidedMethod::GuidedMethod(const QuantFormat& f, GptqOptions g, GuidedOptions o) : GptqMethod(f, g), g_(o) {
  if (o.groups < 1) throw_error("guided: the number of groups must be >= 1, got ", o.groups);
}

std::string GuidedMethod::options_key() const {
  return GptqMethod::options_key() + ",guided_groups=" + std::to_string(g_.groups);
}

void GuidedMethod::set_stats(GuidedStats s) {
  if (s.groups < 1) throw_error("guided: statistics with ", s.groups, " groups");
  stats_ = std::move(s);
  given_ = true;
}

void GuidedMethod::prepare(LlamaModel& model, const Tensor& tokens, const std::string& state_dir, bool progress) {
  if (given_) return;
  const std::string key = stats_key(model, tokens, g_.groups);
  const std::string path = state_dir.empty() ? "" : (fs::path(state_dir) / "guided-stats.safetensors").string();
  if (!path.empty() && fs::exists(path)) {
    stats_ = load_guided_stats(path, key);
    if (stats_.groups == g_.groups) return;
  }
  const auto t0 = std::chrono::steady_clock::now();
  stats_ = compute_guided_stats(model, tokens, g_.groups, progress);
  gradient_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!path.empty()) save_guided_stats(path, stats_, key);
}

Tensor GuidedMethod::row_group_weights(BlockContext& ctx, const std::string& linear) {
  const std::string m = module_name(ctx.layer, linear);
  auto it = stats_.weights.find(m);
  if (it == stats_.weights.end()) throw_error("guided: no gradient statistics for ", m, " (prepare was not run?)");
  const Tensor& w = it->second;
  if (w.size(0) != ctx.n_samples * ctx.seqlen)
    throw_error("guided: statistics of ", m, " cover ", w.size(0), " tokens, the calibration has ",
                ctx.n_samples * ctx.seqlen);
  // Scaled to mean 1 (GPTQ ignores a constant factor of H; equal weights become exactly 1).
  Tensor r = w.to(Device::CPU).to(DType::F32).contiguous().clone();
  float* p = r.data<float>();
  double sum = 0;
  for (int64_t i = 0; i < r.numel(); ++i) sum += p[i];
  const double mean = sum / double(r.numel());
  if (!(mean > 0) || !std::isfinite(mean)) {
    r.fill_(1.0);  // no gradient reached this layer: plain GPTQ
    return r;
  }
  for (int64_t i = 0; i < r.numel(); ++i) p[i] = float(double(p[i]) / mean);
  return r;
}

}  // namespace lowbit
