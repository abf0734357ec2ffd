// lowbit export: a lowbit quantized directory (ggml block formats) -> a GGUF file llama.cpp loads
// (also used by `lowbit quantize ... -o out.gguf`); or (integer group formats, --layout gptq|awq)
// -> a safetensors directory in AutoGPTQ's / AutoAWQ's layout (io/hf_quant_export.h).
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/core/error.h"
#include "lowbit/io/checkpoint.h"
#include "lowbit/io/file_util.h"
#include "lowbit/io/gguf.h"
#include "lowbit/io/hf_quant_export.h"
#include "lowbit/io/quantized_checkpoint.h"

namespace fs = std::filesystem;

namespace lowbit::cli {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The vocabulary of a model path: a GGUF file's embedded one, else its directory's tokenizer.
TokenizerVocab vocab_of_model(const std::string& model, int vocab_size, std::string& from) {
  std::error_code ec;
  if (model.empty() || !fs::exists(model, ec)) return {};
  if (fs::is_regular_file(model, ec) && looks_like_gguf(model)) {
    TokenizerVocab v = read_gguf_vocab(model);
    if (!v.empty()) from = model;
    return v;
  }
  const std::string own = tokenizer_path_for(model);
  if (own.empty()) return {};
  from = own;
  return vocab_from_tokenizer_file(own, vocab_size);
}

struct ExportArgs {
  std::string model, to, tokenizer, layout;
};

void run_export(const ExportArgs& a) {
  if (a.layout.empty() || a.layout == "gguf") {
    export_quantized_dir_to_gguf(a.model, a.to, a.tokenizer, /*quiet=*/false);
    return;
  }
  const HfQuantLayout layout = parse_hf_quant_layout(a.layout);
  if (ends_with(a.to, ".gguf"))
    throw_error("--to ", a.to, ": --layout ", a.layout, " writes a directory, not a .gguf file");
  const HfQuantExportInfo info = export_hf_quant_layout(a.model, a.to, layout);
  int copied = copy_tokenizer_files(a.tokenizer, a.tokenizer.empty() ? a.model : std::string(), a.to);
  std::string note = copied ? "" : "; no tokenizer files copied (give --tokenizer)";
  if (!copied && a.tokenizer.empty()) {
    // A source model with an embedded (GGUF) tokenizer: written as tokenizer.json + tokenizer_config.json.
    nlohmann::json qc;
    try {
      std::ifstream in((fs::path(a.model) / "config.json").string());
      qc = nlohmann::json::parse(in).value("quantization_config", nlohmann::json::object());
    } catch (const std::exception&) {
    }
    std::string from;
    TokenizerVocab v;
    if (qc.contains("source_model") && qc["source_model"].is_string())
      v = vocab_of_model(qc["source_model"].get<std::string>(), 0, from);
    if (!v.empty()) {
      try {
        const HfTokenizerFiles files = hf_tokenizer_files_from_vocab(v, from);
        for (const auto& [name, text] : {std::pair{"tokenizer.json", &files.tokenizer_json},
                                         std::pair{"tokenizer_config.json", &files.tokenizer_config_json}}) {
          io::AtomicFileWriter w((fs::path(a.to) / name).string());
          w.write(text->data(), text->size());
          w.commit();
        }
        note = "; tokenizer.json and tokenizer_config.json written from " + from + "'s embedded tokenizer";
      } catch (const Error& e) {
        note = std::string("; no tokenizer written (") + e.what() + "): give --tokenizer";
      }
    }
  }
  std::fprintf(stderr, "exported %s (%d packed layers) -> %s (%s layout, checkpoint_format %s)%s\n", a.model.c_str(),
               info.layers, a.to.c_str(), hf_quant_layout_name(layout), info.checkpoint_format.c_str(), note.c_str());
}

}  // namespace

void check_gguf_output(const std::string& out) {
  std::error_code ec;
  if (!ends_with(out, ".gguf")) throw_error("--to ", out, ": a GGUF output path must end in .gguf");
  if (fs::is_directory(out, ec)) throw_error(out, ": is a directory; give the GGUF file to write (e.g. model-q4_0.gguf)");
}

