#include "lowbit/runtime/scheduler.h"

#include <algorithm>
#include <chrono>

#include "lowbit/autograd/functions.h"
#include "lowbit/comm/comm.h"
#include "lowbit/core/error.h"
#include "lowbit/core/threads.h"

namespace lowbit {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Cancelled: return "cancelled";
    default: return "error";
  }
}

struct Scheduler::Slot {
  KVCache cache;
  bool busy = false;
  uint64_t id = 0;
  CompletionRequest req;
  std::unique_ptr<Sampler> sampler;
  CompletionResult result;
  double submitted = 0;
  bool prefilling = false;  // the prompt is still being read (pieces of prefill_chunk tokens)
  int64_t prefilled = 0;    // prompt tokens already in the cache
  uint64_t admission = 0;   // order of admission (prompts take turns by it)
  int last_token = 0;   // the token the next decode step feeds
  std::string text;     // generated text so far (before stop-string trimming)
  size_t emitted = 0;   // bytes of `text` already streamed
  size_t longest_stop = 0;
};

namespace {
// Bytes at the end of s that start an incomplete UTF-8 sequence (0 when s ends on a boundary).
size_t incomplete_utf8_tail(const std::string& s) {
  const size_t n = s.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const unsigned char c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back
    const size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    return need > back ? back : 0;
  }
  return 0;
}

// Length of the longest suffix of s (starting at or after `from`) that is a proper prefix of a stop string.
size_t stop_prefix_tail(const std::string& s, size_t from, const std::vector<std::string>& stops) {
  size_t best = 0;
  for (const std::string& st : stops)
    for (size_t len = std::min(st.size() - 1, s.size() - from); len > best; --len)
      if (s.compare(s.size() - len, len, st, 0, len) == 0) {
        best = len;
        break;
      }
  return best;
}

// Tensor parallelism: rank 0's scheduler announces every step to the other ranks, which run the
// same forward on their pieces (follow_scheduler_steps). A header i64 [3] = (op, sequences S,
// tokens N); for a step, then i64 [3 S] = (slot, cache length before the step, token count) per
// sequence and the i32 [N] tokens. Idle announcements keep the ranks' waits under the
// communicator's operation timeout while no request comes.
enum TpOp : int64_t { kTpStop = 0, kTpStep = 1, kTpIdle = 2 };
constexpr auto kTpIdleEvery = std::chrono::seconds(30);

void tp_send(comm::Communicator& c, int64_t op, const std::vector<int64_t>& seqs = {}, const std::vector<int32_t>& tokens = {}) {
  Tensor h = Tensor::empty({3}, DType::I64);
  h.data<int64_t>()[0] = op;
  h.data<int64_t>()[1] = int64_t(seqs.size() / 3);
  h.data<int64_t>()[2] = int64_t(tokens.size());
  c.broadcast(h, 0);
  if (op != kTpStep) return;
  Tensor s = Tensor::empty({int64_t(seqs.size())}, DType::I64);
  std::copy(seqs.begin(), seqs.end(), s.data<int64_t>());
  c.broadcast(s, 0);
  Tensor t = Tensor::from_vector(tokens, {int64_t(tokens.size())});
  c.broadcast(t, 0);
}

// Text of a token for streaming: decode_piece, with lone control bytes (not whitespace) dropped.
std::string piece_text(const Tokenizer& tok, int prev, int id) {
  std::string p = tok.decode_piece(prev, id);
  if (p.size() == 1) {
    const unsigned char c = static_cast<unsigned char>(p[0]);
    if (c < 0x20 && c != '\n' && c != '\t' && c != '\r') return {};
  }
  return p;
}
}  // namespace

