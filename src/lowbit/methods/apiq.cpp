#include "lowbit/methods/apiq.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <algorithm>
#include <map>
#include <optional>
#include <random>

#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/optim.h"
#include "lowbit/methods/block_train.h"
#include "lowbit/methods/layer_error.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/ops/ops.h"
#include "lowbit/quant/lwc.h"
#include "lowbit/quant/quant_linear.h"

namespace lowbit {

namespace {

// The block's linears in the order their inputs are produced (as GPTQ's true-sequential).
const std::vector<std::vector<std::string>> kSequentialGroups = {
    {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"},
    {"self_attn.o_proj"},
    {"mlp.gate_proj", "mlp.up_proj"},
    {"mlp.down_proj"}};

std::string full_name(int layer, const std::string& name) { return "model.layers." + std::to_string(layer) + "." + name; }

std::shared_ptr<Linear>* slot_of(LlamaBlock& b, const std::string& name) {
  for (auto& [n, s] : b.linears())
    if (n == name) return s;
  throw_error("apiq: the block has no linear named ", name);
}

uint64_t derive_seed(uint64_t seed, uint64_t a, uint64_t b, uint64_t c) {
  const auto mix = splitmix64;
  return mix(mix(mix(seed ^ mix(a)) ^ b) ^ c);
}

// Concatenated inputs of each linear during one pass over a block, on the CPU. With step > 1 only
// the rows whose index (counted over the whole pass) is a multiple of step are kept: the strided
// subsample report_sample() takes, without holding every input of every linear in host memory.
// Only the kept rows leave x's device.
struct InputCapture {
  int64_t step = 1;
  Device keep = Device::CPU;  // where subsampled rows (step > 1) are kept: the host, or x's device
  DType dtype = DType::F32;   // dtype of the rows kept in full (step 1): f32, or bf16 for a bf16 cache
  std::map<std::string, std::vector<Tensor>> chunks;
  std::map<std::string, int64_t> seen;  // rows passed so far, per linear
  LinearInputHook hook() {
    return [this](const std::string& name, const Tensor& x) {
      int64_t& off = seen[name];
      const int64_t n = x.size(0), first = (step - off % step) % step;
      if (step == 1) {
        // to() and contiguous() return their input when there is nothing to do: clone only when no
        // copy was made (x's storage belongs to the caller).
        // bf16: converted where x is (on the GPU before the copy: half the bytes to move).
        Tensor h = (dtype == DType::F32 ? x : cast_to(x.contiguous(), dtype)).to(Device::CPU).to(dtype).contiguous();
        if (h.storage() == x.storage()) h = h.clone();
        chunks[name].push_back(h);
      } else if (first < n) {
        // Rows first, first + step, ... gathered into a compact [k, C] tensor on x's device (one
        // row copy each, asynchronous on the GPU), then copied to the host at once.
        const int64_t k = (n - first + step - 1) / step;
        Tensor sub = Tensor::empty({k, x.size(1)}, x.dtype(), x.device());
        for (int64_t i = 0; i < k; ++i) sub.slice(0, i, i + 1).copy_(x.slice(0, first + i * step, first + i * step + 1));
        chunks[name].push_back(keep == Device::CPU ? sub.to(Device::CPU).to(DType::F32) : sub);
      }
      off += n;
    };
  }
  Tensor rows(const std::string& name) const {
    auto it = chunks.find(name);
    if (it == chunks.end()) throw_error("apiq: no inputs captured for ", name);
    int64_t n = 0;
    for (const auto& c : it->second) n += c.size(0);
    const Tensor& first = it->second.front();
    Tensor out = Tensor::empty({n, first.size(1)}, first.dtype(), first.device());
    int64_t r = 0;
    for (const auto& c : it->second) {
      out.slice(0, r, r + c.size(0)).copy_(c);
      r += c.size(0);
    }
    return out;
  }
};

int64_t report_step(int64_t rows) { return rows <= kReportRows ? 1 : (rows + kReportRows - 1) / kReportRows; }

// Replaces the layer in `slot` by its encoded version (placed on `dev`); returns its report, without
// the output error.
LinearReport install(std::shared_ptr<Linear>* slot, const FinalizedLinear& fin, const Tensor& bias,
                     const std::string& name, Device dev) {
  *slot = std::make_shared<QuantLinear>(fin.q, bias, dev, fin.lora_A, fin.lora_B);
  LinearReport r;
  r.name = name;
  r.params = fin.q.out_features() * fin.q.in_features();
  const double adapter_bits = fin.lora_A.defined() ? 16.0 * double(fin.lora_A.numel() + fin.lora_B.numel()) : 0.0;
  r.bits_per_weight = fin.q.fmt().bits_per_weight(fin.q.out_features(), fin.q.in_features()) + adapter_bits / double(r.params);
  return r;
}

// Seconds since `t0`, after the device's queued work has finished.
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0, Device dev) {
  if (dev == Device::CUDA) cuda_synchronize();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

enum class Stage { Weight, Mixed, Output };

}  // namespace

const QuantFormat& ApiqMethod::layer_format(const BlockContext& ctx, const std::string& name) const {
  const QuantFormat& f = ctx.format_of(name, f_);
  LB_CHECK(lwc_supports(f), "apiq: layer ", name, " of block ", ctx.layer, " is planned as ", f.name,
           ", which has no learnable clipping; ApiQ needs a uniform integer format (int2g64, int3g128, int4g128s, ...) "
           "or one of the ggml types ", lwc_ggml_names());
  return f;
}

ApiqMethod::ApiqMethod(const QuantFormat& f, ApiqOptions o) : f_(f), o_(std::move(o)) {
  LB_CHECK(lwc_supports(f), "apiq: format ", f.name,
           " has no learnable clipping; ApiQ needs a uniform integer format (int2g64, int3g128, int4g128s, ...) or one "
           "of the ggml types ", lwc_ggml_names());
  LB_CHECK(o_.epochs >= 0, "apiq: epochs must be >= 0, got ", o_.epochs);
  LB_CHECK(o_.batch >= 1, "apiq: batch (--apiq-batch) must be >= 1, got ", o_.batch);
  LB_CHECK(o_.lora_lr >= 0 && o_.clip_lr >= 0 && o_.lora_wd >= 0 && o_.clip_wd >= 0,
           "apiq: learning rates and weight decays must be >= 0");
  LB_CHECK(o_.aug_coef >= 0, "apiq: the second loss term's coefficient must be >= 0, got ", o_.aug_coef);
  LB_CHECK(o_.weight_epochs >= 0 && o_.output_epochs >= 0 && o_.weight_epochs + o_.output_epochs <= o_.epochs,
           "sapr: weight-preservation (", o_.weight_epochs, ") plus output-preservation (", o_.output_epochs,
           ") epochs exceed the ", o_.epochs, " epochs");
  LB_CHECK(!o_.saliency || o_.lambda >= 0, "sapr: lambda must be >= 0, got ", o_.lambda);
  LB_CHECK(o_.saliency || (o_.weight_epochs == 0 && o_.output_epochs == 0),
           "apiq: weight/output-preservation stages need a saliency map (SAPR)");
}

std::string ApiqMethod::options_key() const {
  std::string k = "rank=" + std::to_string(o_.layer.rank) + ",alpha=" + key_number(o_.layer.lora_alpha) +
                  ",init=" + std::to_string(int(o_.layer.init)) + ",clip_init=" + key_number(o_.layer.clip_init) +
                  (o_.layer.clip_init_rtn && lwc_is_ggml(f_) ? ",clip_init_rtn,keep_start" : "") +
                  ",epochs=" + std::to_string(o_.epochs) + ",batch=" + std::to_string(o_.batch) +
                  ",lr=" + key_number(o_.lora_lr) + "/" + key_number(o_.clip_lr) +
                  ",wd=" + key_number(o_.lora_wd) + "/" + key_number(o_.clip_wd) +
                  ",aug=" + key_number(o_.aug_coef) + ",seed=" + std::to_string(o_.seed) +
                  ",bf16=" + std::to_string(o_.bf16);
  if (o_.saliency)
    k += ",saliency=" + std::string(saliency_kind_name(o_.saliency->kind)) + "/" + std::to_string(o_.saliency->nsamples) +
         "x" + std::to_string(o_.saliency->seqlen) + ",norm=" + saliency_norm_name(o_.saliency->norm) +
         ",reduction=" + sapr_reduction_name(o_.reduction) + ",lambda=" + key_number(o_.lambda) +
         ",reg_lora=" + std::to_string(o_.reg_with_lora) + ",stages=" + std::to_string(o_.weight_epochs) + "/" +
         std::to_string(o_.output_epochs) + ",anneal=" + std::to_string(o_.anneal_lambda) +
         ",layer_weighted=" + std::to_string(o_.layer_weighted);
  return k;
}

std::string ApiqMethod::name() const {
  return std::string(o_.saliency ? "sapr" : "apiq") + (o_.mode == ApiqMode::Layer ? "-layer" : "");
}

void ApiqMethod::quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) {
  // Training runs on the device of the block's inputs (the model's device): weights, clipping
  // logits, adapters, AdamW state and the calibration windows all stay there.
  if (o_.mode == ApiqMode::Layer) quantize_block_layerwise(ctx, reports);
  else quantize_block_blockwise(ctx, reports);
}

namespace {

// One calibration run: `epochs` passes over the windows in a shuffled order, AdamW on two groups.
// data_of(idx, b, e) builds the mean output loss of windows idx[b..e) (this rank's own windows);
// reg_of(lambda) SAPR's lambda * R. Data parallel (shards.distributed()): the shuffle and the
// batches are over all ranks' windows, each rank's data loss is weighted by its share of the step's
// windows, the regularizer is added by rank 0 alone, and the gradients are summed over the ranks
// before AdamW, so every rank takes the one-process step; the epoch's loss sums are all-reduced.
struct Trainer {
  const ApiqOptions& o;
  int layer;
  std::string scope;
  uint64_t scope_id;
  std::vector<ApiqEpochLog>* log;
  const WindowShards& shards;

