// lowbit run: chat with a model in the terminal. The chat template comes from the model; answers
// stream as they are generated; /reset forgets the conversation, /exit (or end of input) quits,
// Ctrl-C stops the current answer without exiting. The conversation is kept within --ctx: when the
// next prompt would not leave room for an answer, the oldest turns are dropped (with a notice).
// With standard input not a terminal (`echo question | lowbit run -m M`), all of it is one
// question and the answer is printed. A model without a chat template continues the text instead.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <mutex>
#include <random>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/cli/serving.h"
#include "lowbit/runtime/scheduler.h"

namespace lowbit::cli {

namespace {
struct RunArgs {
  std::string model, tokenizer, system, device = "cpu";
  int64_t ctx = 0;
  int max_tokens = 0;
  double temperature = 0.7, top_p = 0.9;
  int64_t seed = -1;
  KVCacheType kv_cache = KVCacheType::Auto;
};

std::atomic<bool> g_interrupted{false};
std::atomic<bool> g_generating{false};

extern "C" void on_sigint(int) {
  g_interrupted = true;
  if (!g_generating) {
    static const char msg[] = "\n(/exit or Ctrl-D quits)\n> ";
    ssize_t n = write(STDERR_FILENO, msg, sizeof msg - 1);
    (void)n;
  }
}

struct Answer {
  std::mutex mu;
  std::condition_variable cv;
  std::string pending;
  bool done = false;
  CompletionResult result;
};

// Runs one request to its end, streaming its text to stdout; Ctrl-C cancels it.
CompletionResult answer(Scheduler& sched, CompletionRequest req) {
  auto a = std::make_shared<Answer>();
  req.on_text = [a](const std::string& t) {
    std::lock_guard<std::mutex> lk(a->mu);
    a->pending += t;
    a->cv.notify_all();
  };
  req.on_done = [a](const CompletionResult& r) {
    std::lock_guard<std::mutex> lk(a->mu);
    a->result = r;
    a->done = true;
    a->cv.notify_all();
  };
  g_interrupted = false;
  g_generating = true;
  const uint64_t id = sched.submit(std::move(req));
  bool cancelled = false;
  for (;;) {
    std::string text;
    bool done;
    {
      std::unique_lock<std::mutex> lk(a->mu);
      a->cv.wait_for(lk, std::chrono::milliseconds(50), [&] { return a->done || !a->pending.empty(); });
      text.swap(a->pending);
      done = a->done;
    }
    if (!text.empty()) write_stdout(text);
    if (done) break;
    if (g_interrupted && !cancelled) {
      sched.cancel(id);
      cancelled = true;
    }
  }
  g_generating = false;
  return a->result;
}

void run_run(const RunArgs& a) {
  check_kv_cache_device(a.kv_cache, a.device);
  Device dev = parse_device(a.device);
  ServingModel m = load_serving_model(a.model, a.tokenizer, dev, a.ctx);
  Scheduler sched(m.model(), *m.tok, SchedulerOptions{1, m.ctx, a.kv_cache});
  const bool interactive = isatty(STDIN_FILENO);
  const bool chat = !m.chat_template.empty();
  uint64_t seed = a.seed >= 0 ? uint64_t(a.seed) : std::random_device{}();
  auto request = [&](std::vector<int> prompt) {
    CompletionRequest r;
    r.prompt = std::move(prompt);
    const int room = int(m.ctx - int64_t(r.prompt.size()) + 1);
    r.max_tokens = a.max_tokens > 0 ? std::min(a.max_tokens, room) : room;
    r.sampler = SamplerOptions{a.temperature, a.top_p, seed++};
    return r;
  };
  if (!interactive) {
    const std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    std::string q = input;
    while (!q.empty() && (q.back() == '\n' || q.back() == '\r')) q.pop_back();
    if (q.empty()) throw_error("standard input is empty: nothing to answer");
    std::vector<int> ids;
    if (chat) {
      nlohmann::ordered_json msgs = nlohmann::ordered_json::array();
      if (!a.system.empty()) msgs.push_back({{"role", "system"}, {"content", a.system}});
      msgs.push_back({{"role", "user"}, {"content", q}});
      ids = chat_prompt_ids(m, msgs);
    } else {
      ids = m.tok->encode(q, true);
    }
    if (int64_t(ids.size()) > m.ctx)
      throw_error("the question has ", ids.size(), " tokens, more than the context of ", m.ctx, " tokens (--ctx)");
    const CompletionResult r = answer(sched, request(ids));
    if (r.finish == FinishReason::Error) throw_error(r.error);
    write_stdout("\n");
    return;
  }

  struct sigaction sa {};
  sa.sa_handler = on_sigint;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  std::fprintf(stderr, "lowbit run: %s, context %lld tokens%s. /reset forgets, /exit quits, Ctrl-C stops an answer.\n",
               m.name.c_str(), static_cast<long long>(m.ctx), chat ? "" : " (no chat template: text continuation)");
  nlohmann::ordered_json history = nlohmann::ordered_json::array();
  const size_t keep = a.system.empty() ? 0 : 1;
  auto reset = [&] {
    history = nlohmann::ordered_json::array();
    if (!a.system.empty()) history.push_back({{"role", "system"}, {"content", a.system}});
  };
  reset();
  // Room kept for the answer when trimming: a quarter of the context, at most 512 tokens.
  const int64_t reserve = std::min<int64_t>(512, std::max<int64_t>(1, m.ctx / 4));
  std::string line;
  for (;;) {
    std::fprintf(stderr, "> ");
    std::fflush(stderr);
    g_interrupted = false;
    if (!std::getline(std::cin, line)) break;
    if (line == "/exit" || line == "/quit") break;
    if (line == "/reset") {
      reset();
      std::fprintf(stderr, "(conversation forgotten)\n");
      continue;
    }
    if (!line.empty() && line[0] == '/') {
      std::fprintf(stderr, "commands: /reset (forget the conversation), /exit (quit)\n");
      continue;
    }
    if (line.empty()) continue;
    std::vector<int> ids;
    if (chat) {
      history.push_back({{"role", "user"}, {"content", line}});
      for (;;) {
        ids = chat_prompt_ids(m, history);
        if (int64_t(ids.size()) + reserve <= m.ctx || history.size() <= keep + 1) break;
        // Drop the oldest turn (a user message and the answer after it).
        history.erase(history.begin() + std::ptrdiff_t(keep));
        if (history.size() > keep + 1 && history[keep]["role"] == "assistant")
          history.erase(history.begin() + std::ptrdiff_t(keep));
        std::fprintf(stderr, "(history trimmed: the oldest turn was dropped to fit the context of %lld tokens)\n",
                     static_cast<long long>(m.ctx));
      }
    } else {
      ids = m.tok->encode(line, true);
    }
    if (int64_t(ids.size()) > m.ctx) {
      std::fprintf(stderr, "(that message has %zu tokens, more than the context of %lld tokens; not sent)\n", ids.size(),
                   static_cast<long long>(m.ctx));
      if (chat) history.erase(history.end() - 1);
      continue;
    }
    const CompletionResult r = answer(sched, request(ids));
    write_stdout("\n");
    if (r.finish == FinishReason::Cancelled) std::fprintf(stderr, "(stopped)\n");
    if (r.finish == FinishReason::Error) std::fprintf(stderr, "(error: %s)\n", r.error.c_str());
    if (chat) history.push_back({{"role", "assistant"}, {"content", r.text}});
  }
  std::fprintf(stderr, "\n");
}
}  // namespace

void register_run(CLI::App& app) {
  auto* s = app.add_subcommand("run", "Chat with a model in the terminal (or answer one question from standard input)");
  auto a = std::make_shared<RunArgs>();
  s->add_option("-m,--model", a->model, "model: .gguf, lowbit quantized directory, .safetensors/HF directory or llama2.c .bin")
      ->required();
  s->add_option("--tokenizer", a->tokenizer, "tokenizer file, directory or GGUF file (default: the model's own)");
  s->add_option("--system", a->system, "a system message at the start of the conversation");
  s->add_option("--ctx", a->ctx, "tokens of conversation kept (default: min(2048, the model's context))")->check(at_least(1));
  s->add_option("--max-tokens", a->max_tokens, "longest answer in tokens (default: what the context leaves)")
      ->check(at_least(1));
  s->add_option("-t,--temperature", a->temperature, "0 = greedy")->capture_default_str()->check(between(0, 2));
  s->add_option("--top-p", a->top_p, "nucleus sampling mass")->capture_default_str()->check(CLI::Range(1e-9, 1.0));
  s->add_option("-s,--seed", a->seed, "random seed (default: random)")->check(at_least(0));
  s->add_option("--device", a->device, "cpu or cuda")->capture_default_str();
  add_kv_cache_option(s, &a->kv_cache);
  add_matmul_option(s);
  add_threads_option(s);
  s->callback([a] { run_run(*a); });
}

}  // namespace lowbit::cli
