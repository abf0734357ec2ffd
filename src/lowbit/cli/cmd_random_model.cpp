// lowbit random-model: a randomly initialised Llama-shaped Hugging Face model (safetensors shards),
// written shard by shard without ever being held (io/hf.h write_random_hf_model), for measuring
// commands on models of any size (a 70B shape from its config.json) without downloading one.
#include <chrono>
#include <fstream>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/io/hf.h"

namespace lowbit::cli {

namespace {
struct RandomModelArgs {
  std::string out, config_json, dtype = "bf16";
  LlamaConfig config;
  double shard_mb = 5000, std = 0.02;
  uint64_t seed = 0;
  bool json = false;
};

void run_random_model(RandomModelArgs a) {
  if (a.dtype != "bf16" && a.dtype != "f16" && a.dtype != "f32")
    throw_error("--dtype must be 'bf16', 'f16' or 'f32', got '", a.dtype, "'");
  LlamaConfig c = a.config;
  if (!a.config_json.empty()) {
    std::ifstream f(a.config_json);
    if (!f) throw_error(a.config_json, ": cannot open");
    nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
    if (j.is_discarded()) throw_error(a.config_json, ": not valid JSON");
    c = config_from_hf_json(j, a.config_json);
  }
  if (c.n_kv_heads == 0) c.n_kv_heads = c.n_heads;
  c.validate(a.config_json.empty() ? std::string("random-model") : a.config_json);
  OutputDir out(a.out, "-o");
  RandomModelOptions o;
  o.dtype = a.dtype == "bf16" ? DType::BF16 : a.dtype == "f16" ? DType::F16 : DType::F32;
  o.max_shard_bytes = uint64_t(a.shard_mb * 1e6);
  o.seed = a.seed;
  o.std = a.std;
  const auto t0 = std::chrono::steady_clock::now();
  const uint64_t bytes = write_random_hf_model(a.out, c, o);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  out.keep();
  if (a.json) {
    print_json({{"out", a.out}, {"bytes", bytes}, {"seconds", s}, {"config", c.summary()}});
    return;
  }
  print_stdout("wrote %s: %s, %.2f GB of %s weights in %.1fs\n", a.out.c_str(), c.summary().c_str(), double(bytes) / 1e9,
               a.dtype.c_str(), s);
}
}  // namespace

void register_random_model(CLI::App& app) {
  auto* r = app.add_subcommand("random-model",
                               "Write a random Llama-shaped Hugging Face model (safetensors, sharded) shard by shard, "
                               "never holding it (to measure commands on large shapes)");
  auto a = std::make_shared<RandomModelArgs>();
  a->config.dim = 288, a->config.hidden_dim = 768, a->config.n_layers = 6, a->config.n_heads = 6;
  a->config.n_kv_heads = 0, a->config.vocab_size = 32000, a->config.max_seq_len = 2048;
  a->config.tied_embeddings = false;  // Llama's separate lm_head
  r->add_option("-o,--out", a->out, "output directory (config.json + model.safetensors or shards + index)")->required();
  r->add_option("--config", a->config_json, "Hugging Face config.json giving the architecture (else the flags below)");
  r->add_option("--dim", a->config.dim, "model width")->capture_default_str()->check(at_least(1));
  r->add_option("--hidden-dim", a->config.hidden_dim, "SwiGLU width")->capture_default_str()->check(at_least(1));
  r->add_option("--layers", a->config.n_layers, "decoder blocks")->capture_default_str()->check(at_least(1));
  r->add_option("--heads", a->config.n_heads, "attention heads")->capture_default_str()->check(at_least(1));
  r->add_option("--kv-heads", a->config.n_kv_heads, "key/value heads (default: --heads)")->check(at_least(0));
  r->add_option("--vocab", a->config.vocab_size, "vocabulary size")->capture_default_str()->check(at_least(1));
  r->add_option("--max-seq-len", a->config.max_seq_len, "maximum sequence length")->capture_default_str()->check(at_least(1));
  r->add_flag("--tied", a->config.tied_embeddings, "output head tied to the embeddings (no lm_head)");
  r->add_option("--dtype", a->dtype, "stored dtype: bf16, f16 or f32")->capture_default_str();
  r->add_option("--shard-mb", a->shard_mb, "largest shard in MB (10^6 bytes), as Hugging Face's max_shard_size")
      ->capture_default_str()
      ->check(above(0));
  r->add_option("--std", a->std, "standard deviation of the (uniform) matrix entries; norms are 1")
      ->capture_default_str()
      ->check(above(0));
  r->add_option("--seed", a->seed, "seed of the values")->capture_default_str()->check(at_least(0));
  r->add_flag("--json", a->json, "print the result as JSON");
  r->callback([a] { run_random_model(*a); });
}

}  // namespace lowbit::cli
