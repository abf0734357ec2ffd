#include "lowbit/io/hf_quant_export.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <vector>

#include "lowbit/core/dtype.h"
#include "lowbit/core/error.h"
#include "lowbit/io/file_util.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/io/safetensors.h"

namespace fs = std::filesystem;

namespace lowbit {

namespace {

const char* kGptqHolds =
    "the gptq layout holds lowbit's integer formats of 2, 3, 4 and 8 bits: int2/int3/int4 with groups or per "
    "channel, asymmetric or symmetric (int4g128, int4g128s, int3g128, int2g64, int4pc, ...) and int8pc";
const char* kAwqHolds =
    "the awq (GEMM) layout holds 4-bit group formats only: int4g32, int4g64, int4g128 and their symmetric "
    "variants (int4g128s, ...)";

// Appends `bits` bits of v at bit position `pos` of a little-endian stream of 32-bit words.
void put_bits(std::vector<uint32_t>& words, int64_t pos, uint32_t v, int bits) {
  for (int b = 0; b < bits; ++b, ++pos)
    if ((v >> b) & 1u) words[size_t(pos / 32)] |= 1u << (pos % 32);
}

Tensor i32_tensor(const std::vector<uint32_t>& words, const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::I32);
  std::memcpy(t.raw_data(), words.data(), words.size() * sizeof(uint32_t));
  return t;
}

bool is_quant_suffix(const std::string& name, std::string& module) {
  for (const char* s : {".qweight", ".scales", ".qzeros", ".tensor_scale"}) {
    const size_t n = std::strlen(s);
    if (name.size() > n && name.compare(name.size() - n, n, s) == 0) {
      module = name.substr(0, name.size() - n);
      return true;
    }
  }
  return false;
}

void write_json(const fs::path& path, const nlohmann::json& j) {
  io::AtomicFileWriter w(path.string());
  const std::string s = j.dump(2) + "\n";
  w.write(s.data(), s.size());
  w.commit();
}

struct Layer {
  std::string name;
  const QuantizedTensor* q;
};

}  // namespace

HfQuantLayout parse_hf_quant_layout(std::string_view name) {
  if (name == "gptq") return HfQuantLayout::Gptq;
  if (name == "awq") return HfQuantLayout::Awq;
  throw_error("--layout ", std::string(name), ": unknown layout (known: gptq, awq)");
}

const char* hf_quant_layout_name(HfQuantLayout layout) { return layout == HfQuantLayout::Gptq ? "gptq" : "awq"; }