Scheduler::Scheduler(const LlamaModel& model, const Tokenizer& tokenizer, SchedulerOptions options)
    : model_(model), tok_(tokenizer), opt_(options) {
  if (opt_.parallel < 1) throw_error("scheduler: parallel must be at least 1, got ", opt_.parallel);
  if (opt_.ctx < 1) throw_error("scheduler: ctx must be at least 1, got ", opt_.ctx);
  if (opt_.prefill_chunk < 1) throw_error("scheduler: prefill_chunk must be at least 1, got ", opt_.prefill_chunk);
  if (opt_.batch_tokens < opt_.prefill_chunk)
    throw_error("scheduler: batch_tokens (", opt_.batch_tokens, ") must be at least prefill_chunk (", opt_.prefill_chunk,
                ")");
  for (int i = 0; i < opt_.parallel; ++i) {
    auto s = std::make_unique<Slot>();
    s->cache = model_.make_cache(opt_.ctx, opt_.kv_cache);
    slots_.push_back(std::move(s));
  }
  stats_.parallel = opt_.parallel;
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() { stop(false); }

double Scheduler::now() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
}

uint64_t Scheduler::submit(CompletionRequest r) {
  if (r.prompt.empty()) throw_error("the prompt is empty (no tokens)");
  if (int64_t(r.prompt.size()) > opt_.ctx)
    throw_error("the prompt has ", r.prompt.size(), " tokens, more than the context of ", opt_.ctx, " tokens");
  const int V = model_.config().vocab_size;
  for (int id : r.prompt)
    if (id < 0 || id >= V) throw_error("prompt token ", id, " is outside the model's vocabulary (", V, ")");
  if (r.max_tokens < 1) throw_error("max_tokens must be at least 1, got ", r.max_tokens);
  for (const std::string& s : r.stop)
    if (s.empty()) throw_error("a stop string is empty");
  Sampler check(r.sampler);  // validates temperature / top_p
  (void)check;
  std::lock_guard<std::mutex> lk(mu_);
  if (stopping_) throw_error("the server is shutting down");
  const uint64_t id = next_id_++;
  queue_.push_back({id, std::move(r), now()});
  live_.insert(id);
  ++stats_.requests_submitted;
  cv_.notify_all();
  return id;
}

void Scheduler::cancel(uint64_t id) {
  Pending gone{0, {}, 0};
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = std::find_if(queue_.begin(), queue_.end(), [&](const Pending& p) { return p.id == id; });
    if (it == queue_.end()) {
      if (live_.count(id)) cancelled_.insert(id);  // in a slot, or being admitted into one
      cv_.notify_all();
      return;
    }
    gone = std::move(*it);
    queue_.erase(it);
    live_.erase(id);
    ++stats_.requests_cancelled;
  }
  CompletionResult r;
  r.id = gone.id;
  r.prompt_tokens = int(gone.req.prompt.size());
  r.finish = FinishReason::Cancelled;
  r.seconds = now() - gone.submitted;
  if (gone.req.on_done) gone.req.on_done(r);
}

void Scheduler::stop(bool finish) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!stopping_) finish_on_stop_ = finish;
    else if (!finish) finish_on_stop_ = false;  // a second, harder stop
    stopping_ = true;
    cv_.notify_all();
  }
  if (thread_.get_id() == std::this_thread::get_id()) return;  // from a callback: the loop ends by itself
  std::lock_guard<std::mutex> j(join_mu_);  // several threads may call stop(); one joins
  if (thread_.joinable()) thread_.join();
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  SchedulerStats s = stats_;
  s.queued = int(queue_.size());
  return s;
}

