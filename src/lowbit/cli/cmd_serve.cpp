// lowbit serve: an OpenAI-compatible HTTP server with continuous batching (runtime/scheduler.h).
// HTTP is Debian's cpp-httplib; request bodies are parsed by runtime/openai_api.h.
//
// Responses of /v1/completions and /v1/chat/completions are written with chunked transfer
// encoding, also without `stream`: the worker thread then notices a client that went away while
// its request is queued or decoding (the write side reports it) and cancels the request, freeing
// its slot. SIGINT/SIGTERM: stop accepting connections, let in-flight requests finish (at most
// --drain-timeout seconds, then they are cancelled; a second signal cancels at once), exit 0.
#include <httplib.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/cli/dist.h"
#include "lowbit/cli/serving.h"
#include "lowbit/core/threads.h"
#include "lowbit/runtime/openai_api.h"
#include "lowbit/runtime/scheduler.h"

namespace lowbit::cli {

namespace {
using json = nlohmann::json;

struct ServeArgs {
  std::string model, tokenizer, host = "127.0.0.1", device = "cpu", api_key;
  int port = 8080, parallel = 4, http_threads = 0, max_queue = 256;
  int64_t ctx = 0;
  int64_t prefill_chunk = SchedulerOptions{}.prefill_chunk, batch_tokens = 0;  // 0: max(default, 2 x chunk)
  int64_t max_body = 1 << 20;
  double drain_timeout = 30;
  KVCacheType kv_cache = KVCacheType::Auto;
  DistArgs dist;  // --tp
};

// JSON text of j; invalid UTF-8 (a token cut inside a character) is replaced, never thrown on.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

bool is_loopback(const std::string& host) {
  return host == "127.0.0.1" || host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

bool same_secret(const std::string& a, const std::string& b) {  // constant time in the contents
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) diff |= uint8_t(a[i] ^ b[i % std::max<size_t>(1, b.size())]);
  return diff == 0;
}

int64_t batch_tokens_of(const ServeArgs& a) {
  return a.batch_tokens > 0 ? a.batch_tokens : std::max(SchedulerOptions{}.batch_tokens, 2 * a.prefill_chunk);
}

SchedulerOptions scheduler_options(const ServeArgs& a, int64_t ctx) {
  SchedulerOptions o;
  o.parallel = a.parallel;
  o.ctx = ctx;
  o.kv_cache = a.kv_cache;
  o.prefill_chunk = a.prefill_chunk;
  o.batch_tokens = batch_tokens_of(a);
  return o;
}

// One request's results, handed from the scheduler's thread to the HTTP worker thread.
struct LiveRequest {
  std::mutex mu;
  std::condition_variable cv;
  std::string pending;  // streamed text not yet written
  bool done = false;
  CompletionResult result;
};

class Server {
 public:
  Server(const ServeArgs& a, ServingModel& m) : a_(a), m_(m) {
    sched_ = std::make_unique<Scheduler>(m.model(), *m.tok, scheduler_options(a, m.ctx));
    created_ = std::time(nullptr);
    setup();
  }

  httplib::Server& http() { return svr_; }
  Scheduler& scheduler() { return *sched_; }
  void begin_drain() { draining_ = true; }
  bool draining() const { return draining_; }

 private:
  void count_status(int status) {
    std::lock_guard<std::mutex> lk(mu_);
    ++responses_[status];
  }

  void send_error(httplib::Response& res, const ApiError& e) {
    res.status = e.status;
    res.set_content(dump(api_error_body(e)), "application/json");
  }

