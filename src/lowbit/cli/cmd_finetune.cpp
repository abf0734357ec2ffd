// lowbit finetune: LoRA finetuning of a quantized model (packed weights frozen).
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/cli/lp_args.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/train/finetune.h"

namespace lowbit::cli {

namespace fs = std::filesystem;

namespace {
struct FinetuneArgs {
  std::string model, tokenizer, train_text, valid_text, train_tokens, valid_tokens, device = "cpu";
  FinetuneOptions o;
  LowPrecisionArgs lp;  // --precision: the adapters' products
  bool json = false;
};

// "1.2345 (ppl 3.437)" or "n/a" when there was no validation data.
std::string loss_text(double loss) {
  if (loss < 0) return "n/a";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.4f (ppl %.3f)", loss, std::exp(loss));
  return buf;
}

nlohmann::json loss_json(double loss) { return loss < 0 ? nlohmann::json() : nlohmann::json(loss); }

void run_finetune(FinetuneArgs& a) {
  FinetuneOptions& o = a.o;
  if (!a.train_tokens.empty() && !a.train_text.empty()) throw_error("finetune: give --train or --train-tokens, not both");
  if (!a.valid_tokens.empty() && !a.valid_text.empty()) throw_error("finetune: give --valid or --valid-tokens, not both");
  if (a.train_tokens.empty() && a.train_text.empty()) throw_error("finetune: give --train TEXT or --train-tokens FILE");
  if (!is_lowbit_quantized_dir(a.model))
    throw_error(a.model, ": not a lowbit quantized model directory (make one with lowbit quantize)");
  o.train.low_precision = resolve_low_precision(a.lp, a.device, "finetune");  // before probing for a GPU
  o.train.device = parse_device(a.device);
  OutputDir out(o.train.out_dir);
  out.refuse_input(a.model, "the input model");
  std::unique_ptr<Tokenizer> tok;
  if (!a.train_text.empty() || !a.valid_text.empty()) tok = open_tokenizer(a.tokenizer, a.model);
  auto cache = [&](const char* n) { return (fs::path(o.train.out_dir) / n).string(); };
  std::vector<int32_t> train, valid;
  if (!a.train_tokens.empty()) train = read_token_file(a.train_tokens);
  else train = tokenize_file_cached(a.train_text, *tok, a.tokenizer, cache("train.tokens"));
  if (!a.valid_tokens.empty()) valid = read_token_file(a.valid_tokens);
  else if (!a.valid_text.empty()) valid = tokenize_file_cached(a.valid_text, *tok, a.tokenizer, cache("valid.tokens"));
  check_training_inputs(o.train, train, valid);
  out.keep_if_exists((fs::path(o.train.out_dir) / "state.safetensors").string());  // a failed run keeps its resumable state
  FinetuneResult r = finetune_quantized(a.model, o, train, valid);
  out.keep();
  const std::string model_out = (fs::path(o.train.out_dir) / "model").string();
  if (r.train.complete) copy_tokenizer_files(a.tokenizer, a.model, model_out);
  nlohmann::json j = {{"model", a.model},
                      {"out", model_out},
                      {"steps", r.train.steps_done},
                      {"complete", r.train.complete},
                      {"adapters_created", r.adapters_created},
                      {"adapters_reused", r.adapters_reused},
                      {"val_loss_before", loss_json(r.val_loss_before)},
                      {"val_loss_after", loss_json(r.val_loss_after)},
                      {"optimizer_bits", o.train.optimizer_bits},
                      {"optimizer_state_bytes", r.train.optimizer_state_bytes},
                      {"precision", r.precision}};
  if (o.train.low_precision.enabled()) {
    j["lp_gemm"] = o.train.low_precision.recipe.native_gemm ? "native" : "emulated";
    j["val_loss_after_f32"] = loss_json(r.val_loss_after_f32);
  }
  if (a.json) {
    print_json(j);
    return;
  }
  if (valid.empty())
    print_stdout("no validation data (give --valid or --valid-tokens); %lld steps; adapters: %d new, %d reused\n",
                 (long long)r.train.steps_done, r.adapters_created, r.adapters_reused);
  else
    print_stdout("validation loss %s -> %s after %lld steps; adapters: %d new, %d reused\n",
                 loss_text(r.val_loss_before).c_str(), loss_text(r.val_loss_after).c_str(),
                 (long long)r.train.steps_done, r.adapters_created, r.adapters_reused);
  if (o.train.low_precision.enabled())
    print_stdout("precision %s: the saved model (f32 adapter products) %s\n", r.precision.c_str(),
                 loss_text(r.val_loss_after_f32).c_str());
  print_stdout("wrote %s\n", model_out.c_str());
}
}  // namespace

void register_finetune(CLI::App& app) {
  auto* f = app.add_subcommand("finetune", "LoRA finetuning of a quantized model (packed weights frozen; resumable)");
  auto a = std::make_shared<FinetuneArgs>();
  TrainOptions& t = a->o.train;
  t.max_steps = 200;
  t.warmup_steps = 20;
  t.lr = 2e-4;
  t.weight_decay = 0.0;
  t.eval_every = 50;
  f->add_option("-m,--model", a->model, "quantized model directory (from lowbit quantize)")->required();
  f->add_option("--out", t.out_dir, "run directory: state, log.jsonl, model/ (resumes if it holds a state)")->required();
  f->add_option("--tokenizer", a->tokenizer, "tokenizer for --train/--valid text (default: the model directory's)");
  f->add_option("--train", a->train_text, "training text");
  f->add_option("--valid", a->valid_text, "validation text");
  f->add_option("--train-tokens", a->train_tokens, "training data as raw int32 token ids");
  f->add_option("--valid-tokens", a->valid_tokens, "validation data as raw int32 token ids");
  f->add_option("--rank", a->o.lora_rank, "rank of new LoRA adapters")->capture_default_str()->check(at_least(1));
  f->add_option("--batch", t.batch_size, "sequences per micro-batch")->capture_default_str()->check(at_least(1));
  f->add_option("--seq-len", t.seq_len, "tokens per sequence")->capture_default_str()->check(at_least(1));
  f->add_option("--grad-accum", t.grad_accum, "micro-batches per step")->capture_default_str()->check(at_least(1));
  f->add_option("--steps", t.max_steps, "optimizer steps")->capture_default_str()->check(at_least(0));
  f->add_option("--warmup", t.warmup_steps, "linear warmup steps")->capture_default_str()->check(at_least(0));
  f->add_option("--lr", t.lr, "peak learning rate")->capture_default_str()->check(above(0));
  f->add_option("--weight-decay", t.weight_decay, "AdamW weight decay on the adapters")->capture_default_str()->check(at_least(0));
  f->add_option("--grad-clip", t.grad_clip, "max global gradient norm (0 = off)")->capture_default_str()->check(at_least(0));
  f->add_option("--eval-every", t.eval_every, "validate every N steps (0 = only at the end)")->capture_default_str()->check(at_least(0));
  f->add_option("--eval-batches", t.eval_batches, "validation micro-batches")->capture_default_str()->check(at_least(1));
  f->add_option("--checkpoint-every", t.checkpoint_every, "save the resumable state every N steps (0 = only at the end)")->capture_default_str()->check(at_least(0));
  f->add_option("--seed", t.seed, "seed for data order and adapter init")->capture_default_str()->check(at_least(0));
  f->add_option("--device", a->device, "cpu or cuda")->capture_default_str();
  f->add_option("--optimizer-bits", t.optimizer_bits,
                "AdamW state of the adapters: 32 (f32) or 8 (block-wise dynamic 8-bit, as lowbit train's flag: "
                "tensors under 4096 elements keep f32 state; CPU only for now)")
      ->capture_default_str()->check(CLI::IsMember({8, 32}));
  add_low_precision_options(f, &a->lp,
                            "the LoRA adapters' two products x A^T and (x A^T) B^T (the frozen quantized base keeps its own "
                            "product: it is not re-quantized)");
  f->add_flag("--json", a->json, "print a JSON summary");
  add_threads_option(f);
  f->callback([a] {
    a->o.lora_seed = a->o.train.seed;
    run_finetune(*a);
  });
}

}  // namespace lowbit::cli
