#include "lowbit/io/checkpoint.h"

#include <filesystem>

#include "lowbit/io/file_util.h"
#include "lowbit/io/gguf.h"
#include "lowbit/io/hf.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/safetensors.h"

namespace fs = std::filesystem;

namespace lowbit {

const char* checkpoint_format_name(CheckpointFormat f) {
  switch (f) {
    case CheckpointFormat::Auto: return "auto";
    case CheckpointFormat::Llama2c: return "llama2.c";
    case CheckpointFormat::Gguf: return "GGUF";
    case CheckpointFormat::HfDir: return "Hugging Face directory";
  }
  return "?";
}

static std::string parent_dir(const std::string& path) {
  fs::path p = fs::path(path).parent_path();
  return p.empty() ? std::string(".") : p.string();
}

CheckpointFormat detect_checkpoint_format(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw_error(path, ": no such file or directory");
  if (fs::is_directory(path, ec)) {
    if (looks_like_hf_dir(path)) return CheckpointFormat::HfDir;
    throw_error(path, ": directory without config.json: not a Hugging Face model directory");
  }
  if (looks_like_gguf(path)) return CheckpointFormat::Gguf;
  if (looks_like_safetensors(path)) {
    if (looks_like_hf_dir(parent_dir(path))) return CheckpointFormat::HfDir;
    throw_error(path, ": a safetensors file without a config.json next to it: lowbit needs the model config; "
                "put config.json in its directory and pass the directory");
  }
  if (looks_like_llama2c(path)) return CheckpointFormat::Llama2c;
  // Not recognised: if it has a llama2.c-like name, load it anyway for the precise error.
  if (fs::path(path).extension() == ".bin") return CheckpointFormat::Llama2c;
  throw_error(path, ": unrecognised checkpoint format (expected a llama2.c .bin, a GGUF file, or a Hugging Face model "
              "directory with config.json and safetensors weights)");
}

Checkpoint load_checkpoint(const std::string& path) {
  switch (detect_checkpoint_format(path)) {
    case CheckpointFormat::Llama2c: return load_llama2c(path);
    case CheckpointFormat::Gguf: return load_gguf(path);
    case CheckpointFormat::HfDir: {
      std::error_code ec;
      return load_hf_dir(fs::is_directory(path, ec) ? path : parent_dir(path));
    }
    case CheckpointFormat::Auto: break;
  }
  throw_error(path, ": unrecognised checkpoint format");
}

CheckpointFormat format_for_output(const std::string& path) {
  const std::string ext = fs::path(path).extension().string();
  if (ext == ".bin") return CheckpointFormat::Llama2c;
  if (ext == ".gguf") return CheckpointFormat::Gguf;
  if (ext == ".safetensors")
    throw_error(path, ": a single .safetensors file cannot hold the model config; give a directory to write a "
                "Hugging Face model (config.json + model.safetensors)");
  return CheckpointFormat::HfDir;
}

void save_checkpoint(const std::string& path, const Checkpoint& ckpt, CheckpointFormat format, DType dtype) {
  if (format == CheckpointFormat::Auto) format = format_for_output(path);
  if (!ckpt.source.empty()) io::refuse_to_overwrite(ckpt.source, path);
  if (ckpt.config.rope_scaling.active() && format != CheckpointFormat::HfDir)
    throw_error(path, ": rope_scaling llama3 can only be saved in a Hugging Face directory (", checkpoint_format_name(format),
                " output would drop it)");
  if (dtype != DType::F32 && dtype != DType::F16 && dtype != DType::BF16)
    throw_error(path, ": checkpoints are saved as f32, f16 or bf16, not ", dtype_name(dtype));
  switch (format) {
    case CheckpointFormat::Llama2c:
      if (dtype != DType::F32) throw_error(path, ": the llama2.c format stores f32 only (asked for ", dtype_name(dtype), ")");
      save_llama2c(path, ckpt.config, ckpt.weights);
      return;
    case CheckpointFormat::Gguf: {
      GgufSaveOptions o;
      o.dtype = dtype;
      if (!ckpt.vocab.empty()) o.vocab = &ckpt.vocab;
      save_gguf(path, ckpt.config, ckpt.weights, o);
      return;
    }
    case CheckpointFormat::HfDir: {
      std::error_code ec;
      if (fs::exists(path, ec) && !fs::is_directory(path, ec))
        throw_error(path, ": exists and is not a directory; a Hugging Face model is written as a directory");
      HfSaveOptions o;
      o.dtype = dtype;
      save_hf_dir(path, ckpt.config, ckpt.weights, o);
      return;
    }
    case CheckpointFormat::Auto: break;
  }
}

std::string tokenizer_path_for(const std::string& model_path) {
  std::error_code ec;
  fs::path dir;
  if (fs::is_directory(model_path, ec)) dir = model_path;
  else if (looks_like_safetensors(model_path)) dir = parent_dir(model_path);
  else return "";
  for (const char* name : {"tokenizer.json", "tokenizer.model"})
    if (fs::is_regular_file(dir / name, ec)) return (dir / name).string();
  return "";
}

}  // namespace lowbit
