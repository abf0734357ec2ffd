#include "lowbit/methods/saliency.h"

#include <cmath>
#include <filesystem>
#include <optional>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/leaf_hook.h"
#include "lowbit/core/progress.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/methods/pipeline.h"
#include "lowbit/ops/ops.h"

namespace lowbit {

namespace {

std::string module_name(int layer, const std::string& name) {
  return "model.layers." + std::to_string(layer) + "." + name;
}

// Accumulates sum_t x_tj^2 (per input channel) of the rows a layer sees, then forwards.
// Next-token targets inside each window: targets[b, t] = tokens[b, t+1], the last one ignored (-1).
Tensor shifted_targets(const Tensor& tokens) {
  const int64_t B = tokens.size(0), L = tokens.size(1);
  Tensor t = Tensor::empty({B * L}, DType::I32);
  const int32_t* src = tokens.data<int32_t>();
  int32_t* dst = t.data<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < L; ++i) dst[b * L + i] = i + 1 < L ? src[b * L + i + 1] : -1;
  return t;
}

// Scales s to mean 1 and returns its mean before.
double normalise_mean_one(Tensor& s) {
  float* p = s.data<float>();
  double sum = 0;
  for (int64_t i = 0; i < s.numel(); ++i) sum += p[i];
  const double mean = sum / double(s.numel());
  if (!(mean > 0)) return 0.0;  // a dead layer keeps zero saliency (no regularization)
  for (int64_t i = 0; i < s.numel(); ++i) p[i] = float(double(p[i]) / mean);
  return mean;
}

}  // namespace

SaliencyKind parse_saliency_kind(std::string_view name) {
  if (name == "fisher") return SaliencyKind::Fisher;
  if (name == "grad-weight") return SaliencyKind::GradWeight;
  if (name == "act-weight") return SaliencyKind::ActWeight;
  if (name == "uniform") return SaliencyKind::Uniform;
  throw_error("unknown saliency kind '", name, "' (expected fisher, grad-weight or act-weight)");
}

const char* saliency_kind_name(SaliencyKind k) {
  switch (k) {
    case SaliencyKind::Fisher: return "fisher";
    case SaliencyKind::GradWeight: return "grad-weight";
    case SaliencyKind::ActWeight: return "act-weight";
    case SaliencyKind::Uniform: return "uniform";
  }
  return "?";
}

SaliencyNorm parse_saliency_norm(std::string_view name) {
  if (name == "layer") return SaliencyNorm::Layer;
  if (name == "none") return SaliencyNorm::None;
  throw_error("unknown saliency normalisation '", name, "' (expected layer or none)");
}

const char* saliency_norm_name(SaliencyNorm n) { return n == SaliencyNorm::None ? "none" : "layer"; }

SaprReduction parse_sapr_reduction(std::string_view name) {
  if (name == "mean") return SaprReduction::Mean;
  if (name == "sum") return SaprReduction::Sum;
  throw_error("unknown SAPR regularizer reduction '", name, "' (expected mean or sum)");
}

const char* sapr_reduction_name(SaprReduction r) { return r == SaprReduction::Sum ? "sum" : "mean"; }

const Tensor& SaliencyMap::at(const std::string& module) const {
  auto it = scores.find(module);
  if (it == scores.end()) throw_error("saliency: no scores for module '", module, "'");
  return it->second;
}

