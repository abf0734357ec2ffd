#include "lowbit/methods/pipeline.h"

#include <nlohmann/json.hpp>

#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <optional>

#include "lowbit/autograd/functions.h"
#include "lowbit/core/progress.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/ops/ops.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/quant/quant_linear.h"

namespace lowbit {

namespace fs = std::filesystem;

namespace {

void save_quantized(std::vector<std::pair<std::string, Tensor>>& out, const std::string& prefix, const QuantizedTensor& q) {
  LB_CHECK(q.panel_rows == 0, prefix, ": the codes are in the CPU panel layout; the state is written in the row layout");
  out.emplace_back(prefix + ".codes", q.codes);
  if (q.scales.defined()) out.emplace_back(prefix + ".scales", q.scales);
  if (q.zeros.defined()) out.emplace_back(prefix + ".zeros", q.zeros);
  if (q.tensor_scale.defined()) out.emplace_back(prefix + ".tensor_scale", q.tensor_scale);
  if (q.col_mask.defined()) out.emplace_back(prefix + ".col_mask", q.col_mask);
  if (q.col_scales.defined()) out.emplace_back(prefix + ".col_scales", q.col_scales);
}

QuantizedTensor load_quantized(const SafetensorsFile& f, const std::string& prefix, const QuantFormat& fmt,
                               const Shape& shape) {
  QuantizedTensor q;
  q.format = fmt.id;
  q.shape = shape;
  q.codes = f.load(prefix + ".codes");
  if (f.find(prefix + ".scales")) q.scales = f.load(prefix + ".scales");
  if (f.find(prefix + ".zeros")) q.zeros = f.load(prefix + ".zeros");
  if (f.find(prefix + ".tensor_scale")) q.tensor_scale = f.load(prefix + ".tensor_scale");
  if (f.find(prefix + ".col_mask")) q.col_mask = f.load(prefix + ".col_mask");
  if (f.find(prefix + ".col_scales")) q.col_scales = f.load(prefix + ".col_scales");
  q.validate();
  return q;
}

uint64_t token_hash(const Tensor& tokens) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the calibration ids
  const int32_t* p = tokens.data<int32_t>();
  for (int64_t i = 0; i < tokens.numel(); ++i) h = (h ^ uint32_t(p[i])) * 1099511628211ull;
  return h;
}

std::string formats_key(const LayerFormats* f) {
  if (!f || f->empty()) return "";
  std::string k = "|formats:";
  for (const auto& [m, id] : *f) k += m + "=" + quant_format(id).name + ";";
  return k;
}

}  // namespace

int64_t peak_rss_bytes() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return int64_t(ru.ru_maxrss) * 1024;
}

