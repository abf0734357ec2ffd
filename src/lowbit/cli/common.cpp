#include "lowbit/cli/common.h"
#include "lowbit/cli/dist.h"

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "lowbit/core/progress.h"
#include "lowbit/core/threads.h"
#include "lowbit/io/file_util.h"
#include "lowbit/io/gguf.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/kv_cq.h"
#include "lowbit/methods/kv_wkv.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/tokenizer/chat_template.h"

namespace lowbit::cli {

void add_threads_option(CLI::App* app) {
  app->add_option_function<int>(
         "--threads", [](const int& n) { set_num_threads(n); },
         "CPU threads for the model's computation (default: physical cores, " + std::to_string(default_num_threads()) +
             ")")
      ->check(CLI::Range(1, 1024));
}

void add_f32_vocab_option(CLI::App* app, bool* keep_f32) {
  app->add_flag("--f32-vocab", *keep_f32,
                "lowbit quantized directories: keep the embedding/output matrix dense as stored (default: packed "
                "as q8_0 at load, as GGUF files of small models ship it; about 4x less memory, faster decode)");
}

void add_matmul_option(CLI::App* app) {
  app->add_option_function<std::string>(
      "--matmul", [](const std::string& v) { ops::set_quant_matmul_default(ops::parse_quant_matmul_path(v, "--matmul")); },
      "activations of quantized (packed) matrix products: auto = int8 for decode (<= 8 rows), f32 for "
      "prefill (int8 there too for the ternary formats and, on AVX2 CPUs, ptq161); int8 = int8 activations everywhere (llama.cpp's way, fastest); exact = f32 activations "
      "everywhere (the path that answers \"Paris\" on the SmolLM2 chat example, where int8 decode does "
      "not); reference = row-by-row oracle (slow). Default auto; overrides LOWBIT_QUANT_MATMUL");
}

void add_kv_cache_option(CLI::App* app, KVCacheType* type, const std::string& help) {
  app->add_option_function<std::string>(
      "--kv-cache", [type](const std::string& v) { *type = parse_kv_cache_type(v, "--kv-cache"); },
      help.empty() ? std::string("storage of the KV cache: auto (= f16 on the CPU, f32 on CUDA), f16, q8 (int8 per "
                                 "value + one f32 scale per token and head: half of f16's memory), int4 / int2 "
                                 "(KIVI packed codes: keys per channel, values per token, the newest --kv-window "
                                 "tokens in f16; CPU only) or f32")
                   : help);
}

void check_kv_cache_device(KVCacheType type, const std::string& device) {
  if (kv_cache_bits(type) && device != "cpu")
    throw_error("--kv-cache ", kv_cache_type_name(type), ": the packed KIVI cache runs on the CPU only (no CUDA "
                "body yet): use --device cpu, or --kv-cache f32 on the GPU");
}

namespace fs = std::filesystem;

Device parse_device(const std::string& name) {
  if (name == "cpu") return Device::CPU;
  if (name == "cuda" || name == "gpu") {
    if (!init_cuda(cuda_device_index())) throw_error("--device cuda: no usable CUDA GPU (or lowbit was built without CUDA)");
    return Device::CUDA;
  }
  throw_error("unknown device '", name, "' (expected cpu or cuda)");
}

bool is_packed_gguf(const std::string& path) {
  return gguf_has_packed_linears(path);
}

namespace {
// CPU inference: the packed weights rearranged once into the panel layout of the Int8 body's x86
// panel kernels (ops/quant_matmul.h), in place, before the model takes its copies (the tied
// embedding is one entry: its table and the output layer share the rearranged codes). Off with
// LOWBIT_PANEL_LAYOUT=0.
// Codes borrowed from a file mapping (GGUF: zero copy) are copied into memory of their own first, a
// few MiB at a time, each piece's mapped pages released as it is copied: the resident size does
// not grow (the copy replaces the mapped pages) and the rearrangement is in place.
void to_cpu_panel_layout(QuantizedCheckpoint& q) {
  if (!ops::quant_panel_layout_enabled()) return;
  for (auto& [name, t] : q.quantized) {
    if (ops::quant_matmul_panel_height(t.packed_view()) == 0) continue;
    if (!t.codes.storage()->deleter) {
      const Tensor mapped = t.codes;
      Tensor own = Tensor::empty(mapped.shape(), mapped.dtype());
      const auto* src = static_cast<const uint8_t*>(mapped.raw_data());
      auto* dst = static_cast<uint8_t*>(own.raw_data());
      const size_t n = mapped.nbytes(), piece = size_t(4) << 20;
      for (size_t o = 0; o < n;) {
        // pieces end on piece-aligned addresses, so each releases whole pages
        const size_t e = std::min(n, size_t((reinterpret_cast<uintptr_t>(src + o) / piece + 1) * piece -
                                            reinterpret_cast<uintptr_t>(src)));
        std::memcpy(dst + o, src + o, e - o);
        io::release_mapped_pages(src + o, e - o);
        o = e;
      }
      t.codes = own;
    }
    t.to_panel_layout();
  }
}
}  // namespace

LoadedModel load_model(const std::string& path, Device device, bool dequantize, bool packed_vocab) {
  LoadedModel m;
  ModelTransforms transforms;  // a quantized checkpoint's, kept by its dense view
  if (dequantize && is_lowbit_quantized_dir(path)) {  // the dense view, f32
    QuantizedCheckpoint q = load_quantized_model(path);
    m.checkpoint = std::move(q.dense);
    transforms = std::move(q.transforms);
  } else if (is_lowbit_quantized_dir(path)) {  // packed weights: QuantLinear layers
    QuantizedCheckpoint q = load_quantized_model(path, /*dense_view=*/false);
    if (packed_vocab && device == Device::CPU) m.packed_vocab_bytes = pack_vocab(q);
    if (device == Device::CPU) to_cpu_panel_layout(q);
    // LOWBIT_TERNARY_KERNEL=lut: the ternary weights' lookup-table index form (a second copy of
    // their codes, before the model takes its copies), which makes the Int8 body take the
    // lookup-table kernel (ops/quant_matmul.h).
    if (device == Device::CPU && ops::quant_ternary_lut_enabled())
      for (auto& [name, t] : q.quantized) t.to_tl_layout();
    m.model = make_quantized_model(q, device);
    m.checkpoint = std::move(q.dense);
    for (auto& l : m.checkpoint.weights.layers)  // drop the placeholders of the packed linears
      for (Tensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) *t = Tensor();
    if (m.packed_vocab_bytes > 0) m.checkpoint.weights.tok_embeddings = m.checkpoint.weights.output = Tensor();
    return m;
  }
  if (!dequantize && is_packed_gguf(path)) {  // ggml block types stay packed: QuantLinear layers
    QuantizedCheckpoint q = load_gguf_quantized(path, /*dense_view=*/false);
    if (device == Device::CPU) to_cpu_panel_layout(q);
    m.model = make_quantized_model(q, device);
    m.checkpoint = std::move(q.dense);
    for (auto& l : m.checkpoint.weights.layers)
      for (Tensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) *t = Tensor();
    if (m.model->packed_output()) {
      m.checkpoint.weights.tok_embeddings = m.checkpoint.weights.output = Tensor();
      for (const char* name : {"model.embed_tokens", "lm_head"})
        if (auto it = q.quantized.find(name); it != q.quantized.end()) m.packed_vocab_bytes += it->second.nbytes();
    }
    return m;
  }
  if (!m.checkpoint.weights.tok_embeddings.defined()) m.checkpoint = load_checkpoint(path);
  LlamaWeights w = m.checkpoint.weights;
  if (device != Device::CPU) for_each_weight(w, [&](const std::string&, Tensor& t) { t = t.to(device); });
  m.model = std::make_unique<LlamaModel>(m.checkpoint.config, w, false);
  m.model->set_transforms(std::move(transforms));
  return m;
}

void add_transform_options(CLI::App* app, TransformArgs* a) {
  app->add_option("--rotate", a->rotate,
                  "rotate a full-precision model (QuaRot): hadamard folds the norms into the linears, rotates the "
                  "residual stream and adds an online Hadamard before down_proj; the function is unchanged")
      ->capture_default_str()
      ->check(CLI::IsMember({"none", "hadamard"}));
  app->add_option("--rotate-seed", a->rotate_seed, "seed of the random signs and small orthogonal factors of --rotate")
      ->capture_default_str()
      ->check(at_least(0));
  app->add_option("--act", a->act,
                  "fake-quantize the input of every block linear per token: none, int8, int4, int8-asym, int4-asym, "
                  "int4-absmean (BitNet v2's INT4: s = mean|x| / sqrt(7)), fp8 (E4M3), fp4-mx (E2M1, e8m0 scale per 32) or fp4-nv (E2M1, e4m3 scale per 16 under an f32 "
                  "per-token scale) (default: what the checkpoint records, else none)")
      ->check(CLI::Validator(
          [](std::string& v) -> std::string {
            try {
              parse_act_quant(v, "");
            } catch (const Error& e) {
              return std::string(e.what()).substr(2);  // past the empty flag name's ": "
            }
            return "";
          },
          "FORMAT", ""));
  app->add_option("--act-clip", a->act_clip_arg,
                  "with --act: clip ratio of each token's range (0, 1], or 'search' (quantize, with --calib: one ratio per "
                  "block and activation point with the least output error on calibration rows, methods/act_clip.h)")
      ->check(CLI::Validator(
          [](std::string& v) -> std::string {
            if (v == "search") return "";
            std::string e = above(0)(v);
            return e.empty() ? between(0, 1)(v) : e;
          },
          "R|search", ""))
      ->each([a](const std::string& v) {
        a->act_clip_given = true;
        a->act_clip_search = v == "search";
        if (!a->act_clip_search) a->act_clip = std::stod(v);
      });
  app->add_option("--kv-quant", a->kv_quant,
                  "fake quantization of the KV cache: none, int4, int2 (KIVI: keys per channel, values per token, "
                  "asymmetric), cq1, cq2 (Coupled Quantization: 8 / 4 channels of a token quantized jointly to one of "
                  "256 learned centroids, 1 / 2 bits per channel; `quantize --calib` learns the codebooks, which the "
                  "checkpoint keeps), wkv4, wkv2 (WKVQuant: static per-channel smoothing calibrated on --calib / "
                  "--kv-calib, then 4 / 2-bit per-token quantization; past only: a query never reads its own token "
                  "quantized) (default: what the checkpoint records, else none)")
      ->check(CLI::Validator(
          [](std::string& v) -> std::string {
            try {
              parse_kv_quant_bits(v, "");
            } catch (const Error& e) {
              return std::string(e.what()).substr(2);
            }
            return "";
          },
          "BITS", ""));
  app->add_option("--kv-token-quant", a->kv_token_quant,
                  "LLM-QAT's KV quantization (what `qat --method llm-qat --kv-bits` trains with): k_proj/v_proj outputs "
                  "fake-quantized per token and head, symmetric, before RoPE: none, int8, int4, int2 (default: what the "
                  "checkpoint records, else none)")
      ->check(CLI::Validator(
          [](std::string& v) -> std::string {
            try {
              parse_kv_token_bits(v, "");
            } catch (const Error& e) {
              return std::string(e.what()).substr(2);
            }
            return "";
          },
          "BITS", ""));
  app->add_option("--kv-calib", a->kv_calib,
                  "with --kv-quant cq1|cq2|wkv4|wkv2 on a model without codebooks / smoothing (eval, generate, bench): "
                  "learn them at load on this text's keys and values (quantize records them instead: its --calib)");
  app->add_option("--kv-codebook", a->kv_codebook,
                  "with --kv-quant cq1|cq2 codebooks learned here: centroids rounded to f16 (the paper's codebooks, "
                  "stored in f16) or kept in f32")
      ->capture_default_str()
      ->check(CLI::IsMember({"f16", "f32"}));
  app->add_option("--kv-calib-windows", a->kv_calib_windows, "with --kv-calib: calibration windows")
      ->capture_default_str()
      ->check(between(1, 4096));
  app->add_option("--kv-calib-seqlen", a->kv_calib_seqlen, "with --kv-calib: tokens per window (capped at the model's max)")
      ->capture_default_str()
      ->check(between(2, 1 << 20));
  app->add_option("--kv-group", a->kv_group, "with --kv-quant or --kv-cache int4|int2: tokens per key group and channels per value group (values: the whole head when it does not divide head_dim)")
      ->check(between(1, 4096))
      ->each([a](const std::string&) { a->kv_group_given = true; });
  app->add_option("--kv-window", a->kv_window, "with --kv-quant or --kv-cache int4|int2: recent tokens kept in full precision (at least)")
      ->check(at_least(0))
      ->each([a](const std::string&) { a->kv_window_given = true; });
}

void apply_rotation(LoadedModel& m, const TransformArgs& a) {
  if (!a.rotating()) return;
  LlamaModel& model = *m.model;
  if (!model.transforms().rotation.empty())
    throw_error("--rotate: the model is already rotated (", model.transforms().rotation, ")");
  bool packed = model.packed_output() != nullptr;
  for (int i = 0; i < model.n_layers(); ++i)
    for (auto& [name, slot] : model.block(i).linears()) packed |= dynamic_cast<DenseLinear*>(slot->get()) == nullptr;
  if (packed)
    throw_error("--rotate: the model is quantized; rotations are applied to the full-precision model before "
                "quantizing (lowbit quantize --rotate hadamard ...), and a checkpoint made so keeps them (add "
                "--dequantize to rotate the dequantized weights as a full-precision model)");
  LlamaConfig c = model.config();
  LlamaWeights w = weights_to(model.weights(), Device::CPU);
  for_each_weight(w, [](const std::string&, Tensor& t) { t = t.to(DType::F32); });  // compacted 16-bit tables
  ModelTransforms t = rotate_weights(c, w, a.rotate_seed);
  t.act = model.transforms().act;
  t.kv = model.transforms().kv;
  t.kv_token_bits = model.transforms().kv_token_bits;
  replace_weights(m, c, std::move(w), std::move(t));
}

void replace_weights(LoadedModel& m, LlamaConfig c, LlamaWeights w, ModelTransforms t) {
  m.model = std::make_unique<LlamaModel>(c, w, false);
  m.model->set_transforms(std::move(t));
  m.checkpoint.config = c;
  m.checkpoint.weights = std::move(w);
}

void apply_quant_transforms(LlamaModel& model, const TransformArgs& a, KVCacheType cache) {
  const bool packed = kv_cache_bits(cache) > 0;
  if (packed && !a.kv_quant.empty() && parse_kv_quant_bits(a.kv_quant) > 0)
    throw_error("--kv-quant ", a.kv_quant, " simulates KV-cache quantization on an f16/f32 cache, --kv-cache ",
                kv_cache_type_name(cache), " stores the cache quantized: give one of them (--kv-group and --kv-window "
                "set either)");
  ModelTransforms t = model.transforms();
  if (a.act_clip_search)
    throw_error("--act-clip search: only `lowbit quantize` searches clip ratios (on --calib data); a checkpoint made so "
                "records them, and --act-clip R replaces them with one ratio");
  if (!a.act.empty()) {  // the recorded searched ratios stay with the same format given again
    ActQuantSpec given = parse_act_quant(a.act);
    if (act_quant_name(given) == act_quant_name(t.act)) given.clips = t.act.clips;
    t.act = std::move(given);
  }
  if (a.act_clip_given) {
    t.act.clip = a.act_clip;
    t.act.clips.clear();
  }
  if (!a.kv_quant.empty()) {
    const int bits = parse_kv_quant_bits(a.kv_quant), channels = kv_quant_channels(a.kv_quant);
    if (channels > 0) {  // CQ: the codebooks come from the checkpoint (quantize learns them)
      if (!(t.kv.coupled() && t.kv.bits == bits && t.kv.cq_channels == channels))
        throw_error("--kv-quant ", a.kv_quant, ": this model has no ", a.kv_quant, " codebooks (it records KV quantization ",
                    kv_quant_name(t.kv), "); they are learned by `lowbit quantize --kv-quant ", a.kv_quant,
                    " --calib TEXT ...`, and the checkpoint it writes keeps them");
    } else if (kv_quant_wkv(a.kv_quant)) {  // WKVQuant: the smoothing comes from the checkpoint or --kv-calib
      if (!(t.kv.smoothed() && t.kv.bits == bits))
        throw_error("--kv-quant ", a.kv_quant, ": this model has no ", a.kv_quant, " smoothing (it records KV quantization ",
                    kv_quant_name(t.kv), "); it is calibrated by `lowbit quantize --kv-quant ", a.kv_quant,
                    " --calib TEXT ...` (the checkpoint keeps it) or at load with --kv-calib TEXT");
    } else {
      t.kv.bits = bits;
      t.kv.cq_channels = 0;
      t.kv.cq_keys = Tensor();
      t.kv.cq_values = Tensor();
      t.kv.wkv = false;
      t.kv.wkv_shift = Tensor();
      t.kv.wkv_scale = Tensor();
    }
  }
  if (packed && (t.kv.coupled() || t.kv.smoothed()))
    throw_error("--kv-cache ", kv_cache_type_name(cache), " stores KIVI codes; this model records ",
                t.kv.coupled() ? "coupled" : "WKVQuant", " KV quantization ", kv_quant_name(t.kv),
                " (simulated on an f16/f32 cache): give --kv-cache f16 or f32, or --kv-quant none");
  if (!a.kv_token_quant.empty()) t.kv_token_bits = parse_kv_token_bits(a.kv_token_quant);
  if (a.kv_group_given) t.kv.group = a.kv_group;
  if (a.kv_window_given) t.kv.window = a.kv_window;
  if (a.act_clip_given && !t.act.enabled()) throw_error("--act-clip: no activation quantization (give --act)");
  if ((a.kv_group_given || a.kv_window_given) && !t.kv.enabled() && !packed)
    throw_error(a.kv_group_given ? "--kv-group" : "--kv-window",
                ": no KV-cache quantization (give --kv-quant, or --kv-cache int4|int2)");
  const KVQuantSpec recorded = t.kv;
  model.set_transforms(std::move(t));
  if (packed)  // the flags, else what the checkpoint records, else the defaults
    model.set_kv_cache_layout(a.kv_group_given || !recorded.enabled() ? a.kv_group : recorded.group,
                              a.kv_window_given || !recorded.enabled() ? a.kv_window : recorded.window);
}

void apply_kv_calibration(LoadedModel& m, const TransformArgs& a, const std::string& tokenizer_path,
                          const std::string& model_path, bool quiet) {
  if (a.kv_calib.empty()) return;
  const int channels = a.kv_quant.empty() ? 0 : kv_quant_channels(a.kv_quant);
  const bool wkv = !a.kv_quant.empty() && kv_quant_wkv(a.kv_quant);
  if (channels == 0 && !wkv)
    throw_error("--kv-calib learns the codebooks of coupled KV quantization or WKVQuant's smoothing: give --kv-quant cq1, "
                "cq2, wkv4 or wkv2");
  const ModelTransforms& cur = m.model->transforms();
  if (cur.kv.coupled() || cur.kv.smoothed())
    throw_error("--kv-calib: the model already records ", kv_quant_name(cur.kv), cur.kv.coupled() ? " codebooks" : " smoothing",
                " (drop --kv-calib to use them)");
  std::ifstream in(a.kv_calib, std::ios::binary);
  if (!in) throw_error("--kv-calib ", a.kv_calib, ": cannot open");
  auto tok = open_tokenizer(tokenizer_path, model_path);
  std::stringstream ss;
  ss << in.rdbuf();
  std::vector<int32_t> stream;
  for (int id : tok->encode(ss.str(), false)) stream.push_back(id);
  if (stream.empty()) throw_error("--kv-calib ", a.kv_calib, ": the text holds no tokens");
  const int64_t seqlen = std::min<int64_t>(a.kv_calib_seqlen, m.model->config().max_seq_len);
  const Tensor calib = sample_calibration(stream, a.kv_calib_windows, seqlen, 0);
  const int bits = parse_kv_quant_bits(a.kv_quant);
  if (wkv) {
    WkvCalibOptions o;
    o.bits = bits;
    o.group = a.kv_group_given ? a.kv_group : cur.kv.enabled() ? cur.kv.group : a.kv_group;
    const WkvCalibReport r = learn_wkv_smoothing(*m.model, calib, o);
    ModelTransforms t = cur;
    t.kv.bits = bits;
    t.kv.cq_channels = 0;
    t.kv.cq_keys = Tensor();
    t.kv.cq_values = Tensor();
    t.kv.wkv = true;
    t.kv.wkv_shift = r.shift;
    t.kv.wkv_scale = r.scale;
    m.model->set_transforms(std::move(t));
    if (!quiet) {
      double lp = 0, lc = 0;
      for (size_t i = 0; i < r.loss_plain.size(); ++i) lp += r.loss_plain[i], lc += r.loss_chosen[i];
      std::fprintf(stderr, "kv smoothing %s calibrated on %lld x %lld tokens of %s: next-block relative error %.5f without "
                   "smoothing, %.5f with (mean over layers; %.1f s)\n", a.kv_quant.c_str(), (long long)calib.size(0),
                   (long long)calib.size(1), a.kv_calib.c_str(), lp / double(r.loss_plain.size()),
                   lc / double(r.loss_chosen.size()), r.seconds);
    }
    return;
  }
  KVCodebookOptions o;
  o.channels = channels;
  o.code_bits = bits * channels;
  o.f16 = a.kv_codebook == "f16";
  const KVCodebookReport r = learn_kv_codebooks(*m.model, calib, o);
  ModelTransforms t = cur;
  t.kv.bits = bits;
  t.kv.cq_channels = channels;
  t.kv.cq_keys = r.keys;
  t.kv.cq_values = r.values;
  m.model->set_transforms(std::move(t));
  if (!quiet) {
    double ek = 0, ev = 0;
    for (double e : r.key_rel_error) ek += e;
    for (double e : r.value_rel_error) ev += e;
    std::fprintf(stderr, "kv codebooks %s learned on %lld x %lld tokens of %s: relative error keys %.4f, values %.4f (%.1f s)\n",
                 a.kv_quant.c_str(), (long long)calib.size(0), (long long)calib.size(1), a.kv_calib.c_str(),
                 ek / double(r.key_rel_error.size()), ev / double(r.value_rel_error.size()), r.seconds);
  }
}

void compact_for_inference(LoadedModel& m, Device device) {
  if (device != Device::CPU || !m.model) return;
  m.model->compact_weights();
  m.checkpoint.weights = LlamaWeights{};
}

std::unique_ptr<Tokenizer> open_tokenizer(const std::string& tokenizer_path, const std::string& model_path) {
  if (!tokenizer_path.empty()) return open_tokenizer_file(tokenizer_path);
  std::error_code ec;
  if (!model_path.empty() && (fs::is_directory(model_path, ec) || looks_like_gguf(model_path)))
    return open_tokenizer_file(model_path);
  throw_error("no tokenizer: pass --tokenizer FILE (tokenizer.bin, tokenizer.model, tokenizer.json or a GGUF file); ",
              model_path, " is neither a model directory with one nor a GGUF file with an embedded one");
}

std::string find_chat_template(const std::string& tokenizer_path, const std::string& model_path, std::string* where) {
  for (const std::string& p : {tokenizer_path, model_path}) {
    std::error_code ec;
    if (p.empty() || !fs::exists(p, ec)) continue;
    std::string source = chat_template_for(p);
    if (!source.empty()) {
      if (where) *where = p;
      return source;
    }
  }
  return {};
}

std::string render_chat(const std::string& source, const std::string& where, const Tokenizer& tok,
                        const nlohmann::ordered_json& messages, bool add_generation_prompt) {
  ChatTemplateInputs in;
  in.messages = messages;
  in.add_generation_prompt = add_generation_prompt;
  in.bos_token = tok.token_text(tok.bos_id());
  in.eos_token = tok.token_text(tok.eos_id());
  in.extra["tools"] = nullptr;  // as transformers passes them
  in.extra["documents"] = nullptr;
  return render_chat_template(source, in, where + " (chat template)");
}

std::string chat_prompt(const std::string& tokenizer_path, const std::string& model_path, const Tokenizer& tok,
                        const std::string& user, const std::string& system) {
  std::string where;
  const std::string source = find_chat_template(tokenizer_path, model_path, &where);
  if (source.empty())
    throw_error("--chat: no chat template found (", model_path.empty() ? tokenizer_path : model_path,
                " has no tokenizer.chat_template, chat_template.jinja or tokenizer_config.json chat_template)");
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  if (!system.empty()) messages.push_back({{"role", "system"}, {"content", system}});
  messages.push_back({{"role", "user"}, {"content", user}});
  return render_chat(source, where, tok, messages, true);
}

std::vector<int32_t> read_token_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw_error(path, ": cannot open token file");
  const auto size = static_cast<int64_t>(f.tellg());
  if (size % 4 != 0) throw_error(path, ": ", size, " bytes is not a whole number of int32 token ids");
  std::vector<int32_t> ids(size_t(size / 4));
  f.seekg(0);
  f.read(reinterpret_cast<char*>(ids.data()), size);
  if (!f) throw_error(path, ": read failed");
  return ids;
}