SaliencyMap compute_saliency(const LlamaConfig& config, const LlamaWeights& weights, const Tensor& tokens_in,
                             const SaliencyOptions& o) {
  LB_CHECK(tokens_in.dim() == 2 && tokens_in.dtype() == DType::I32 && tokens_in.size(1) >= 2,
           "saliency: calibration tokens must be i32 [N, L] with L >= 2, got ", tokens_in.describe());
  LB_CHECK(o.batch >= 1, "saliency: batch must be >= 1, got ", o.batch);
  const Tensor tokens = tokens_in.contiguous();
  const int64_t N = tokens.size(0), L = tokens.size(1);
  const bool needs_grad = o.kind != SaliencyKind::ActWeight && o.kind != SaliencyKind::Uniform;
  LlamaModel model(config, weights, needs_grad);
  SaliencyMap out;
  out.kind = o.kind;
  out.norm = o.norm;
  out.rope_style = config.rope_style;
  out.nsamples = N;
  out.seqlen = L;
  if (o.kind == SaliencyKind::Uniform) {
    for (int i = 0; i < model.n_layers(); ++i)
      for (auto& [name, slot] : model.block(i).linears()) {
        const std::string m = "model.layers." + std::to_string(i) + "." + name;
        out.scores.emplace(m, Tensor::full({(*slot)->out_features(), (*slot)->in_features()}, 1.0));
        if (o.norm == SaliencyNorm::Layer) out.layer_mean[m] = 1.0;
      }
    return out;
  }

  // Accumulators in double, per module.
  struct Acc {
    std::shared_ptr<Linear>* slot;
    int64_t rows = 0, cols = 0;
    Tensor w;                   // F32 CPU copy of the weight (grad-weight and act-weight only)
    std::vector<double> sum;    // [out*in] (gradient kinds on the CPU) or [in] (act-weight: sum of x^2)
    int64_t rows_seen = 0;
    // Fisher on a GPU: sum of g^2 kept on the device in f32, so a batch costs two elementwise
    // kernels instead of a copy of every gradient to the host and a single-threaded double loop
    // (163 s for one 7B-shaped block at 128 x 2048 tokens on an H100).
    Tensor dev_sum;
  };
  std::map<std::string, Acc> acc;
  std::unordered_map<Node*, Acc*> by_weight;  // the gradient kinds: weight leaf -> its accumulator
  for (int i = 0; i < model.n_layers(); ++i)
    for (auto& [name, slot] : model.block(i).linears()) {
      const std::string m = module_name(i, name);
      Acc a{slot, (*slot)->out_features(), (*slot)->in_features(), {}, {}, 0, {}};
      if (o.kind != SaliencyKind::Fisher) a.w = (*slot)->effective_weight().to(Device::CPU).to(DType::F32).contiguous();
      if (!needs_grad) a.sum.assign(size_t(a.cols), 0.0);
      Acc& placed = acc.emplace(m, std::move(a)).first->second;
      if (needs_grad) {
        auto* dense = dynamic_cast<DenseLinear*>(slot->get());
        LB_CHECK(dense, "saliency: ", m, " is not a dense layer (compute saliency on the full-precision model)");
        by_weight[dense->weight_var().node().get()] = &placed;
      }
    }

  // act-weight: sum of x^2 per input channel of every linear, gathered by hooks on the layers.
  std::optional<LinearHookScope> hooks;
  if (!needs_grad) {
    std::vector<std::pair<std::string, std::shared_ptr<Linear>*>> slots;
    for (auto& [m, a] : acc) slots.emplace_back(m, a.slot);
    hooks.emplace(slots, [&acc](const std::string& m, const Tensor& x) {
      Acc& a = acc.at(m);
      const Tensor xc = x.to(Device::CPU).to(DType::F32).contiguous();
      const int64_t n = xc.size(0), in = xc.size(1);
      const float* p = xc.data<float>();
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < in; ++j) a.sum[size_t(j)] += double(p[i * in + j]) * double(p[i * in + j]);
      a.rows_seen += n;
    });
  }
  // The gradient kinds fold each weight's gradient into its accumulator as soon as backward has
  // finished it, then drop it (and every other parameter's): the pass never holds all gradients at
  // once, so its memory is the model, the accumulators and one block's activations (7B-shaped
  // blocks on an H100: 3.8 GB per block when every gradient and a g^2 buffer per weight were kept).
  std::map<Shape, Tensor> dev_tmp;  // g^2 scratch on the device, one per weight shape
  const LeafGradHook fold = [&](Node& leaf) {
    auto found = by_weight.find(&leaf);
    if (found != by_weight.end()) {
      Acc& a = *found->second;
      if (o.kind == SaliencyKind::Fisher && leaf.grad.device() != Device::CPU) {
        const Tensor g = leaf.grad.to(DType::F32).contiguous();
        if (!a.dev_sum.defined()) a.dev_sum = Tensor::zeros(g.shape(), DType::F32, g.device());
        Tensor& tmp = dev_tmp[g.shape()];
        if (!tmp.defined()) tmp = Tensor::empty(g.shape(), DType::F32, g.device());
        ops::mul(g, g, tmp);
        ops::axpy(1.0, tmp, a.dev_sum);
      } else {
        const Tensor g = leaf.grad.to(Device::CPU).to(DType::F32).contiguous();
        if (a.sum.empty()) a.sum.assign(size_t(g.numel()), 0.0);
        const float* pg = g.data<float>();
        const float* pw = a.w.defined() ? a.w.data<float>() : nullptr;
        for (int64_t k = 0; k < g.numel(); ++k)
          a.sum[size_t(k)] += o.kind == SaliencyKind::Fisher ? double(pg[k]) * double(pg[k])
                                                             : std::fabs(double(pg[k]) * double(pw[k]));
      }
    }
    leaf.grad = Tensor();
  };
  int64_t batches = 0;
  std::optional<ProgressBar> bar;
  if (o.progress) bar.emplace(std::string("saliency ") + saliency_kind_name(o.kind), N, "seqs");
  {
    for (int64_t s = 0; s < N; s += o.batch) {
      const int64_t e = std::min(N, s + o.batch);
      const Tensor tb = tokens.slice(0, s, e).contiguous();
      if (!needs_grad) {
        NoGradGuard ng;
        model.forward(tb);
      } else {
        EnableGradGuard eg;  // a caller under NoGradGuard still gets gradients
        Var loss = cross_entropy(model.forward(tb), shifted_targets(tb));
        backward_with_leaf_hook(loss, fold);
        for (auto& p : model.parameters()) p.zero_grad();
      }
      ++batches;
      if (bar) bar->update(e);
    }
  }
  hooks.reset();  // the model's own layers again
  dev_tmp.clear();
  if (bar) bar->finish();

  // Layer: mean over batches, then mean 1 per layer. None: the raw sum over batches.
  const bool layer_norm = o.norm == SaliencyNorm::Layer;
  for (auto& [m, a] : acc) {
    const int64_t rows = a.rows, cols = a.cols;
    Tensor s = Tensor::empty({rows, cols});
    float* ps = s.data<float>();
    if (a.dev_sum.defined()) {  // Fisher on a GPU: the f32 device sums, scaled in double as below
      const Tensor h = a.dev_sum.to(Device::CPU).contiguous();
      a.dev_sum = Tensor();
      const float* ph = h.data<float>();
      for (int64_t k = 0; k < rows * cols; ++k)
        ps[k] = float(layer_norm ? double(ph[k]) / double(batches) : double(ph[k]));
    } else if (needs_grad) {
      if (a.sum.empty()) a.sum.assign(size_t(rows * cols), 0.0);  // no gradient reached it
      for (int64_t k = 0; k < rows * cols; ++k)
        ps[k] = float(layer_norm ? a.sum[size_t(k)] / double(batches) : a.sum[size_t(k)]);
    } else {
      const float* pw = a.w.data<float>();
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t k = r * cols + c;
          ps[k] = float(std::fabs(double(pw[k])) * std::sqrt(a.sum[size_t(c)] / double(std::max<int64_t>(a.rows_seen, 1))));
        }
    }
    std::vector<double>().swap(a.sum);
    if (layer_norm) out.layer_mean[m] = normalise_mean_one(s);
    out.scores.emplace(m, s);
  }
  return out;
}

