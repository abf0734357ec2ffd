#include "lowbit/runtime/generate.h"

#include <chrono>

#include "lowbit/comm/comm.h"

namespace lowbit {

namespace {
// llama2.c safe_printf: single-byte pieces that are not printable or whitespace are dropped.
std::string printable(const std::string& piece) {
  if (piece.size() == 1) {
    const unsigned char c = static_cast<unsigned char>(piece[0]);
    if (!(std::isprint(c) || std::isspace(c))) return {};
  }
  return piece;
}
}  // namespace

int follow_root(const LlamaModel& model, int token) {
  comm::Communicator* c = model.tensor_parallel();
  if (!c) return token;
  Tensor t = Tensor::from_vector(std::vector<int32_t>{int32_t(token)}, {1});
  c->broadcast(t, 0);
  return t.data<int32_t>()[0];
}

bool is_root(const LlamaModel& model) {
  return !model.tensor_parallel() || model.tensor_parallel()->rank() == 0;
}

GenerateResult generate(const LlamaModel& model, const Tokenizer& tok, const std::string& prompt,
                        const GenerateOptions& o, const std::function<void(const std::string&)>& on_piece) {
  if (o.steps < 1) throw_error("generate: steps must be at least 1");
  const int max_seq = model.config().max_seq_len;
  const int steps = std::min(o.steps, max_seq);
  GenerateResult r;
  std::vector<int> prompt_ids = tok.encode(prompt, o.add_special);
  if (prompt_ids.empty()) throw_error("generate: the prompt encodes to no tokens and the tokenizer has no BOS");
  if (int(prompt_ids.size()) > steps)
    throw_error("generate: the prompt has ", prompt_ids.size(), " tokens, more than --steps ", steps);
  for (int id : prompt_ids)
    if (id < 0 || id >= model.config().vocab_size)
      throw_error("generate: prompt token ", id, " is outside the model's vocabulary (", model.config().vocab_size,
                  "); tokenizer and model do not match");
  r.prompt_tokens = int(prompt_ids.size());
  r.tokens = prompt_ids;
  Sampler sampler(o.sampler);
  NoGradGuard no_grad;
  KVCache cache = model.make_cache(steps, o.kv_cache);
  auto t0 = std::chrono::steady_clock::now();
  // Prefill all prompt tokens but the last in one pass, then decode one token at a time.
  if (prompt_ids.size() > 1) {
    std::vector<int32_t> pre(prompt_ids.begin(), prompt_ids.end() - 1);
    model.forward_cached(Tensor::from_vector(pre, {int64_t(pre.size())}), cache, /*logits=*/false);
  }
  int token = prompt_ids.back();
  const int V = model.config().vocab_size;
  const bool root = is_root(model);
  for (int pos = int(prompt_ids.size()) - 1; pos < steps; ++pos) {
    Var logits = model.forward_cached(Tensor::from_vector(std::vector<int32_t>{token}, {1}), cache, root);
    int next = 0;
    if (root) {
      Tensor lv = logits.value().to(Device::CPU).contiguous();
      next = sampler.sample(lv.data<float>(), V);
    }
    next = follow_root(model, next);
    if (next == tok.bos_id()) break;
    if (o.stop_at_eos && next == tok.eos_id()) break;
    r.tokens.push_back(next);
    if (on_piece) on_piece(printable(tok.decode_piece(token, next)));
    token = next;
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int produced = int(r.tokens.size()) - 1;
  r.tokens_per_second = r.seconds > 0 ? produced / r.seconds : 0;
  return r;
}

}  // namespace lowbit
