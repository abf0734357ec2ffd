// lowbit quantize: block-wise post-training quantization of a model (RTN, GPTQ, AWQ).
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/ptq_methods.h"

namespace lowbit::cli {

namespace fs = std::filesystem;

namespace {
struct QuantArgs {
  std::string model, tokenizer, method = "gptq", format = "int4g128", calib, calib_tokens, out, state_dir,
      device = "cpu", next_input = "quantized";
  int64_t nsamples = 128, seqlen = 2048, batch = 8;
  uint64_t seed = 0;
  double percdamp = 0.01;
  bool act_order = false, no_clip = false, json = false;
};

std::unique_ptr<BlockMethod> make_method(const QuantArgs& a, const QuantFormat& f) {
  if (a.method == "rtn") return std::make_unique<RtnMethod>(f);
  if (a.method == "gptq") {
    GptqOptions o;
    o.percdamp = a.percdamp;
    o.act_order = a.act_order;
    return std::make_unique<GptqMethod>(f, o);
  }
  if (a.method == "awq") return std::make_unique<AwqMethod>(f, AwqOptions{}, !a.no_clip);
  throw_error("unknown --method '", a.method, "' (expected rtn, gptq or awq)");
}

void run_quantize(const QuantArgs& a) {
  const QuantFormat& f = parse_quant_format(a.format);
  if (a.next_input != "quantized" && a.next_input != "fp")
    throw_error("--next-input must be 'quantized' or 'fp', got '", a.next_input, "'");
  std::error_code ec;
  if (fs::exists(a.out) && fs::exists(a.model) && fs::equivalent(a.out, a.model, ec))
    throw_error("--out ", a.out, " is the input model; choose another directory");
  Device dev = parse_device(a.device);
  LoadedModel m = load_model(a.model, dev);
  // Calibration tokens.
  std::vector<int32_t> stream;
  if (!a.calib_tokens.empty()) {
    stream = read_token_file(a.calib_tokens);
  } else if (!a.calib.empty()) {
    auto tok = open_tokenizer(a.tokenizer, a.model);
    std::ifstream in(a.calib, std::ios::binary);
    if (!in) throw_error(a.calib, ": cannot open calibration text");
    std::stringstream ss;
    ss << in.rdbuf();
    for (int id : tok->encode(ss.str(), false)) stream.push_back(id);
  } else if (a.method != "rtn") {
    throw_error("--method ", a.method, " needs calibration data: --calib TEXT (with a tokenizer) or --calib-tokens FILE");
  }
  for (size_t i = 0; i < stream.size(); ++i)
    if (stream[i] < 0 || stream[i] >= m.model->config().vocab_size)
      throw_error("calibration token ", stream[i], " at position ", i, " is outside the model's vocabulary");
  const int64_t seqlen = std::min<int64_t>(a.seqlen, m.model->config().max_seq_len);
  Tensor calib = stream.empty() ? Tensor::full({1, 2}, 1.0, DType::I32)  // RTN without data: error report on a stub
                                : sample_calibration(stream, a.nsamples, seqlen, a.seed);
  auto method = make_method(a, f);
  PipelineOptions o;
  o.next_from_fp = a.next_input == "fp";
  o.batch = a.batch;
  o.state_dir = a.state_dir.empty() ? (fs::path(a.out) / ".state").string() : a.state_dir;
  PipelineReport r = run_blockwise(*m.model, calib, *method, f, o);
  nlohmann::json layers = nlohmann::json::array();
  for (const auto& l : r.linears)
    layers.push_back({{"name", l.name}, {"rel_error", l.rel_error}, {"bits_per_weight", l.bits_per_weight}, {"params", l.params}});
  nlohmann::json report = {{"model", a.model},         {"method", a.method},
                           {"format", f.name},         {"bits_per_weight", r.bits_per_weight},
                           {"seconds", r.seconds},     {"peak_rss_bytes", r.peak_rss_bytes},
                           {"nsamples", calib.size(0)}, {"seqlen", calib.size(1)},
                           {"seed", a.seed},           {"next_input", a.next_input},
                           {"resumed_from_block", r.resumed_from_block}, {"layers", layers}};
  save_quantized_model(a.out, *m.model, a.method, f,
                       {{"calibration", {{"nsamples", calib.size(0)}, {"seqlen", calib.size(1)}, {"seed", a.seed}}}});
  {
    std::ofstream rep((fs::path(a.out) / "quantize_report.json").string());
    rep << report.dump(2) << "\n";
  }
  fs::remove_all(o.state_dir, ec);
  if (a.json) {
    print_json(report);
    return;
  }
  std::printf("%-44s %12s %8s\n", "layer", "rel. error", "bpw");
  for (const auto& l : r.linears) std::printf("%-44s %12.3e %8.3f\n", l.name.c_str(), l.rel_error, l.bits_per_weight);
  std::printf("\n%s %s: %.3f bits per weight (quantized layers, metadata included), %.1fs, peak memory %.0f MiB\n",
              a.method.c_str(), f.name, r.bits_per_weight, r.seconds, double(r.peak_rss_bytes) / (1 << 20));
  std::printf("wrote %s\n", a.out.c_str());
}
}  // namespace

void register_quantize(CLI::App& app) {
  auto* q = app.add_subcommand("quantize", "Quantize a model block by block (rtn, gptq, awq); resumable");
  auto a = std::make_shared<QuantArgs>();
  q->add_option("-m,--model", a->model, "input model (llama2.c .bin, .gguf, HF directory)")->required();
  q->add_option("--method", a->method, "rtn, gptq or awq")->capture_default_str();
  q->add_option("--format", a->format, "number format: " + quant_format_names())->capture_default_str();
  q->add_option("--calib", a->calib, "calibration text file (tokenized with the model's tokenizer)");
  q->add_option("--tokenizer", a->tokenizer, "tokenizer for --calib (default: the model directory's)");
  q->add_option("--calib-tokens", a->calib_tokens, "calibration data as raw int32 token ids");
  q->add_option("--nsamples", a->nsamples, "calibration windows")->capture_default_str();
  q->add_option("--seqlen", a->seqlen, "tokens per window (capped at the model's max)")->capture_default_str();
  q->add_option("--seed", a->seed, "seed for drawing the windows")->capture_default_str();
  q->add_option("--next-input", a->next_input, "next block's inputs: outputs of the 'quantized' or the 'fp' block")
      ->capture_default_str();
  q->add_option("--percdamp", a->percdamp, "GPTQ dampening (fraction of mean diag H)")->capture_default_str();
  q->add_flag("--act-order", a->act_order, "GPTQ: columns by decreasing Hessian diagonal (static groups)");
  q->add_flag("--no-clip", a->no_clip, "AWQ: skip the clipping search");
  q->add_option("--batch", a->batch, "calibration windows per forward pass")->capture_default_str();
  q->add_option("--state-dir", a->state_dir, "resumable state (default: OUT/.state; removed on success)");
  q->add_option("-o,--out", a->out, "output directory (config.json + model.safetensors)")->required();
  q->add_option("--device", a->device, "cpu or cuda")->capture_default_str();
  q->add_flag("--json", a->json, "print the report as JSON");
  q->callback([a] { run_quantize(*a); });
}

}  // namespace lowbit::cli
