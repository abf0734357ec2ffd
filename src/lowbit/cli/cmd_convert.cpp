// lowbit convert: checkpoint format conversion (llama2.c .bin <-> GGUF <-> Hugging Face directory).
#include <cstdio>
#include <filesystem>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/core/error.h"
#include "lowbit/io/checkpoint.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/io/file_util.h"
#include "lowbit/quant/matryoshka.h"

namespace fs = std::filesystem;

namespace lowbit::cli {

namespace {

struct ConvertArgs {
  std::string from, to, dtype = "f32", tokenizer;
  int slice = 0;  // Matryoshka width: write the r-bit slice of an int8 parent (quant/matryoshka.h)
};

// Tokenizer and generation files that travel with a Hugging Face model directory.
constexpr const char* kSideFiles[] = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                      "special_tokens_map.json", "generation_config.json"};

void copy_atomically(const fs::path& src, const fs::path& dst) {
  const fs::path tmp = dst.string() + ".tmp";
  std::error_code ec;
  fs::copy_file(src, tmp, fs::copy_options::overwrite_existing, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw_error(dst.string(), ": cannot copy ", src.string(), ": ", ec.message());
  }
  fs::rename(tmp, dst, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw_error(dst.string(), ": cannot rename ", tmp.string(), " over it: ", ec.message());
  }
}

// convert --slice R: the R-bit model of a Matryoshka checkpoint (int8 group codes) as an ordinary
// lowbit quantized checkpoint in int{R}g{G} (quant/matryoshka.h), which every command runs packed.
void run_slice(const ConvertArgs& a) {
  if (!is_lowbit_quantized_dir(a.from))
    throw_error("--slice ", a.slice, ": ", a.from, " is not a lowbit quantized checkpoint (a Matryoshka model is written "
                "by qat --method matquant)");
  if (a.dtype != "f32" || !a.tokenizer.empty())
    throw_error(a.tokenizer.empty() ? "--dtype" : "--tokenizer", ": a sliced checkpoint keeps the source's storage; "
                "it cannot be combined with --slice");
  io::refuse_to_overwrite(a.from, a.to);
  OutputDir out(a.to, "--to");
  out.refuse_input(a.from, "the input model");
  QuantizedCheckpoint q = load_quantized_model(a.from, /*dense_view=*/false);
  if (!q.lora.empty()) throw_error("--slice: ", a.from, " has LoRA adapters; a Matryoshka slice has none");
  const QuantFormat& parent = quant_format(q.format);
  const QuantFormat& sf = matryoshka_slice_format(parent, a.slice, "--slice");
  std::unique_ptr<LlamaModel> model = make_quantized_model(q, Device::CPU);
  const int n = matryoshka_slice_model(*model, a.slice, "--slice");
  model->set_transforms(q.transforms);
  const nlohmann::json extra = {{"matryoshka", {{"sliced_from", a.from}, {"parent_format", parent.name}, {"width", a.slice}}}};
  save_quantized_model(a.to, *model, q.method.empty() ? "matquant" : q.method, sf, extra);
  copy_tokenizer_files("", a.from, a.to);
  out.keep();
  std::fprintf(stderr, "sliced %s (%s) -> %s: %d linears as %s (the top %d bits of the codes)\n", a.from.c_str(),
               parent.name, a.to.c_str(), n, sf.name, a.slice);
}

void run_convert(const ConvertArgs& a) {
  if (a.slice) return run_slice(a);
  if (a.dtype != "f32" && a.dtype != "f16" && a.dtype != "bf16")
    throw_error("--dtype ", a.dtype, ": expected f32, f16 or bf16");
  const DType dtype = parse_dtype(a.dtype);
  const CheckpointFormat out_format = format_for_output(a.to);  // fail fast, before loading
  io::refuse_to_overwrite(a.from, a.to);
  if (!a.tokenizer.empty() && out_format != CheckpointFormat::Gguf)
    throw_error("--tokenizer: only a GGUF output embeds a tokenizer (", a.to, " is not a .gguf path)");
  // A lowbit quantized directory converts as the function it computes: codes dequantized, LoRA
  // adapters added (Ŵ + B A), i.e. its dense view.
  const bool quantized_dir = is_lowbit_quantized_dir(a.from);
  Checkpoint ck;
  if (quantized_dir) {
    QuantizedCheckpoint q = load_quantized_model(a.from);
    refuse_transforms(q, "convert");
    ck = std::move(q.dense);
  } else {
    ck = load_checkpoint(a.from);
  }
  std::string embedded;
  if (out_format == CheckpointFormat::Gguf) {
    if (!a.tokenizer.empty()) {
      ck.vocab = vocab_from_tokenizer_file(a.tokenizer, ck.config.vocab_size);
      embedded = a.tokenizer;
    } else if (ck.vocab.empty()) {
      // A Hugging Face source directory's own tokenizer travels into the GGUF file when it can.
      const std::string own = tokenizer_path_for(a.from);
      if (!own.empty()) {
        try {
          ck.vocab = vocab_from_tokenizer_file(own, ck.config.vocab_size);
          embedded = own;
        } catch (const Error& e) {
          std::fprintf(stderr, "  note: the source's tokenizer is not embedded: %s\n", e.what());
        }
      }
    }
  }
  save_checkpoint(a.to, ck, out_format, dtype);
  // An HF directory keeps its tokenizer files; copy them along to an HF output.
  std::error_code ec;
  const fs::path src_dir = fs::is_directory(ck.source, ec) ? fs::path(ck.source) : fs::path();
  int copied = 0;
  if (out_format == CheckpointFormat::HfDir && !src_dir.empty())
    for (const char* name : kSideFiles)
      if (fs::is_regular_file(src_dir / name, ec)) {
        copy_atomically(src_dir / name, fs::path(a.to) / name);
        ++copied;
      }
  std::fprintf(stderr, "converted %s (%s) -> %s (%s, %s)%s\n  %s\n", a.from.c_str(),
               quantized_dir ? "lowbit quantized, dequantized" : checkpoint_format_name(detect_checkpoint_format(a.from)),
               a.to.c_str(), checkpoint_format_name(out_format),
               dtype_name(dtype), copied ? ", tokenizer files copied" : "", ck.config.summary().c_str());
  if (!embedded.empty())
    std::fprintf(stderr, "  embedded tokenizer %s (tokenizer.ggml.model = %s%s%s)\n", embedded.c_str(), ck.vocab.model.c_str(),
                 ck.vocab.pre.empty() ? "" : ", pre = ", ck.vocab.pre.c_str());
  if (out_format == CheckpointFormat::Gguf && ck.vocab.empty())
    std::fprintf(stderr, "  note: the source has no embedded tokenizer; the GGUF file has none (tokenizer.ggml.model = none)\n");
}

}  // namespace

