// lowbit eval ppl: perplexity of a model on a text file or a raw token file.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/core/threads.h"
#include "lowbit/eval/perplexity.h"
#include "lowbit/eval/tasks.h"
#include "lowbit/io/file_util.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/quant/matryoshka.h"

namespace lowbit::cli {

namespace {
struct PplArgs {
  bool dequantize = false;
  std::string model, tokenizer, text, tokens, device = "cpu", logits_out;
  int64_t ctx = 512, batch = 1, max_windows = 0;
  bool bos = false, json = false, second_half = false;
  KVCacheType kv_cache = KVCacheType::Auto;
  bool use_cache = false, f32_vocab = false;
  int64_t kv_chunk = 0;
  int slice = 0;  // Matryoshka width (quant/matryoshka.h); 0: the model as stored
  TransformArgs tr;
};

void run_ppl(const PplArgs& a) {
  if (a.slice && a.dequantize) throw_error("--slice: slices the packed int8 codes; it cannot be combined with --dequantize");
  if (a.slice && !is_lowbit_quantized_dir(a.model))
    throw_error("--slice ", a.slice, ": ", a.model, " is not a lowbit quantized checkpoint (a Matryoshka model is written by "
                "qat --method matquant)");
  if (a.text.empty() == a.tokens.empty()) throw_error("eval ppl: give exactly one of --text FILE or --tokens FILE");
  check_kv_cache_device(a.kv_cache, a.device);
  if (!a.logits_out.empty() && (a.use_cache || a.kv_chunk > 0))
    throw_error("--logits-out: writes the logits of the batched forward; it cannot be combined with --kv-cache/--kv-chunk");
  Device dev = parse_device(a.device);
  LoadedModel m = load_model(a.model, dev, a.dequantize, !a.f32_vocab);
  if (a.slice) matryoshka_slice_model(*m.model, a.slice, "--slice");
  apply_rotation(m, a.tr);
  apply_kv_calibration(m, a.tr, a.tokenizer, a.model, a.json);
  apply_quant_transforms(*m.model, a.tr, a.kv_cache);
  compact_for_inference(m, dev);
  const ModelTransforms& tr = m.model->transforms();
  std::vector<int32_t> stream;
  int bos = -1;
  std::unique_ptr<Tokenizer> tok;
  if (!a.tokens.empty()) {
    stream = read_token_file(a.tokens);
    if (a.bos) bos = m.checkpoint.config.bos_id;
  } else {
    tok = open_tokenizer(a.tokenizer, a.model);
    std::ifstream f(a.text, std::ios::binary);
    if (!f) throw_error(a.text, ": cannot open text file");
    std::stringstream ss;
    ss << f.rdbuf();
    auto t0 = std::chrono::steady_clock::now();
    for (int id : tok->encode(ss.str(), false)) stream.push_back(id);
    if (!a.json)
      std::fprintf(stderr, "tokenized %s: %zu tokens in %.2fs\n", a.text.c_str(), stream.size(),
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (a.bos) {
      bos = tok->bos_id();
      if (bos < 0) throw_error("--bos: the tokenizer has no BOS token");
    }
  }
  PerplexityOptions o;
  o.ctx = a.ctx;
  o.batch = a.batch;
  o.bos = bos;
  o.max_windows = a.max_windows;
  o.use_cache = a.use_cache || a.kv_chunk > 0;
  o.kv_cache = a.kv_cache;
  o.cache_chunk = a.kv_chunk;
  o.score_second_half = a.second_half;
  // --logits-out: every position's logits, f32 little-endian [windows, ctx, vocab], written to a
  // temporary file renamed over FILE only when the whole run succeeded.
  std::unique_ptr<io::AtomicFileWriter> logits_file;
  if (!a.logits_out.empty()) {
    logits_file = std::make_unique<io::AtomicFileWriter>(a.logits_out);
    o.on_logits = [&logits_file](int64_t, const Tensor& l) {
      logits_file->write(l.data<float>(), size_t(l.numel()) * sizeof(float));
    };
  }
  PerplexityResult r = evaluate_perplexity(*m.model, stream, o);
  if (logits_file) logits_file->commit();
  // Memory of a cache of one window, per token (packed caches: codes, scales, zero points and the
  // f16 ring of the newest tokens).
  const bool packed = o.use_cache && kv_cache_bits(a.kv_cache) > 0;
  const double kv_bytes_per_token =
      o.use_cache ? double(m.model->make_cache(a.ctx, a.kv_cache).bytes()) / double(a.ctx) : 0.0;
  if (a.json) {
    print_json({{"model", a.model},
                {"data", a.text.empty() ? a.tokens : a.text},
                {"ctx", a.ctx},
                {"bos", a.bos},
                {"score_second_half", a.second_half},
                {"windows", r.windows},
                {"tokens", r.tokens},
                {"nll", r.nll},
                {"ppl", r.ppl},
                {"seconds", r.seconds},
                {"tokens_per_second", r.tokens_per_second},
                {"device", a.device},
                {"kv_cache", o.use_cache ? kv_cache_type_name(a.kv_cache) : "none"},
                {"kv_chunk", o.use_cache ? (a.kv_chunk > 0 ? std::min(a.kv_chunk, a.ctx) : a.ctx) : 0},
                {"rotation", tr.rotation.empty() ? "none" : tr.rotation},
                {"act", act_quant_name(tr.act)},
                {"act_clip", tr.act.clip},
                {"kv_quant", kv_quant_name(tr.kv)},
                {"kv_token_quant", tr.kv_token_bits ? "int" + std::to_string(tr.kv_token_bits) : "none"},
                {"kv_group", packed ? m.model->kv_cache_layout().group : tr.kv.group},
                {"kv_window", packed ? m.model->kv_cache_layout().window : tr.kv.window},
                {"act_clips_mean", tr.act.clips.empty() ? nlohmann::json() : nlohmann::json(mean_of(tr.act.clips))},
                {"kv_cache_bytes_per_token", kv_bytes_per_token},
                {"threads", threads_summary()}});
  } else {
    print_stdout("model      %s\ndata       %s\nwindows    %lld x %lld tokens%s\npredicted  %lld tokens%s\n",
                a.model.c_str(), (a.text.empty() ? a.tokens : a.text).c_str(), (long long)r.windows, (long long)a.ctx,
                a.bos ? " (BOS + ctx-1 tokens each)" : "", (long long)r.tokens,
                a.second_half ? " (second half of each window, as llama-perplexity)" : "");
    print_stdout("mean NLL   %.6f nats/token\nperplexity %.4f\nspeed      %.0f tokens/s (%.2fs)\nthreads    %s\n", r.nll,
                 r.ppl, r.tokens_per_second, r.seconds, threads_summary().c_str());
    if (o.use_cache)
      print_stdout("kv cache   %s, %.0f bytes/token at ctx %lld\n", kv_cache_type_name(m.model->make_cache(0, a.kv_cache).type),
                   kv_bytes_per_token, (long long)a.ctx);
  }
}
struct TaskArgs {
  std::string model, tokenizer, tasks = "arc_easy,arc_challenge,piqa,openbook_qa,winogrande,lambada_openai",
                                  data_dir, device = "cpu", delimiter = " ";
  int64_t limit = 0;
  bool no_bos = false, json = false, dequantize = false;
  TransformArgs tr;
};

void run_tasks(const TaskArgs& a) {
  Device dev = parse_device(a.device);
  // The vocabulary matrices stay as stored (no q8_0 packing at load, unlike eval ppl's default).
  LoadedModel m = load_model(a.model, dev, a.dequantize);
  apply_rotation(m, a.tr);
  apply_kv_calibration(m, a.tr, a.tokenizer, a.model, a.json);
  apply_quant_transforms(*m.model, a.tr);
  compact_for_inference(m, dev);
  const ModelTransforms& tr = m.model->transforms();
  auto tok = open_tokenizer(a.tokenizer, a.model);
  const std::string dir = a.data_dir.empty() ? default_task_dir() : a.data_dir;
  TaskOptions o;
  o.limit = a.limit;
  o.delimiter = a.delimiter;
  o.bos = !a.no_bos;
  nlohmann::json results = nlohmann::json::array();
  std::string name;
  std::stringstream list(a.tasks);
  if (!a.json) print_stdout("%-16s %-16s %7s %8s %9s\n", "task", "kind", "rows", "acc", "acc_norm");
  while (std::getline(list, name, ',')) {
    if (name.empty()) continue;
    const std::string path = name.find('/') != std::string::npos ? name : dir + "/" + name + ".jsonl";
    TaskResult r = evaluate_task(*m.model, *tok, path, o);
    results.push_back({{"task", r.task}, {"kind", r.kind}, {"rows", r.rows}, {"acc", r.acc},
                       {"acc_norm", r.acc_norm >= 0 ? nlohmann::json(r.acc_norm) : nlohmann::json()},
                       {"seconds", r.seconds}});
    if (r.kv_quantized_fraction >= 0) results.back()["kv_quantized_fraction"] = r.kv_quantized_fraction;
    if (!a.json) {
      print_stdout("%-16s %-16s %7lld %8.4f ", r.task.c_str(), r.kind.c_str(), (long long)r.rows, r.acc);
      if (r.acc_norm >= 0) print_stdout("%9.4f\n", r.acc_norm);
      else print_stdout("%9s\n", "-");
    }
  }
  if (a.json)
    print_json({{"model", a.model},
                {"results", results},
                {"rotation", tr.rotation.empty() ? "none" : tr.rotation},
                {"act", act_quant_name(tr.act)},
                {"act_clip", tr.act.clip},
                {"act_clips_mean", tr.act.clips.empty() ? nlohmann::json() : nlohmann::json(mean_of(tr.act.clips))},
                {"kv_quant", kv_quant_name(tr.kv)},
                {"kv_group", tr.kv.group},
                {"kv_window", tr.kv.window}});
}
}  // namespace

void register_eval(CLI::App& app) {
  auto* eval = app.add_subcommand("eval", "Evaluate a model");
  eval->require_subcommand(1);
  auto* ppl = eval->add_subcommand("ppl", "Perplexity over non-overlapping windows of --ctx tokens");
  auto a = std::make_shared<PplArgs>();
  ppl->add_option("-m,--model", a->model, "model: llama2.c .bin, .gguf, .safetensors or a Hugging Face directory")
      ->required();
  ppl->add_option("--tokenizer", a->tokenizer, "tokenizer file or directory (default: the model directory's)");
  ppl->add_option("--text", a->text, "text file to evaluate on (tokenized without special tokens)");
  ppl->add_option("--tokens", a->tokens, "raw little-endian int32 token ids, used exactly as given");
  ppl->add_option("--slice", a->slice, "evaluate the R-bit slice of a Matryoshka checkpoint (int8 codes from qat --method "
                  "matquant): 8, 4, 3 or 2 (the codes' top R bits, quant/matryoshka.h)")
      ->check(CLI::IsMember({2, 3, 4, 8}));
  ppl->add_option("--ctx", a->ctx, "window length in tokens; the first token of each window is context only")
      ->capture_default_str()
      ->check(at_least(2));
  ppl->add_option("--batch", a->batch, "windows per forward pass")->capture_default_str()->check(at_least(1));
  ppl->add_option("--max-windows", a->max_windows, "evaluate at most this many windows (0 = all)")->check(at_least(0));
  ppl->add_flag("--bos", a->bos, "start each window with BOS followed by ctx-1 tokens, all of them scored");
  ppl->add_flag("--score-second-half", a->second_half,
                "score only the second half of each window (tokens ctx/2+1 .. ctx-1), as llama.cpp's llama-perplexity does");
  ppl->add_option("--device", a->device, "cpu or cuda")->capture_default_str();
  ppl->add_flag("--dequantize", a->dequantize,
                "run a quantized model (lowbit directory, GGUF block types) dequantized to f32 (the reference path)");
  ppl->add_flag("--json", a->json, "print one JSON object instead of text");
  ppl->add_option("--logits-out", a->logits_out,
                  "write every position's logits to FILE: raw little-endian f32 [windows, ctx, vocab] (to compare "
                  "with another runtime on the same windows)");
  add_kv_cache_option(ppl, &a->kv_cache,
                      "run each window through the KV cache of this type (auto = f16 on the CPU, f16, q8, int4, int2 "
                      "(KIVI packed; --kv-group, --kv-window), f32) "
                      "instead of the batched forward without a cache (the default; --batch is then ignored)");
  ppl->get_option("--kv-cache")->each([a](const std::string&) { a->use_cache = true; });
  ppl->add_option("--kv-chunk", a->kv_chunk,
                  "with the KV cache: tokens per forward call (1 = token by token, as generation decodes; "
                  "default: the whole window in one call)")
      ->check(at_least(1));
  add_matmul_option(ppl);
  add_transform_options(ppl, &a->tr);
  add_f32_vocab_option(ppl, &a->f32_vocab);
  add_threads_option(ppl);
  ppl->callback([a] { run_ppl(*a); });

  auto* tasks = eval->add_subcommand("tasks", "Zero-shot accuracy on llm-foundry JSONL tasks (ARC, PIQA, WinoGrande, ...)");
  auto t = std::make_shared<TaskArgs>();
  tasks->add_option("-m,--model", t->model, "model (any supported format)")->required();
  tasks->add_option("--tokenizer", t->tokenizer, "tokenizer file or directory (default: the model directory's)");
  tasks->add_option("--tasks", t->tasks, "comma-separated task names (files NAME.jsonl in --data-dir) or paths")
      ->capture_default_str()
      ->check(non_empty());
  tasks->add_option("--data-dir", t->data_dir, "folder of task files (default: $LOWBIT_SHARED/tasks/llm-foundry, else shared/tasks/llm-foundry beside the repository holding the lowbit executable, else ../shared/tasks/llm-foundry)");
  tasks->add_option("--limit", t->limit, "at most this many rows per task (0 = all)")->check(at_least(0));
  tasks->add_option("--delimiter", t->delimiter, "text between a query and each choice")->capture_default_str();
  tasks->add_flag("--no-bos", t->no_bos, "do not prepend the tokens the tokenizer adds for specials (BOS; SmolLM2 adds none)");
  tasks->add_option("--device", t->device, "cpu or cuda")->capture_default_str();
  tasks->add_flag("--json", t->json, "print one JSON object");
  tasks->add_flag("--dequantize", t->dequantize,
                  "run a quantized model (lowbit directory, GGUF block types) dequantized to f32 (the reference path)");
  add_matmul_option(tasks);
  add_transform_options(tasks, &t->tr);
  add_threads_option(tasks);
  tasks->callback([t] { run_tasks(*t); });
}

}  // namespace lowbit::cli