SaliencyMap normalise_saliency_per_layer(SaliencyMap s) {
  if (s.norm == SaliencyNorm::Layer) return s;
  for (auto& [m, t] : s.scores) {
    Tensor c = t.to(Device::CPU).to(DType::F32).contiguous().clone();
    s.layer_mean[m] = normalise_mean_one(c);
    t = c;
  }
  s.norm = SaliencyNorm::Layer;
  return s;
}

SaliencyMap compute_saliency(const LlamaConfig& config, const LlamaWeights& weights, const Tensor& tokens_in,
                             const SaliencyOptions& o, comm::Communicator* comm) {
  const bool sums = o.kind == SaliencyKind::Fisher || o.kind == SaliencyKind::GradWeight;
  const int64_t N = tokens_in.dim() == 2 ? tokens_in.size(0) : 0, nbatch = o.batch >= 1 ? (N + o.batch - 1) / o.batch : 0;
  const int W = comm ? comm->world_size() : 1, r = comm ? comm->rank() : 0;
  // One rank, a kind that is not a plain sum over batches, or fewer batches than ranks: every rank
  // computes the whole map (compute_saliency checks the inputs).
  if (W == 1 || !sums || nbatch < W) return compute_saliency(config, weights, tokens_in, o);
  // This rank's whole batches [first, last) of the one-process pass, their raw sums over the ranks.
  const int64_t first = std::min(N, nbatch * r / W * o.batch), last = std::min(N, nbatch * (r + 1) / W * o.batch);
  SaliencyOptions mine = o;
  mine.norm = SaliencyNorm::None;
  SaliencyMap s = compute_saliency(config, weights, tokens_in.slice(0, first, last).contiguous(), mine);
  int64_t n = 0;
  for (const auto& [m, t] : s.scores) n += t.numel();
  Tensor flat = Tensor::empty({n}, DType::F64);
  double* p = flat.data<double>();
  for (const auto& [m, t] : s.scores) {  // the map's order: the same on every rank
    const Tensor c = t.to(Device::CPU).to(DType::F32).contiguous();
    for (int64_t k = 0; k < c.numel(); ++k) *p++ = double(c.data<float>()[k]);
  }
  comm->all_reduce_sum(flat);
  p = flat.data<double>();
  // Layer: the mean over all batches (as one process), then mean 1 per layer. None: the raw sum.
  const double div = o.norm == SaliencyNorm::Layer ? double(nbatch) : 1.0;
  for (auto& [m, t] : s.scores) {
    Tensor c = Tensor::empty(t.shape());
    for (int64_t k = 0; k < c.numel(); ++k) c.data<float>()[k] = float(*p++ / div);
    t = c;
  }
  s.nsamples = N;
  return o.norm == SaliencyNorm::Layer ? normalise_saliency_per_layer(std::move(s)) : s;
}

