#include "lowbit/eval/perplexity.h"

#include <chrono>
#include <algorithm>
#include <cmath>

#include "lowbit/autograd/functions.h"
#include "lowbit/core/progress.h"

namespace lowbit {

PerplexityResult evaluate_perplexity(const LlamaModel& model, const std::vector<int32_t>& stream,
                                     const PerplexityOptions& o) {
  if (o.ctx < 2) throw_error("perplexity: --ctx must be at least 2, got ", o.ctx);
  if (o.batch < 1) throw_error("perplexity: --batch must be at least 1");
  if (o.ctx > model.config().max_seq_len)
    throw_error("perplexity: --ctx ", o.ctx, " exceeds the model's maximum sequence length ", model.config().max_seq_len);
  const int64_t per_window = o.bos >= 0 ? o.ctx - 1 : o.ctx;  // stream tokens consumed per window
  int64_t n_windows = int64_t(stream.size()) / per_window;
  if (o.max_windows > 0 && n_windows > o.max_windows) n_windows = o.max_windows;
  if (n_windows == 0)
    throw_error("perplexity: the token stream (", stream.size(), " tokens) is shorter than one window of ", o.ctx, " tokens");
  if (o.on_logits && o.use_cache)
    throw_error("perplexity: the logits of each window are handed out on the batched path only (not with the KV cache)");
  if (o.score_second_half && o.ctx < 4)
    throw_error("perplexity: --score-second-half needs --ctx of at least 4, got ", o.ctx);
  // The first position whose prediction is scored: 0 (every token but the window's first) or ctx/2.
  const int64_t first = o.score_second_half ? o.ctx / 2 : 0;
  const int V = model.config().vocab_size;
  for (size_t i = 0; i < size_t(n_windows * per_window); ++i)
    if (stream[i] < 0 || stream[i] >= V)
      throw_error("perplexity: token ", stream[i], " at position ", i, " is outside the model's vocabulary [0, ", V, ")");

  NoGradGuard no_grad;
  PerplexityResult r;
  double total_nll = 0;
  int64_t scored = 0;
  ProgressBar bar("perplexity", n_windows, "windows");
  auto t0 = std::chrono::steady_clock::now();
  const int64_t batch = o.use_cache ? 1 : o.batch;
  for (int64_t w0 = 0; w0 < n_windows; w0 += batch) {
    const int64_t B = std::min(batch, n_windows - w0);
    Tensor tokens = Tensor::empty({B, o.ctx}, DType::I32);
    Tensor targets = Tensor::empty({B * o.ctx}, DType::I32);
    int32_t* tp = tokens.data<int32_t>();
    int32_t* gp = targets.data<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      const int32_t* src = stream.data() + (w0 + b) * per_window;
      int32_t* row = tp + b * o.ctx;
      if (o.bos >= 0) {
        row[0] = o.bos;
        for (int64_t t = 1; t < o.ctx; ++t) row[t] = src[t - 1];
      } else {
        for (int64_t t = 0; t < o.ctx; ++t) row[t] = src[t];
      }
      // Position t predicts token t+1; the last position has nothing to predict.
      for (int64_t t = 0; t < o.ctx; ++t) gp[b * o.ctx + t] = t >= first && t + 1 < o.ctx ? row[t + 1] : -1;
    }
    const int64_t n = B * (o.ctx - 1 - first);
    if (o.use_cache) {
      // B == 1 here (the batch is forced to one window): chunks of the window through the cache.
      KVCache cache = model.make_cache(o.ctx, o.kv_cache);
      const int64_t chunk = o.cache_chunk > 0 ? std::min(o.cache_chunk, o.ctx) : o.ctx;
      double nll_sum = 0;
      for (int64_t t0c = 0; t0c < o.ctx; t0c += chunk) {
        const int64_t len = std::min(chunk, o.ctx - t0c);
        Var logits = model.forward_cached(tokens.view({o.ctx}).slice(0, t0c, t0c + len).contiguous(), cache);
        const int64_t valid = std::min(len, o.ctx - 1 - t0c);  // positions with a target
        // Positions before `first` are not scored (their targets are -1, ignored by cross_entropy).
        const int64_t counted = std::max<int64_t>(0, t0c + valid - std::max(t0c, first));
        if (valid <= 0 || counted == 0) continue;
        Var lv(logits.value().slice(0, 0, valid).contiguous(), false);
        Var loss = cross_entropy(lv, targets.slice(0, t0c, t0c + valid).contiguous().to(lv.value().device()));
        nll_sum += loss.value().item() * double(counted);
      }
      total_nll += nll_sum;
    } else {
      Var logits = model.forward(tokens);
      if (o.on_logits) {
        Tensor l = logits.value().to(Device::CPU).contiguous();
        if (l.dtype() != DType::F32) l = l.to(DType::F32);
        o.on_logits(w0, l.view({B * o.ctx, int64_t(V)}));
      }
      Var loss = cross_entropy(logits, targets.to(logits.value().device()));
      total_nll += loss.value().item() * double(n);
    }
    scored += n;
    bar.update(w0 + B, "ppl " + std::to_string(std::exp(total_nll / double(scored))).substr(0, 7));
  }
  bar.finish();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.windows = n_windows;
  r.tokens = scored;
  r.nll = total_nll / double(scored);
  r.ppl = std::exp(r.nll);
  r.tokens_per_second = r.seconds > 0 ? double(n_windows * o.ctx) / r.seconds : 0;
  return r;
}

}  // namespace lowbit