void Scheduler::finish(Slot& s, FinishReason why, const std::string& error) {
  // What is still held back is sent now (an unfinished stop-string prefix is plain text at the end).
  if (why != FinishReason::Cancelled && why != FinishReason::Error && s.emitted < s.text.size()) {
    if (s.req.on_text) s.req.on_text(s.text.substr(s.emitted));
    s.emitted = s.text.size();
  }
  CompletionResult& r = s.result;
  r.text = s.text.substr(0, s.emitted);
  r.finish = why;
  r.error = error;
  r.completion_tokens = int(r.tokens.size());
  r.seconds = now() - s.submitted;
  {
    std::lock_guard<std::mutex> lk(mu_);
    s.busy = false;
    cancelled_.erase(s.id);
    live_.erase(s.id);
    --stats_.active;
    if (why == FinishReason::Cancelled) ++stats_.requests_cancelled;
    else if (why == FinishReason::Error) ++stats_.requests_failed;
    else ++stats_.requests_finished;
    stats_.completion_tokens += uint64_t(r.completion_tokens);
  }
  auto done = std::move(s.req.on_done);
  s.req = CompletionRequest{};
  s.sampler.reset();
  if (done) done(r);
}

bool Scheduler::accept_token(Slot& s, int token) {
  const int prev = s.last_token;
  s.last_token = token;
  if (s.result.tokens.empty()) s.result.first_token_seconds = now() - s.submitted;
  if (token == tok_.bos_id() || (s.req.stop_at_eos && token == tok_.eos_id())) {
    finish(s, FinishReason::Stop);
    return true;
  }
  s.result.tokens.push_back(token);
  s.text += piece_text(tok_, prev, token);
  // A stop string anywhere in the text not yet streamed (it may begin in the held-back part).
  if (!s.req.stop.empty()) {
    const size_t from = s.emitted;
    size_t cut = std::string::npos;
    for (const std::string& st : s.req.stop) {
      const size_t p = s.text.find(st, from);
      if (p != std::string::npos) cut = std::min(cut, p);
    }
    if (cut != std::string::npos) {
      s.text.resize(cut);
      finish(s, FinishReason::Stop);
      return true;
    }
  }
  const bool full = s.cache.length + 1 > s.cache.capacity;
  if (int(s.result.tokens.size()) >= s.req.max_tokens || full) {
    finish(s, FinishReason::Length);
    return true;
  }
  size_t hold = std::max(incomplete_utf8_tail(s.text), stop_prefix_tail(s.text, s.emitted, s.req.stop));
  const size_t upto = s.text.size() - std::min(hold, s.text.size() - s.emitted);
  if (upto > s.emitted) {
    if (s.req.on_text) s.req.on_text(s.text.substr(s.emitted, upto - s.emitted));
    s.emitted = upto;
  }
  return false;
}

void Scheduler::admit(Slot& s, Pending p) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    s.busy = true;
    s.id = p.id;
  }
  s.req = std::move(p.req);
  s.submitted = p.submitted;
  s.sampler = std::make_unique<Sampler>(s.req.sampler);
  s.result = CompletionResult{};
  s.result.id = p.id;
  s.result.prompt_tokens = int(s.req.prompt.size());
  s.result.queue_seconds = now() - p.submitted;
  s.text.clear();
  s.emitted = 0;
  s.cache.length = 0;
  s.prefilling = true;
  s.prefilled = 0;
  s.admission = next_admission_++;
  s.last_token = s.req.prompt.back();
}