  void setup() {
    svr_.set_payload_max_length(size_t(a_.max_body));
    svr_.set_read_timeout(30, 0);
    svr_.set_write_timeout(30, 0);
    const int threads = a_.http_threads > 0 ? a_.http_threads : std::max(32, 4 * a_.parallel);
    svr_.new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
    svr_.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (a_.api_key.empty() || req.path == "/health") return httplib::Server::HandlerResponse::Unhandled;
      const std::string auth = req.get_header_value("Authorization");
      const std::string prefix = "Bearer ";
      if (auth.rfind(prefix, 0) == 0 && same_secret(auth.substr(prefix.size()), a_.api_key))
        return httplib::Server::HandlerResponse::Unhandled;
      send_error(res, ApiError(401, auth.empty() ? "missing API key: send the header 'Authorization: Bearer KEY'"
                                                 : "invalid API key",
                               "", "authentication_error"));
      return httplib::Server::HandlerResponse::Handled;
    });
    // Statuses httplib sets itself (404 unknown path, 413 body over the limit, 400 bad HTTP) get
    // an OpenAI-style error body too.
    svr_.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
      count_status(res.status);
      if (!res.body.empty()) return;
      std::string msg;
      if (res.status == 404) msg = "no such endpoint: " + req.method + " " + req.path;
      else if (res.status == 413) msg = "request body is larger than the limit of " + std::to_string(a_.max_body) + " bytes";
      else msg = "HTTP error " + std::to_string(res.status);
      send_error(res, ApiError(res.status, msg));
    });
    svr_.set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string what = "internal error";
      try {
        std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = std::string("internal error: ") + e.what();
      } catch (...) {
      }
      send_error(res, ApiError(500, what, "", "server_error"));
    });
    svr_.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      if (draining_) {
        res.status = 503;
        res.set_content(R"({"status":"shutting down"})", "application/json");
      } else {
        res.set_content(R"({"status":"ok"})", "application/json");
      }
    });
    svr_.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      json model = {{"id", m_.name}, {"object", "model"}, {"created", created_}, {"owned_by", "lowbit"}};
      model["meta"] = {{"n_ctx", m_.ctx}, {"n_parallel", a_.parallel}, {"n_vocab", m_.model().config().vocab_size},
                       {"chat_template", !m_.chat_template.empty()}};
      res.set_content(dump({{"object", "list"}, {"data", json::array({model})}}), "application/json");
    });
    svr_.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(metrics(), "text/plain; version=0.0.4");
    });
    // Bodies are read here, not by httplib's form handling (which refuses url-encoded bodies over
    // 8 KiB, the content type curl -d and urllib send by default).
    auto reading = [this](bool chat) {
      return [this, chat](const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& reader) {
        std::string body;
        bool too_big = false;
        const bool ok = reader([&](const char* data, size_t n) {
          if (int64_t(body.size() + n) > a_.max_body) {
            too_big = true;
            return false;
          }
          body.append(data, n);
          return true;
        });
        // httplib skips a body whose Content-Length is over set_payload_max_length without reading it.
        const std::string len = req.get_header_value("Content-Length");
        if (!ok && !too_big && !len.empty() && len.size() < 19 && len.find_first_not_of("0123456789") == std::string::npos)
          too_big = std::stoll(len) > a_.max_body;
        if (!ok && !too_big) return send_error(res, ApiError(400, "could not read the request body"));
        if (too_big)
          return send_error(res, ApiError(413, "request body is larger than the limit of " + std::to_string(a_.max_body) +
                                                   " bytes"));
        complete(body, res, chat);
      };
    };
    svr_.Post("/v1/completions", reading(false));
    svr_.Post("/v1/chat/completions", reading(true));
  }

  std::string metrics() {
    const SchedulerStats s = sched_->stats();
    std::string out;
    auto metric = [&](const char* name, const char* type, const char* help, double v) {
      out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + name + " ";
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.17g\n", v);
      out += buf;
    };
    metric("lowbit_requests_total", "counter", "Completion requests accepted into the queue.", double(s.requests_submitted));
    metric("lowbit_requests_finished_total", "counter", "Requests that ran to their end.", double(s.requests_finished));
    metric("lowbit_requests_cancelled_total", "counter", "Requests cancelled (client gone or shutdown).",
           double(s.requests_cancelled));
    metric("lowbit_requests_failed_total", "counter", "Requests that ended with an error.", double(s.requests_failed));
    metric("lowbit_prompt_tokens_total", "counter", "Prompt tokens prefilled.", double(s.prompt_tokens));
    metric("lowbit_completion_tokens_total", "counter", "Tokens generated.", double(s.completion_tokens));
    metric("lowbit_queue_length", "gauge", "Requests waiting for a slot.", double(s.queued));
    metric("lowbit_active_slots", "gauge", "Sequences decoding now.", double(s.active));
    metric("lowbit_slots", "gauge", "Slots (--parallel).", double(s.parallel));
    metric("lowbit_decode_steps_total", "counter", "Batched decode steps.", double(s.decode_steps));
    metric("lowbit_decode_rows_total", "counter", "Sequences summed over batched decode steps.", double(s.decode_rows));
    metric("lowbit_steps_total", "counter", "Forward steps (decoding slots and prompt pieces together).", double(s.steps));
    metric("lowbit_prefill_chunks_total", "counter", "Prompt pieces (--prefill-chunk tokens at most) run.",
           double(s.prefill_chunks));
    metric("lowbit_busy_seconds_total", "counter", "Seconds spent in prefill and decode.", s.busy_seconds);
    metric("lowbit_tokens_per_second", "gauge", "Generated tokens per busy second, since start.",
           s.busy_seconds > 0 ? double(s.completion_tokens) / s.busy_seconds : 0.0);
    out += "# HELP lowbit_http_responses_total HTTP error responses by status.\n# TYPE lowbit_http_responses_total counter\n";
    std::lock_guard<std::mutex> lk(mu_);
    for (const auto& [status, n] : responses_)
      out += "lowbit_http_responses_total{status=\"" + std::to_string(status) + "\"} " + std::to_string(n) + "\n";
    return out;
  }

  void complete(const std::string& body, httplib::Response& res, bool chat) {
    ApiRequest ar;
    CompletionRequest cr;
    try {
      if (draining_) throw ApiError(503, "the server is shutting down", "", "server_error");
      ar = parse_api_request(body, chat);
      try {
        if (chat) cr.prompt = chat_prompt_ids(m_, ar.messages);
        else if (!ar.prompt_ids.empty()) cr.prompt = ar.prompt_ids;
        else cr.prompt = m_.tok->encode(ar.prompt, true);
      } catch (const ApiError&) {
        throw;
      } catch (const Error& e) {
        throw ApiError(400, e.what(), chat ? "messages" : "prompt");
      }
      if (cr.prompt.empty()) throw ApiError(400, "the prompt is empty (it encodes to no tokens)", "prompt");
      if (int64_t(cr.prompt.size()) > m_.ctx)
        throw ApiError(400,
                       "the prompt has " + std::to_string(cr.prompt.size()) + " tokens, more than the context of " +
                           std::to_string(m_.ctx) + " tokens",
                       chat ? "messages" : "prompt", "invalid_request_error");
      const int room = int(m_.ctx - int64_t(cr.prompt.size()) + 1);
      cr.max_tokens = ar.max_tokens > 0 ? ar.max_tokens : chat ? room : std::min(16, room);
      cr.sampler.temperature = ar.temperature;
      cr.sampler.top_p = ar.top_p;
      cr.sampler.seed = ar.seed ? *ar.seed : std::random_device{}();
      cr.stop = ar.stop;
      cr.stop_at_eos = !ar.ignore_eos;
      if (sched_->stats().queued >= a_.max_queue)
        throw ApiError(503, "too many requests waiting (" + std::to_string(a_.max_queue) + "); retry later", "",
                       "server_error");
    } catch (const ApiError& e) {
      return send_error(res, e);  // counted by the error handler, as every status >= 400
    }
    auto live = std::make_shared<LiveRequest>();
    cr.on_text = [live](const std::string& t) {
      std::lock_guard<std::mutex> lk(live->mu);
      live->pending += t;
      live->cv.notify_all();
    };
    cr.on_done = [live](const CompletionResult& r) {
      std::lock_guard<std::mutex> lk(live->mu);
      live->result = r;
      live->done = true;
      live->cv.notify_all();
    };
    uint64_t id = 0;
    try {
      id = sched_->submit(std::move(cr));
    } catch (const Error& e) {
      return send_error(res, draining_ ? ApiError(503, e.what(), "", "server_error") : ApiError(400, e.what()));
    }
    const std::string rid = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(id);
    const json base = {{"id", rid},
                       {"object", chat ? (ar.stream ? "chat.completion.chunk" : "chat.completion") : "text_completion"},
                       {"created", std::time(nullptr)},
                       {"model", m_.name}};
    auto usage = [](const CompletionResult& r) {
      return json{{"prompt_tokens", r.prompt_tokens},
                  {"completion_tokens", r.completion_tokens},
                  {"total_tokens", r.prompt_tokens + r.completion_tokens}};
    };
    auto finish_name = [](const CompletionResult& r) -> json { return finish_reason_name(r.finish); };
    Scheduler* sched = sched_.get();
    const bool stream = ar.stream, include_usage = ar.include_usage;
    res.set_chunked_content_provider(
        stream ? "text/event-stream" : "application/json",
        [=](size_t, httplib::DataSink& sink) {
          auto sse = [&](const json& j) {
            const std::string s = "data: " + dump(j) + "\n\n";
            return sink.write(s.data(), s.size());
          };
          bool first = true;
          for (;;) {
            std::string text;
            bool done;
            {
              std::unique_lock<std::mutex> lk(live->mu);
              // Without stream the text is not sent piecewise: wait for the end only (else this spins).
              live->cv.wait_for(lk, std::chrono::milliseconds(100),
                                [&] { return live->done || (stream && !live->pending.empty()); });
              done = live->done;
              if (stream) text.swap(live->pending);
            }
            if (!sink.is_writable()) {  // the client went away: free the slot
              sched->cancel(id);
              return false;
            }
            if (stream && (first || !text.empty()) && !(text.empty() && !chat)) {
              json c = base;
              if (chat) {
                json delta = {{"content", text}};
                if (first) delta["role"] = "assistant";
                c["choices"] = json::array({{{"index", 0}, {"delta", delta}, {"logprobs", nullptr}, {"finish_reason", nullptr}}});
              } else {
                c["choices"] = json::array({{{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", nullptr}}});
              }
              if (!sse(c)) {
                sched->cancel(id);
                return false;
              }
              first = false;
            }
            if (!done) continue;
            const CompletionResult r = live->result;
            if (r.finish == FinishReason::Error) {
              const json err = api_error_body(ApiError(500, r.error, "", "server_error"));
              if (stream) sse(err);
              else {
                const std::string s = dump(err);
                sink.write(s.data(), s.size());
              }
            } else if (stream) {
              json c = base;
              if (chat)
                c["choices"] = json::array({{{"index", 0}, {"delta", json::object()}, {"logprobs", nullptr}, {"finish_reason", finish_name(r)}}});
              else
                c["choices"] = json::array({{{"index", 0}, {"text", ""}, {"logprobs", nullptr}, {"finish_reason", finish_name(r)}}});
              sse(c);
              if (include_usage) {
                json u = base;
                u["choices"] = json::array();
                u["usage"] = usage(r);
                sse(u);
              }
              const std::string end = "data: [DONE]\n\n";
              sink.write(end.data(), end.size());
            } else {
              json c = base;
              if (chat)
                c["choices"] = json::array({{{"index", 0},
                                             {"message", {{"role", "assistant"}, {"content", r.text}}},
                                             {"logprobs", nullptr},
                                             {"finish_reason", finish_name(r)}}});
              else
                c["choices"] =
                    json::array({{{"index", 0}, {"text", r.text}, {"logprobs", nullptr}, {"finish_reason", finish_name(r)}}});
              c["usage"] = usage(r);
              const std::string s = dump(c);
              sink.write(s.data(), s.size());
            }
            sink.done();
            return true;
          }
        },
        [sched, id](bool success) {
          if (!success) sched->cancel(id);  // ends a request whose response could not be completed
        });
  }

  const ServeArgs& a_;
  ServingModel& m_;
  std::unique_ptr<Scheduler> sched_;
  httplib::Server svr_;
  std::atomic<bool> draining_{false};
  std::time_t created_ = 0;
  std::mutex mu_;
  std::map<int, uint64_t> responses_;
};

std::atomic<int> g_stop_signals{0};
volatile sig_atomic_t g_last_signal = 0;
extern "C" void on_stop_signal(int sig) {
  g_last_signal = sig;
  ++g_stop_signals;  // lock-free atomic: async-signal-safe
}

void run_serve(const ServeArgs& a) {
  if (a.port < 0 || a.port > 65535) throw_error("--port must be in [0, 65535], got ", a.port);
  if (a.host.empty()) throw_error("--host must not be empty");
  if (batch_tokens_of(a) < a.prefill_chunk)
    throw_error("--batch-tokens (", a.batch_tokens, ") must be at least --prefill-chunk (", a.prefill_chunk, ")");
  // SIGINT/SIGTERM only set a flag (whichever thread they land on); the watcher thread below acts.
  struct sigaction sa {}, old_int{}, old_term{};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);
  struct RestoreHandlers {
    struct sigaction i, t;
    ~RestoreHandlers() {
      sigaction(SIGINT, &i, nullptr);
      sigaction(SIGTERM, &t, nullptr);
    }
  } restore{old_int, old_term};
  g_stop_signals = 0;
  signal(SIGPIPE, SIG_IGN);

  check_kv_cache_device(a.kv_cache, a.device);
  // --tp N: N ranks, each with its piece of the model; rank 0 serves HTTP and runs the scheduler,
  // whose steps the other ranks follow.
  const std::unique_ptr<comm::Communicator> comm = start_ranks(a.dist, a.device == "cuda", "--tp");
  Device dev = parse_device(a.device);
  ServingModel m = load_serving_model(a.model, a.tokenizer, dev, a.ctx, comm.get());
  if (comm->rank() != 0) {
    follow_scheduler_steps(m.model(), scheduler_options(a, m.ctx));
    return;
  }
  Server server(a, m);
  httplib::Server& http = server.http();
  int port = a.port;
  if (port == 0) {
    port = http.bind_to_any_port(a.host);
    if (port <= 0) throw_error("--host ", a.host, ": cannot bind a port");
  } else if (!http.bind_to_port(a.host, port)) {
    throw_error("--host ", a.host, " --port ", port, ": cannot bind (in use, or not an address of this machine)");
  }
  if (!is_loopback(a.host) && a.api_key.empty())
    std::fprintf(stderr, "lowbit serve: warning: listening on %s without --api-key: anyone who can reach it may use it\n",
                 a.host.c_str());
  std::fprintf(stderr, "lowbit serve: listening on http://%s:%d (model %s, %d slots x %lld tokens, prompt pieces of %lld, "
               "%lld tokens per step, %d threads%s)\n",
               a.host.c_str(), port, m.name.c_str(), a.parallel, static_cast<long long>(m.ctx),
               static_cast<long long>(a.prefill_chunk), static_cast<long long>(batch_tokens_of(a)), num_threads(),
               comm->world_size() > 1 ? (", tensor-parallel over " + std::to_string(comm->world_size()) + " ranks").c_str() : "");
  std::fflush(stderr);

  std::atomic<bool> listening_done{false};
  std::thread watcher([&] {
    int handled = 0;
    bool stop_pending = false;  // http.stop() once the server runs (a signal may come before listen)
    auto deadline = std::chrono::steady_clock::time_point::max();
    while (!listening_done) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      const int signals = g_stop_signals.load();
      if (signals > handled) {
        if (handled == 0) {
          std::fprintf(stderr, "lowbit serve: %s: shutting down, finishing the requests in flight\n",
                       g_last_signal == SIGINT ? "SIGINT" : "SIGTERM");
          server.begin_drain();
          stop_pending = true;
          deadline = std::chrono::steady_clock::now() +
                     std::chrono::milliseconds(int64_t(a.drain_timeout * 1000));
        }
        if (signals >= 2 && handled < 2) {
          std::fprintf(stderr, "lowbit serve: second signal: cancelling the requests in flight\n");
          server.scheduler().stop(false);
        }
        handled = signals;
      }
      if (stop_pending && http.is_running()) {
        http.stop();
        stop_pending = false;
      }
      if (std::chrono::steady_clock::now() > deadline) {
        std::fprintf(stderr, "lowbit serve: --drain-timeout reached: cancelling the requests in flight\n");
        server.scheduler().stop(false);
        deadline = std::chrono::steady_clock::time_point::max();
      }
    }
  });
  const bool ok = http.listen_after_bind();
  listening_done = true;
  watcher.join();
  server.scheduler().stop(true);
  if (!ok && !server.draining()) throw_error("the HTTP server stopped unexpectedly");
  std::fprintf(stderr, "lowbit serve: stopped\n");
}
}  // namespace