void save_saliency(const std::string& path, const SaliencyMap& s) {
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& [m, t] : s.scores) ts.emplace_back(m, t);
  if (auto parent = std::filesystem::path(path).parent_path(); !parent.empty())
    std::filesystem::create_directories(parent);
  std::map<std::string, std::string> md;
  if (!s.layer_mean.empty()) md["layer_means"] = nlohmann::json(s.layer_mean).dump();
  md["format"] = "lowbit-saliency";
  md["version"] = "1";
  md["kind"] = saliency_kind_name(s.kind);
  md["normalization"] = saliency_norm_name(s.norm);
  md["rope_style"] = s.rope_style == RopeStyle::Half ? "half" : "interleaved";
  md["nsamples"] = std::to_string(s.nsamples);
  md["seqlen"] = std::to_string(s.seqlen);
  md["source"] = s.source;
  save_safetensors(path, ts, md);
}

double SaliencyMap::layer_weight(const std::string& module) const {
  if (layer_mean.empty())
    throw_error("saliency: no per-layer means (a layer-normalised file written before they were kept); recompute "
                "the saliency or start from a raw (--saliency-norm none) file");
  auto it = layer_mean.find(module);
  if (it == layer_mean.end()) throw_error("saliency: no layer mean for '", module, "'");
  double total = 0;
  for (const auto& [m, v] : layer_mean) total += v;
  const double mean = total / double(layer_mean.size());
  return mean > 0 ? it->second / mean : 0.0;
}

