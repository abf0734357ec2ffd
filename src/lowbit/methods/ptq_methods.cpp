#include "lowbit/methods/ptq_methods.h"

#include <algorithm>
#include <chrono>
#include <map>

#include "lowbit/methods/guided.h"
#include "lowbit/methods/rtn.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/ops/ops.h"
#include "lowbit/quant/ggml_grid.h"
#include "lowbit/quant/quant_linear.h"

namespace lowbit {

namespace {

// Keeps (a prefix of) the rows each linear sees during one block pass, on the CPU. max_rows
// bounds the memory: error reports and AWQ's searches need a sample, not every calibration row.
struct InputCapture {
  explicit InputCapture(int64_t max_rows = 0) : max_rows_(max_rows) {}
  std::map<std::string, std::vector<Tensor>> chunks;
  std::map<std::string, int64_t> kept;
  LinearInputHook hook() {
    return [this](const std::string& name, const Tensor& x) {
      int64_t& k = kept[name];
      int64_t take = x.size(0);
      if (max_rows_ > 0) take = std::min(take, max_rows_ - k);
      if (take <= 0) return;
      chunks[name].push_back(x.slice(0, 0, take).to(Device::CPU).contiguous().clone());
      k += take;
    };
  }
  Tensor rows(const std::string& name) const {
    auto it = chunks.find(name);
    if (it == chunks.end()) throw_error("pipeline: no inputs captured for ", name);
    int64_t n = 0;
    const int64_t in = it->second.front().size(1);
    for (const auto& c : it->second) n += c.size(0);
    Tensor out = Tensor::empty({n, in});
    int64_t r = 0;
    for (const auto& c : it->second) {
      out.slice(0, r, r + c.size(0)).copy_(c);
      r += c.size(0);
    }
    return out;
  }