void Scheduler::step() {
  const int V = model_.config().vocab_size;
  std::vector<Slot*> seqs;
  std::vector<KVCache*> caches;
  std::vector<int32_t> tokens;
  std::vector<int64_t> counts;
  std::vector<bool> want;
  int64_t budget = opt_.batch_tokens;
  // Every decoding slot feeds its next token ...
  for (auto& s : slots_)
    if (s->busy && !s->prefilling) {
      seqs.push_back(s.get());
      caches.push_back(&s->cache);
      tokens.push_back(s->last_token);
      counts.push_back(1);
      want.push_back(true);
      --budget;
    }
  const size_t n_decode = seqs.size();
  // ... and the prompts in prefill, in admission order, one piece each while the budget lasts (at
  // least one piece per step, so prompts progress however many slots decode).
  std::vector<Slot*> pre;
  for (auto& s : slots_)
    if (s->busy && s->prefilling) pre.push_back(s.get());
  std::sort(pre.begin(), pre.end(), [](const Slot* a, const Slot* b) { return a->admission < b->admission; });
  for (Slot* s : pre) {
    const int64_t P = int64_t(s->req.prompt.size());
    const int64_t n = std::min(opt_.prefill_chunk, P - s->prefilled);
    if (seqs.size() > n_decode && n > budget) break;
    seqs.push_back(s);
    caches.push_back(&s->cache);
    tokens.insert(tokens.end(), s->req.prompt.begin() + s->prefilled, s->req.prompt.begin() + s->prefilled + n);
    counts.push_back(n);
    want.push_back(s->prefilled + n == P);
    budget -= n;
  }
  if (seqs.empty()) return;
  try {
    if (comm::Communicator* tp = model_.tensor_parallel()) {  // the other ranks run this step too
      std::vector<int64_t> desc;
      for (size_t j = 0; j < seqs.size(); ++j) {
        int64_t slot = 0;
        while (slots_[size_t(slot)].get() != seqs[j]) ++slot;
        desc.insert(desc.end(), {slot, seqs[j]->cache.length, counts[j]});
      }
      tp_send(*tp, kTpStep, desc, tokens);
    }
    const Tensor logits = model_.forward_mixed(Tensor::from_vector(tokens, {int64_t(tokens.size())}), caches, counts, want)
                              .value()
                              .to(Device::CPU)
                              .contiguous();
    {
      std::lock_guard<std::mutex> lk(mu_);
      ++stats_.steps;
      if (n_decode > 0) {
        ++stats_.decode_steps;
        stats_.decode_rows += n_decode;
      }
      stats_.prefill_chunks += seqs.size() - n_decode;
    }
    // Each sequence's next token from its own logits row and its own sampler (independent of the
    // others, so the rows are sampled over the thread pool), then taken in order.
    std::vector<size_t> sampled;  // sequences with a logits row, in row order
    for (size_t j = 0; j < seqs.size(); ++j)
      if (want[j]) sampled.push_back(j);
    std::vector<int> next(sampled.size());
    parallel_each(int64_t(sampled.size()), [&](int64_t r) {
      next[size_t(r)] = seqs[sampled[size_t(r)]]->sampler->sample(logits.data<float>() + r * V, V);
    });
    size_t row = 0;
    for (size_t j = 0; j < seqs.size(); ++j) {
      Slot& s = *seqs[j];
      if (j >= n_decode) {
        s.prefilled += counts[j];
        if (!want[j]) continue;
        s.prefilling = false;  // the prompt's last piece: its first token
      }
      accept_token(s, next[row++]);
    }
  } catch (const std::exception& e) {
    for (Slot* s : seqs)
      if (s->busy) finish(*s, FinishReason::Error, e.what());
  }
}