// Tokenizes a text file once and caches the ids (see common.h).
std::vector<int32_t> tokenize_file_cached(const std::string& text_path, const Tokenizer& tok, const std::string& tok_path,
                               const std::string& cache_path) {
  std::error_code ec;
  const auto size = fs::file_size(text_path, ec);
  if (ec) throw_error(text_path, ": cannot read (", ec.message(), ")");
  const auto mtime = fs::last_write_time(text_path).time_since_epoch().count();
  const std::string key = text_path + "|" + std::to_string(size) + "|" + std::to_string(mtime) + "|" + tok_path;
  std::ifstream meta(cache_path + ".key");
  std::string saved;
  std::getline(meta, saved);
  if (saved == key && fs::exists(cache_path)) return read_token_file(cache_path);
  std::ifstream f(text_path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  auto t0 = std::chrono::steady_clock::now();
  const std::string text = ss.str();
  std::vector<int> ids;
  {
    ProgressBar bar("tokenize " + fs::path(text_path).filename().string(), int64_t(text.size() >> 20), "MB");
    ids = tok.encode_long(text, [&](size_t done) { bar.update(int64_t(done >> 20)); });
    bar.finish();
  }
  std::fprintf(stderr, "tokenized %s: %zu tokens in %.1fs\n", text_path.c_str(), ids.size(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  std::vector<int32_t> out(ids.begin(), ids.end());
  {
    std::ofstream o(cache_path + ".tmp", std::ios::binary);
    o.write(reinterpret_cast<const char*>(out.data()), std::streamsize(out.size() * 4));
  }
  fs::rename(cache_path + ".tmp", cache_path);
  std::ofstream(cache_path + ".key") << key << "\n";
  return out;
}

void write_stdout(std::string_view s) {
  errno = 0;
  if (std::fwrite(s.data(), 1, s.size(), stdout) != s.size() || std::fflush(stdout) != 0)
    throw_error("writing to standard output: ", errno ? std::strerror(errno) : "write failed");
}

void print_stdout(const char* fmt, ...) {
  va_list ap, ap2;
  va_start(ap, fmt);
  va_copy(ap2, ap);
  const int n = std::vsnprintf(nullptr, 0, fmt, ap);
  va_end(ap);
  std::string s(size_t(std::max(n, 0)), '\0');
  if (n > 0) std::vsnprintf(s.data(), s.size() + 1, fmt, ap2);
  va_end(ap2);
  write_stdout(s);
}

void check_stdout() {
  errno = 0;
  std::cout.flush();
  const bool bad = !std::cout || std::fflush(stdout) != 0 || std::ferror(stdout);
  if (bad) throw_error("writing to standard output: ", errno ? std::strerror(errno) : "write failed");
}

void print_json(const nlohmann::json& j) { write_stdout(j.dump() + "\n"); }

// ---- numeric flag ranges ------------------------------------------------------------------------

namespace {
// Parses a whole string as a finite number; "" on success, else the problem.
std::string parse_finite(const std::string& in, double& v) {
  const char* b = in.c_str();
  char* end = nullptr;
  errno = 0;
  v = std::strtod(b, &end);
  if (in.empty() || end == b || *end != '\0') return "'" + in + "' is not a number";
  if (!std::isfinite(v) || errno == ERANGE) return "'" + in + "' is not a finite number";
  return {};
}

std::string fmt_num(double x) {
  std::ostringstream os;
  os << x;
  return os.str();
}

CLI::Validator range_validator(double lo, double hi, bool lo_open, std::string desc) {
  return CLI::Validator(
      [lo, hi, lo_open](std::string& in) -> std::string {
        double v = 0;
        if (std::string e = parse_finite(in, v); !e.empty()) return e;
        const bool ok = (lo_open ? v > lo : v >= lo) && v <= hi;
        if (ok) return {};
        std::string want = std::isinf(hi) ? (lo_open ? "greater than " : "at least ") + fmt_num(lo)
                                          : "between " + fmt_num(lo) + " and " + fmt_num(hi);
        return "must be " + want + ", got " + in;
      },
      desc, "");
}
}  // namespace

CLI::Validator at_least(double lo) {
  return range_validator(lo, std::numeric_limits<double>::infinity(), false, "NUMBER>=" + fmt_num(lo));
}
CLI::Validator above(double lo) {
  return range_validator(lo, std::numeric_limits<double>::infinity(), true, "NUMBER>" + fmt_num(lo));
}
CLI::Validator between(double lo, double hi) {
  return range_validator(lo, hi, false, "NUMBER in [" + fmt_num(lo) + ", " + fmt_num(hi) + "]");
}
CLI::Validator finite() {
  return range_validator(-std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity(), false,
                         "");
}

CLI::Validator non_empty() {
  return CLI::Validator([](std::string& in) -> std::string { return in.empty() ? "must not be empty" : ""; }, "", "");
}

// ---- output directories -------------------------------------------------------------------------

OutputDir::OutputDir(std::string path, std::string flag) : path_(std::move(path)), flag_(std::move(flag)) {
  if (path_.empty()) throw_error(flag_, ": empty path");
  std::error_code ec;
  const fs::path p(path_);
  if (fs::exists(p, ec)) {
    if (!fs::is_directory(p, ec)) throw_error(flag_, " ", path_, ": exists and is not a directory");
    if (::access(path_.c_str(), W_OK | X_OK) != 0)
      throw_error(flag_, " ", path_, ": directory is not writable (", std::strerror(errno), ")");
    return;
  }
  // Find the topmost missing ancestor: that is what this object creates (and may remove).
  fs::path top = fs::absolute(p, ec).lexically_normal();
  if (top.has_filename() == false) top = top.parent_path();
  for (fs::path q = top; !q.empty() && q != q.root_path(); q = q.parent_path()) {
    if (fs::exists(q, ec)) {
      if (!fs::is_directory(q, ec)) throw_error(flag_, " ", path_, ": ", q.string(), " is not a directory");
      break;
    }
    top = q;
  }
  fs::create_directories(p, ec);
  if (ec) throw_error(flag_, " ", path_, ": cannot create directory (", ec.message(), ")");
  created_ = top.string();
}

OutputDir::~OutputDir() {
  if (keep_ || created_.empty()) return;
  std::error_code ec;
  if (!keep_if_.empty() && fs::exists(keep_if_, ec) && !(fs::is_directory(keep_if_, ec) && fs::is_empty(keep_if_, ec)))
    return;
  fs::remove_all(created_, ec);
}

void OutputDir::refuse_input(const std::string& input, const std::string& what) const {
  std::error_code ec;
  if (input.empty() || !fs::exists(input, ec)) return;
  const fs::path in = fs::weakly_canonical(input, ec);
  for (fs::path q = fs::weakly_canonical(path_, ec); !q.empty(); q = q.parent_path()) {
    if (q == in) throw_error(flag_, " ", path_, " is ", what, " (or inside it); choose another directory");
    if (q == q.root_path()) break;
  }
}

// ---- tokenizer files travel with outputs --------------------------------------------------------

double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / double(v.size());
}

std::vector<std::pair<int64_t, int64_t>> block_linear_shapes(const LlamaConfig& c) {
  const int64_t d = c.dim, h = c.hidden_dim, hd = c.resolved_head_dim();
  const int64_t q = hd * c.n_heads, kv = hd * c.n_kv_heads;
  return {{q, d}, {kv, d}, {kv, d}, {d, q}, {h, d}, {h, d}, {d, h}};
}

double block_linear_bits_per_weight(const LlamaConfig& c, const QuantFormat& f) {
  double bits = 0, params = 0;
  for (const auto& [out, in] : block_linear_shapes(c)) {
    bits += f.bits_per_weight(out, in) * double(out) * double(in);
    params += double(out) * double(in);
  }
  return params > 0 ? bits / params : 0;
}

int copy_tokenizer_files(const std::string& tokenizer, const std::string& model, const std::string& out_dir) {
  std::error_code ec;
  std::vector<std::pair<fs::path, std::string>> files;  // source, name in out_dir
  auto add_file = [&](const fs::path& f) {
    const std::string ext = f.extension().string();
    std::string name = ext == ".json" ? "tokenizer.json" : ext == ".model" ? "tokenizer.model" : "";
    if (name.empty()) {
      std::ifstream in(f, std::ios::binary);
      char c = 0;
      while (in.get(c) && std::isspace(static_cast<unsigned char>(c))) {
      }
      name = c == '{' ? "tokenizer.json" : "tokenizer.bin";
    }
    files.emplace_back(f, name);
  };
  auto add_dir = [&](const fs::path& d) {
    for (const char* n : {"tokenizer.json", "tokenizer.model", "tokenizer.bin", "tokenizer_config.json",
                          "special_tokens_map.json", "chat_template.jinja"})
      if (fs::is_regular_file(d / n, ec)) files.emplace_back(d / n, n);
  };
  if (!tokenizer.empty()) {
    if (fs::is_directory(tokenizer, ec)) add_dir(tokenizer);
    else if (fs::is_regular_file(tokenizer, ec)) add_file(tokenizer);
  } else if (!model.empty() && fs::is_directory(model, ec)) {
    add_dir(model);
  }
  int copied = 0;
  for (const auto& [src, name] : files) {
    const fs::path dst = fs::path(out_dir) / name;
    if (fs::exists(dst, ec) && fs::equivalent(src, dst, ec)) continue;
    const fs::path tmp = dst.string() + ".tmp";
    fs::copy_file(src, tmp, fs::copy_options::overwrite_existing, ec);
    if (!ec) fs::rename(tmp, dst, ec);
    if (ec) {
      fs::remove(tmp, ec);
      throw_error(dst.string(), ": cannot copy the tokenizer file ", src.string(), " (", ec.message(), ")");
    }
    ++copied;
  }
  return copied;
}

// ---- default task directory ---------------------------------------------------------------------

std::string default_task_dir() {
  const std::string sub = "tasks/llm-foundry";
  if (const char* s = std::getenv("LOWBIT_SHARED"); s && *s) return (fs::path(s) / sub).string();
  // The executable lives in <repo>/<build>/lowbit (or <prefix>/bin/lowbit): look for a shared/
  // folder beside each of its ancestors.
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec)
    for (fs::path d = exe.parent_path(); !d.empty() && d != d.root_path(); d = d.parent_path()) {
      const fs::path cand = d.parent_path() / "shared" / sub;
      if (fs::is_directory(cand, ec)) return cand.string();
    }
  return (fs::path("../shared") / sub).string();
}


}  // namespace lowbit::cli
