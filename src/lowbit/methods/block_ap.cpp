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
#include "lowbit/quant/quant_linear.h"

namespace lowbit {

BlockApMethod::BlockApMethod(const QuantFormat& f, BlockApOptions o) : f_(f), o_(o) {
  LB_CHECK(lsq_supports(f), "efficientqat: format ", f.name,
           " is not a uniform integer format; Block-AP trains step sizes and zero points of intB{gG,pc}[s]");
  LB_CHECK(o_.epochs >= 0, "efficientqat: Block-AP epochs must be >= 0, got ", o_.epochs);
  LB_CHECK(o_.batch >= 1, "efficientqat: Block-AP batch must be >= 1, got ", o_.batch);
  LB_CHECK(std::isfinite(o_.weight_lr) && std::isfinite(o_.quant_lr) && o_.weight_lr >= 0 && o_.quant_lr >= 0,
           "efficientqat: Block-AP learning rates must be finite and >= 0");
}

std::string BlockApMethod::options_key() const {
  return "epochs=" + std::to_string(o_.epochs) + ",batch=" + std::to_string(o_.batch) + ",lr=" + key_number(o_.weight_lr) +
         "/" + key_number(o_.quant_lr) + ",init=" + lsq_init_name(o_.init) + ",seed=" + std::to_string(o_.seed);
}

void BlockApMethod::quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) {
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
  std::vector<Var> weights, quant;
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
    e.t = std::make_shared<LsqTrainLinear>(wd, (*slot)->bias(), f, lsq_init(e.w, f, o_.init), lo);
    for (auto& p : e.t->weight_parameters()) weights.push_back(p);
    for (auto& p : e.t->quant_parameters()) quant.push_back(p);
    es.push_back(std::move(e));
  }
  for (auto& e : es) *e.slot = e.t;
  try {
    AdamW opt({ParamGroup{weights, AdamWOptions{o_.weight_lr, 0.9, 0.999, 1e-8, 0.0}},
               ParamGroup{quant, AdamWOptions{o_.quant_lr, 0.9, 0.999, 1e-8, 0.0}}});
    std::vector<Var> all = weights;
    all.insert(all.end(), quant.begin(), quant.end());
    const int64_t n = shards.total();
    // The mean MSE of windows idx[b..e) of this rank's.
    auto loss_of = [&](const std::vector<int64_t>& idx, size_t b, size_t e) {
      Var out = ctx.model.block_forward(ctx.layer, Var(gather_windows(ctx.inputs, idx, b, e, L)), int64_t(e - b), L);
      return mse(out, Var(gather_windows(ctx.fp_targets, idx, b, e, L)));
    };
    for (int ep = 0; ep < o_.epochs; ++ep) {
      const auto perm = shuffled_indices(n, splitmix64(splitmix64(o_.seed ^ splitmix64(uint64_t(ctx.layer))) ^ uint64_t(ep)));
      double sum = 0;
      int64_t steps = 0;
      for (size_t b = 0; b < size_t(n); b += size_t(o_.batch)) {
        const size_t e = std::min(size_t(n), b + size_t(o_.batch));
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
      log_.push_back({ctx.layer, ep, mean});
      if (o_.verbose) std::fprintf(stderr, "[block-ap] layer %d epoch %d  loss %.6e\n", ctx.layer, ep, mean);
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