void register_serve(CLI::App& app) {
  auto* s = app.add_subcommand("serve", "OpenAI-compatible HTTP server with continuous batching");
  auto a = std::make_shared<ServeArgs>();
  s->add_option("-m,--model", a->model, "model: .gguf, lowbit quantized directory, .safetensors/HF directory or llama2.c .bin")
      ->required();
  s->add_option("--tokenizer", a->tokenizer, "tokenizer file, directory or GGUF file (default: the model's own)");
  s->add_option("--host", a->host, "address to listen on (loopback unless given; anything else exposes the model)")
      ->capture_default_str()
      ->check(non_empty());
  s->add_option("--port", a->port, "TCP port (0: any free port, printed on stderr)")->capture_default_str()->check(CLI::Range(0, 65535));
  s->add_option("--device", a->device, "cpu or cuda")->capture_default_str();
  s->add_option("--parallel", a->parallel, "sequences decoded together (KV-cache slots)")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  s->add_option("--ctx", a->ctx, "tokens per sequence, prompt + completion (default: min(2048, the model's context))")
      ->check(at_least(1));
  s->add_option("--prefill-chunk", a->prefill_chunk,
                 "prompts are read in pieces of this many tokens, one piece per step next to the decoding slots "
                 "(llama.cpp's --ubatch-size)")
      ->capture_default_str()
      ->check(at_least(1));
  s->add_option("--batch-tokens", a->batch_tokens,
                "tokens per step: one per decoding slot plus prompt pieces (llama.cpp's --batch-size; "
                "default max(256, 2 x --prefill-chunk))")
      ->check(at_least(1));
  s->add_option("--api-key", a->api_key, "require 'Authorization: Bearer KEY' on every endpoint but /health")
      ->check(non_empty());
  s->add_option("--max-body", a->max_body, "largest request body in bytes (larger: 413)")
      ->capture_default_str()
      ->check(at_least(64));
  s->add_option("--max-queue", a->max_queue, "requests that may wait for a slot (more: 503)")
      ->capture_default_str()
      ->check(at_least(1));
  s->add_option("--http-threads", a->http_threads, "HTTP worker threads (default: max(32, 4 x --parallel))")
      ->check(CLI::Range(1, 4096));
  s->add_option("--drain-timeout", a->drain_timeout, "seconds in-flight requests may run after SIGINT/SIGTERM")
      ->capture_default_str()
      ->check(at_least(0));
  add_kv_cache_option(s, &a->kv_cache);
  add_matmul_option(s);
  add_threads_option(s);
  add_tp_options(s, &a->dist);
  s->callback([a] { run_serve(*a); });
}

}  // namespace lowbit::cli