  // The step's loss and regularizer are summed on the parameters' device and read back once per
  // epoch (the log and the finiteness check), so a GPU step has no host round trip.
  void run(const std::vector<Var>& clip, const std::vector<Var>& lora,
           const std::function<Var(const std::vector<int64_t>&, size_t, size_t)>& data_of,
           const std::function<Var(double)>& reg_of) {
    // One AdamW per group. A group without gradients in a step (SAPR: the LoRA factors during weight
    // preservation with Ŵ = Q(W)) is not stepped and keeps its bias-correction count, like PyTorch's
    // per-parameter step in the reference; with gradients in every step this is one two-group AdamW.
    AdamW clip_opt(std::vector<ParamGroup>{{clip, AdamWOptions{o.clip_lr, 0.9, 0.999, 1e-8, o.clip_wd}}});
    std::optional<AdamW> lora_opt;
    if (!lora.empty())
      lora_opt.emplace(std::vector<ParamGroup>{{lora, AdamWOptions{o.lora_lr, 0.9, 0.999, 1e-8, o.lora_wd}}});
    std::vector<Var> all = clip;
    all.insert(all.end(), lora.begin(), lora.end());
    const int64_t n = shards.total();
    for (int ep = 0; ep < o.epochs; ++ep) {
      const Stage stage = !o.saliency ? Stage::Output
                          : ep < o.weight_epochs ? Stage::Weight
                          : ep >= o.epochs - o.output_epochs ? Stage::Output
                                                             : Stage::Mixed;
      // This epoch's regularizer weight (anneal_lambda: linear decay over the mixed epochs).
      double lambda = o.lambda;
      if (o.anneal_lambda && stage == Stage::Mixed) {
        const int n_mixed = o.epochs - o.weight_epochs - o.output_epochs;
        lambda = o.lambda * double(n_mixed - (ep - o.weight_epochs)) / double(n_mixed);
      }
      const auto t0 = std::chrono::steady_clock::now();
      const auto perm = shuffled_indices(n, derive_seed(o.seed, uint64_t(layer), scope_id, uint64_t(ep)));
      Tensor loss_sum, reg_sum;  // 0-d, on the loss's device
      auto accumulate = [](Tensor& acc, const Tensor& v) {
        if (!acc.defined()) acc = Tensor::zeros({}, v.dtype(), v.device());
        ops::axpy(1.0, v.contiguous(), acc);
      };
      int64_t steps = 0;
      for (size_t b = 0; b < size_t(n); b += size_t(o.batch)) {
        const size_t e = std::min(size_t(n), b + size_t(o.batch));
        AutocastBf16Guard autocast(o.bf16);
        Var loss, reg;
        if (stage != Stage::Weight) loss = shards.step_loss(perm, b, e, data_of);
        if (o.saliency && stage != Stage::Output && shards.is_root()) {
          reg = reg_of(lambda);
          loss = loss.defined() ? add(loss, reg) : reg;
        }
        if (loss.defined()) accumulate(loss_sum, loss.value());
        if (reg.defined()) accumulate(reg_sum, reg.value());
        ++steps;
        if (loss.defined()) backward(loss);
        if (shards.distributed()) all_reduce_grads(all, *shards.comm());
        // Both groups' tensors in one fused update (one GPU launch for a block's 28 tensors).
        std::vector<AdamW*> opts{&clip_opt};
        if (lora_opt && std::any_of(lora.begin(), lora.end(), [](const Var& p) { return p.grad().defined(); }))
          opts.push_back(&*lora_opt);
        AdamW::step_all(opts);
        clip_opt.zero_grad();
        if (lora_opt) lora_opt->zero_grad();
      }
      const double sum = shards.sum(loss_sum.defined() ? loss_sum.item() : 0.0);
      const double sum_reg = shards.sum(reg_sum.defined() ? reg_sum.item() : 0.0);
      // A non-finite step loss makes the epoch's sum non-finite (the parameters are then NaN too).
      if (!std::isfinite(sum))
        throw_error("apiq: layer ", layer, " (", scope, "): loss is ", sum, " in epoch ", ep,
                    "; lower --lora-lr / --clip-lr");
      ApiqEpochLog l{layer, scope, ep, sum / double(std::max<int64_t>(steps, 1)),
                     sum_reg / double(std::max<int64_t>(steps, 1)),
                     std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()};
      if (o.verbose)
        std::fprintf(stderr, "[%s] layer %d %-18s epoch %2d  loss %.6e  reg %.3e  %.4f s (%s)\n", o.saliency ? "sapr" : "apiq",
                     layer, scope.c_str(), ep, l.loss, l.reg, l.seconds,
                     stage == Stage::Weight ? "weight" : stage == Stage::Mixed ? "mixed" : "output");
      log->push_back(l);
    }
  }
};

// The values of `ps` (copies), and putting them back: the starting point kept for the ggml grids.
std::vector<Tensor> snapshot(const std::vector<Var>& ps) {
  std::vector<Tensor> s;
  for (const auto& p : ps) s.push_back(p.value().clone());
  return s;
}
void restore(std::vector<Var> ps, const std::vector<Tensor>& s) {
  for (size_t i = 0; i < ps.size(); ++i) ps[i].mutable_value().copy_(s[i]);
}

// ggml block types start from the reference quantizer's grid (QuantTrainOptions::clip_init_rtn);
// there the trained clipping is kept only if its calibration loss is below the start's.
bool keeps_start(const ApiqOptions& o, const QuantFormat& f) { return o.layer.clip_init_rtn && lwc_is_ggml(f); }

std::vector<int64_t> identity_order(int64_t n) {
  std::vector<int64_t> idx(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) idx[size_t(i)] = i;
  return idx;
}

// Sum over all windows, in order and batches of `batch`, of the mean loss of each batch times its
// window count, without gradients: the ggml grids' keep-the-start rule compares this at the start
// and after training. loss(idx, b, e) returns the mean loss of windows idx[b..e). Data parallel:
// each rank sums over its own windows and the sums are all-reduced, so every rank keeps or drops
// the trained parameters alike.
template <class LossFn>
double loss_over_all_windows(const WindowShards& shards, int64_t batch, LossFn loss) {
  NoGradGuard ng;
  const int64_t N = shards.local_count();
  const std::vector<int64_t> idx = identity_order(N);
  double sum = 0;
  for (int64_t b = 0; b < N; b += batch) {
    const int64_t e = std::min(N, b + batch);
    sum += loss(idx, size_t(b), size_t(e)).value().item() * double(e - b);
  }
  return shards.sum(sum);
}

}  // namespace

void ApiqMethod::quantize_block_layerwise(BlockContext& ctx, std::vector<LinearReport>& reports) {
  LlamaBlock& blk = ctx.model.block(ctx.layer);
  const int64_t L = ctx.seqlen;
  const WindowShards shards(comm_, ctx.n_samples);  // this rank's windows among all ranks'
  const Device dev = ctx.inputs.device();
  const DType cache = ctx.inputs.dtype() == DType::BF16 ? DType::BF16 : DType::F32;
  ApiqBlockTimes times;
  times.layer = ctx.layer;
  uint64_t linear_id = 0;
  for (const auto& group : kSequentialGroups) {
    auto t0 = Clock::now();
    InputCapture cap;
    cap.dtype = cache;  // a bf16 cache keeps the captured inputs and the targets in bf16 too
    ctx.run_block(ctx.inputs, cap.hook(), false);  // inputs as produced by the groups calibrated so far
    times.capture += seconds_since(t0, dev);
    for (const auto& name : group) {
      ++linear_id;
      t0 = Clock::now();
      auto* slot = slot_of(blk, name);
      const Tensor w = (*slot)->effective_weight().to(Device::CPU).to(DType::F32).contiguous().clone();
      const Tensor bias = (*slot)->bias();
      const Tensor x = cap.rows(name);
      // Training data on the model's device; the target X W^T (the bias cancels in the difference).
      Tensor xd = x, wd = w, y;
      if (cache == DType::BF16) {
        // bf16 cache: the targets in bf16, each chunk of windows computed in f32 as below.
        xd = x.to(dev);
        wd = w.to(dev);
        y = Tensor::empty({x.size(0), w.size(0)}, DType::BF16, dev);
        NoGradGuard ng;
        const int64_t rows = std::max<int64_t>(1, ctx.batch) * L;
        for (int64_t r0 = 0; r0 < x.size(0); r0 += rows) {
          const int64_t r1 = std::min(x.size(0), r0 + rows);
          const Tensor xc = cast_to(xd.slice(0, r0, r1), DType::F32);
          const Tensor yc = dev == Device::CPU ? linear_forward(xc, w) : linear(Var(xc), Var(wd)).value();
          Tensor dst = y.slice(0, r0, r1);
          ops::cast(yc.contiguous(), dst);
        }
      } else if (dev == Device::CPU) {
        y = linear_forward(x, w);
      } else {
        xd = x.to(dev);
        wd = w.to(dev);
        NoGradGuard ng;
        y = linear(Var(xd), Var(wd)).value();
      }
      times.capture += seconds_since(t0, dev);
      t0 = Clock::now();
      QuantTrainOptions lo = o_.layer;
      lo.seed = derive_seed(o_.seed, uint64_t(ctx.layer), linear_id, 0xA11CE);
      QuantTrainLinear t(wd, Tensor(), layer_format(ctx, name), lo);
      const Tensor sal = o_.saliency ? o_.saliency->at(full_name(ctx.layer, name)).to(dev) : Tensor();
      const double layer_w = o_.saliency && o_.layer_weighted ? o_.saliency->layer_weight(full_name(ctx.layer, name)) : 1.0;
      // The output loss over all windows (no gradient), for the ggml grids' keep-the-start rule.
      auto full_loss = [&] {
        return loss_over_all_windows(shards, o_.batch, [&](const std::vector<int64_t>& idx, size_t b, size_t e) {
          return mse(t.forward(Var(gather_windows(xd, idx, b, e, L))), Var(gather_windows(y, idx, b, e, L)));
        });
      };
      const bool keep = keeps_start(o_, layer_format(ctx, name)) && o_.epochs > 0;
      const std::vector<Tensor> start = keep ? snapshot(t.parameters()) : std::vector<Tensor>();
      const double start_loss = keep ? full_loss() : 0.0;
      Trainer tr{o_, ctx.layer, name, linear_id, &log_, shards};
      tr.run(
          t.clip_parameters(), t.lora_parameters(),
          [&](const std::vector<int64_t>& idx, size_t b, size_t e) {
            return mse(t.forward(Var(gather_windows(xd, idx, b, e, L))), Var(gather_windows(y, idx, b, e, L)));
          },
          [&](double lambda) {
            return scale(saliency_regularizer(t.quantized_weight(o_.reg_with_lora), wd, sal, o_.reduction), lambda * layer_w);
          });
      if (keep) {
        const double trained_loss = full_loss();
        if (!(trained_loss < start_loss)) restore(t.parameters(), start);
        if (o_.verbose)
          std::fprintf(stderr, "[%s] layer %d %-18s calibration loss: start %.6e trained %.6e -> %s\n",
                       this->name().c_str(), ctx.layer, name.c_str(), start_loss, trained_loss, trained_loss < start_loss ? "trained" : "start");
      }
      times.train += seconds_since(t0, dev);
      t0 = Clock::now();
      const FinalizedLinear fin = t.finalize();
      times.finalize += seconds_since(t0, dev);
      t0 = Clock::now();
      LinearReport r = install(slot, fin, bias, full_name(ctx.layer, name), dev);
      times.install += seconds_since(t0, dev);
      t0 = Clock::now();
      r.rel_error = relative_output_error(report_sample(x), w, (*slot)->effective_weight());
      reports.push_back(r);
      times.report += seconds_since(t0, dev);
    }
  }
  finish_block(times);
}

void ApiqMethod::finish_block(const ApiqBlockTimes& t) {
  times_ = t;
  if (!o_.verbose) return;
  std::fprintf(stderr, "[%s] layer %d times: train %.2f s, finalize %.2f s, install %.2f s, report %.2f s",
               name().c_str(), t.layer, t.train, t.finalize, t.install, t.report);
  if (o_.mode == ApiqMode::Layer) std::fprintf(stderr, ", capture %.2f s", t.capture);
  std::fprintf(stderr, "\n");
}

void ApiqMethod::quantize_block_blockwise(BlockContext& ctx, std::vector<LinearReport>& reports) {
  LlamaBlock& blk = ctx.model.block(ctx.layer);
  const int64_t N = ctx.n_samples, L = ctx.seqlen;
  const WindowShards shards(comm_, N);  // this rank's windows among all ranks'
  const Device dev = ctx.inputs.device();
  ApiqBlockTimes times;
  times.layer = ctx.layer;
  auto t0 = Clock::now();
  // Second target: the FP block on the quantized-path inputs (before any layer changes).
  const Tensor y_aug = o_.aug_coef > 0 ? ctx.run_block(ctx.inputs) : Tensor();
  struct Entry {
    std::string name;
    std::shared_ptr<Linear>* slot;
    Tensor w, bias;  // on the model's device
    std::shared_ptr<QuantTrainLinear> t;
    Tensor sal;      // SAPR saliency, moved to the device once
    double layer_w = 1.0;  // SAPR layer_weighted: the layer's lambda factor
  };
  std::vector<Entry> es;
  std::vector<Var> clip, lora;
  uint64_t linear_id = 0;
  for (const auto& group : kSequentialGroups)
    for (const auto& name : group) {
      ++linear_id;
      Entry e;
      e.name = name;
      e.slot = slot_of(blk, name);
      e.bias = (*e.slot)->bias();
      QuantTrainOptions lo = o_.layer;
      lo.seed = derive_seed(o_.seed, uint64_t(ctx.layer), linear_id, 0xA11CE);
      // The replaced layer's weight is frozen while it trains (the original layers are kept only to
      // put back on an error): shared, not copied, when it is already a contiguous f32 tensor.
      lo.share_weight = true;
      e.t = std::make_shared<QuantTrainLinear>((*e.slot)->effective_weight(), e.bias, layer_format(ctx, name), lo);
      e.w = e.t->frozen_weight();  // the layer's f32 weight (no second copy on the device)
      if (o_.saliency) e.sal = o_.saliency->at(full_name(ctx.layer, name)).to(dev);
      if (o_.saliency && o_.layer_weighted) e.layer_w = o_.saliency->layer_weight(full_name(ctx.layer, name));
      for (auto& p : e.t->clip_parameters()) clip.push_back(p);
      for (auto& p : e.t->lora_parameters()) lora.push_back(p);
      es.push_back(std::move(e));
    }
  std::vector<std::shared_ptr<Linear>> originals;
  for (auto& e : es) {
    originals.push_back(*e.slot);
    *e.slot = e.t;
  }
  // ggml grids: the block's output loss over all windows at the start (the reference quantizer's
  // grid) and after training; the better is kept.
  bool keep = o_.epochs > 0;
  for (auto& e : es) keep = keep && keeps_start(o_, e.t->format());
  // The block's output loss on windows idx[b..e) (the training loss, and the keep-the-start rule's).
  auto data_loss = [&](const std::vector<int64_t>& idx, size_t b, size_t e) {
    Var out = ctx.model.block_forward(ctx.layer, Var(gather_windows(ctx.inputs, idx, b, e, L)), int64_t(e - b), L);
    Var loss = mse(out, Var(gather_windows(ctx.fp_targets, idx, b, e, L)));
    if (y_aug.defined()) loss = add(loss, scale(mse(out, Var(gather_windows(y_aug, idx, b, e, L))), o_.aug_coef));
    return loss;
  };
  auto full_loss = [&] { return loss_over_all_windows(shards, o_.batch, data_loss); };
  std::vector<Var> all = clip;
  all.insert(all.end(), lora.begin(), lora.end());
  std::vector<Tensor> start;
  double start_loss = 0;
  try {
    if (keep) start = snapshot(all), start_loss = full_loss();
    Trainer tr{o_, ctx.layer, "block", 0, &log_, shards};
    tr.run(clip, lora, data_loss, [&](double lambda) {
      Var reg;
      for (auto& en : es) {
        Var r = saliency_regularizer(en.t->quantized_weight(o_.reg_with_lora), en.w, en.sal, o_.reduction);
        if (en.layer_w != 1.0) r = scale(r, en.layer_w);
        reg = reg.defined() ? add(reg, r) : r;
      }
      return scale(reg, lambda);
    });
    if (keep) {
      const double trained_loss = full_loss();
      if (!(trained_loss < start_loss)) restore(all, start);
      if (o_.verbose)
        std::fprintf(stderr, "[%s] layer %d block calibration loss: start %.6e trained %.6e -> %s\n", name().c_str(),
                     ctx.layer, start_loss, trained_loss, trained_loss < start_loss ? "trained" : "start");
    }
  } catch (...) {
    for (size_t i = 0; i < es.size(); ++i) *es[i].slot = originals[i];
    throw;
  }
  times.train = seconds_since(t0, dev);
  for (auto& e : es) {
    t0 = Clock::now();
    const FinalizedLinear fin = e.t->finalize();
    times.finalize += seconds_since(t0, dev);
    t0 = Clock::now();
    reports.push_back(install(e.slot, fin, e.bias, full_name(ctx.layer, e.name), dev));
    times.install += seconds_since(t0, dev);
  }
  // Output errors of the encoded layers on the inputs the quantized block produces (only the
  // report's row subsample is kept, on the model's device: the errors are computed there).
  t0 = Clock::now();
  InputCapture cap;
  cap.step = report_step(N * L);
  cap.keep = dev;
  ctx.run_block(ctx.inputs, cap.hook(), false);  // only the captured rows are needed, not the outputs
  for (size_t i = 0; i < es.size(); ++i) {
    LinearReport& r = reports[reports.size() - es.size() + i];
    r.rel_error = relative_output_error(report_sample(cap.rows(es[i].name)), es[i].w, (*es[i].slot)->effective_weight());
  }
  times.report = seconds_since(t0, dev);
  finish_block(times);
}

}  // namespace lowbit
