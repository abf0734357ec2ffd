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
GenerateResult generate(const LlamaModel& model, const Tokenizer& tokenizer, const std::string& prompt,
                        const GenerateOptions& options, const std::function<void(const std::string&)>& on_piece);

}  // namespace lowbit
