// lowbit qat: quantization-aware training (train/qat.h) of a full-precision model into a lowbit
// quantized checkpoint; resumable.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/cli/dist.h"
#include "lowbit/cli/lp_args.h"
#include "lowbit/core/threads.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/methods/pipeline.h"
#include "lowbit/quant/matryoshka.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/train/llm_qat.h"
#include "lowbit/train/qat.h"

namespace lowbit::cli {

namespace fs = std::filesystem;

namespace {

struct QatArgs {
  std::string model, method, format = "int2g64", train_text, train_tokens, tokenizer, out, state_dir, device = "cpu",
                             init, gen_tokens, grad_checkpointing, widths, width_weights;
  int64_t self_generate = 0, gen_length = 0, gen_top_k = 50;
  bool self_generate_given = false, gen_top_k_given = false;
  QatConfig c;
  LowPrecisionArgs lp;  // --precision (lsq, paretoq)
  bool json = false, tf32 = false;
  DistArgs dist;  // --gpus N / launcher environment: data-parallel training (issue 20)
};

nlohmann::json stage_json(const QatStage& s) {
  auto num = [](double v) { return v < 0 ? nlohmann::json() : nlohmann::json(v); };
  return {{"stage", s.name},         {"steps", s.steps},
          {"tokens", s.tokens},      {"loss_before", num(s.loss_before)},
          {"loss_after", num(s.loss_after)}, {"seconds", s.seconds},
          {"resumed_from", s.resumed_from}, {"hyper", s.hyper},
          {"optimizer_state_bytes", s.optimizer_state_bytes}};
}

void run_qat(QatArgs& a) {
  find_qat_method(a.method);  // an unknown name fails before anything is loaded
  const QuantFormat& f = parse_quant_format(a.format);
  a.c.format = &f;
  if (!a.init.empty()) {
    a.c.init = parse_lsq_init(a.init);
    a.c.init_set = true;
  }
  if (!a.train_text.empty() && !a.train_tokens.empty()) throw_error("qat: give --train TEXT or --train-tokens FILE, not both");
  const bool given_data = !a.train_text.empty() || !a.train_tokens.empty();
  if (a.self_generate_given && given_data)
    throw_error("qat: --self-generate makes the training data; give it or --train / --train-tokens, not both");
  if (a.self_generate_given && a.self_generate < 1)
    throw_error("qat: --self-generate ", a.self_generate, ": the number of sequences to generate must be >= 1");
  // llm-qat is data-free by default: without training data it generates its own.
  if (!given_data && !a.self_generate_given && a.method == "llm-qat") a.self_generate = 256;
  const bool generate = a.self_generate > 0 && !given_data;
  if (!generate && (!a.gen_tokens.empty() || a.gen_length > 0 || a.gen_top_k_given))
    throw_error(!a.gen_tokens.empty() ? "--gen-tokens" : a.gen_length > 0 ? "--gen-length" : "--gen-top-k",
                " applies to self-generated data (--self-generate N)");
  if (!generate && !given_data) throw_error("qat: give --train TEXT (with a tokenizer), --train-tokens FILE or --self-generate N");
  if (a.method == "llm-qat" || a.method == "onebit") a.c.distill = true;  // their loss is the distillation KL
  if (a.c.lm_weight > 0 && !a.c.distill) throw_error("--lm-weight adds the LM loss to --distill's KL; it needs --distill");
  if ((a.tf32 || a.c.bf16) && a.device == "cpu")
    throw_error(a.tf32 ? "--tf32" : "--bf16", " needs --device cuda (it selects GPU tensor-core precision)");
  // Methods whose layers have CPU bodies only (the registry says why), before probing for a GPU.
  if (const QatMethodInfo& info = find_qat_method(a.method); a.device != "cpu" && !info.cpu_only.empty())
    throw_error("qat --method ", a.method, ": --device ", a.device, " is not supported: ", info.cpu_only,
                " (use --device cpu)");
  if (a.method != "matquant" && (!a.widths.empty() || !a.width_weights.empty()))
    throw_error(!a.widths.empty() ? "--widths" : "--width-weights", ": only qat --method matquant trains Matryoshka widths");
  if (a.method == "matquant") {
    a.c.widths = parse_matryoshka_widths(a.widths.empty() ? "8,4,2" : a.widths, "--widths");
    a.c.width_weights = parse_width_weights(a.width_weights, a.c.widths.size(), "--width-weights");
  }
  if (!a.grad_checkpointing.empty()) a.c.grad_checkpoint = a.grad_checkpointing == "on";
  a.c.low_precision = resolve_low_precision(a.lp, a.device, "qat");
  if (a.c.low_precision.enabled() && a.c.bf16)
    throw_error("qat: --precision ", a.lp.precision, " is not combined with --bf16 (the low-precision products read f32 "
                "operands; --precision bf16 rounds them to bf16)");
  const Device dev = parse_device(a.device);  // lsq, efficientqat, paretoq and l4q train where the model is loaded
  if (a.tf32) cuda_set_allow_tf32(true);
  if (is_lowbit_quantized_dir(a.model))
    throw_error(a.model, ": is already a lowbit quantized model; QAT starts from the full-precision model");
  std::error_code ec;
  if (fs::exists(a.out) && fs::exists(a.model) && fs::equivalent(a.out, a.model, ec))
    throw_error("--out ", a.out, " is the input model; choose another directory");
  // The method's own checks (format support) before anything is loaded.
  make_qat_method(a.method, a.c);
  // Data parallel (--gpus N / a launcher): every rank loads the model and the data; each end-to-end
  // step's windows (and efficientqat's Block-AP calibration windows) are split over the ranks and
  // the gradients all-reduced (train/qat.h); rank 0 writes. No resumable state then.
  const std::unique_ptr<comm::Communicator> world = start_ranks(a.dist, a.device != "cpu");
  const bool writer = world->rank() == 0;
  if (world->world_size() > 1) {
    const std::string n = std::to_string(world->world_size());
    if (!a.state_dir.empty() || a.c.stop_after_steps > 0 || a.c.stop_after_blocks > 0)
      throw_error(!a.state_dir.empty() ? "--state-dir" : a.c.stop_after_steps > 0 ? "--stop-after" : "--stop-after-blocks",
                  ": a data-parallel qat run (", n, " ranks) keeps no resumable state; run it with one rank");
    if (generate)
      throw_error("--self-generate with ", n, " ranks: every rank would generate the data; generate it with one rank "
                  "(--self-generate N --gen-tokens FILE) and train on it with --train-tokens FILE");
    a.c.comm = world.get();
    if (!writer) a.c.progress = false;
  }
  if (a.c.zero && world->world_size() == 1)
    throw_error("--zero shards the optimizer state over several ranks (--gpus N or a launcher)");
  if (a.c.zero && a.c.optimizer_bits != 32) throw_error("--zero: f32 optimizer state only (--optimizer-bits 32)");
  std::optional<OutputDir> out, state;  // rank 0's (the other ranks of a data-parallel run write nothing)
  if (writer) {
    out.emplace(a.out, "--out");
    out->refuse_input(a.model, "the input model");
  }
  if (world->world_size() == 1) {
    a.c.state_dir = a.state_dir.empty() ? (fs::path(a.out) / ".state").string() : a.state_dir;
    state.emplace(a.c.state_dir, "--state-dir");  // created now: an unusable path fails before training
    state->keep_if_exists(a.c.state_dir);          // a failed run keeps its resumable state once saved
    out->keep_if_exists(a.c.state_dir);
  }
  LoadedModel m = load_model(a.model, dev);
  std::vector<int32_t> stream;
  std::string gen_path;
  if (generate) {
    SelfGenOptions g;
    g.sequences = a.self_generate;
    const int64_t seqlen = std::min<int64_t>(a.c.seqlen > 0 ? a.c.seqlen : 256, m.model->config().max_seq_len - 1);
    g.length = a.gen_length > 0 ? a.gen_length : seqlen + 1;
    if (a.c.seqlen > 0 && g.length < a.c.seqlen + 1)
      throw_error("--gen-length ", g.length, " is shorter than a training window (--seqlen ", a.c.seqlen, " + 1)");
    if (a.c.seqlen <= 0) a.c.seqlen = std::min<int64_t>(seqlen, g.length - 1);
    g.top_k = a.gen_top_k;
    g.seed = a.c.seed;
    g.model_id = fs::absolute(a.model).lexically_normal().string();
    g.progress = a.c.progress;
    g.checkpoint_seconds = a.c.checkpoint_seconds;
    gen_path = a.gen_tokens.empty() ? (fs::path(a.c.state_dir) / "self-generated.i32").string() : a.gen_tokens;
    stream = self_generate(*m.model, g, gen_path);
    a.c.sequence_length = g.length;
  } else if (!a.train_tokens.empty()) {
    stream = read_token_file(a.train_tokens);
  } else {
    auto tok = open_tokenizer(a.tokenizer, a.model);
    std::ifstream in(a.train_text, std::ios::binary);
    if (!in) throw_error(a.train_text, ": cannot open training text");
    std::stringstream ss;
    ss << in.rdbuf();
    for (int id : tok->encode(ss.str(), false)) stream.push_back(id);
  }
  const std::string& data = generate ? gen_path : a.train_tokens.empty() ? a.train_text : a.train_tokens;
  if (stream.empty()) throw_error(data, ": training data holds no tokens");
  for (size_t i = 0; i < stream.size(); ++i)
    if (stream[i] < 0 || stream[i] >= m.model->config().vocab_size)
      throw_error(data, ": token ", stream[i], " at position ", i, " is outside the model's vocabulary (",
                  m.model->config().vocab_size, ")");
  auto method = make_qat_method(a.method, a.c);
  QatResult r = method->run(*m.model, stream);
  if (!writer) return;  // rank 0 reports and writes the (identical) model
  nlohmann::json stages = nlohmann::json::array();
  for (const auto& s : r.stages) stages.push_back(stage_json(s));
  int64_t tokens = 0;
  for (const auto& s : r.stages) tokens += s.tokens;
  nlohmann::json report = {{"model", a.model},     {"method", a.method},       {"format", f.name},
                           {"complete", r.complete}, {"seconds", r.seconds},   {"stages", stages},
                           {"training_tokens", tokens}, {"data", data},        {"data_tokens", stream.size()},
                           {"bits_per_weight", block_linear_bits_per_weight(m.model->config(), f)},
                           {"peak_rss_bytes", peak_rss_bytes()}, {"threads", threads_summary()},
                           {"ranks", world->world_size()}, {"comm_backend", world->backend()},
                           {"precision", a.c.low_precision.enabled()
                                             ? low_precision_key(a.c.low_precision, m.model->config().n_layers)
                                             : std::string("f32")}};
  if (generate)
    report["self_generated"] = {{"sequences", a.self_generate}, {"length", a.c.sequence_length}, {"top_k", a.gen_top_k},
                                {"file", gen_path}};
  if (a.method == "llm-qat") {  // what the checkpoint was trained for, and how to evaluate it so
    const std::string act = a.c.act_bits ? "int" + std::to_string(a.c.act_bits) : "none";
    const std::string kv = a.c.kv_bits ? "int" + std::to_string(a.c.kv_bits) : "none";
    const std::string eval = "lowbit eval ppl -m " + a.out + " --act " + act + " --kv-token-quant " + kv;
    report["trained_for"] = {
        {"weights", f.name},
        {"act", act + (a.c.act_bits ? " per token, symmetric (recorded in the checkpoint: eval/run apply it)" : "")},
        {"kv", kv + (a.c.kv_bits ? " per (token, head), symmetric, k_proj/v_proj outputs before RoPE (recorded in the "
                                   "checkpoint: eval/run apply it, as --kv-token-quant)"
                                 : "")},
        {"eval", eval}};
  }
  if (!r.complete) {  // stopped early (testing aid): the state stays for the next run
    out->keep();
    if (a.json) print_json(report);
    else print_stdout("qat %s: stopped early; rerun the same command to resume from %s\n", a.method.c_str(),
                      a.c.state_dir.c_str());
    return;
  }
  nlohmann::json extra = {{"source_model", a.model}, {"qat", report}};
  if (a.method == "matquant")  // the checkpoint is a Matryoshka parent: its narrower models are slices
    extra["matryoshka"] = {{"parent_bits", f.bits}, {"widths", a.c.widths}, {"width_weights", a.c.width_weights},
                           {"slice", "S(q, r) = clamp((q + 2^(7-r)) >> (8-r), 0, 2^r - 1), w = s (S 2^(8-r) - z)"},
                           {"load", "lowbit eval ppl -m " + a.out + " --slice R; lowbit convert --from " + a.out +
                                        " --to DIR --slice R (an ordinary int{R}g" + std::to_string(f.group_size) +
                                        " checkpoint)"}};
  save_quantized_model(a.out, *r.model, a.method, f, extra);
  {
    const std::string path = (fs::path(a.out) / "qat_report.json").string();
    FILE* fp = std::fopen(path.c_str(), "wb");
    if (!fp) throw_error(path, ": cannot write");
    const std::string s = report.dump(2) + "\n";
    const bool ok = std::fwrite(s.data(), 1, s.size(), fp) == s.size();
    if (std::fclose(fp) != 0 || !ok) throw_error(path, ": write failed");
  }
  copy_tokenizer_files(a.tokenizer, a.model, a.out);
  out->keep();
  if (a.state_dir.empty() && !a.c.state_dir.empty()) fs::remove_all(a.c.state_dir, ec);
  if (a.json) {
    print_json(report);
    return;
  }
  for (const auto& s : r.stages)
    print_stdout("%-9s %6lld steps %10lld tokens  loss %.5g -> %.5g  %.1fs\n", s.name.c_str(), (long long)s.steps,
                 (long long)s.tokens, s.loss_before, s.loss_after, s.seconds);
  print_stdout("qat %s %s: %.1fs, peak memory %.0f MiB\nwrote %s\n", a.method.c_str(), f.name, r.seconds,
               double(peak_rss_bytes()) / (1 << 20), a.out.c_str());
}

}  // namespace

void register_qat(CLI::App& app) {
  auto* q = app.add_subcommand("qat", "Quantization-aware training (" + qat_method_names() + "); resumable");
  auto a = std::make_shared<QatArgs>();
  QatConfig& c = a->c;
  q->add_option("-m,--model", a->model, "input full-precision model (llama2.c .bin, .gguf, HF directory)")->required();
  q->add_option("--method", a->method, "QAT method, one of:" + qat_method_help())->required();
  q->add_option("--format", a->format, "number format (uniform integer: intBgG, intBpc, symmetric with s)")
      ->capture_default_str()
      ->check(non_empty());
  q->add_option("--train", a->train_text, "training text (tokenized with --tokenizer or the model's tokenizer)");
  q->add_option("--tokenizer", a->tokenizer, "tokenizer for --train (default: the model's)");
  q->add_option("--train-tokens", a->train_tokens, "training data as raw int32 token ids");
  q->add_option("--self-generate", a->self_generate,
                "training data generated by the full-precision model: N sequences, LLM-QAT's rule (arXiv 2305.17888, "
                "Section 2.1: the first token random from the vocabulary, the next greedy (top-1) to a prefix of 3 to 5 "
                "tokens, the rest sampled, here top-k --gen-top-k at temperature 1); each starts with BOS; resumable, "
                "deterministic for --seed (default for --method llm-qat without --train/--train-tokens: 256)");
  q->add_option("--gen-tokens", a->gen_tokens, "with --self-generate: the raw int32 token-id file to write, or reuse when it "
                "exists with the same settings, or resume from FILE.partial (default: the state directory, removed on success)");
  q->add_option("--gen-length", a->gen_length, "with --self-generate: tokens per sequence, BOS included (default --seqlen + 1)")
      ->check(at_least(3));
  q->add_option("--gen-top-k", a->gen_top_k, "with --self-generate: sample among the k most likely tokens (0: all)")
      ->capture_default_str()
      ->check(at_least(0));
  q->add_option("--act-bits", c.act_bits, "llm-qat: quantize the input of every block linear per token (symmetric MinMax, STE) "
                "during training: 4 or 8 (recorded in the checkpoint, as `eval ppl --act int4|int8`)")
      ->check(CLI::IsMember({4, 8}));
  q->add_option("--kv-bits", c.kv_bits, "llm-qat: quantize the KV cache (k_proj / v_proj outputs, before RoPE, as the reference "
                "code) per token and head (symmetric MinMax, STE) during training: 2, 4 or 8 (recorded in the checkpoint, as "
                "`eval ppl --kv-token-quant int2|int4|int8`)")
      ->check(CLI::IsMember({2, 4, 8}));
  q->add_option("--steps", c.steps, "end-to-end optimizer steps (default 300; efficientqat: of E2E-QP)")->check(at_least(0));
  q->add_option("--batch", c.batch, "sequences per step (default 8)")->check(at_least(1));
  q->add_option("--seqlen", c.seqlen, "tokens per sequence (default 256, capped at the model's max)")->check(at_least(1));
  q->add_option("--lr", c.lr, "lsq, paretoq: AdamW lr of the latent weights (default 1e-4; paretoq: the paper's 2e-5 is for 1B+ models over billions of tokens, lsq's 1e-4 serves a few hundred steps); efficientqat: E2E-QP lr of the step sizes (default 1e-4, chosen on stories260K's validation split; the paper's 7B value is 2e-5); l4q: lr of LoRA A/B (default 1e-3, the best of 2e-4 / 1e-3 / 3e-3 on stories260K's validation split; not the paper's value); llm-qat: latent weights (default 1e-4, at 2 bits 3e-3: the best on stories260K's validation split; the paper's 2e-5 is for 7B models); lr-qat: lr of the low-rank factors A/B (default 1e-3, the reference code's --lr-ab; 3e-3 is better at int2g64 on stories260K); onebit: latent weights (default 1e-3, chosen on stories260K's validation split; 1e-4 was much worse there)")
      ->check(above(0));
  q->add_option("--quant-lr", c.quant_lr, "lsq, l4q, lr-qat: AdamW lr of the step sizes and zero points (default 1e-3; lr-qat: of the step sizes, default 1e-5 = the reference code's --scales-lr; 1e-4 is better at int2g64 on stories260K); paretoq: of alpha (default 1e-3, chosen on stories260K's validation split; the paper trains alpha with the weights' lr, 2e-5); onebit: of the value vectors h, g (default 1e-3)")->check(above(0));
  q->add_option("--warmup", c.warmup, "linear warmup steps (default steps / 20; paretoq: 0, the paper's warmup_ratio)")->check(at_least(0));
  q->add_option("--bits", c.paretoq_bits, "paretoq: bit width of the paper's quantizer: 1 (sign), 1.58 (ternary SEQ), 2 (SEQ), 3, 4 (LSQ); default from --format: int2 -> 2, int2 symmetric (int2g64s, int2pcs) -> 1.58, int3 -> 3, int4 -> 4; 1 and 1.58 are stored in an int2 format")
      ->check(CLI::IsMember({"1", "1.58", "2", "3", "4"}));
  q->add_option("--seed", c.seed, "seed for the training windows and calibration sampling")->capture_default_str()->check(at_least(0));
  q->add_flag("--distill", c.distill, "train on KL(teacher || student) to the full-precision model's logits instead of the LM loss");
  q->add_option("--lm-weight", c.lm_weight, "with --distill: add this times the LM cross-entropy")->check(at_least(0));
  q->add_flag("--tf32", a->tf32, "GPU: let f32 matmuls and attention use TF32 tensor cores (faster, ~1e-3 relative error)");
  q->add_flag("--bf16", c.bf16,
              "GPU: the end-to-end stages' steps in mixed precision (bf16 products and attention with fp32 "
              "accumulation; fp32 parameters, loss and AdamW); efficientqat's Block-AP stays fp32");
  q->add_option("--optimizer-bits", c.optimizer_bits,
                "AdamW state of the end-to-end stage (lsq, paretoq, l4q, lr-qat, efficientqat's E2E-QP; Block-AP keeps f32): "
                "32 or 8 (block-wise dynamic 8-bit, as lowbit train's flag: tensors under 4096 elements and the token "
                "embedding keep f32 state; CPU only for now)")
      ->capture_default_str()->check(CLI::IsMember({8, 32}));
  q->add_flag("--zero", c.zero, "with several ranks (--gpus N): shard the end-to-end stage's AdamW state over them (whole "
              "parameters per rank, as lowbit train --zero; f32 state only)");
  q->add_option("--init", a->init, "lsq, l4q, lr-qat: initial steps/zero points (l4q, lr-qat: of W0): mse (LSQ+; lsq's and lr-qat's default), lp4 (the same range search minimising the L4 norm of the error: the LR-QAT reference's LP_p4), minmax (RTN's range, no clipping: L4Q_init, l4q's default) or lsq (2<|w|>/sqrt(Qp))")
      ->check(CLI::IsMember({"mse", "lp4", "minmax", "lsq"}));
  q->add_option("--lora-rank", c.lora_rank, "l4q, lr-qat: LoRA rank (default 8: lowbit's choice for small models, not the papers' values; LR-QAT's reference runs 7B models at 32)")
      ->check(at_least(1));
  q->add_option("--lora-alpha", c.lora_alpha, "l4q, lr-qat: LoRA alpha, the adapter is (alpha / rank) B A (l4q: added to W0; lr-qat: to W0/s0 before rounding, in grid steps) (default 16: PEFT/QLoRA's usual value; LR-QAT's reference code defaults to 1)")
      ->check(above(0));
  q->add_option("--downcast", c.downcast, "lr-qat: how the frozen W0/s0 is stored during training: int8 (fixed point with 8-B "
                "fractional bits, 1 byte per weight: the paper's default), bf16, f16 (2 bytes) or f32 (no downcast)")
      ->check(CLI::IsMember({"int8", "bf16", "f16", "f32"}));
  q->add_option("--grad-checkpointing", a->grad_checkpointing, "lr-qat: on (default): each layer rebuilds its quantized weight "
                "in the backward, keeping nothing of the weight's size between forward and backward; off: keep it (less compute, about 6 bytes per weight more memory)")
      ->check(CLI::IsMember({"on", "off"}));
  q->add_option("--nsamples", c.nsamples, "efficientqat, matquant: Block-AP calibration windows (default 128)")->check(at_least(1));
  q->add_option("--block-epochs", c.block_epochs, "efficientqat, matquant: Block-AP epochs (default 5: 5 x 128 windows = ApiQ's 20 x 32 tokens per block; the paper: 2 x 4096)")->check(at_least(0));
  q->add_option("--block-batch", c.block_batch, "efficientqat, matquant: Block-AP windows per step (default 2)")->check(at_least(1));
  q->add_option("--block-lr", c.block_lr, "efficientqat, matquant: Block-AP lr of the weights (default 1e-3, tuned on stories260K; the paper's 7B value is 2e-5)")->check(at_least(0));
  q->add_option("--block-quant-lr", c.block_quant_lr, "efficientqat, matquant: Block-AP lr of steps and zero points (default 1e-3; the paper's 7B value is 1e-4)")
      ->check(at_least(0));
  q->add_option("--widths", a->widths, "matquant: Matryoshka widths of the loss, comma-separated from 8, 4, 3, 2 "
                "(default 8,4,2): the int8 codes and their top-bit slices; matquant trains the steps at --block-quant-lr / "
                "2^(8 - narrowest) and the zero points at x 2^(8 - narrowest)")
      ->check(non_empty());
  q->add_option("--width-weights", a->width_weights, "matquant: the loss weight of each --widths entry, comma-separated "
                "(default all 1: the paper's unweighted sum)")
      ->check(non_empty());
  q->add_option("--svid", c.svid, "onebit: the rank-1 factorisation of |W| that initialises the value vectors, power "
                "(power iteration: |W|'s dominant singular pair, the default) or nmf (Lee-Seung multiplicative updates)")
      ->check(CLI::IsMember({"power", "nmf"}));
  q->add_option("--hidden-mse", c.hidden_mse, "onebit: alpha of OneBit's hidden-state term of the distillation loss, "
                "KL + alpha * sum over blocks of the mean squared distance of the l2-normalised block outputs of student "
                "and FP teacher (default 1, the authors' setting; 0: KL to the logits only)")
      ->check(at_least(0));
  q->add_option("--state-dir", a->state_dir, "resumable state (default: OUT/.state; removed on success)");
  q->add_option("--checkpoint-seconds", c.checkpoint_seconds, "save the resumable state at most this often (0: every step)")
      ->capture_default_str()
      ->check(at_least(0.0));
  q->add_option("--stop-after", c.stop_after_steps, "testing aid: stop after this many end-to-end steps of this run (state kept)")
      ->check(at_least(0));
  q->add_option("--stop-after-blocks", c.stop_after_blocks, "testing aid: stop after this many Block-AP blocks of this run")
      ->check(at_least(0));
  q->add_flag("--verbose", c.verbose, "print per-epoch Block-AP losses");
  q->add_option("-o,--out", a->out, "output directory (a lowbit quantized checkpoint, as quantize writes)")->required();
  q->add_option("--device", a->device, "cpu or cuda (lsq, efficientqat, matquant, paretoq, l4q; llm-qat, lr-qat and onebit: cpu only)")
      ->capture_default_str();
  add_low_precision_options(q, &a->lp,
                            "the trained layers' products x Q(W)^T (lsq, paretoq: the fake-quantized latent weight "
                            "and the activations / gradients; Q's own backward unchanged; the packed result is the same "
                            "kind of checkpoint)");
  q->add_flag("--json", a->json, "print the report as JSON");
  add_threads_option(q);
  add_dist_options(q, &a->dist);
  q->callback([a, q] {
    // Flags that only some methods read.
    const std::pair<const char*, std::vector<std::string>> owned[] = {
        {"--nsamples", {"efficientqat", "matquant"}},       {"--block-epochs", {"efficientqat", "matquant"}},
        {"--block-batch", {"efficientqat", "matquant"}},    {"--block-lr", {"efficientqat", "matquant"}},
        {"--block-quant-lr", {"efficientqat", "matquant"}}, {"--stop-after-blocks", {"efficientqat", "matquant"}},
        {"--widths", {"matquant"}},                         {"--width-weights", {"matquant"}},
        {"--steps", {"lsq", "paretoq", "l4q", "lr-qat", "llm-qat", "efficientqat", "onebit"}},
        {"--quant-lr", {"lsq", "paretoq", "l4q", "lr-qat", "onebit"}}, {"--init", {"lsq", "l4q", "lr-qat"}},
        {"--bits", {"paretoq"}},                {"--lora-rank", {"l4q", "lr-qat"}},
        {"--lora-alpha", {"l4q", "lr-qat"}},   {"--act-bits", {"llm-qat"}},
        {"--kv-bits", {"llm-qat"}},            {"--downcast", {"lr-qat"}},
        {"--grad-checkpointing", {"lr-qat"}}, {"--svid", {"onebit"}},
        {"--hidden-mse", {"onebit"}}};
    for (const auto& [flag, methods] : owned)
      if (q->count(flag) > 0 && std::find(methods.begin(), methods.end(), a->method) == methods.end()) {
        std::string names;
        for (const auto& m : methods) names += (names.empty() ? "" : " or ") + m;
        throw_error(flag, " applies to --method ", names, ", not ", a->method);
      }
    if (a->method == "matquant" && q->count("--format") == 0) a->format = "int8g64";  // MatQuant's parent codes
    if (a->method == "onebit" && q->count("--format") == 0) a->format = "onebit";     // sign bits + value vectors
    a->self_generate_given = q->count("--self-generate") > 0;
    a->gen_top_k_given = q->count("--gen-top-k") > 0;
    a->c.progress = !a->json;
    run_qat(*a);
  });
}

}  // namespace lowbit::cli
