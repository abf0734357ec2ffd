#include "lowbit/eval/tasks.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "lowbit/core/progress.h"

namespace lowbit {

namespace {

struct Scored {
  double logprob = 0;
  bool greedy = true;  // every continuation token was the argmax
  double kv_quantized = 0;  // sum over the scored positions of the fraction of quantized keys/values read
  int64_t positions = 0;
};

// One (context, continuation) pair made ready for the model: the token window and the index in it
// of the first continuation token.
struct Request {
  std::vector<int32_t> window;
  size_t first = 0;
};

Request make_request(const LlamaModel& model, const Tokenizer& tok, const std::string& context,
                     const std::string& continuation, bool bos) {
  std::vector<int> whole = tok.encode(context + continuation, false);
  const std::vector<int> ctx = tok.encode(context, false);
  // The continuation's tokens: what the whole encoding has past the context's encoding. When a
  // merge crosses the boundary the shared prefix is shorter; score from where they differ.
  size_t split = 0;
  while (split < ctx.size() && split < whole.size() && ctx[split] == whole[split]) ++split;
  if (whole.empty()) throw_error("task scoring: context and continuation are both empty");
  if (split == whole.size()) split = whole.size() - 1;  // empty continuation: score the last token
  // With `bos`, the sequence starts with whatever the tokenizer itself prepends for special tokens
  // (BOS for Llama 2 and llama2.c models, nothing for SmolLM2, whose GGUF says add_bos_token false).
  std::vector<int32_t> ids;
  if (bos)
    for (int id : tok.encode("", true)) ids.push_back(id);
  const size_t offset = ids.size();
  ids.insert(ids.end(), whole.begin(), whole.end());
  // Keep the most recent tokens when the sequence is longer than the model's context.
  const size_t max_len = size_t(model.config().max_seq_len);
  size_t drop = ids.size() > max_len ? ids.size() - max_len : 0;
  const size_t first = offset + split;  // index (in ids) of the first continuation token
  if (first < drop + 1) drop = first - 1;  // keep at least one context token before it
  Request r;
  r.window.assign(ids.begin() + int64_t(drop), ids.end());
  r.first = first - drop;
  if (r.window.size() < 2) throw_error("task scoring: nothing to condition on");
  for (int32_t id : r.window)
    if (id < 0 || id >= model.config().vocab_size)
      throw_error("task scoring: token ", id, " is outside the model's vocabulary (tokenizer and model mismatch)");
  return r;
}

// Scores every request in one forward pass: the windows are right-padded to the longest one
// (causal attention: padding after a position never changes its logits) and run as one batch.
std::vector<Scored> score_batch(const LlamaModel& model, const std::vector<Request>& reqs) {
  size_t T = 0;
  for (const Request& r : reqs) T = std::max(T, r.window.size());
  const int64_t B = int64_t(reqs.size());
  std::vector<int32_t> tokens(size_t(B) * T, 0);
  for (size_t b = 0; b < reqs.size(); ++b) std::copy(reqs[b].window.begin(), reqs[b].window.end(), tokens.begin() + int64_t(b * T));
  NoGradGuard ng;
  Var x = model.embed(Tensor::from_vector(tokens, {B, int64_t(T)}));
  for (int i = 0; i < model.n_layers(); ++i) x = model.block_forward(i, x, B, int64_t(T));
  std::vector<Scored> out(reqs.size());
  for (size_t b = 0; b < reqs.size(); ++b) {
    const Request& r = reqs[b];
    Scored& s = out[b];
    // Only the positions that predict continuation tokens go through the output head (the
    // vocabulary projection dominates the cost for short windows and large vocabularies).
    const int64_t lo = int64_t(b * T + r.first) - 1, hi = int64_t(b * T + r.window.size()) - 1;
    Tensor logits = model.head(Var(x.value().slice(0, lo, hi).contiguous())).value().to(Device::CPU).contiguous();
    const int64_t V = logits.size(1);
    const float* z = logits.data<float>();
    for (size_t t = r.first; t < r.window.size(); ++t) {
      const float* row = z + int64_t(t - r.first) * V;  // position t-1 predicts token t
      double mx = -std::numeric_limits<double>::infinity();
      int64_t arg = 0;
      for (int64_t v = 0; v < V; ++v)
        if (row[v] > mx) {
          mx = row[v];
          arg = v;
        }
      double sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - mx);
      s.logprob += double(row[r.window[t]]) - mx - std::log(sum);
      s.greedy = s.greedy && arg == r.window[t];
      const int64_t p = int64_t(t) - 1;  // the query's position
      s.kv_quantized += double(model.transforms().kv.quantized_len(p)) / double(p + 1);
      ++s.positions;
    }
  }
  return out;
}

}  // namespace

