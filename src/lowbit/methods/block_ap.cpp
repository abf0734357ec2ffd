#include "lowbit/methods/block_ap.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>

#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/optim.h"
#include "lowbit/methods/block_train.h"
#include "lowbit/quant/lsq_linear.h"
#include "lowbit/quant/matryoshka.h"
#include "lowbit/quant/quant_linear.h"

namespace lowbit {

BlockApMethod::BlockApMethod(const QuantFormat& f, BlockApOptions o) : f_(f), o_(o) {
  LB_CHECK(lsq_supports(f), "efficientqat: format ", f.name,
           " is not a uniform integer format; Block-AP trains step sizes and zero points of intB{gG,pc}[s]");
  LB_CHECK(o_.epochs >= 0, "efficientqat: Block-AP epochs must be >= 0, got ", o_.epochs);
  LB_CHECK(o_.batch >= 1, "efficientqat: Block-AP batch must be >= 1, got ", o_.batch);
  LB_CHECK(std::isfinite(o_.weight_lr) && std::isfinite(o_.quant_lr) && o_.weight_lr >= 0 && o_.quant_lr >= 0,
           "efficientqat: Block-AP learning rates must be finite and >= 0");
  if (!o_.widths.empty()) {
    LB_CHECK(o_.width_weights.size() == o_.widths.size(), "matquant: ", o_.width_weights.size(), " width weights for ",
             o_.widths.size(), " widths");
    for (size_t i = 0; i < o_.widths.size(); ++i) {
      matryoshka_slice_format(f, o_.widths[i], "matquant --widths");
      LB_CHECK(std::isfinite(o_.width_weights[i]) && o_.width_weights[i] >= 0, "matquant: width weight ",
               o_.width_weights[i], " must be finite and >= 0");
    }
  }
}

std::string BlockApMethod::options_key() const {
  return "epochs=" + std::to_string(o_.epochs) + ",batch=" + std::to_string(o_.batch) + ",lr=" + key_number(o_.weight_lr) +
         "/" + key_number(o_.quant_lr) + ",init=" + lsq_init_name(o_.init) + ",seed=" + std::to_string(o_.seed) +
         widths_key();
}

LsqParams BlockApMethod::initial_params(const Tensor& w, const QuantFormat& f) const {
  const double scale = quant_lr_scale();
  if (scale == 1.0) return lsq_init(w, f, o_.init);
  // MatQuant: the narrowest slice starts at its own round-to-nearest grid (s_r, z_r): s = s_r / 2^k,
  // z = z_r 2^k (exact: a power of two), so the range maps onto codes [0, 2^c - 2^k].
  int narrow = f.bits;
  for (int r : o_.widths) narrow = std::min(narrow, r);
  LsqParams p = lsq_init(w, matryoshka_slice_format(f, narrow, "matquant --widths"), o_.init);
  for (int64_t i = 0; i < p.step.numel(); ++i) {
    p.step.set_item(i, p.step.item(i) / scale);
    p.offset.set_item(i, p.offset.item(i) * scale);
  }
  return p;
}

double BlockApMethod::quant_lr_scale() const {
  if (o_.widths.empty()) return 1.0;
  int narrow = f_.bits;
  for (int r : o_.widths) narrow = std::min(narrow, r);
  return std::ldexp(1.0, f_.bits - narrow);
}

std::string BlockApMethod::widths_key() const {
  if (o_.widths.empty()) return "";
  std::string k = ",widths=";
  for (size_t i = 0; i < o_.widths.size(); ++i) {
    if (i) k += '/';
    k += std::to_string(o_.widths[i]);
    k += ':';
    k += key_number(o_.width_weights[i]);
  }
  return k;
}

void BlockApMethod::prepare(LlamaModel&, const Tensor& tokens, const std::string&, bool) {
  if (!o_.widths.empty()) tokens_ = tokens.clone();
}

Tensor BlockApMethod::sliced_block_forward(LlamaModel& model, int layer, const Tensor& x, int r, int64_t n,
                                           int64_t L) const {
  NoGradGuard ng;
  LlamaBlock& blk = model.block(layer);
  std::vector<std::pair<std::shared_ptr<Linear>*, std::shared_ptr<Linear>>> saved;
  for (auto& [name, slot] : blk.linears()) {
    auto* ql = dynamic_cast<const QuantLinear*>(slot->get());
    LB_CHECK(ql, "matquant: layer ", layer, " ", name, " is not quantized");
    saved.emplace_back(slot, *slot);
    *slot = std::make_shared<QuantLinear>(matryoshka_slice(ql->quantized(), r), ql->bias(), ql->device());
  }
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  try {
    constexpr int64_t kWindows = 8;
    for (int64_t b = 0; b < n; b += kWindows) {
      const int64_t e = std::min(n, b + kWindows);
      const Var out = model.block_forward(layer, Var(x.slice(0, b * L, e * L).contiguous()), e - b, L);
      y.slice(0, b * L, e * L).copy_(out.value());
    }
  } catch (...) {
    for (auto& [slot, orig] : saved) *slot = orig;
    throw;
  }
  for (auto& [slot, orig] : saved) *slot = orig;
  return y;
}

void BlockApMethod::sync_paths(BlockContext& ctx) {
  if (o_.widths.empty() || paths_layer_ == ctx.layer) return;
  LB_CHECK(tokens_.defined(), "matquant: the calibration tokens were not given to prepare()");
  // Fresh (block 0, or a resume at block l): the embeddings through the finished blocks, sliced.
  paths_.clear();
  for (int r : o_.widths) {
    if (r >= f_.bits) continue;
    Tensor x;
    {
      NoGradGuard ng;
      x = ctx.model.embed(tokens_).value().contiguous();
    }
    for (int j = 0; j < ctx.layer; ++j) x = sliced_block_forward(ctx.model, j, x, r, ctx.n_samples, ctx.seqlen);
    paths_[r] = x;
  }
  paths_layer_ = ctx.layer;
}

void BlockApMethod::quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) {
  sync_paths(ctx);
  // Training runs on the device of the block's inputs (the model's device): the LSQ layers, the
  // block's forward and backward, the MSE and AdamW all have CUDA bodies.
  const Device dev = ctx.inputs.device();
  LlamaBlock& blk = ctx.model.block(ctx.layer);
  const int64_t N = ctx.n_samples, L = ctx.seqlen;
  const WindowShards shards(comm_, N);  // data parallel: this rank's windows among all ranks'
  struct Entry {
    std::string name;
    std::shared_ptr<Linear>* slot;
    std::shared_ptr<Linear> original;
    std::shared_ptr<LsqTrainLinear> t;
    Tensor w;  // the original F32 weight, on the CPU (the quantizer's initialisation and the report)
  };
  std::vector<Entry> es;
  std::vector<Var> weights, quant, offsets;  // offsets: MatQuant's zero points (their own learning rate)
  for (auto& [name, slot] : blk.linears()) {
    Entry e;
    e.name = name;
    e.slot = slot;
    e.original = *slot;
    const Tensor wd = (*slot)->effective_weight().to(DType::F32).contiguous();
    e.w = wd.to(Device::CPU);
    QatLinearOptions lo;
    lo.grad_scale = 1.0;  // EfficientQAT: plain STE gradients for s and z
    const QuantFormat& f = ctx.format_of(name, f_);
    LB_CHECK(lsq_supports(f), "efficientqat: layer ", name, " of block ", ctx.layer, " is planned as ", f.name,
             ", not a uniform integer format; Block-AP trains step sizes and zero points of intB{gG,pc}[s]");
    e.t = std::make_shared<LsqTrainLinear>(wd, (*slot)->bias(), f, initial_params(e.w, f), lo);
    for (auto& p : e.t->weight_parameters()) weights.push_back(p);
    const std::vector<Var> qp = e.t->quant_parameters();  // step, then the offset (asymmetric formats)
    for (size_t i = 0; i < qp.size(); ++i) (o_.widths.empty() || i == 0 ? quant : offsets).push_back(qp[i]);
    es.push_back(std::move(e));
  }
  for (auto& e : es) *e.slot = e.t;
  try {
    // MatQuant: the steps and zero points of the int8 codes move, per AdamW step, as far in the
    // narrowest width's units as Block-AP's would at that width (quant_lr_scale).
    const double qs = quant_lr_scale();
    std::vector<ParamGroup> groups{ParamGroup{weights, AdamWOptions{o_.weight_lr, 0.9, 0.999, 1e-8, 0.0}},
                                   ParamGroup{quant, AdamWOptions{o_.quant_lr / qs, 0.9, 0.999, 1e-8, 0.0}}};
    if (!offsets.empty()) groups.push_back(ParamGroup{offsets, AdamWOptions{o_.quant_lr * qs, 0.9, 0.999, 1e-8, 0.0}});
    AdamW opt(groups);
    std::vector<Var> all = weights;
    all.insert(all.end(), quant.begin(), quant.end());
    all.insert(all.end(), offsets.begin(), offsets.end());
    const int64_t n = shards.total();
    // The mean MSE of windows idx[b..e) of this rank's; MatQuant: Σ_r λ_r MSE_r of the r-bit slices.
    const size_t nw = o_.widths.size();
    std::vector<double> width_sum(nw, 0.0);
    double step_windows = 1;  // the global step's window count: a rank's share weighs k / step_windows
    auto loss_of = [&](const std::vector<int64_t>& idx, size_t b, size_t e) {
      const Var x(gather_windows(ctx.inputs, idx, b, e, L));
      const Var target(gather_windows(ctx.fp_targets, idx, b, e, L));
      if (nw == 0) return mse(ctx.model.block_forward(ctx.layer, x, int64_t(e - b), L), target);
      Var total;
      for (size_t w = 0; w < nw; ++w) {
        for (auto& en : es) en.t->set_slice(o_.widths[w]);
        const auto path = paths_.find(o_.widths[w]);
        const Var xw = path == paths_.end() ? x : Var(gather_windows(path->second, idx, b, e, L));
        const Var lw = mse(ctx.model.block_forward(ctx.layer, xw, int64_t(e - b), L), target);
        width_sum[w] += lw.value().item() * double(e - b) / step_windows;
        const Var term = scale(lw, o_.width_weights[w]);
        total = total.defined() ? add(total, term) : term;
      }
      for (auto& en : es) en.t->set_slice(0);
      return total;
    };
    for (int ep = 0; ep < o_.epochs; ++ep) {
      const auto perm = shuffled_indices(n, splitmix64(splitmix64(o_.seed ^ splitmix64(uint64_t(ctx.layer))) ^ uint64_t(ep)));
      double sum = 0;
      std::fill(width_sum.begin(), width_sum.end(), 0.0);
      int64_t steps = 0;
      for (size_t b = 0; b < size_t(n); b += size_t(o_.batch)) {
        const size_t e = std::min(size_t(n), b + size_t(o_.batch));
        step_windows = double(e - b);
        ++steps;
        // Data parallel: the part of the step's mean loss that this rank's windows make, the
        // gradients summed over the ranks (block_train.h; one rank: the step's loss).
        if (Var loss = shards.step_loss(perm, b, e, loss_of); loss.defined()) {
          sum += loss.value().item();
          backward(loss);
        }
        if (shards.distributed()) all_reduce_grads(all, *shards.comm());
        opt.step();
        opt.zero_grad();
      }
      const double mean = shards.sum(sum) / double(std::max<int64_t>(steps, 1));
      if (!std::isfinite(mean))
        throw_error("efficientqat: Block-AP loss of layer ", ctx.layer, " is ", mean, " in epoch ", ep,
                    "; lower the Block-AP learning rates");
      BlockApLog lg{ctx.layer, ep, mean, {}};
      for (double ws : width_sum) lg.width_loss.push_back(shards.sum(ws) / double(std::max<int64_t>(steps, 1)));
      log_.push_back(lg);
      if (o_.verbose) std::fprintf(stderr, "[%s] layer %d epoch %d  loss %.6e\n", name().c_str(), ctx.layer, ep, mean);
    }
  } catch (...) {
    for (auto& e : es) *e.slot = e.original;
    throw;
  }
  for (auto& e : es) {
    QuantizedTensor q = e.t->encode();
    LinearReport r;
    r.name = "model.layers." + std::to_string(ctx.layer) + "." + e.name;
    r.params = q.out_features() * q.in_features();
    r.bits_per_weight = q.fmt().bits_per_weight(q.out_features(), q.in_features());
    const Tensor bias = e.t->bias();
    *e.slot = std::make_shared<QuantLinear>(std::move(q), bias.defined() ? bias.to(Device::CPU) : bias, dev);
    reports.push_back(r);
  }
  // MatQuant: the narrow widths' paths through the finished block.
  for (auto& [r, x] : paths_) x = sliced_block_forward(ctx.model, ctx.layer, x, r, ctx.n_samples, ctx.seqlen);
  if (!paths_.empty()) paths_layer_ = ctx.layer + 1;
  // Output errors of the encoded layers (against the block's original FP weights) on a subsample of
  // the inputs the quantized block produces.
  std::map<std::string, std::vector<Tensor>> rows;
  std::map<std::string, int64_t> seen;
  const int64_t step = std::max<int64_t>(1, (N * L + kReportRows - 1) / kReportRows);
  ctx.run_block(ctx.inputs, [&](const std::string& name, const Tensor& x) {
    int64_t& off = seen[name];
    for (int64_t i = 0; i < x.size(0); ++i)
      if ((off + i) % step == 0) rows[name].push_back(x.slice(0, i, i + 1).to(Device::CPU).to(DType::F32).contiguous().clone());
    off += x.size(0);
  });
  for (size_t i = 0; i < es.size(); ++i) {
    const auto& rs = rows[es[i].name];
    if (rs.empty()) continue;
    Tensor x = Tensor::empty({int64_t(rs.size()), rs.front().size(1)}, DType::F32);
    for (size_t k = 0; k < rs.size(); ++k) x.slice(0, int64_t(k), int64_t(k) + 1).copy_(rs[k]);
    reports[reports.size() - es.size() + i].rel_error =
        relative_output_error(x, es[i].w, (*es[i].slot)->effective_weight().to(Device::CPU));
  }
}

}  // namespace lowbit
