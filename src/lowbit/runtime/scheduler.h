// Continuous batching for serving (lowbit serve, lowbit run): up to `parallel` sequences decode
// together, each in its own slot (a KV cache of `ctx` tokens). The scheduler owns one thread that
// repeats one step:
//   1. cancelled requests leave their slots; waiting requests are admitted into free slots;
//   2. one forward (LlamaModel::forward_mixed) runs at most `batch_tokens` tokens: the next token of
//      every decoding slot, plus pieces of the prompts of slots still in prefill (each prompt is
//      split into pieces of `prefill_chunk` tokens, always the same way, so a request's numbers do
//      not depend on the load; prompts take turns in admission order, and a step takes at least
//      one piece while a prompt waits). A long prompt thus no longer stalls the decoding slots for
//      its whole prefill: they advance one token per step while it is read piece by piece;
//   3. each decoding slot, and each slot whose prompt's last piece ran, samples with its own
//      sampler (temperature, top-p, its own seed), streams the new text through its callback and
//      leaves when done (max_tokens, EOS/BOS, a stop string, the context full, cancelled).
// submit() and cancel() are thread-safe; callbacks run on the scheduler's thread and must be quick.
// No HTTP here: the server (cli/cmd_serve.cpp) and the tests drive it directly.
// On a tensor-parallel piece of the model, rank 0's scheduler sends each step's sequences and tokens
// to the other ranks, which follow (follow_scheduler_steps).
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "lowbit/model/llama.h"
#include "lowbit/runtime/sampler.h"
#include "lowbit/tokenizer/tokenizer.h"

namespace lowbit {

enum class FinishReason { Stop, Length, Cancelled, Error };
const char* finish_reason_name(FinishReason r);  // "stop", "length", "cancelled", "error"

struct CompletionResult {
  uint64_t id = 0;
  std::string text;         // the generated text, a stop string and what follows it removed
  std::vector<int> tokens;  // generated token ids (including the one that completed a stop string)
  int prompt_tokens = 0;
  int completion_tokens = 0;
  FinishReason finish = FinishReason::Stop;
  std::string error;           // FinishReason::Error only
  double queue_seconds = 0;    // submit -> admitted
  double first_token_seconds = 0;  // submit -> first token (time to first token)
  double seconds = 0;          // submit -> done
};

struct CompletionRequest {
  std::vector<int> prompt;  // token ids, as the model gets them (specials included)
  int max_tokens = 16;      // >= 1
  SamplerOptions sampler;
  std::vector<std::string> stop;  // generation ends before the first occurrence of any of these
  bool stop_at_eos = true;        // end at the tokenizer's EOS (always at BOS, like run.c)
  // Streamed text, in order; together they make CompletionResult::text. Text that may be the start
  // of a stop string, or an incomplete UTF-8 sequence, is held back until it is decided.
  std::function<void(const std::string& text)> on_text;
  // Called exactly once when the request ends (also when cancelled or on an error).
  std::function<void(const CompletionResult&)> on_done;
};

struct SchedulerOptions {
  int parallel = 4;   // slots (sequences decoding together)
  int64_t ctx = 2048; // tokens per slot: prompt + completion
  KVCacheType kv_cache = KVCacheType::Auto;  // storage of the slots' caches (model/llama.h)
  int64_t prefill_chunk = 128;  // prompt tokens per piece (llama.cpp's n_ubatch analogue), >= 1
  int64_t batch_tokens = 256;   // tokens per step, decode + prompt pieces (n_batch), >= prefill_chunk
};

struct SchedulerStats {
  uint64_t requests_submitted = 0, requests_finished = 0, requests_cancelled = 0, requests_failed = 0;
  uint64_t prompt_tokens = 0, completion_tokens = 0;
  uint64_t decode_steps = 0, decode_rows = 0;  // steps with decoding slots, and those slots summed over them
  uint64_t steps = 0, prefill_chunks = 0;      // all forward steps; prompt pieces run
  double busy_seconds = 0;                     // time spent in prefill + decode
  int queued = 0, active = 0, parallel = 0;
};

class Scheduler {
 public:
  Scheduler(const LlamaModel& model, const Tokenizer& tokenizer, SchedulerOptions options);
  ~Scheduler();  // stop(false)
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a request; returns its id. Throws lowbit::Error (nothing queued, no callback) when the
  // prompt is empty, longer than the context, holds ids outside the vocabulary, max_tokens < 1,
  // the sampler options are invalid, or the scheduler is stopping.
  uint64_t submit(CompletionRequest request);
  // Ends a request: a queued one at once, an active one before the next step. Unknown or finished
  // ids are ignored. The request's on_done reports FinishReason::Cancelled.
  void cancel(uint64_t id);
  // Stops accepting requests. finish = true: queued and active requests run to their end;
  // false: they are cancelled. Returns when the scheduler's thread has exited. Idempotent.
  void stop(bool finish);
  SchedulerStats stats() const;
  const SchedulerOptions& options() const { return opt_; }

 private:
  struct Pending {
    uint64_t id;
    CompletionRequest req;
    double submitted;  // seconds on the scheduler's clock
  };
  struct Slot;
  void loop();
  void admit(Slot& s, Pending p);  // takes the slot; the prompt is read by the next steps
  // One forward: decoding slots and pieces of prompts, within the token budget.
  void step();
  // Feeds a sampled token to the slot: text, stop checks, streaming; true when the slot is done.
  bool accept_token(Slot& s, int token);
  void finish(Slot& s, FinishReason why, const std::string& error = {});
  double now() const;

  const LlamaModel& model_;
  const Tokenizer& tok_;
  SchedulerOptions opt_;
  std::vector<std::unique_ptr<Slot>> slots_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending> queue_;
  std::unordered_set<uint64_t> live_;       // submitted, not yet finished
  std::unordered_set<uint64_t> cancelled_;  // live ids to cancel at the next step
  uint64_t next_id_ = 1;
  uint64_t next_admission_ = 0;  // order in which slots were taken (prompts take turns by it)
  bool stopping_ = false, finish_on_stop_ = true;
  SchedulerStats stats_;
  std::mutex join_mu_;
  std::thread thread_;
  const std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
};

// Tensor parallelism (LlamaModel::tensor_parallel_shard): a Scheduler on rank 0's piece announces
// each step to the other ranks; on those, this runs the same forward_mixed steps on their pieces
// with their own `parallel` caches (same options as rank 0's), without logits, until rank 0's
// scheduler stops. Throws on rank 0 or a model that is not a piece.
void follow_scheduler_steps(const LlamaModel& model, const SchedulerOptions& options);

}  // namespace lowbit
