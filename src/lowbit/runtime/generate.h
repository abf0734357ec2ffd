// Autoregressive generation with the KV cache, following llama2.c's run.c loop: the prompt is
// encoded with BOS; `steps` counts the positions fed to the model (prompt included), each of
// which yields the next token; generation stops after `steps` positions,
// at BOS (run.c's sequence delimiter) or, when stop_at_eos, at EOS.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "lowbit/model/llama.h"
#include "lowbit/runtime/sampler.h"
#include "lowbit/tokenizer/tokenizer.h"

namespace lowbit {

struct GenerateOptions {
  int steps = 256;
  bool stop_at_eos = true;
  bool add_special = true;  // encode(prompt, add_special): false for an already chat-templated prompt
  SamplerOptions sampler;
  KVCacheType kv_cache = KVCacheType::Auto;  // storage of the KV cache (f16 on the CPU by default)
};

struct GenerateResult {
  std::vector<int> tokens;  // prompt tokens (with BOS) followed by generated ones
  int prompt_tokens = 0;
  double seconds = 0;       // wall time of the loop (prefill + decode)
  double tokens_per_second = 0;
};

// on_piece receives the text of each new token as it is produced (run.c's decode + safe_printf).
// On a tensor-parallel piece of a model (LlamaModel::tensor_parallel_shard) every rank calls it with
// the same prompt and options: rank 0 samples, the other ranks skip the output head and take rank
// 0's tokens (follow_root), so all stop together; their on_piece sees the same text.
GenerateResult generate(const LlamaModel& model, const Tokenizer& tokenizer, const std::string& prompt,
                        const GenerateOptions& options, const std::function<void(const std::string&)>& on_piece);

// Tensor parallelism: rank 0's token on every rank (a broadcast; `token` is rank 0's choice there and
// ignored elsewhere). The model itself when it is not a tensor-parallel piece.
int follow_root(const LlamaModel& model, int token);
// Whether this process samples and talks to the user: not a tensor-parallel piece, or its rank 0.
bool is_root(const LlamaModel& model);

}  // namespace lowbit
