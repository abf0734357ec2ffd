#include "lowbit/methods/norm_tweak.h"

#include <algorithm>

#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/optim.h"

namespace lowbit {

namespace {

// Per-channel mean and variance of y [M, C] over its rows, as [1, C] vars.
std::pair<Var, Var> channel_moments(const Var& y) {
  const int64_t m = y.value().size(0);
  Var ones(Tensor::full({1, m}, 1.0 / double(m)).to(y.value().device()));
  Var mu = matmul(ones, y);
  Var sq = matmul(ones, mul(y, y));
  return {mu, sub(sq, mul(mu, mu))};
}

}  // namespace

Var channel_distribution_loss(const Var& y, const Tensor& target) {
  if (y.value().dim() != 2 || y.value().shape() != target.shape())
    throw_error("norm-tweak: output and target shapes differ");
  auto [mq, vq] = channel_moments(y);
  Var mf, vf;
  {
    NoGradGuard ng;
    auto [a, b] = channel_moments(Var(target));
    mf = Var(a.value());
    vf = Var(b.value());
  }
  // mse = mean over the C channels of the squared differences: the paper's 1/C sum_c.
  return add(mse(mq, mf), mse(vq, vf));
}

double channel_distribution_loss_value(const Tensor& y, const Tensor& target) {
  NoGradGuard ng;
  return channel_distribution_loss(Var(y), target).value().item();
}

std::string NormTweakMethod::options_key() const {
  return "base=" + base_->name() + "(" + base_->options_key() + "),epochs=" + std::to_string(o_.epochs) +
         ",batch=" + std::to_string(o_.batch) + ",lr=" + key_number(o_.lr) + ",depth=" + key_number(o_.lr_depth_scale);
}

void NormTweakMethod::quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) {
  base_->quantize_block(ctx, reports);
  LlamaBlock& b = ctx.model.block(ctx.layer);
  const int64_t L = ctx.seqlen, N = ctx.n_samples;
  // L over all windows (in the pipeline's batches: the moments are over all N*L tokens).
  auto full_loss = [&] { return channel_distribution_loss_value(ctx.run_block(ctx.inputs), ctx.fp_targets); };
  BlockLog log;
  log.layer = ctx.layer;
  log.loss_before = full_loss();
  const Var attn0 = b.attn_norm, ffn0 = b.ffn_norm;
  Var attn(attn0.value().clone(), true), ffn(ffn0.value().clone(), true);
  b.attn_norm = attn;
  b.ffn_norm = ffn;
  AdamWOptions ao;
  const int n_layers = ctx.model.n_layers();
  ao.lr = o_.lr * (1.0 + o_.lr_depth_scale * double(ctx.layer) / double(std::max(1, n_layers - 1)));
  ao.weight_decay = 0;
  AdamW opt({attn, ffn}, ao);
  const int64_t step_windows = std::max<int64_t>(1, o_.batch);
  try {
    for (int e = 0; e < o_.epochs; ++e)
      for (int64_t s = 0; s < N; s += step_windows) {
        const int64_t end = std::min(N, s + step_windows);
        Var x(ctx.inputs.slice(0, s * L, end * L));
        Var y = ctx.model.block_forward(ctx.layer, x, end - s, L);
        Var loss = channel_distribution_loss(y, ctx.fp_targets.slice(0, s * L, end * L).contiguous());
        opt.zero_grad();
        backward(loss);
        opt.step();
      }
  } catch (...) {
    b.attn_norm = attn0;
    b.ffn_norm = ffn0;
    throw;
  }
  b.attn_norm = Var(attn.value().clone());
  b.ffn_norm = Var(ffn.value().clone());
  log.loss_after = full_loss();
  log.kept = log.loss_after < log.loss_before;
  if (!log.kept) {
    b.attn_norm = attn0;
    b.ffn_norm = ffn0;
  }
  log_.push_back(log);
}

}  // namespace lowbit