std::string key_number(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

double relative_output_error(const Tensor& x, const Tensor& w, const Tensor& q) {
  // ||X (W - Q)^T||^2 / ||X W^T||^2 with the ops, so it runs where the tensors live (cuBLAS on the
  // GPU, BLAS on the CPU) without host copies; strict f32 on the GPU even in a TF32 run, so the
  // reported error does not depend on --tf32.
  const Device dev = x.device();
  std::optional<CudaTf32Scope> strict;
  if (dev == Device::CUDA) strict.emplace(false);
  const Tensor xf = x.to(DType::F32).contiguous(), wf = w.to(dev).to(DType::F32).contiguous();
  const Tensor qf = q.to(dev).to(DType::F32).contiguous();
  Tensor y = Tensor::empty({xf.size(0), wf.size(0)}, DType::F32, dev);
  ops::gemm(xf, false, wf, true, y, 1.0, 0.0);
  const double ref = ops::sum_squares(y);
  Tensor d = Tensor::empty(wf.shape(), DType::F32, dev);
  ops::sub(wf, qf, d);
  ops::gemm(xf, false, d, true, y, 1.0, 0.0);
  const double err = ops::sum_squares(y);
  return ref > 0 ? err / ref : 0.0;
}

Tensor report_sample(const Tensor& x, int64_t max_rows) {
  if (x.size(0) <= max_rows) return x;
  const int64_t step = (x.size(0) + max_rows - 1) / max_rows, n = (x.size(0) + step - 1) / step;
  Tensor out = Tensor::empty({n, x.size(1)}, x.dtype(), x.device());
  for (int64_t i = 0; i < n; ++i) out.slice(0, i, i + 1).copy_(x.slice(0, i * step, i * step + 1));
  return out;
}

Tensor BlockContext::run_block(const Tensor& x, const LinearInputHook& hook, bool keep_output) const {
  NoGradGuard ng;
  LlamaBlock& b = model.block(layer);
  std::optional<LinearHookScope> hooks;
  if (hook) hooks.emplace(b.linears(), hook);
  const int64_t D = x.size(1);
  Tensor out = keep_output ? Tensor::empty({n_samples * seqlen, D}, x.dtype(), x.device()) : Tensor();
  for (int64_t s = 0; s < n_samples; s += batch) {
    const int64_t e = std::min(n_samples, s + batch);
    // A bf16 cache: this batch in f32 (on x's device), the output rounded back into the cache's dtype.
    const Tensor xs = x.slice(0, s * seqlen, e * seqlen);
    Var xin(x.dtype() == DType::BF16 ? cast_to(xs, DType::F32) : xs);
    Var y = model.block_forward(layer, xin, e - s, seqlen);
    if (!keep_output) continue;
    Tensor dst = out.slice(0, s * seqlen, e * seqlen);
    if (dst.dtype() == y.value().dtype()) dst.copy_(y.value());
    else ops::cast(y.value().contiguous(), dst);  // on the device (copy_ would stage through the host)
  }
  return out;
}

namespace {
// The model's transforms in the resume key ("" without any, so older states stay valid): a state
// written for a rotated model is refused for another rotation and vice versa.
std::string clips_key(const std::vector<double>& clips) {
  std::string k;
  for (double c : clips) k += (k.empty() ? "|clips:" : ",") + key_number(c);
  return k;
}
std::string transforms_key(const ModelTransforms& t) {
  if (!t.any()) return "";
  return "|rot:" + (t.rotation.empty() ? std::string("none") : t.rotation + ":" + std::to_string(t.rotation_seed)) +
         "|act:" + act_quant_name(t.act) + ":" + key_number(t.act.clip) + "|kv:" + kv_quant_name(t.kv) + ":" +
         std::to_string(t.kv.group) + ":" + std::to_string(t.kv.window) + clips_key(t.act.clips);
}
}  // namespace

const QuantFormat& BlockContext::format_of(const std::string& linear, const QuantFormat& dflt) const {
  if (!formats) return dflt;
  auto it = formats->find("model.layers." + std::to_string(layer) + "." + linear);
  return it == formats->end() ? dflt : quant_format(it->second);
}

PipelineReport run_blockwise(LlamaModel& model, const Tensor& tokens, BlockMethod& method, const QuantFormat& format,
                             const PipelineOptions& o) {
  if (tokens.dim() != 2 || tokens.dtype() != DType::I32) throw_error("pipeline: calibration tokens must be i32 [N, L]");
  const int64_t N = tokens.size(0), L = tokens.size(1);
  const auto t0 = std::chrono::steady_clock::now();
  // Calibration forwards through ptq161 layers on f32 activations (as before the Int8 prefill).
  ops::QuantSalientPrefillExactScope exact_ptq161;
  BlockStream* stream = o.stream;
  if (stream && method.needs_whole_model())
    throw_error("pipeline: method '", method.name(), "' reads the whole model before the first block; it cannot run on "
                "a streamed model (quantize --stream off)");
  method.prepare(model, tokens, o.state_dir, o.progress);  // the model is untouched yet, also when resuming
  PipelineReport rep;
  rep.method = method.name();
  rep.format = format.name;
  Tensor X, Xfp;
  int start = 0;
  const std::string state_path = o.state_dir.empty() ? "" : (fs::path(o.state_dir) / "pipeline.safetensors").string();
  if (o.cache_dtype != DType::F32 && o.cache_dtype != DType::BF16)
    throw_error("pipeline: calibration activations are kept in f32 or bf16, not ", dtype_name(o.cache_dtype));
  const bool bf16_cache = o.cache_dtype == DType::BF16;
  if (bf16_cache && !method.accepts_bf16_cache())
    throw_error("pipeline: method '", method.name(), "' needs f32 calibration activations; a bf16 cache is for "
                "apiq, apiq-layer, sapr and sapr-layer");
  // The cache dtype joins the key only when bf16, so f32 states written before it stay valid.
  const std::string key = method.name() + "(" + method.options_key() + ")|" + format.name + "|" + std::to_string(token_hash(tokens)) + "|" +
                          (o.next_from_fp ? "fp" : "q") + transforms_key(model.transforms()) + formats_key(o.formats) +
                          (stream ? "|stream" : "") + (bf16_cache ? "|cache:bf16" : "");
  if (!state_path.empty() && fs::exists(state_path)) {
    SafetensorsFile f = SafetensorsFile::open(state_path);
    auto it = f.metadata().find("key");
    if (it == f.metadata().end() || it->second != key)
      throw_error(state_path, ": saved state is for a different run (method, format, calibration data or options); "
                  "remove it or use another state directory");
    start = std::stoi(f.metadata().at("next_block"));
    // The per-linear report of the blocks done before the restart, so the final report lists every block.
    if (auto r = f.metadata().find("report"); r != f.metadata().end()) {
      const auto j = nlohmann::json::parse(r->second, nullptr, false);
      if (!j.is_array()) throw_error(state_path, ": 'report' metadata is not a JSON array");
      try {
        for (const auto& l : j)
          rep.linears.push_back({l.at("name").get<std::string>(), l.at("rel_error").get<double>(),
                                 l.at("bits_per_weight").get<double>(), l.at("params").get<int64_t>()});
      } catch (const nlohmann::json::exception& e) {
        throw_error(state_path, ": malformed 'report' metadata (", e.what(), ")");
      }
    }
    // Activations and rebuilt layers go where the model lives (the state file is on the host).
    const Device dev = stream ? stream->device() : model.block(0).attn_norm.value().device();
    X = f.load("inputs").to(dev);
    Xfp = f.find("fp_inputs") ? f.load("fp_inputs").to(dev) : X;
    if (bf16_cache != (X.dtype() == DType::BF16) || X.dtype() != Xfp.dtype())
      throw_error(state_path, ": the saved activations are ", dtype_name(X.dtype()), ", this run keeps them in ",
                  bf16_cache ? "bf16" : "the model's dtype", "; remove the state or use another state directory");
    if (stream) stream->check_finished(start, key);  // the finished blocks are written out, not in the state
    for (int i = 0; i < (stream ? 0 : start); ++i) {
      LlamaBlock& b = model.block(i);
      const std::string p = "block." + std::to_string(i) + ".";
      b.attn_norm.mutable_value().copy_(f.load(p + "attn_norm"));
      b.ffn_norm.mutable_value().copy_(f.load(p + "ffn_norm"));
      for (auto& [name, slot] : b.linears()) {
        const BlockContext bc{model, i, N, L, Tensor(), Tensor(), o.batch, o.formats};
        QuantizedTensor q = load_quantized(f, p + name, bc.format_of(name, format),
                                           {(*slot)->out_features(), (*slot)->in_features()});
        // LoRA adapters (ApiQ, SAPR) are part of the saved state: a resumed run must see the same block.
        Tensor lora_A = f.find(p + name + ".lora_A") ? f.load(p + name + ".lora_A") : Tensor();
        Tensor lora_B = f.find(p + name + ".lora_B") ? f.load(p + name + ".lora_B") : Tensor();
        // A method may have changed a bias (CLE's scaling and bias correction): the saved one wins.
        Tensor bias = f.find(p + name + ".bias") ? f.load(p + name + ".bias").to(dev) : (*slot)->bias();
        auto ql = std::make_shared<QuantLinear>(std::move(q), bias, dev, lora_A, lora_B);
        // QuIP's incoherence transforms (quip): part of the layer's function.
        const std::string ip = p + name + ".incoherence.";
        if (f.find(ip + "in_signs")) {
          Incoherence t;
          t.in.signs = f.load(ip + "in_signs");
          if (f.find(ip + "in_small")) t.in.small = f.load(ip + "in_small");
          if (f.find(ip + "out_signs")) t.out.signs = f.load(ip + "out_signs");
          if (f.find(ip + "out_small")) t.out.small = f.load(ip + "out_small");
          const Tensor seed = f.load(ip + "seed");
          t.seed = uint64_t(seed.data<int64_t>()[0]);
          validate_incoherence(t, ql->out_features(), ql->in_features(), t.out.defined(), state_path, p + name);
          ql->set_incoherence(std::move(t));
        }
        *slot = ql;
      }
    }
    rep.resumed_from_block = start;
  } else if (stream) {
    X = stream->embed(tokens).contiguous();
    if (bf16_cache) X = to_bf16(X);
    Xfp = X;
  } else {
    NoGradGuard ng;
    X = model.embed(tokens).value().contiguous();
    if (bf16_cache) X = to_bf16(X);
    Xfp = X;
  }

  auto last_save = std::chrono::steady_clock::now();
  ProgressBar bar(method.name() + " " + format.name, model.n_layers(), "blocks");
  bar.update(start);
  for (int i = start; i < model.n_layers(); ++i) {
    const auto tb = std::chrono::steady_clock::now();
    if (stream) {
      stream->load(model, i);
      rep.stream_load_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - tb).count();
    }
    BlockContext ctx{model, i, N, L, X, Tensor(), o.batch, o.formats};
    const auto tf = std::chrono::steady_clock::now();
    Tensor Y = ctx.run_block(Xfp);  // FP target before the block changes
    Xfp = Tensor();  // not needed again (reassigned below): one activation tensor less held during the method
    rep.fp_forward_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - tf).count();
    rep.blocks_run++;
    BlockContext qctx{model, i, N, L, X, Y, o.batch, o.formats};
    method.quantize_block(qctx, rep.linears);
    Tensor Xq = qctx.run_block(X);
    if (o.next_from_fp) {
      X = Y;
      Xfp = Y;
    } else {
      X = Xq;
      Xfp = Y;
    }
    if (stream) {  // written before the state that counts it as done
      const auto tw = std::chrono::steady_clock::now();
      stream->finish(model, i, key);
      rep.stream_write_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - tw).count();
    }
    const bool stopping = o.stop_after_blocks > 0 && i + 1 - start >= o.stop_after_blocks && i + 1 < model.n_layers();
    const bool last = i + 1 == model.n_layers();  // the output is written next: no state needed
    const double since_save = std::chrono::duration<double>(std::chrono::steady_clock::now() - last_save).count();
    if (!state_path.empty() && !last && (stopping || since_save >= o.checkpoint_seconds)) {
      const auto ts0 = std::chrono::steady_clock::now();
      fs::create_directories(o.state_dir);
      std::vector<std::pair<std::string, Tensor>> ts{{"inputs", X}};
      if (!o.next_from_fp) ts.emplace_back("fp_inputs", Xfp);
      for (int j = 0; j <= (stream ? -1 : i); ++j) {  // streamed blocks: written by finish()
        LlamaBlock& b = model.block(j);
        const std::string p = "block." + std::to_string(j) + ".";
        ts.emplace_back(p + "attn_norm", b.attn_norm.value());
        ts.emplace_back(p + "ffn_norm", b.ffn_norm.value());
        for (auto& [name, slot] : b.linears()) {
          auto* ql = dynamic_cast<QuantLinear*>(slot->get());
          if (!ql) throw_error("pipeline: method '", method.name(), "' left ", name, " of block ", j, " unquantized");
          save_quantized(ts, p + name, ql->quantized());
          if (ql->bias().defined()) ts.emplace_back(p + name + ".bias", ql->bias());
          if (const Incoherence& t = ql->incoherence(); t.defined()) {
            const std::string ip = p + name + ".incoherence.";
            ts.emplace_back(ip + "in_signs", t.in.signs);
            if (t.in.small.defined()) ts.emplace_back(ip + "in_small", t.in.small);
            if (t.out.defined()) ts.emplace_back(ip + "out_signs", t.out.signs);
            if (t.out.small.defined()) ts.emplace_back(ip + "out_small", t.out.small);
            Tensor seed = Tensor::empty({1}, DType::I64);
            seed.data<int64_t>()[0] = int64_t(t.seed);
            ts.emplace_back(ip + "seed", seed);
          }
          if (ql->has_lora()) {
            ts.emplace_back(p + name + ".lora_A", ql->lora_A());
            ts.emplace_back(p + name + ".lora_B", ql->lora_B());
          }
        }
      }
      nlohmann::json report = nlohmann::json::array();
      for (const auto& l : rep.linears)
        report.push_back({{"name", l.name}, {"rel_error", l.rel_error}, {"bits_per_weight", l.bits_per_weight},
                          {"params", l.params}});
      save_safetensors(state_path, ts,
                       {{"key", key}, {"next_block", std::to_string(i + 1)}, {"report", report.dump()}});
      last_save = std::chrono::steady_clock::now();
      rep.checkpoints_saved++;
      rep.checkpoint_seconds += std::chrono::duration<double>(last_save - ts0).count();
    }
    rep.block_seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - tb).count());
    bar.update(i + 1);
    if (stopping) {
      rep.complete = false;
      break;
    }
  }
  bar.finish();
  double bits = 0, params = 0;
  for (const auto& l : rep.linears) {
    bits += l.bits_per_weight * double(l.params);
    params += double(l.params);
  }
  rep.bits_per_weight = params > 0 ? bits / params : 0;
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  rep.peak_rss_bytes = peak_rss_bytes();
  return rep;
}

}  // namespace lowbit