SaliencyMap load_saliency(const std::string& path) {
  SafetensorsFile f = SafetensorsFile::open(path);
  const auto& md = f.metadata();
  auto get = [&](const char* k) -> std::string {
    auto it = md.find(k);
    if (it == md.end()) throw_error(path, ": not a lowbit saliency file (metadata '", k, "' missing)");
    return it->second;
  };
  if (get("format") != "lowbit-saliency") throw_error(path, ": not a lowbit saliency file (format '", get("format"), "')");
  if (get("version") != "1") throw_error(path, ": saliency file version ", get("version"), " (this build reads 1)");
  SaliencyMap s;
  try {
    s.kind = parse_saliency_kind(get("kind"));
    s.nsamples = std::stoll(get("nsamples"));
    s.seqlen = std::stoll(get("seqlen"));
    // Files written before the key existed hold layer-normalised scores.
    if (auto it = md.find("normalization"); it != md.end()) s.norm = parse_saliency_norm(it->second);
    if (auto it = md.find("source"); it != md.end()) s.source = it->second;
    if (auto it = md.find("layer_means"); it != md.end())
      for (const auto& [m, v] : nlohmann::json::parse(it->second).get<std::map<std::string, double>>()) s.layer_mean[m] = v;
  } catch (const std::exception& e) {
    throw_error(path, ": bad saliency metadata: ", e.what());
  }
  const std::string rs = get("rope_style");
  if (rs != "half" && rs != "interleaved") throw_error(path, ": rope_style '", rs, "' (expected half or interleaved)");
  s.rope_style = rs == "half" ? RopeStyle::Half : RopeStyle::Interleaved;
  for (const auto& t : f.tensors()) {
    Tensor v = f.load_f32(t.name);
    if (v.dim() != 2) throw_error(path, ": saliency '", t.name, "' is ", v.describe(), ", expected [out, in]");
    s.scores.emplace(t.name, v.contiguous());
  }
  return s;
}

void check_saliency_matches(const SaliencyMap& s, const LlamaModel& model, const std::string& source) {
  if (s.rope_style != model.config().rope_style)
    throw_error(source, ": saliency was computed with ", s.rope_style == RopeStyle::Half ? "half" : "interleaved",
                " q/k rows but the model uses the other layout; recompute it for this model file");
  auto& m = const_cast<LlamaModel&>(model);
  for (int i = 0; i < m.n_layers(); ++i)
    for (auto& [name, slot] : m.block(i).linears()) {
      const std::string mod = module_name(i, name);
      auto it = s.scores.find(mod);
      if (it == s.scores.end()) throw_error(source, ": no saliency for ", mod, " (computed for another model?)");
      const Shape want{(*slot)->out_features(), (*slot)->in_features()};
      if (it->second.shape() != want)
        throw_error(source, ": saliency of ", mod, " is ", shape_str(it->second.shape()), " but the layer is ",
                    shape_str(want));
    }
}

Var saliency_regularizer(const Var& w_hat, const Tensor& w, const Tensor& s, SaprReduction reduction) {
  LB_CHECK(w_hat.shape() == w.shape() && w.shape() == s.shape(), "saliency_regularizer: Ŵ ", shape_str(w_hat.shape()),
           ", W ", shape_str(w.shape()), " and S ", shape_str(s.shape()), " must have one shape");
  const DType dt = w_hat.value().dtype();
  const Device dev = w_hat.value().device();
  // One reduction (and one elementwise backward) instead of sub, mul, mul, sum and scale.
  return weighted_sq_err(w_hat, w.to(dt).to(dev), s.to(dt).to(dev),
                         reduction == SaprReduction::Sum ? 1.0 : 1.0 / double(w.numel()));
}

}  // namespace lowbit