 private:
  int64_t max_rows_;
};

// GPTQ's H = 2/n sum x x^T, accumulated where the activations live (cuBLAS on the GPU, BLAS on
// the CPU) in f32 like the reference implementation. Linears fed the same tensor in one forward
// pass (q/k/v, gate/up) share one sum: the product is computed once per distinct input.
struct HessianCapture {
  std::map<std::string, Tensor> sum;  // sum of x^T x per input owner
  std::map<std::string, int64_t> rows;
  std::map<std::string, std::string> owner;  // linear -> the linear whose sum holds its input
  Tensor last_x;                             // the latest distinct input of this batch
  std::string last_name;
  // [rows, in] of this batch, each row filled with its token's weight (RSQ; undefined: weights 1).
  // Built once per batch width and device by set_row_weights.
  Tensor row_weights;
  Tensor batch_weights;  // F32 [rows] on the host
  std::map<int64_t, Tensor> expanded;  // in -> row_weights for that width
  void set_row_weights(const Tensor& w) {
    batch_weights = w;
    expanded.clear();
  }
  const Tensor& weights_for(const Tensor& x) {
    auto it = expanded.find(x.size(1));
    if (it != expanded.end()) return it->second;
    const int64_t rows = x.size(0), in = x.size(1);
    if (batch_weights.numel() != rows) throw_error("gptq: ", batch_weights.numel(), " token weights for ", rows, " rows");
    Tensor e = Tensor::empty({rows, in});
    float* p = e.data<float>();
    const float* r = batch_weights.data<float>();
    for (int64_t i = 0; i < rows; ++i) std::fill(p + i * in, p + (i + 1) * in, r[i]);
    return expanded[in] = e.to(x.device());
  }
  LinearInputHook hook() {
    return [this](const std::string& name, const Tensor& x) {
      if (last_x.defined() && x.raw_data() == last_x.raw_data() && x.shape() == last_x.shape() &&
          x.dtype() == last_x.dtype() && x.strides() == last_x.strides()) {
        const std::string& o = owner.at(last_name);
        auto [it, fresh] = owner.emplace(name, o);
        if (!fresh && it->second != o) throw_error("gptq: inconsistent input sharing for ", name);
        return;
      }
      owner.emplace(name, name);
      Tensor xc = x.dtype() == DType::F32 ? x.contiguous() : x.to(DType::F32).contiguous();
      Tensor& h = sum[name];
      if (!h.defined()) h = Tensor::zeros({xc.size(1), xc.size(1)}, DType::F32, xc.device());
      if (batch_weights.defined()) {  // sum_t r_t x_t x_t^T = (diag(r) X)^T X
        Tensor xr = Tensor::empty(xc.shape(), DType::F32, xc.device());
        ops::mul(xc, weights_for(xc), xr);
        ops::gemm(xr, true, xc, false, h, 1.0, 1.0);
      } else {
        ops::gemm(xc, true, xc, false, h, 1.0, 1.0);
      }
      rows[name] += xc.size(0);
      last_x = x;
      last_name = name;
    };
  }
  void end_batch() {  // sharing is detected within one forward pass only
    last_x = Tensor();
    last_name.clear();
  }
  // F32 [in, in] on the device the activations live on.
  Tensor hessian(const std::string& name) const {
    auto o = owner.find(name);
    if (o == owner.end() || rows.at(o->second) == 0) throw_error("gptq: no calibration inputs reached ", name);
    const Tensor& s = sum.at(o->second);
    Tensor h = Tensor::empty(s.shape(), s.dtype(), s.device());
    ops::scale(s, 2.0 / double(rows.at(o->second)), h);
    return h;
  }
};

// Thrown by GPTQ's capture hook once every linear of the current sequential group has seen its
// batch input: the rest of the block's forward pass is not needed for this group (run_block puts
// the layers back and rethrows; GptqMethod catches it).
struct StopForward {};

// AWQ searches its scales on a sample of the calibration rows (llm-awq uses 128 x 512 tokens).
constexpr int64_t kAwqRows = 65536;

std::string full_name(int layer, const std::string& name) { return "model.layers." + std::to_string(layer) + "." + name; }

std::shared_ptr<Linear>* slot_of(LlamaBlock& b, const std::string& name) {
  for (auto& [n, s] : b.linears())
    if (n == name) return s;
  throw_error("no linear named ", name);
}

// Replaces a layer by its quantized version and records the report.
void install(BlockContext& ctx, const std::string& name, const Tensor& x, QuantizedTensor q,
             std::vector<LinearReport>& reports, const Tensor& reference_weight = Tensor()) {
  auto* slot = slot_of(ctx.model.block(ctx.layer), name);
  const Tensor w = reference_weight.defined() ? reference_weight : (*slot)->effective_weight().to(Device::CPU).contiguous();
  const Tensor deq = q.dequantize();
  LinearReport r;
  r.name = full_name(ctx.layer, name);
  r.rel_error = relative_output_error(x, w, deq);
  r.params = q.out_features() * q.in_features();
  r.bits_per_weight = q.fmt().bits_per_weight(q.out_features(), q.in_features());
  reports.push_back(r);
  const Device dev = (*slot)->effective_weight().device();
  *slot = std::make_shared<QuantLinear>(std::move(q), (*slot)->bias(), dev, Tensor(), Tensor(), deq);
}

Tensor weight_of(BlockContext& ctx, const std::string& name) {
  return (*slot_of(ctx.model.block(ctx.layer), name))->effective_weight().to(Device::CPU).contiguous();
}

const std::vector<std::vector<std::string>> kSequentialGroups = {
    {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"},
    {"self_attn.o_proj"},
    {"mlp.gate_proj", "mlp.up_proj"},
    {"mlp.down_proj"}};


}  // namespace

void RtnMethod::quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) {
  InputCapture cap(kReportRows);
  // --weighted-round: sum of x^2 per input channel of each linear, over every calibration row.
  std::map<std::string, std::vector<double>> sq;
  std::map<std::string, int64_t> n_rows;
  LinearInputHook hook = cap.hook();
  if (weighted_)
    hook = [&, report = cap.hook()](const std::string& name, const Tensor& x_in) {
      report(name, x_in);
      Tensor x = x_in.to(Device::CPU).to(DType::F32).contiguous();
      const int64_t n = x.size(0), in = x.size(1);
      std::vector<double>& s = sq[name];
      s.resize(size_t(in), 0.0);
      const float* p = x.data<float>();
      for (int64_t t = 0; t < n; ++t)
        for (int64_t c = 0; c < in; ++c) s[size_t(c)] += double(p[t * in + c]) * double(p[t * in + c]);
      n_rows[name] += n;
    };
  ctx.run_block(ctx.inputs, hook);
  for (const auto& group : kSequentialGroups)
    for (const auto& name : group) {
      Tensor w = weight_of(ctx, name);
      const QuantFormat& f = ctx.format_of(name, f_);
      if (weighted_ && f.is_ggml_block()) {
        const std::vector<double>& s = sq.at(name);
        Tensor imp = Tensor::empty({int64_t(s.size())});
        for (size_t c = 0; c < s.size(); ++c) imp.data<float>()[c] = float(s[c] / double(n_rows.at(name)));
        install(ctx, name, report_sample(cap.rows(name)), rtn_quantize_weighted(w, f, imp), reports);
      } else {
        install(ctx, name, report_sample(cap.rows(name)), rtn_quantize(w, f), reports);
      }
    }
}

std::string GptqMethod::options_key() const {
  return "percdamp=" + key_number(o_.percdamp) + ",block=" + std::to_string(o_.block_size) +
         ",act_order=" + std::to_string(o_.act_order) + ",static_groups=" + std::to_string(o_.static_groups) +
         ",fp64=" + std::to_string(o_.cuda_fp64_factorization) +
         (o_.hessian_shrink > 0 ? ",hessian_shrink=" + key_number(o_.hessian_shrink) : std::string());
}

std::string QuipMethod::options_key() const {
  return GptqMethod::options_key() + ",quip_seed=" + std::to_string(quip_->seed) +
         ",quip_sides=" + (quip_->two_sided ? "both" : "input");
}

std::string AwqMethod::options_key() const {
  return "grid=" + std::to_string(o_.n_grid) + ",clip=" + std::to_string(clip_) + ",clip_grid=" +
         std::to_string(o_.clip_grid) + ",shrink=" + key_number(o_.max_shrink) + ",clip_tokens=" +
         std::to_string(o_.max_clip_tokens) + (o_.weighted_round ? ",weighted_round=1" : "");
}

GptqResult GptqMethod::solve_layer(BlockContext& ctx, const std::string& name, const Tensor& w, const Tensor& h) {
  const QuantFormat& f = ctx.format_of(name, f_);
  if (ctx.formats && f.is_ggml_block() && !ggml_block_grid_supported(f)) {
    // A mixed plan (--format-map) may put layers in iq4_xs / tq1_0 / tq2_0, which GPTQ's sweep has
    // no per-value grid for: those layers are rounded to nearest, counted in rtn_layers().
    ++rtn_layers_;
    GptqResult r;
    r.q = rtn_quantize(w.to(Device::CPU).contiguous(), f);
    return r;
  }
  return solve(w, h, f);
}

GptqResult GptqMethod::solve_row_groups(BlockContext& ctx, const std::string& name, const Tensor& w,
                                        const std::vector<Tensor>& h) {
  const QuantFormat& f = ctx.format_of(name, f_);
  // One group, or a layer of a mixed plan that is rounded to nearest anyway (no Hessian needed).
  if (h.size() == 1 || (ctx.formats && f.is_ggml_block() && !ggml_block_grid_supported(f))) return solve_layer(ctx, name, w, h[0]);
  if (f.has_tensor_scale)
    throw_error(this->name(), ": ", full_name(ctx.layer, name), " is in format ", f.name,
                ", which has one scale for the whole tensor, so its rows cannot be solved in groups (use 1 group)");
  const std::vector<int64_t> b = row_group_bounds(w.size(0), int64_t(h.size()));
  std::vector<GptqResult> parts;
  for (size_t k = 0; k < h.size(); ++k)
    if (b[k + 1] > b[k]) parts.push_back(solve_layer(ctx, name, w.slice(0, b[k], b[k + 1]).contiguous(), h[k]));
  return stack_row_groups(parts);
}

void GptqMethod::quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) {
  using Clock = std::chrono::steady_clock;
  const Device dev = ctx.inputs.device();
  const bool on_gpu = dev == Device::CUDA;  // then W, H, the report rows and the error stay there
  GptqPhaseSeconds& prof = gptq_phase_seconds();
  auto lap = [&](Clock::time_point& t, double& acc) {
    if (on_gpu) cuda_synchronize();
    const Clock::time_point now = Clock::now();
    acc += std::chrono::duration<double>(now - t).count();
    t = now;
  };
  const Tensor r = token_weights(ctx);  // RSQ: before any of the block's linears changes
  if (r.defined() && (r.dim() != 1 || r.size(0) != ctx.n_samples * ctx.seqlen))
    throw_error(name(), ": token weights must be [", ctx.n_samples * ctx.seqlen, "]");
  if (on_gpu) cuda_synchronize();  // the pipeline's queued passes are not counted below
  Clock::time_point t = Clock::now();
  for (const auto& group : kSequentialGroups) {
    // Inputs as produced by the groups quantized so far: Hessians of this group, a row sample
    // for the error report.
    HessianCapture hc;
    // Linears with row-group weights (GuidedQuant): one Hessian sum per group of output rows each,
    // accumulated here instead of in hc (their weights differ per linear even where inputs are shared).
    std::map<std::string, Tensor> rgw;               // linear -> F32 [N*L, g] on the host
    std::map<std::string, std::vector<Tensor>> gsum;  // linear -> the g sums of w x x^T
    std::map<std::string, int64_t> grows;
    for (const auto& n : group) {
      Tensor gw = row_group_weights(ctx, n);
      if (!gw.defined()) continue;
      if (gw.dim() != 2 || gw.size(0) != ctx.n_samples * ctx.seqlen || gw.size(1) < 1)
        throw_error(name(), ": row-group weights of ", n, " must be [", ctx.n_samples * ctx.seqlen, ", groups], got ",
                    gw.describe());
      rgw[n] = gw.to(Device::CPU).to(DType::F32).contiguous();
    }
    InputCapture cap(kReportRows);             // CPU model: report rows on the host
    std::map<std::string, Tensor> gpu_rows;    // GPU model: report rows on the device
    LinearInputHook hh = hc.hook(), ch = cap.hook();
    // Batch by batch, each forward pass stopped after the group's last linear has its input
    // (the reference llama.py runs whole layers; the Hessians are the same).
    const int64_t L = ctx.seqlen;
    for (int64_t s = 0; s < ctx.n_samples; s += ctx.batch) {
      const int64_t e = std::min(ctx.n_samples, s + ctx.batch);
      const Tensor xb = ctx.inputs.slice(0, s * L, e * L);
      BlockContext bc{ctx.model, ctx.layer, e - s, L, xb, ctx.fp_targets, e - s, ctx.formats};
      if (r.defined()) hc.set_row_weights(r.slice(0, s * L, e * L).contiguous());
      size_t seen = 0;
      try {
        bc.run_block(xb, [&](const std::string& n, const Tensor& x) {
          if (std::find(group.begin(), group.end(), n) == group.end()) return;
          if (auto it = rgw.find(n); it != rgw.end()) {
            accumulate_row_group_hessians(x, it->second.slice(0, s * L, e * L), gsum[n]);
            grows[n] += x.size(0);
          } else {
            hh(n, x);
          }
          if (!on_gpu) {
            ch(n, x);
          } else if (!gpu_rows.count(n) || gpu_rows[n].size(0) < kReportRows) {
            const int64_t have = gpu_rows.count(n) ? gpu_rows[n].size(0) : 0;
            const int64_t take = std::min(x.size(0), kReportRows - have);
            Tensor rows = Tensor::empty({have + take, x.size(1)}, DType::F32, dev);
            if (have) rows.slice(0, 0, have).copy_(gpu_rows[n]);
            Tensor xs = x.slice(0, 0, take);
            rows.slice(0, have, have + take).copy_(xs.dtype() == DType::F32 ? xs : xs.to(DType::F32));
            gpu_rows[n] = rows;
          }
          if (++seen == group.size()) throw StopForward{};
        });
      } catch (const StopForward&) {
      }
      hc.end_batch();
    }
    if (distributed()) {  // data-parallel calibration: the sums over every rank's windows
      for (auto& [owner, sum] : hc.sum) {
        comm_->all_reduce_sum(sum);
        hc.rows[owner] = comm_->all_reduce_sum(hc.rows[owner]);
      }
      for (auto& [n, sums] : gsum) {
        for (Tensor& sk : sums) comm_->all_reduce_sum(sk);
        grows[n] = comm_->all_reduce_sum(grows[n]);
      }
    }
    lap(t, prof.capture);
    auto solve_one = [&](const std::string& name, const Tensor& w) {
      auto it = gsum.find(name);
      if (it == gsum.end()) {
        if (rgw.count(name)) throw_error("gptq: no calibration inputs reached ", name);
        return solve_layer(ctx, name, w, hc.hessian(name));
      }
      std::vector<Tensor> hs;  // H_k = 2/n sum_t w[t, k] x_t x_t^T, as HessianCapture scales its sum
      for (const Tensor& sk : it->second) {
        Tensor h = Tensor::empty(sk.shape(), sk.dtype(), sk.device());
        ops::scale(sk, 2.0 / double(grows.at(name)), h);
        hs.push_back(h);
      }
      return solve_row_groups(ctx, name, w, hs);
    };
    for (const auto& name : group) {
      if (quip_) {
        if (on_gpu) throw_error(this->name(), ": incoherence processing runs on the CPU (--device cpu)");
        if (rgw.count(name)) throw_error(this->name(), ": incoherence processing with row-group Hessians is not supported");
        const Tensor w = weight_of(ctx, name);
        Incoherence inc = make_incoherence(w.size(0), w.size(1), incoherence_seed(quip_->seed, ctx.layer, name),
                                           quip_->two_sided);
        GptqResult r = solve_layer(ctx, name, inc.weight(w), inc.hessian(hc.hessian(name)));
        lap(t, prof.quantize);
        auto* slot = slot_of(ctx.model.block(ctx.layer), name);
        LinearReport rep;  // against the layer in x's basis
        rep.name = full_name(ctx.layer, name);
        rep.rel_error = relative_output_error(cap.rows(name), w, inc.unweight(r.q.dequantize()));
        rep.params = r.q.out_features() * r.q.in_features();
        rep.bits_per_weight = r.q.fmt().bits_per_weight(r.q.out_features(), r.q.in_features());
        reports.push_back(rep);
        auto ql = std::make_shared<QuantLinear>(std::move(r.q), (*slot)->bias(), Device::CPU);
        ql->set_incoherence(std::move(inc));
        *slot = ql;
        lap(t, prof.install);
        continue;
      }
      if (!on_gpu) {
        Tensor w = weight_of(ctx, name);
        GptqResult r = solve_one(name, w);
        lap(t, prof.quantize);
        install(ctx, name, cap.rows(name), std::move(r.q), reports);
        lap(t, prof.install);
        continue;
      }
      auto* slot = slot_of(ctx.model.block(ctx.layer), name);
      const Tensor w = (*slot)->effective_weight().contiguous();
      GptqResult r = solve_one(name, w);  // GPU path for the integer formats
      lap(t, prof.quantize);
      const Tensor deq = r.dequantized.defined() ? r.dequantized : r.q.dequantize().to(dev);
      LinearReport rep;
      rep.name = full_name(ctx.layer, name);
      rep.rel_error = relative_output_error(gpu_rows.at(name), w.dtype() == DType::F32 ? w : w.to(DType::F32), deq);
      rep.params = r.q.out_features() * r.q.in_features();
      rep.bits_per_weight = r.q.fmt().bits_per_weight(r.q.out_features(), r.q.in_features());
      reports.push_back(rep);
      lap(t, prof.report);
      *slot = std::make_shared<QuantLinear>(std::move(r.q), (*slot)->bias(), dev, Tensor(), Tensor(), deq);
      lap(t, prof.install);
    }
  }
}

