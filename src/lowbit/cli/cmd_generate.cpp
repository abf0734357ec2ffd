// lowbit generate: sample text from a model with the KV cache.
#include <cstdio>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/runtime/generate.h"

namespace lowbit::cli {

namespace {
struct GenArgs {
  std::string model, tokenizer, prompt, device = "cpu";
  int steps = 256;
  double temperature = 1.0, top_p = 0.9;
  uint64_t seed = 42;
  bool json = false, ignore_eos = false;
};

void run_generate(const GenArgs& a) {
  Device dev = parse_device(a.device);
  LoadedModel m = load_model(a.model, dev);
  compact_for_inference(m, dev);
  auto tok = open_tokenizer(a.tokenizer, a.model);
  if (tok->vocab_size() > m.model->config().vocab_size)
    throw_error("tokenizer has ", tok->vocab_size(), " tokens but the model's vocabulary is ",
                m.model->config().vocab_size, ": they do not belong together");
  GenerateOptions o;
  o.steps = a.steps;
  o.stop_at_eos = !a.ignore_eos;
  o.sampler = SamplerOptions{a.temperature, a.top_p, a.seed};
  std::string text;
  GenerateResult r = generate(*m.model, *tok, a.prompt, o, [&](const std::string& piece) {
    if (a.json) {
      text += piece;
    } else {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
  });
  if (a.json) {
    print_json({{"prompt", a.prompt},
                {"text", text},
                {"tokens", r.tokens},
                {"prompt_tokens", r.prompt_tokens},
                {"seconds", r.seconds},
                {"tokens_per_second", r.tokens_per_second}});
  } else {
    std::printf("\n");
    std::fprintf(stderr, "%d tokens, %.1f tokens/s\n", int(r.tokens.size()) - r.prompt_tokens, r.tokens_per_second);
  }
}
}  // namespace

void register_generate(CLI::App& app) {
  auto* g = app.add_subcommand("generate", "Generate text (greedy with --temperature 0, else temperature + top-p)");
  auto a = std::make_shared<GenArgs>();
  g->add_option("-m,--model", a->model, "model: llama2.c .bin, .gguf, .safetensors or a Hugging Face directory")->required();
  g->add_option("--tokenizer", a->tokenizer, "tokenizer file or directory (default: the model directory's)");
  g->add_option("-p,--prompt", a->prompt, "prompt text (BOS is added)");
  g->add_option("-n,--steps", a->steps, "positions to run, prompt included (like llama2.c -n)")->capture_default_str();
  g->add_option("-t,--temperature", a->temperature, "0 = greedy")->capture_default_str();
  g->add_option("--top-p", a->top_p, "nucleus sampling mass")->capture_default_str();
  g->add_option("-s,--seed", a->seed, "random seed")->capture_default_str();
  g->add_flag("--ignore-eos", a->ignore_eos, "do not stop at EOS (llama2.c run.c stops only at BOS)");
  g->add_option("--device", a->device, "cpu or cuda")->capture_default_str();
  g->add_flag("--json", a->json, "print one JSON object instead of streaming text");
  add_threads_option(g);
  g->callback([a] { run_generate(*a); });
}

}  // namespace lowbit::cli