void export_quantized_dir_to_gguf(const std::string& dir, const std::string& out, const std::string& tokenizer,
                                  bool quiet) {
  check_gguf_output(out);
  if (!is_lowbit_quantized_dir(dir))
    throw_error(dir, ": not a lowbit quantized directory (config.json with a lowbit quantization_config); "
                "quantize first: lowbit quantize -m MODEL --format q4_0 -o DIR");
  io::refuse_to_overwrite((fs::path(dir) / "model.safetensors").string(), out);
  nlohmann::json qc;
  {
    std::ifstream in((fs::path(dir) / "config.json").string());
    try {
      qc = nlohmann::json::parse(in).at("quantization_config");
    } catch (const std::exception& e) {
      throw_error(dir, "/config.json: cannot read quantization_config: ", e.what());
    }
  }
  QuantizedCheckpoint q = load_quantized_model(dir);
  refuse_transforms(q, "a GGUF file");
  // A mixed plan's vocabulary types (--preset / --format-map token_embd, output rules): packed now,
  // round to nearest as llama-quantize does.
  if (qc.contains("format_plan") && qc["format_plan"].is_object() && qc["format_plan"].contains("vocab_formats")) {
    const nlohmann::json& vf = qc["format_plan"]["vocab_formats"];
    if (!vf.is_object()) throw_error(dir, "/config.json: quantization_config.format_plan.vocab_formats must be an object");
    std::map<std::string, QuantFormatId> formats;
    for (const auto& [name, v] : vf.items()) {
      if (!v.is_string()) throw_error(dir, "/config.json: format_plan.vocab_formats['", name, "'] is not a string");
      try {
        formats[name] = parse_quant_format(v.get<std::string>()).id;
      } catch (const Error& e) {
        throw_error(dir, "/config.json: format_plan.vocab_formats['", name, "']: ", e.what());
      }
    }
    pack_vocab(q, formats);
  }
  // Tokenizer: --tokenizer, else the directory's own, else the source model's (recorded by quantize).
  TokenizerVocab vocab;
  std::string from;
  const int vocab_size = q.dense.config.vocab_size;
  if (!tokenizer.empty()) {
    vocab = vocab_from_tokenizer_file(tokenizer, vocab_size);
    from = tokenizer;
  } else {
    vocab = vocab_of_model(dir, vocab_size, from);
    if (vocab.empty() && qc.contains("source_model") && qc["source_model"].is_string())
      vocab = vocab_of_model(qc["source_model"].get<std::string>(), vocab_size, from);
  }
  save_gguf_quantized(out, q, &vocab, qc.dump());
  if (quiet) return;
  std::fprintf(stderr, "exported %s (%s, %s, %zu packed layers) -> %s\n", dir.c_str(), q.method.c_str(),
               quant_format(q.format).name, q.quantized.size(), out.c_str());
  if (!vocab.empty())
    std::fprintf(stderr, "  embedded tokenizer %s (tokenizer.ggml.model = %s)%s\n", from.c_str(), vocab.model.c_str(),
                 vocab.chat_template.empty() ? "" : " and its chat template");
  else
    std::fprintf(stderr, "  note: no tokenizer found (give --tokenizer); the GGUF file has none (tokenizer.ggml.model = none)\n");
}

void register_export(CLI::App& app) {
  auto a = std::make_shared<ExportArgs>();
  auto* sub = app.add_subcommand(
      "export", "export a lowbit quantized model as a GGUF file for llama.cpp (ggml block formats) or as a GPTQ/AWQ "
                "safetensors directory (integer group formats)");
  sub->footer(
      "The packed layers are written as their raw ggml blocks (q4_0, q4_1, q8_0, iq4_nl, k-quants, ...), everything "
      "else (embeddings, output, norms) as f32; llama's q/k rows are permuted to llama.cpp's layout. The tokenizer and "
      "chat template embedded are --tokenizer's, else the directory's or the source model's. Metadata "
      "lowbit.quantization.{method,format,config} records how it was made. Written atomically.\n"
      "--layout gptq|awq instead writes a directory for transformers/vLLM/AutoGPTQ/AutoAWQ: model.safetensors with "
      "qweight/qzeros/scales(/g_idx) int32-packed as AutoGPTQ (2, 3, 4, 8 bits) or AutoAWQ GEMM (4 bits) pack them, "
      "config.json with quantization_config, quantize_config.json / quant_config.json, and the tokenizer files.\n"
      "Examples: lowbit export -m smollm-q4_0-gptq --to smollm-q4_0-gptq.gguf\n"
      "          lowbit export -m smollm-int4g128-gptq --to smollm-gptq-hf --layout gptq");
  sub->add_option("-m,--model", a->model, "lowbit quantized directory (from lowbit quantize)")->required();
  sub->add_option("--to", a->to, "output .gguf file, or output directory with --layout gptq|awq")->required();
  sub->add_option("--layout", a->layout, "gguf (default), gptq (AutoGPTQ/GPTQModel safetensors) or awq (AutoAWQ GEMM)");
  sub->add_option("--tokenizer", a->tokenizer,
                  "tokenizer to embed (sentencepiece .model, tokenizer.json, or a GGUF file's); default: the "
                  "directory's own, else the source model's");
  sub->callback([a] { run_export(*a); });
}

}  // namespace lowbit::cli