void register_convert(CLI::App& app) {
  auto a = std::make_shared<ConvertArgs>();
  auto* sub = app.add_subcommand("convert", "convert a checkpoint between llama2.c .bin, GGUF and Hugging Face formats");
  sub->footer(
      "The input format is detected from the contents. The output format follows --to: *.bin = llama2.c (f32), "
      "*.gguf = GGUF v3, anything else = a Hugging Face directory (config.json + model.safetensors). Outputs are "
      "written atomically; the input is never overwritten.\n"
      "Example: lowbit convert --from stories260K.bin --to stories260K-hf --dtype bf16");
  sub->add_option("--from", a->from,
                  "input: llama2.c .bin, .gguf, a Hugging Face model directory, or a lowbit quantized directory "
                  "(written dequantized, LoRA adapters added)")
      ->required();
  sub->add_option("--to", a->to, "output: out.bin, out.gguf or an output directory")->required();
  sub->add_option("--tokenizer", a->tokenizer,
                  "GGUF output: embed this tokenizer (sentencepiece .model, byte-level tokenizer.json, or a GGUF "
                  "file's); default: the source's own (GGUF, or a Hugging Face directory's tokenizer)");
  sub->add_option("--slice", a->slice, "write the R-bit slice of a Matryoshka checkpoint (int8 codes from qat --method "
                  "matquant) as an ordinary int{R}g{G} lowbit checkpoint: 8, 4, 3 or 2")
      ->check(CLI::IsMember({2, 3, 4, 8}));
  sub->add_option("--dtype", a->dtype, "weight type of GGUF / Hugging Face outputs: f32, f16 or bf16")
      ->capture_default_str();
  sub->callback([a] { run_convert(*a); });
}

}  // namespace lowbit::cli
