#include "lowbit/methods/rsq.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "lowbit/autograd/functions.h"
#include "lowbit/ops/ops.h"

namespace lowbit {

Tensor attention_concentration(const LlamaModel& model, int layer, const Tensor& x, int64_t B, int64_t T) {
  if (x.dim() != 2 || x.size(0) != B * T) throw_error("attention_concentration: x must be [", B * T, ", D]");
  NoGradGuard ng;
  const LlamaConfig& c = model.config();
  const LlamaBlock& b = model.block(layer);
  const int64_t H = c.n_heads, KVH = c.n_kv_heads, hd = c.resolved_head_dim();
  const double eps = c.norm_eps, scale = 1.0 / std::sqrt(double(hd));
  Tensor out = Tensor::zeros({B * T});
  float* acc = out.data<float>();
  Tensor qh = Tensor::empty({T, hd}), kh = Tensor::empty({T, hd}), s = Tensor::empty({T, T});
  std::vector<double> row(size_t(T), 0.0);
  for (int64_t w = 0; w < B; ++w) {
    Var xv(x.slice(0, w * T, (w + 1) * T));
    Var h = rmsnorm(xv, b.attn_norm, eps);
    Var q = b.wq->forward(h), k = b.wk->forward(h);
    if (c.qk_norm) {
      q = reshape(rmsnorm(reshape(q, {-1, hd}), b.q_norm, eps), {T, H * hd});
      k = reshape(rmsnorm(reshape(k, {-1, hd}), b.k_norm, eps), {T, KVH * hd});
    }
    q = rope(q, 1, T, H, hd, 0, c.rope_theta, c.rope_style, c.rope_scaling);
    k = rope(k, 1, T, KVH, hd, 0, c.rope_theta, c.rope_style, c.rope_scaling);
    const Tensor qa = q.value().to(Device::CPU).to(DType::F32).contiguous();
    const Tensor ka = k.value().to(Device::CPU).to(DType::F32).contiguous();
    for (int64_t head = 0; head < H; ++head) {
      const int64_t kvh = head / (H / KVH);
      for (int64_t t = 0; t < T; ++t) {
        std::copy_n(qa.data<float>() + t * H * hd + head * hd, hd, qh.data<float>() + t * hd);
        std::copy_n(ka.data<float>() + t * KVH * hd + kvh * hd, hd, kh.data<float>() + t * hd);
      }
      ops::gemm(qh, false, kh, true, s, scale, 0.0);  // s[i, j] = q_i . k_j / sqrt(hd)
      const float* sp = s.data<float>();
      for (int64_t i = 0; i < T; ++i) {  // causal softmax of row i over j <= i
        double mx = sp[i * T];
        for (int64_t j = 1; j <= i; ++j) mx = std::max(mx, double(sp[i * T + j]));
        double z = 0;
        for (int64_t j = 0; j <= i; ++j) z += row[size_t(j)] = std::exp(double(sp[i * T + j]) - mx);
        for (int64_t j = 0; j <= i; ++j) acc[w * T + j] += float(row[size_t(j)] / z);
      }
    }
  }
  return out;
}

Tensor minmax_token_weights(const Tensor& a, int64_t T, double lo, double hi) {
  if (a.dim() != 1 || T <= 0 || a.size(0) % T != 0) throw_error("minmax_token_weights: a must be [B*T]");
  Tensor ac = a.to(Device::CPU).to(DType::F32).contiguous();
  Tensor out = Tensor::empty({a.size(0)});
  const float* p = ac.data<float>();
  float* o = out.data<float>();
  for (int64_t w = 0; w < a.size(0) / T; ++w) {
    const float* pw = p + w * T;
    const auto [mn, mx] = std::minmax_element(pw, pw + T);
    const double range = double(*mx) - double(*mn);
    for (int64_t t = 0; t < T; ++t) {
      const double u = range > 0 ? (double(pw[t]) - double(*mn)) / range : 0.0;
      o[w * T + t] = float(std::clamp(lo + u * (hi - lo), lo, hi));
    }
  }
  return out;
}

std::string RsqMethod::options_key() const {
  return GptqMethod::options_key() + ",rsq_min=" + key_number(r_.min_weight) + ",rsq_max=" + key_number(r_.max_weight);
}

Tensor RsqMethod::token_weights(BlockContext& ctx) {
  const Tensor a = attention_concentration(ctx.model, ctx.layer, ctx.inputs, ctx.n_samples, ctx.seqlen);
  return minmax_token_weights(a, ctx.seqlen, r_.min_weight, r_.max_weight);
}

}  // namespace lowbit