TaskResult evaluate_task(const LlamaModel& model, const Tokenizer& tok, const std::string& path, const TaskOptions& o) {
  std::ifstream in(path);
  if (!in) throw_error(path, ": cannot open task file");
  std::vector<nlohmann::json> rows;
  int line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) throw_error(path, ":", line_no, ": not a JSON object");
    rows.push_back(std::move(j));
    if (o.limit > 0 && int64_t(rows.size()) >= o.limit) break;
  }
  if (rows.empty()) throw_error(path, ": no rows");
  TaskResult r;
  r.task = std::filesystem::path(path).stem().string();
  const nlohmann::json& first = rows.front();
  if (first.contains("context_options")) r.kind = "winogrande";
  else if (first.contains("choices")) r.kind = "multiple_choice";
  else if (first.contains("context") && first.contains("continuation")) r.kind = "lambada";
  else throw_error(path, ": unknown task schema (expected query/choices/gold, context_options/continuation/gold or context/continuation)");
  auto t0 = std::chrono::steady_clock::now();
  int64_t correct = 0, correct_norm = 0;
  double kv_quantized = 0;
  int64_t positions = 0;
  auto tally = [&](const std::vector<Scored>& v) {
    for (const Scored& s : v) kv_quantized += s.kv_quantized, positions += s.positions;
  };
  ProgressBar bar(r.task, int64_t(rows.size()), "rows");
  for (size_t i = 0; i < rows.size(); ++i) {
    const nlohmann::json& j = rows[i];
    auto field = [&](const char* k) -> const nlohmann::json& {
      if (!j.contains(k)) throw_error(path, ": row ", i + 1, " has no '", k, "'");
      return j[k];
    };
    try {
      if (r.kind == "lambada") {
        const Request req = make_request(model, tok, field("context").get<std::string>(),
                                         " " + field("continuation").get<std::string>(), o.bos);
        const std::vector<Scored> scored = score_batch(model, {req});
        tally(scored);
        correct += scored[0].greedy;
      } else {
        const int gold = field("gold").get<int>();
        std::vector<std::pair<std::string, std::string>> pairs;  // (context, continuation)
        if (r.kind == "winogrande") {
          for (const auto& c : field("context_options")) pairs.emplace_back(c.get<std::string>(), " " + field("continuation").get<std::string>());
        } else {
          for (const auto& c : field("choices")) pairs.emplace_back(field("query").get<std::string>(), o.delimiter + c.get<std::string>());
        }
        if (gold < 0 || gold >= int(pairs.size())) throw_error(path, ": row ", i + 1, ": gold ", gold, " out of range");
        std::vector<Request> reqs;
        for (const auto& [context, continuation] : pairs) reqs.push_back(make_request(model, tok, context, continuation, o.bos));
        const std::vector<Scored> scored = score_batch(model, reqs);  // every choice in one forward pass
        tally(scored);
        int best = 0, best_norm = 0;
        double bs = -1e300, bn = -1e300;
        for (size_t c = 0; c < pairs.size(); ++c) {
          const double lp = scored[c].logprob;
          const double ln = lp / double(std::max<size_t>(1, pairs[c].second.size()));
          if (lp > bs) bs = lp, best = int(c);
          if (ln > bn) bn = ln, best_norm = int(c);
        }
        correct += best == gold;
        correct_norm += best_norm == gold;
      }
    } catch (const nlohmann::json::exception& e) {
      throw_error(path, ": row ", i + 1, ": ", e.what());
    }
    bar.update(int64_t(i + 1));
  }
  bar.finish();
  r.rows = int64_t(rows.size());
  r.acc = double(correct) / double(r.rows);
  if (r.kind != "lambada" && r.kind != "winogrande") r.acc_norm = double(correct_norm) / double(r.rows);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (model.transforms().kv.enabled()) r.kv_quantized_fraction = positions ? kv_quantized / double(positions) : 0.0;
  return r;
}

}  // namespace lowbit