HfQuantExportInfo export_hf_quant_layout(const std::string& dir, const std::string& out_dir, HfQuantLayout layout) {
  const bool gptq = layout == HfQuantLayout::Gptq;
  const char* holds = gptq ? kGptqHolds : kAwqHolds;
  if (!is_lowbit_quantized_dir(dir))
    throw_error(dir, ": not a lowbit quantized directory (config.json with a lowbit quantization_config); "
                "quantize first: lowbit quantize -m MODEL --format int4g128 -o DIR");
  std::error_code ec;
  if (fs::exists(out_dir, ec) && !fs::is_directory(out_dir, ec))
    throw_error("--to ", out_dir, ": exists and is not a directory (the ", hf_quant_layout_name(layout),
                " layout is a directory)");
  if (fs::exists(out_dir, ec) && fs::equivalent(dir, out_dir, ec))
    throw_error("--to ", out_dir, ": is the input directory; give a new directory");
  const fs::path cfg_path = fs::path(dir) / "config.json";
  nlohmann::json cfg;
  {
    std::ifstream in(cfg_path);
    try {
      cfg = nlohmann::json::parse(in);
    } catch (const std::exception& e) {
      throw_error(cfg_path.string(), ": cannot parse: ", e.what());
    }
  }
  const nlohmann::json qc = cfg.value("quantization_config", nlohmann::json::object());
  if (qc.contains("lora"))
    throw_error(dir, ": has LoRA adapters (", qc["lora"].is_string() ? qc["lora"].get<std::string>() : "?",
                ", from ApiQ/SAPR); the ", hf_quant_layout_name(layout),
                " layout has no place for them (export the packed weights of a method without adapters)");

  QuantizedCheckpoint ck = load_quantized_model(dir, /*dense_view=*/false);
  refuse_transforms(ck, std::string("the ") + hf_quant_layout_name(layout) + " layout");
  const QuantFormat& f = quant_format(ck.format);
  const bool int_kind = f.kind == QuantKind::IntAsym || f.kind == QuantKind::IntSym;
  if (gptq && !(int_kind && (f.bits == 2 || f.bits == 3 || f.bits == 4 || f.bits == 8)))
    throw_error(dir, ": format ", f.name, " cannot be exported as gptq: ", holds);
  if (!gptq && !(int_kind && f.bits == 4 && f.group_size > 0))
    throw_error(dir, ": format ", f.name, " cannot be exported as awq: ", holds);
  const int B = f.bits;
  const int per_word = 32 / B;  // B = 3: 32 codes per 3 words
  const int64_t align = B == 3 ? 32 : per_word;
  const uint32_t mask = (1u << B) - 1u;

  std::vector<Layer> layers;
  for (const auto& [name, q] : ck.quantized) layers.push_back({name, &q});
  if (layers.empty()) throw_error(dir, ": no quantized layer to export");

  // Shapes first, and whether any zero point is 0 (gptq v1 cannot store it).
  bool zero_is_zero = false;
  for (const Layer& L : layers) {
    const QuantizedTensor& q = *L.q;
    if (q.format != f.id) throw_error(dir, ": ", L.name, " is ", q.fmt().name, ", the directory says ", f.name);
    q.validate();
    const int64_t out = q.out_features(), in = q.in_features();
    if (gptq) {
      if (in % align != 0)
        throw_error(dir, ": ", L.name, " has ", in, " inputs; the gptq layout packs ", B,
                    "-bit codes along the input and needs a multiple of ", align);
      if (out % align != 0)
        throw_error(dir, ": ", L.name, " has ", out, " outputs; the gptq layout packs ", B,
                    "-bit zero points along the output and needs a multiple of ", align);
    } else {
      if (in % f.group_size != 0)
        throw_error(dir, ": ", L.name, " has ", in, " inputs, not a multiple of the group size ", f.group_size,
                    " (the awq layout has whole groups only)");
      if (out % 8 != 0)
        throw_error(dir, ": ", L.name, " has ", out, " outputs; the awq layout packs 8 outputs a word and needs a multiple of 8");
    }
    if (f.kind == QuantKind::IntAsym) {  // integer zero points only (ParetoQ's 2-bit SEQ stores z = 1.5)
      const int64_t G = f.n_groups(in);
      for (int64_t o = 0; o < out; ++o)
        for (int64_t g = 0; g < G; ++g)
          if (const float z = q.group_params(o, g).zero; z != std::nearbyint(z))
            throw_error(dir, ": ", L.name, " row ", o, " group ", g, " has the zero point ", z, "; the ",
                        hf_quant_layout_name(layout), " layout stores integer zero points only (a ParetoQ 2-bit "
                        "SEQ checkpoint has half-integer ones: run it with lowbit, or export another method's)");
    }
    if (gptq && f.kind == QuantKind::IntAsym) {
      const int64_t G = f.n_groups(in);
      for (int64_t o = 0; o < out && !zero_is_zero; ++o)
        for (int64_t g = 0; g < G; ++g)
          if (q.group_params(o, g).zero == 0.0f) {
            zero_is_zero = true;
            break;
          }
    }
  }
  const std::string checkpoint_format = gptq ? (zero_is_zero ? "gptq_v2" : "gptq") : "gemm";
  const uint32_t zero_offset = gptq && !zero_is_zero ? 1u : 0u;

  std::vector<std::pair<std::string, Tensor>> ts;
  // Non-linear tensors (and biases) pass through in f16, in the file's order.
  SafetensorsFile src = SafetensorsFile::open((fs::path(dir) / "model.safetensors").string());
  for (const auto& t : src.tensors()) {
    std::string module;
    if (is_quant_suffix(t.name, module) && ck.quantized.count(module)) continue;
    ts.emplace_back(t.name, src.load_f32(t.name).to(DType::F16));
  }
  const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};  // AWQ GEMM: nibble k holds output 8j + order[k]
  std::vector<uint8_t> codes;
  for (const Layer& L : layers) {
    const QuantizedTensor& q = *L.q;
    const int64_t out = q.out_features(), in = q.in_features(), G = f.n_groups(in);
    std::vector<uint8_t> zeros(size_t(out * G));
    std::vector<uint16_t> scales(size_t(G * out));  // [G, out]
    for (int64_t o = 0; o < out; ++o)
      for (int64_t g = 0; g < G; ++g) {
        const GroupParams p = q.group_params(o, g);
        scales[size_t(g * out + o)] = f32_to_f16(p.scale);
        zeros[size_t(o * G + g)] = uint8_t(f.kind == QuantKind::IntSym ? 1 << (B - 1) : int(p.zero));
      }
    Tensor sc = Tensor::empty({G, out}, DType::F16);
    std::memcpy(sc.raw_data(), scales.data(), scales.size() * 2);
    codes.resize(size_t(in));
    if (gptq) {
      const int64_t rows = in * B / 32, zcols = out * B / 32;
      std::vector<uint32_t> qw(static_cast<size_t>(rows * out), 0u), col(static_cast<size_t>(rows), 0u);
      for (int64_t o = 0; o < out; ++o) {
        q.unpack_row(o, codes.data());
        std::fill(col.begin(), col.end(), 0u);
        for (int64_t i = 0; i < in; ++i) put_bits(col, i * B, codes[size_t(i)], B);
        for (int64_t k = 0; k < rows; ++k) qw[size_t(k * out + o)] = col[size_t(k)];
      }
      std::vector<uint32_t> qz(static_cast<size_t>(G * zcols), 0u), zrow(static_cast<size_t>(zcols), 0u);
      for (int64_t g = 0; g < G; ++g) {
        std::fill(zrow.begin(), zrow.end(), 0u);
        for (int64_t o = 0; o < out; ++o)
          put_bits(zrow, o * B, (uint32_t(zeros[size_t(o * G + g)]) - zero_offset) & mask, B);
        std::copy(zrow.begin(), zrow.end(), qz.begin() + g * zcols);
      }
      std::vector<uint32_t> gidx(static_cast<size_t>(in), 0u);
      for (int64_t i = 0; i < in; ++i) gidx[size_t(i)] = uint32_t(f.group_of_column(i));
      ts.emplace_back(L.name + ".qweight", i32_tensor(qw, {rows, out}));
      ts.emplace_back(L.name + ".qzeros", i32_tensor(qz, {G, zcols}));
      ts.emplace_back(L.name + ".scales", sc);
      ts.emplace_back(L.name + ".g_idx", i32_tensor(gidx, {in}));
    } else {
      const int64_t words = out / 8;
      std::vector<uint8_t> all(size_t(out * in));  // codes [out, in]
      for (int64_t o = 0; o < out; ++o) q.unpack_row(o, all.data() + o * in);
      std::vector<uint32_t> qw(size_t(in * words), 0), qz(size_t(G * words), 0);
      for (int64_t i = 0; i < in; ++i)
        for (int64_t j = 0; j < words; ++j) {
          uint32_t w = 0;
          for (int k = 0; k < 8; ++k) w |= uint32_t(all[size_t((8 * j + order[k]) * in + i)] & 15u) << (4 * k);
          qw[size_t(i * words + j)] = w;
        }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < words; ++j) {
          uint32_t w = 0;
          for (int k = 0; k < 8; ++k) w |= uint32_t(zeros[size_t((8 * j + order[k]) * G + g)] & 15u) << (4 * k);
          qz[size_t(g * words + j)] = w;
        }
      ts.emplace_back(L.name + ".qweight", i32_tensor(qw, {in, words}));
      ts.emplace_back(L.name + ".qzeros", i32_tensor(qz, {G, words}));
      ts.emplace_back(L.name + ".scales", sc);
    }
  }

  const int64_t group_size = f.group_size > 0 ? f.group_size : -1;
  nlohmann::json hqc;
  if (gptq) {
    hqc = {{"quant_method", "gptq"},
           {"bits", B},
           {"group_size", group_size},
           {"desc_act", false},
           {"sym", f.kind == QuantKind::IntSym},
           {"true_sequential", true},
           {"damp_percent", qc.contains("gptq") && qc["gptq"].is_object() ? qc["gptq"].value("percdamp", 0.01) : 0.01},
           {"checkpoint_format", checkpoint_format},
           {"model_file_base_name", "model"},
           {"quantizer", "lowbit " + qc.value("method", std::string("?")) + " " + f.name}};
  } else {
    hqc = {{"quant_method", "awq"},
           {"bits", 4},
           {"group_size", group_size},
           {"zero_point", true},
           {"version", "gemm"},
           {"modules_to_not_convert", nullptr}};
  }
  fs::create_directories(out_dir, ec);
  if (ec) throw_error("--to ", out_dir, ": cannot create the directory (", ec.message(), ")");
  save_safetensors((fs::path(out_dir) / "model.safetensors").string(), ts,
                   {{"format", "pt"}, {"quantizer", std::string("lowbit ") + hf_quant_layout_name(layout)}});
  nlohmann::json out_cfg = cfg;
  out_cfg["torch_dtype"] = "float16";
  out_cfg["quantization_config"] = hqc;
  write_json(fs::path(out_dir) / "config.json", out_cfg);
  if (gptq) {
    write_json(fs::path(out_dir) / "quantize_config.json", hqc);
  } else {
    write_json(fs::path(out_dir) / "quant_config.json",
               {{"zero_point", true}, {"q_group_size", group_size}, {"w_bit", 4}, {"version", "GEMM"}});
  }
  return {checkpoint_format, int(layers.size())};
}

}  // namespace lowbit