void AwqMethod::quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) {
  LlamaBlock& b = ctx.model.block(ctx.layer);
  const LlamaConfig& c = ctx.model.config();
  // Data parallel: the searches run on the first kAwqRows calibration rows of all windows, as in
  // one process: each rank captures its part of them (its windows follow the lower ranks'), the
  // parts are all-gathered, and every rank runs the same searches on the same rows.
  std::vector<int64_t> takes{kAwqRows};  // rows each rank contributes
  int rank = 0;
  if (distributed()) {
    rank = comm_->rank();
    const int W = comm_->world_size();
    Tensor mine = Tensor::empty({1}, DType::I64), all = Tensor::empty({W}, DType::I64);
    mine.data<int64_t>()[0] = ctx.n_samples * ctx.seqlen;
    comm_->all_gather(mine, all);
    takes.assign(size_t(W), 0);
    int64_t before = 0;
    for (int r = 0; r < W; ++r) {
      const int64_t have = all.data<int64_t>()[r];
      takes[size_t(r)] = std::clamp<int64_t>(kAwqRows - before, 0, have);
      before += have;
    }
  }
  InputCapture cap(takes[size_t(rank)]);
  if (takes[size_t(rank)] > 0) ctx.run_block(ctx.inputs, cap.hook());
  // Original weights (for the error reports against the unscaled layer) and inputs.
  std::map<std::string, Tensor> w0, x0;
  for (const auto& g : kSequentialGroups) {
    Tensor x;  // the linears of a group share their input
    if (!distributed()) {
      x = cap.rows(g[0]);
    } else {
      const int64_t in = (*slot_of(b, g[0]))->in_features(), pad = *std::max_element(takes.begin(), takes.end());
      Tensor part = Tensor::zeros({pad, in}), all = Tensor::empty({pad * comm_->world_size(), in});
      if (takes[size_t(rank)] > 0) part.slice(0, 0, takes[size_t(rank)]).copy_(cap.rows(g[0]));
      comm_->all_gather(part, all);
      int64_t n = 0;
      for (int64_t t : takes) n += t;
      x = Tensor::empty({n, in});
      int64_t at = 0;
      for (int r = 0; r < comm_->world_size(); ++r) {
        const int64_t t = takes[size_t(r)];
        if (t > 0) x.slice(0, at, at + t).copy_(all.slice(0, r * pad, r * pad + t));
        at += t;
      }
    }
    for (const auto& n : g) {
      w0[n] = weight_of(ctx, n).clone();
      x0[n] = x;
    }
  }
  // 1. Scale search per input-sharing group, folded into the producer of the input.
  auto fold_rows = [](Tensor& w, const Tensor& s) {  // w[i, :] /= s[i]
    const int64_t out = w.size(0), in = w.size(1);
    float* p = w.data<float>();
    for (int64_t i = 0; i < out; ++i)
      for (int64_t j = 0; j < in; ++j) p[i * in + j] /= s.data<float>()[i];
  };
  std::map<std::string, Tensor> scales;
  auto search = [&](const std::vector<std::string>& names) {
    std::vector<Tensor> ws;
    std::vector<const QuantFormat*> fs;
    for (const auto& n : names) ws.push_back(w0[n]), fs.push_back(&ctx.format_of(n, f_));
    AwqScaleResult r = awq_search_scales(x0[names[0]], ws, fs, Tensor(), o_);
    for (const auto& n : names) scales[n] = r.scales;
    return r.scales;
  };
  auto fold_norm = [](Var& norm, const Tensor& s) {
    Tensor g = norm.mutable_value();
    Tensor gc = g.to(Device::CPU).contiguous().clone();
    float* p = gc.data<float>();
    for (int64_t i = 0; i < gc.numel(); ++i) p[i] /= s.data<float>()[i];
    g.copy_(gc);
  };
  fold_norm(b.attn_norm, search(kSequentialGroups[0]));
  fold_norm(b.ffn_norm, search(kSequentialGroups[2]));
  Tensor up = w0["mlp.up_proj"].clone(), v = w0["self_attn.v_proj"].clone();
  fold_rows(up, search(kSequentialGroups[3]));
  const bool scale_o = c.n_heads == c.n_kv_heads;  // o's input channel i comes from v's row i only then
  if (scale_o) fold_rows(v, search(kSequentialGroups[1]));
  // 2. Clipping + RTN on the scaled weights, with the inputs the scaled model produces.
  std::map<std::string, Tensor> scaled_w;
  for (const auto& g : kSequentialGroups)
    for (const auto& n : g) {
      Tensor w = n == "mlp.up_proj" ? up : n == "self_attn.v_proj" ? v : w0[n];
      scaled_w[n] = scales.count(n) ? scale_weight_columns(w, scales[n]) : w;
    }
  for (const auto& g : kSequentialGroups)
    for (const auto& n : g) {
      // Input of n after folding: x / s (for the scaled groups), computed from the original x.
      Tensor xs = scales.count(n) ? divide_input_columns(x0[n], scales[n]) : x0[n];
      // up/v rows were divided by s of the next group: the consumer sees that, not this layer.
      const QuantFormat& f = ctx.format_of(n, f_);
      QuantizedTensor q = o_.weighted_round && f.is_ggml_block() && ggml_block_grid_supported(f)
                              ? rtn_quantize_weighted(scaled_w[n], f, activation_mean_square(xs))
                          : clip_ ? rtn_quantize_clipped(scaled_w[n], f, awq_search_clip(xs, scaled_w[n], f, o_))
                                  : rtn_quantize(scaled_w[n], f);
      install(ctx, n, report_sample(xs), std::move(q), reports, scaled_w[n]);
    }
}

}  // namespace lowbit
