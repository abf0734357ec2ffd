// lowbit generate: sample text from a model with the KV cache.
#include <cstdio>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/cli/dist.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/quant/matryoshka.h"
#include "lowbit/runtime/generate.h"

namespace lowbit::cli {

namespace {
struct GenArgs {
  std::string model, tokenizer, prompt, chat, system, device = "cpu";
  int steps = 256;
  double temperature = 1.0, top_p = 0.9;
  uint64_t seed = 42;
  bool json = false, ignore_eos = false, f32_vocab = false;
  KVCacheType kv_cache = KVCacheType::Auto;
  int slice = 0;  // Matryoshka width (quant/matryoshka.h); 0: the model as stored
  TransformArgs tr;
  DistArgs dist;  // --tp
};

void run_generate(const GenArgs& a) {
  check_kv_cache_device(a.kv_cache, a.device);
  // --tp N: N ranks, each with its piece of the model; rank 0 samples and prints.
  const std::unique_ptr<comm::Communicator> comm = start_ranks(a.dist, a.device == "cuda", "--tp");
  Device dev = parse_device(a.device);
  if (a.slice && comm->world_size() > 1)
    throw_error("--slice with --tp ", comm->world_size(), ": write the slice first (convert --from ", a.model,
                " --to DIR --slice ", a.slice, ") and run that checkpoint");
  if (a.slice && !is_lowbit_quantized_dir(a.model))
    throw_error("--slice ", a.slice, ": ", a.model, " is not a lowbit quantized checkpoint (a Matryoshka model is written by "
                "qat --method matquant)");
  LoadedModel m = load_model_for_ranks(a.model, dev, *comm, !a.f32_vocab, !a.tr.any_given());
  if (a.slice) matryoshka_slice_model(*m.model, a.slice, "--slice");
  apply_rotation(m, a.tr);
  apply_kv_calibration(m, a.tr, a.tokenizer, a.model, a.json);
  apply_quant_transforms(*m.model, a.tr, a.kv_cache);
  compact_for_inference(m, dev);
  shard_for_tensor_parallel(m, *comm, dev);
  const bool root = comm->rank() == 0;
  auto tok = open_tokenizer(a.tokenizer, a.model);
  if (tok->vocab_size() > m.model->config().vocab_size)
    throw_error("tokenizer has ", tok->vocab_size(), " tokens but the model's vocabulary is ",
                m.model->config().vocab_size, ": they do not belong together");
  GenerateOptions o;
  o.steps = a.steps;
  o.stop_at_eos = !a.ignore_eos;
  o.kv_cache = a.kv_cache;
  o.sampler = SamplerOptions{a.temperature, a.top_p, a.seed};
  std::string prompt = a.prompt;
  if (!a.chat.empty()) {
    if (!a.prompt.empty()) throw_error("--chat and --prompt exclude each other");
    // The template writes BOS itself where the model wants one; special tokens in it are parsed.
    prompt = chat_prompt(a.tokenizer, a.model, *tok, a.chat, a.system);
    o.add_special = false;
  } else if (!a.system.empty()) {
    throw_error("--system needs --chat");
  }
  std::string text;
  GenerateResult r = generate(*m.model, *tok, prompt, o, [&](const std::string& piece) {
    if (!root) return;
    if (a.json) {
      text += piece;
    } else {
      write_stdout(piece);
    }
  });
  if (!root) return;
  if (a.json) {
    print_json({{"prompt", prompt},
                {"text", text},
                {"tokens", r.tokens},
                {"prompt_tokens", r.prompt_tokens},
                {"seconds", r.seconds},
                {"tokens_per_second", r.tokens_per_second},
                {"tp", comm->world_size()}});
  } else {
    write_stdout("\n");
    std::fprintf(stderr, "%d tokens, %.1f tokens/s\n", int(r.tokens.size()) - r.prompt_tokens, r.tokens_per_second);
  }
}
}  // namespace

void register_generate(CLI::App& app) {
  auto* g = app.add_subcommand("generate", "Generate text (greedy with --temperature 0, else temperature + top-p)");
  auto a = std::make_shared<GenArgs>();
  g->add_option("-m,--model", a->model, "model: llama2.c .bin, .gguf, .safetensors or a Hugging Face directory")->required();
  g->add_option("--tokenizer", a->tokenizer, "tokenizer file, directory or GGUF file (default: the model's own)");
  g->add_option("-p,--prompt", a->prompt, "prompt text (the tokenizer's specials are added: BOS for Llama 2, none for SmolLM2)");
  g->add_option("--chat", a->chat,
                "a user message, wrapped in the model's chat template (add_generation_prompt; special tokens parsed)");
  g->add_option("--system", a->system, "with --chat: a system message before the user message");
  g->add_option("--slice", a->slice, "generate with the R-bit slice of a Matryoshka checkpoint (int8 codes from qat "
                "--method matquant): 8, 4, 3 or 2")
      ->check(CLI::IsMember({2, 3, 4, 8}));
  g->add_option("-n,--steps", a->steps, "positions to run, prompt included (like llama2.c -n)")->capture_default_str()->check(at_least(1));
  g->add_option("-t,--temperature", a->temperature, "0 = greedy")->capture_default_str()->check(at_least(0));
  g->add_option("--top-p", a->top_p, "nucleus sampling mass")->capture_default_str()->check(between(0, 1));
  g->add_option("-s,--seed", a->seed, "random seed")->capture_default_str()->check(at_least(0));
  g->add_flag("--ignore-eos", a->ignore_eos, "do not stop at EOS (llama2.c run.c stops only at BOS)");
  g->add_option("--device", a->device, "cpu or cuda")->capture_default_str();
  g->add_flag("--json", a->json, "print one JSON object instead of streaming text");
  add_kv_cache_option(g, &a->kv_cache);
  add_matmul_option(g);
  add_transform_options(g, &a->tr);
  add_f32_vocab_option(g, &a->f32_vocab);
  add_threads_option(g);
  add_tp_options(g, &a->dist);
  g->callback([a] { run_generate(*a); });
}

}  // namespace lowbit::cli
