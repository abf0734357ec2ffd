// lowbit train: pretrain a Llama-architecture model from scratch on a text corpus.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/cli/dist.h"
#include "lowbit/cli/lp_args.h"
#include "lowbit/io/hf.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/ops/ternary.h"
#include "lowbit/train/trainer.h"

namespace lowbit::cli {

namespace fs = std::filesystem;

namespace {
struct TrainArgs {
  std::string tokenizer, train_text, valid_text, train_tokens, valid_tokens, config_json, device = "cpu";
  std::string arch = "llama", ternary_scale = "mean", schedule = "cosine", hadamard = "on", act_quant = "absmax";
  LowPrecisionArgs lp;
  TrainOptions o;
  DistArgs dist;  // --gpus N / launcher environment: data-parallel training (issue 20)
  bool json = false, tf32 = false, bf16 = false;
};

void run_train(TrainArgs& a) {
  TrainOptions& o = a.o;
  if (a.bf16) {
#ifndef LOWBIT_WITH_CUDA
    throw_error("train: --bf16 needs the CUDA backend, and this build has none: bf16 activations and matmuls have no "
                "CPU kernels (train in f32 on the CPU, or rebuild with -DLOWBIT_CUDA=ON and use --device cuda)");
#endif
    if (a.device != "cuda" && a.device != "gpu")
      throw_error("train: --bf16 needs --device cuda: bf16 activations and matmuls have no CPU kernels");
  }
  o.bf16 = a.bf16;
  set_train_arch(o.bitnet, parse_train_arch(a.arch));
  o.bitnet.hadamard = a.hadamard == "on";
  o.bitnet.act_scale = ops::parse_act_scale(a.act_quant);
  o.bitnet.scale = ops::parse_ternary_scale(a.ternary_scale);
  o.bitnet.two_stage = parse_train_schedule(a.schedule);
  o.low_precision = resolve_low_precision(a.lp, a.device, "train");
  check_bitnet_options(o.bitnet, o.max_steps);
  if (o.bitnet.enabled && a.bf16)
    throw_error("train: --arch ", a.arch, " trains in f32 (no --bf16): BitLinear's quantizers",
                o.bitnet.v2 ? " and H-BitLinear's Hadamard transform and activation quantizer" : "",
                " take f32 (or f64) operands on either device");
  if (!a.train_tokens.empty() && !a.train_text.empty()) throw_error("train: give --train or --train-tokens, not both");
  if (!a.valid_tokens.empty() && !a.valid_text.empty()) throw_error("train: give --valid or --valid-tokens, not both");
  // Data parallel: every rank builds the same model and data; each step's windows are split over
  // the ranks and the gradients all-reduced (trainer.h); rank 0 writes.
  const std::unique_ptr<comm::Communicator> world = start_ranks(a.dist, a.device != "cpu");
  const bool writer = world->rank() == 0;
  o.comm = world.get();
  if (world->world_size() > 1 && a.bf16)
    throw_error("train: --bf16 with several ranks is not supported yet (the bf16 copies' gradients are collected per "
                "rank); train in f32");
  o.device = parse_device(a.device);
  std::optional<OutputDir> out;
  if (writer) out.emplace(o.out_dir);
  if (!a.config_json.empty()) {
    std::ifstream f(a.config_json);
    if (!f) throw_error(a.config_json, ": cannot open");
    nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
    if (j.is_discarded()) throw_error(a.config_json, ": not valid JSON");
    o.config = config_from_hf_json(j, a.config_json);
  }
  std::unique_ptr<Tokenizer> tok;
  if (!a.tokenizer.empty()) tok = open_tokenizer_file(a.tokenizer);
  if (o.config.vocab_size == 0) {
    if (!tok) throw_error("train: give --vocab or --tokenizer (the vocabulary size comes from it)");
    o.config.vocab_size = tok->vocab_size();
  }
  if (o.config.n_kv_heads == 0) o.config.n_kv_heads = o.config.n_heads;
  if (o.config.max_seq_len < o.seq_len) o.config.max_seq_len = int(o.seq_len);
  std::vector<int32_t> train, valid;
  // Rank 0 tokenizes (and writes the caches) first; the other ranks then read its caches.
  if (!writer) world->barrier();
  auto cache = [&](const char* n) { return (fs::path(o.out_dir) / n).string(); };
  if (!a.train_tokens.empty()) train = read_token_file(a.train_tokens);
  else if (!a.train_text.empty()) {
    if (!tok) throw_error("train: --train TEXT needs --tokenizer");
    train = tokenize_file_cached(a.train_text, *tok, a.tokenizer, cache("train.tokens"));
  } else {
    throw_error("train: give --train TEXT (with --tokenizer) or --train-tokens FILE");
  }
  if (!a.valid_tokens.empty()) valid = read_token_file(a.valid_tokens);
  else if (!a.valid_text.empty()) {
    if (!tok) throw_error("train: --valid TEXT needs --tokenizer");
    valid = tokenize_file_cached(a.valid_text, *tok, a.tokenizer, cache("valid.tokens"));
  }
  if (writer) world->barrier();
  check_training_inputs(o, train, valid);
  o.config.validate("model architecture");
  if (a.tf32) {
    if (o.device != Device::CUDA) throw_error("train: --tf32 needs --device cuda");
    cuda_set_allow_tf32(true);
  }
  if (!a.json && writer)
    std::fprintf(stderr, "model: %s\ntrain: %zu tokens, valid: %zu tokens\n", o.config.summary().c_str(), train.size(), valid.size());
  if (!a.json && writer && world->world_size() > 1)
    std::fprintf(stderr, "data-parallel training: %d ranks (%s backend), each micro-batch of %lld windows split over them\n",
                 world->world_size(), world->backend().c_str(), (long long)o.batch_size);
  if (writer) out->keep_if_exists((fs::path(o.out_dir) / "state.safetensors").string());  // a failed run keeps its resumable state
  TrainResult r = train_model(o, train, valid, [&](const TrainRecord& rec) {
    if (rec.val_loss >= 0 && !a.json && writer)
      std::fprintf(stderr, "\nstep %lld  loss %.4f  val_loss %.4f  lr %.2e  %.0f tok/s\n", (long long)rec.step, rec.loss,
                   rec.val_loss, rec.lr, rec.tokens_per_second);
  });
  if (!writer) return;
  out->keep();
  const double run_tokens = double(r.records.size()) * double(o.batch_size * o.seq_len * o.grad_accum);
  const double tok_s = r.train_seconds > 0 ? run_tokens / r.train_seconds : 0;
  if (r.complete && !a.tokenizer.empty()) copy_tokenizer_files(a.tokenizer, "", (fs::path(o.out_dir) / "hf").string());
  const nlohmann::json val_loss = r.final_val_loss < 0 ? nlohmann::json() : nlohmann::json(r.final_val_loss);
  nlohmann::json j = {{"out", o.out_dir}, {"steps", r.steps_done}, {"resumed", r.resumed}, {"final_val_loss", val_loss},
                        {"train_seconds", r.train_seconds}, {"tokens_per_second", tok_s}, {"device", a.device},
                        {"tf32", a.tf32}, {"bf16", a.bf16}, {"optimizer_bits", o.optimizer_bits},
                        {"optimizer_state_bytes", r.optimizer_state_bytes},
                        {"optimizer_params_8bit", r.optimizer_params_8bit},
                        {"ranks", world->world_size()}, {"comm_backend", world->backend()}};
  if (o.device == Device::CUDA) j["gpu"] = cuda_device_name();
  if (!o.dump_order.empty()) j["data_order"] = o.dump_order;
  j["precision"] = a.lp.precision;
  if (o.low_precision.enabled()) {
    j["precision_settings"] = low_precision_key(o.low_precision, o.config.n_layers);
    j["lp_gemm"] = o.low_precision.recipe.native_gemm ? "native" : "emulated";
    j["final_val_loss_f32"] = r.final_val_loss_f32 < 0 ? nlohmann::json() : nlohmann::json(r.final_val_loss_f32);
  }
  j["arch"] = a.arch;
  j["schedule"] = a.schedule;
  if (o.bitnet.enabled) {
    j["ternary_scale"] = a.ternary_scale;
    j["transition_at"] = o.bitnet.transition_at;
    j["transition_step"] = bitnet_transition_step(o.bitnet, o.max_steps);
    j["phase_in_steps"] = o.bitnet.phase_in_steps;
    if (o.bitnet.v2) {
      j["act_bits"] = o.bitnet.act_bits;
      j["act4_at"] = o.bitnet.act4_at;
      j["act4_step"] = bitnet_act4_step(o.bitnet, o.max_steps);
      j["hadamard"] = o.bitnet.hadamard;
      j["act_quant"] = a.act_quant;
    }
    if (r.complete) j["ternary_checkpoint"] = (fs::path(o.out_dir) / "ternary").string();
  }
  if (!r.records.empty()) j["final_train_loss"] = r.records.back().loss;
  if (a.json) {
    print_json(j);
    return;
  }
  char val[64] = "no validation data";
  if (r.final_val_loss >= 0) std::snprintf(val, sizeof val, "final val loss %.4f", r.final_val_loss);
  print_stdout("trained %lld steps; %s; %.0f tokens/s over %.1fs of steps; model in %s/model.bin and %s/hf\n",
               (long long)r.steps_done, val, tok_s, r.train_seconds, o.out_dir.c_str(), o.out_dir.c_str());
  print_stdout("optimizer state: %lld bytes (--optimizer-bits %d, %lld tensors with 8-bit state)\n",
               (long long)r.optimizer_state_bytes, o.optimizer_bits, (long long)r.optimizer_params_8bit);
  if (o.bitnet.enabled && r.complete && !a.tokenizer.empty())
    copy_tokenizer_files(a.tokenizer, "", (fs::path(o.out_dir) / "ternary").string());
  if (o.bitnet.enabled && r.complete)
    print_stdout("ternary (%s) checkpoint in %s/ternary\n", bitnet_arch_name(o.bitnet), o.out_dir.c_str());
  if (o.bitnet.v2 && r.complete)
    print_stdout("bitnet-v2: %s/ternary holds the online Hadamard transforms and A%d (%s) activations; model.bin and "
                 "hf/ hold the weights without them (not the trained function)\n",
                 o.out_dir.c_str(), o.bitnet.act_bits, a.act_quant.c_str());
}
}  // namespace

void register_train(CLI::App& app) {
  auto* t = app.add_subcommand("train", "Pretrain a Llama-architecture model from scratch (resumable)");
  auto a = std::make_shared<TrainArgs>();
  TrainOptions& o = a->o;
  t->add_option("--out", o.out_dir, "run directory: state, log.jsonl, model.bin, hf/ (resumes if it holds a state)")->required();
  t->add_option("--tokenizer", a->tokenizer, "tokenizer for --train/--valid text");
  t->add_option("--train", a->train_text, "training text file");
  t->add_option("--valid", a->valid_text, "validation text file");
  t->add_option("--train-tokens", a->train_tokens, "training data as raw int32 token ids");
  t->add_option("--valid-tokens", a->valid_tokens, "validation data as raw int32 token ids");
  t->add_option("--config", a->config_json, "Hugging Face style config.json for the architecture (else the flags below)");
  t->add_option("--dim", o.config.dim, "model width")->default_val(288)->check(at_least(1));
  t->add_option("--hidden-dim", o.config.hidden_dim, "SwiGLU width")->default_val(768)->check(at_least(1));
  t->add_option("--layers", o.config.n_layers, "decoder blocks")->default_val(6)->check(at_least(1));
  t->add_option("--heads", o.config.n_heads, "attention heads")->default_val(6)->check(at_least(1));
  t->add_option("--kv-heads", o.config.n_kv_heads, "key/value heads (default: --heads)")->default_val(0)->check(at_least(0));
  t->add_option("--vocab", o.config.vocab_size, "vocabulary size (default: the tokenizer's)")->default_val(0)->check(at_least(0));
  t->add_option("--max-seq-len", o.config.max_seq_len, "maximum sequence length of the model")->default_val(256)->check(at_least(1));
  t->add_option("--batch", o.batch_size, "sequences per micro-batch")->capture_default_str()->check(at_least(1));
  t->add_option("--seq-len", o.seq_len, "tokens per training sequence")->capture_default_str()->check(at_least(1));
  t->add_option("--grad-accum", o.grad_accum, "micro-batches per step")->capture_default_str()->check(at_least(1));
  t->add_option("--steps", o.max_steps, "optimizer steps")->capture_default_str()->check(at_least(0));
  t->add_option("--warmup", o.warmup_steps, "linear warmup steps")->capture_default_str()->check(at_least(0));
  t->add_option("--lr", o.lr, "peak learning rate")->capture_default_str()->check(above(0));
  t->add_option("--min-lr-ratio", o.min_lr_ratio, "final lr as a fraction of --lr (cosine)")->capture_default_str()->check(between(0, 1));
  t->add_option("--weight-decay", o.weight_decay, "AdamW weight decay (matrices only)")->capture_default_str()->check(at_least(0));
  t->add_option("--beta2", o.beta2, "AdamW beta2")->capture_default_str()->check(between(0, 1));
  t->add_option("--grad-clip", o.grad_clip, "max global gradient norm (0 = off)")->capture_default_str()->check(at_least(0));
  t->add_option("--eval-every", o.eval_every, "validate every N steps (0 = only at the end)")->capture_default_str()->check(at_least(0));
  t->add_option("--eval-batches", o.eval_batches, "validation micro-batches")->capture_default_str()->check(at_least(1));
  t->add_option("--checkpoint-every", o.checkpoint_every, "save the resumable state every N steps (0 = only at the end)")->capture_default_str()->check(at_least(0));
  t->add_option("--seed", o.seed, "seed for initialisation and data order")->capture_default_str()->check(at_least(0));
  t->add_option("--device", a->device, "cpu or cuda")->capture_default_str();
  t->add_flag("--tf32", a->tf32, "let f32 GEMMs and attention on the GPU use TF32 tensor cores (faster, ~1e-3 relative error)");
  t->add_flag("--bf16", a->bf16,
              "mixed precision on the GPU: bf16 activations and matmuls (fp32 accumulation), fp32 master weights, "
              "gradients for the update and AdamW state, fp32 loss");
  t->add_option("--optimizer-bits", o.optimizer_bits,
                "AdamW state: 32 (f32 moments) or 8 (block-wise dynamic 8-bit moments, Dettmers et al. 2022: codes plus "
                "an f32 absmax per 2048 elements, about a quarter of the bytes). With 8, tensors under 4096 elements "
                "(norms) and the token embedding keep f32 state, as bitsandbytes' min_8bit_size and the paper's "
                "stable-embedding advice; CPU only for now")
      ->capture_default_str()->check(CLI::IsMember({8, 32}));
  t->add_option("--dump-order", o.dump_order,
                "write the run's data order (int64 window starts of every step and micro-batch, then the validation "
                "windows) to FILE, for reference implementations (bench/torch_train_ref.py)");
  t->add_option("--arch", a->arch,
                "llama, bitnet-b1.58: every block linear a BitLinear (ternary absmean weights, int8 per-token "
                "activations, straight-through gradients; CPU), or bitnet-v2: the same with H-BitLinear o_proj and "
                "down_proj (online Hadamard transform of the input) and --act-bits per-token activations at every block "
                "linear (BitNet v2, W1.58A4); both also save OUT/ternary, a packed ternary checkpoint")
      ->capture_default_str();
  t->add_option("--ternary-scale", a->ternary_scale, "bitnet-b1.58 weight scale: mean (b1.58) or median (Reloaded) of |W|")
      ->capture_default_str();
  t->add_option("--act-bits", o.bitnet.act_bits,
                "bitnet-v2: activation bits of the block linears at the end of training (4 or 8; per token, symmetric "
                "absmax)")
      ->capture_default_str();
  t->add_option("--act4-at", o.bitnet.act4_at,
                "bitnet-v2 with --act-bits 4: train with 8-bit activations for this fraction of the steps, then "
                "continue with 4-bit (the paper's A8 -> A4 recipe), keeping the latent weights and the optimizer state")
      ->capture_default_str()->check(between(0, 1));
  t->add_option("--act-quant", a->act_quant,
                "bitnet-v2 with --act-bits 4: the 4-bit activation quantizer, absmax (s = max|x| / 7 per token) or "
                "absmean (the BitNet a4.8 / v2 papers' INT4 quantizer: s = mean|x| / sqrt(7), codes in [-8, 7]); the "
                "8-bit phase of --act4-at stays absmax")
      ->capture_default_str();
  t->add_option("--hadamard", a->hadamard,
                "bitnet-v2: on (H-BitLinear o_proj/down_proj), or off — an ablation: the same activation bits "
                "without the online Hadamard transforms")
      ->capture_default_str()->check(CLI::IsMember({"on", "off"}));
  t->add_option("--transition-at", o.bitnet.transition_at,
                "bitnet-b1.58: train unquantized (f32: the papers' 16-bit phase) for this fraction of the steps, then "
                "switch to 1.58 bit keeping the latent weights and the optimizer state")
      ->capture_default_str()->check(between(0, 1));
  t->add_option("--phase-in-steps", o.bitnet.phase_in_steps,
                "bitnet-b1.58: blend the quantizers in linearly over N steps after the transition (0 = at once)")
      ->capture_default_str()->check(at_least(0));
  t->add_option("--schedule", a->schedule,
                "cosine (warmup + cosine), or bitnet-two-stage (BitNet: the lr halves at mid-run and decays again, "
                "weight decay 0 in the second half)")
      ->capture_default_str();
  add_low_precision_options(t, &a->lp, "the block linears");
  t->add_flag("--json", a->json, "print a JSON summary");
  add_dist_options(t, &a->dist);
  t->add_option("--stop-after", o.stop_after, "testing aid: stop after this many steps of this run (state kept)")
      ->check(at_least(0));
  t->add_flag("--zero", o.zero,
              "with several ranks: shard the AdamW state over them (ZeRO: gradients reduce-scattered, parameters "
              "all-gathered; f32 state; the state file is the unsharded one)");
  add_threads_option(t);
  t->callback([a] { run_train(*a); });
}

}  // namespace lowbit::cli
