// Perplexity over a token stream with non-overlapping windows (the protocol of GPTQ/AWQ papers).
//
// The stream is cut into windows of `ctx` tokens (a trailing partial window is dropped). In each
// window the first token is context only and tokens 1..ctx-1 are predicted from the ones before
// them, so every window contributes ctx-1 predictions. When `bos` >= 0, each window is instead
// BOS followed by ctx-1 stream tokens, all of which are predicted (for models trained on
// BOS-delimited documents). Reported: mean NLL (nats/token), ppl = exp(NLL), tokens predicted.
//
// `score_second_half` is llama.cpp's llama-perplexity protocol: the same windows, but only the
// tokens of the window's second half are scored (positions ctx/2 .. ctx-2 predict tokens
// ctx/2+1 .. ctx-1: ctx-1-ctx/2 predictions per window), so every scored token has at least ctx/2
// tokens of context. With the same tokens and windows, lowbit's number and llama-perplexity's are
// on the same predictions (without BOS; llama-perplexity writes BOS over each window's first token
// when the model adds one, lowbit's `bos` prepends it).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "lowbit/model/llama.h"

namespace lowbit {

struct PerplexityOptions {
  int64_t ctx = 512;
  int64_t batch = 1;        // windows per forward pass
  int bos = -1;             // >= 0: prepend this id to each window (see above)
  int64_t max_windows = 0;  // 0 = all
  bool score_second_half = false;  // llama-perplexity's scoring (see above)
  bool progress = true;
  // Through the KV cache: each window runs through LlamaModel::forward_cached with a cache of this
  // type, `cache_chunk` tokens per call (ctx or more = the whole window in one call; 1 = token by
  // token, as generation decodes), instead of the batched forward without a cache. Every query
  // then attends to keys/values read back from the cache, so the cache's storage type shows in
  // the perplexity. `batch` is ignored (one window at a time).
  bool use_cache = false;
  KVCacheType kv_cache = KVCacheType::Auto;
  int64_t cache_chunk = 0;  // 0 = whole window
  // When set (batched path only: use_cache must be false), called after each forward with the
  // index of its first window and its logits, f32 on the CPU, [B * ctx, vocab] in window order
  // (position t of window w at row (w - first_window) * ctx + t). For comparing logits with
  // another runtime (`lowbit eval ppl --logits-out`).
  std::function<void(int64_t first_window, const Tensor& logits)> on_logits;
};

struct PerplexityResult {
  double nll = 0;   // mean negative log-likelihood, nats per predicted token
  double ppl = 0;   // exp(nll)
  int64_t tokens = 0;   // predictions scored
  int64_t windows = 0;
  double seconds = 0;
  double tokens_per_second = 0;  // forward throughput over all window tokens
};

PerplexityResult evaluate_perplexity(const LlamaModel& model, const std::vector<int32_t>& stream,
                                     const PerplexityOptions& options);

}  // namespace lowbit