void Scheduler::loop() {
  NoGradGuard no_grad;
  for (;;) {
    std::vector<Pending> admitted;
    std::vector<Slot*> to_cancel;
    bool cancel_all = false;
    {
      std::unique_lock<std::mutex> lk(mu_);
      auto ready = [&] { return stopping_ || !queue_.empty() || stats_.active > 0; };
      if (comm::Communicator* tp = model_.tensor_parallel()) {
        while (!cv_.wait_for(lk, kTpIdleEvery, ready)) {
          lk.unlock();
          try {
            tp_send(*tp, kTpIdle);
          } catch (const std::exception&) {
            // a rank is gone: the next step's announcement fails and ends its requests with the error
          }
          lk.lock();
        }
      } else {
        cv_.wait(lk, ready);
      }
      if (stopping_ && !finish_on_stop_) cancel_all = true;
      if (stopping_ && queue_.empty() && stats_.active == 0) {
        lk.unlock();
        if (comm::Communicator* tp = model_.tensor_parallel()) {
          try {
            tp_send(*tp, kTpStop);
          } catch (const std::exception&) {
            // the other ranks are gone already
          }
        }
        return;
      }
      for (auto& s : slots_)
        if (s->busy && (cancel_all || cancelled_.count(s->id))) to_cancel.push_back(s.get());
      if (cancel_all) {
        stats_.requests_cancelled += queue_.size();
        for (const Pending& p : queue_) live_.erase(p.id);
        admitted.assign(std::make_move_iterator(queue_.begin()), std::make_move_iterator(queue_.end()));
        queue_.clear();
      } else {
        int free_slots = 0;
        for (auto& s : slots_) free_slots += !s->busy;
        free_slots += int(to_cancel.size());
        while (free_slots-- > 0 && !queue_.empty()) {
          admitted.push_back(std::move(queue_.front()));
          queue_.pop_front();
          ++stats_.active;
          stats_.prompt_tokens += admitted.back().req.prompt.size();
        }
      }
    }
    for (Slot* s : to_cancel) finish(*s, FinishReason::Cancelled);
    if (cancel_all) {
      for (Pending& p : admitted) {
        CompletionResult r;
        r.id = p.id;
        r.prompt_tokens = int(p.req.prompt.size());
        r.finish = FinishReason::Cancelled;
        r.seconds = now() - p.submitted;
        if (p.req.on_done) p.req.on_done(r);
      }
      continue;
    }
    for (Pending& p : admitted) {
      Slot* free_slot = nullptr;
      for (auto& s : slots_)
        if (!s->busy) {
          free_slot = s.get();
          break;
        }
      try {
        admit(*free_slot, std::move(p));
      } catch (const std::exception& e) {
        if (free_slot->busy) finish(*free_slot, FinishReason::Error, e.what());
      }
    }
    const double t_start = now();
    step();
    std::lock_guard<std::mutex> lk(mu_);
    stats_.busy_seconds += now() - t_start;
  }
}

void follow_scheduler_steps(const LlamaModel& model, const SchedulerOptions& opt) {
  comm::Communicator* c = model.tensor_parallel();
  if (!c || c->rank() == 0) throw_error("follow_scheduler_steps: for the tensor-parallel ranks other than 0");
  NoGradGuard no_grad;
  std::vector<KVCache> caches;
  for (int i = 0; i < opt.parallel; ++i) caches.push_back(model.make_cache(opt.ctx, opt.kv_cache));
  for (;;) {
    Tensor h = Tensor::empty({3}, DType::I64);
    c->broadcast(h, 0);
    const int64_t op = h.data<int64_t>()[0], S = h.data<int64_t>()[1], N = h.data<int64_t>()[2];
    if (op == kTpStop) return;
    if (op != kTpStep) continue;
    Tensor desc = Tensor::empty({3 * S}, DType::I64), tokens = Tensor::empty({N}, DType::I32);
    c->broadcast(desc, 0);
    c->broadcast(tokens, 0);
    std::vector<KVCache*> ptrs;
    std::vector<int64_t> counts;
    for (int64_t j = 0; j < S; ++j) {
      const int64_t* d = desc.data<int64_t>() + 3 * j;
      if (d[0] < 0 || d[0] >= opt.parallel || d[1] < 0 || d[1] > opt.ctx)
        throw_error("tensor parallelism: rank 0 announced slot ", d[0], " at length ", d[1], " (", opt.parallel,
                    " slots of ", opt.ctx, " tokens here): the ranks were started with different options");
      caches[size_t(d[0])].length = d[1];  // 0 after an admission: the slot starts over
      ptrs.push_back(&caches[size_t(d[0])]);
      counts.push_back(d[2]);
    }
    try {
      model.forward_mixed(tokens, ptrs, counts, std::vector<bool>(size_t(S), false));
    } catch (const Error&) {
      // Rank 0's forward of the same step failed the same check (it finishes those requests with an error).
    }
  }
}

}  // namespace lowbit
