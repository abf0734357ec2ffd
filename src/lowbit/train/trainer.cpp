#include "lowbit/train/trainer.h"

#include <bit>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include <nlohmann/json.hpp>

#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/optim.h"
#include "lowbit/core/progress.h"
#include "lowbit/io/hf.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/methods/block_train.h"
#include "lowbit/train/zero.h"
#include "lowbit/ops/ops.h"

namespace lowbit {

namespace fs = std::filesystem;

LlamaWeights init_weights(const LlamaConfig& c, uint64_t seed) {
  LlamaWeights w = random_weights(c, seed);
  const double s = 1.0 / std::sqrt(2.0 * c.n_layers);
  for (auto& l : w.layers) {
    ops::scale(l.wo, s, l.wo);
    ops::scale(l.w_down, s, l.w_down);
  }
  return w;
}

MixedPrecisionModel::MixedPrecisionModel(const LlamaModel& master) : master_(master) {
  masters_ = master.parameters();
  for (const auto& p : masters_) {
    if (p.value().device() != Device::CUDA)
      throw_error("bf16 mixed precision needs the model on the GPU (--device cuda): the CPU backend has no bf16 kernels");
    if (p.value().dtype() != DType::F32)
      throw_error("bf16 mixed precision needs f32 master weights, got ", p.value().describe());
  }
  // The copy is built over the masters' own tensors (the model checks f32 weights), then every
  // parameter node gets a bf16 tensor of its own: the copy shares nothing with the masters after.
  copy_ = std::make_unique<LlamaModel>(master.config(), master.weights(), true);
  copies_ = copy_->parameters();
  if (copies_.size() != masters_.size()) throw_error("MixedPrecisionModel: parameter lists differ");
  for (auto& c : copies_) c.mutable_value() = Tensor::empty(c.shape(), DType::BF16, Device::CUDA);
  refresh();
}

void MixedPrecisionModel::refresh() {
  for (size_t i = 0; i < masters_.size(); ++i) {
    ops::cast(masters_[i].value(), copies_[i].mutable_value());
    copies_[i].zero_grad();
  }
}

Var MixedPrecisionModel::forward(const Tensor& tokens) const {
  if (tokens.dim() != 2) throw_error("forward: tokens must be [B, T], got ", tokens.describe());
  const int64_t B = tokens.size(0), T = tokens.size(1);
  // The lookup (and its scatter-add gradient, which sums many rows per token) stays in f32.
  Var x = cast(master_.embed(tokens), DType::BF16);
  for (int i = 0; i < copy_->n_layers(); ++i) x = copy_->block_forward(i, x, B, T);
  return cast(copy_->head(x), DType::F32);
}

void MixedPrecisionModel::collect_grads() {
  for (size_t i = 0; i < masters_.size(); ++i) {
    Var& c = copies_[i];
    if (!c.grad().defined()) continue;
    Tensor g = Tensor::empty(c.shape(), DType::F32, Device::CUDA);
    ops::cast(c.grad(), g);
    accumulate_grad(masters_[i], g);
    c.zero_grad();
  }
}

namespace {

// The architecture a state belongs to ("llama", "bitnet-b1.58" or "bitnet-v2", the latter with
// "-no-hadamard" for --hadamard off and "-absmean" for --act-quant absmean): a resume checks it.
std::string arch_name(const TrainOptions& o) {
  return std::string(bitnet_arch_name(o.bitnet)) + (o.bitnet.v2 && !o.bitnet.hadamard ? "-no-hadamard" : "") +
         (o.bitnet.v2 && o.bitnet.act_scale == ops::ActScale::AbsMean ? "-absmean" : "");
}

// The state file: the parameters, then AdamW's state tensors in its order (state_tensors()).
// Low-precision training's part of the state: its settings (checked on resume) and the fp8 amax
// histories of the model's LowPrecisionLinear layers (null model: f32 training).
struct LpStatePart {
  std::vector<const LpProduct*> products;
  std::string key = "f32";
};

void save_state_tensors(const std::string& path, const std::vector<Var>& params, const std::vector<Tensor>& st, int bits,
                        int64_t step, const LlamaConfig& c, uint64_t seed, const std::string& arch,
                        const LpStatePart& lp) {
  // The state tensors' number and types depend on the optimizer bits: stored so a resume can check.
  std::vector<std::pair<std::string, Tensor>> ts;
  for (size_t i = 0; i < params.size(); ++i) ts.emplace_back("param." + std::to_string(i), params[i].value());
  for (size_t i = 0; i < st.size(); ++i) ts.emplace_back("adamw." + std::to_string(i), st[i]);
  for (auto& t : lp_state_tensors(lp.products)) ts.push_back(std::move(t));
  nlohmann::json cj = config_to_hf_json(c, "float32");
  save_safetensors(path, ts,
                   {{"step", std::to_string(step)}, {"seed", std::to_string(seed)}, {"config", cj.dump()}, {"arch", arch},
                    {"optimizer_bits", std::to_string(bits)}, {"precision", lp.key}});
}

void save_state(const std::string& path, const std::vector<Var>& params, AdamW& opt, int64_t step,
                const LlamaConfig& c, uint64_t seed, const std::string& arch, const LpStatePart& lp) {
  std::vector<Tensor> st;
  for (Tensor* t : opt.state_tensors()) st.push_back(*t);
  save_state_tensors(path, params, st, opt.state_bits(), step, c, seed, arch, lp);
}

// state_index: the file's state tensor for each of opt.state_tensors() (null: the same order);
// a sharded (ZeRO) optimizer restores its own parameters' moments from a whole state file.
int64_t load_state(const std::string& path, std::vector<Var>& params, AdamW& opt, uint64_t seed,
                   const std::string& arch, const LpStatePart& lp, const std::vector<size_t>* state_index = nullptr) {
  SafetensorsFile f = SafetensorsFile::open(path);
  auto it = f.metadata().find("step");
  if (it == f.metadata().end()) throw_error(path, ": training state has no 'step' metadata");
  auto sd = f.metadata().find("seed");
  if (sd != f.metadata().end() && sd->second != std::to_string(seed))
    throw_error(path, ": saved with --seed ", sd->second, ", this run uses ", seed, "; use the same seed or a new --out");
  auto ar = f.metadata().find("arch");
  const std::string saved_arch = ar == f.metadata().end() ? "llama" : ar->second;
  if (saved_arch != arch)
    throw_error(path, ": saved by an --arch ", saved_arch, " run, this run is --arch ", arch,
                " (-no-hadamard: --hadamard off, -absmean: --act-quant absmean); use the same flags or a new --out");
  auto ob = f.metadata().find("optimizer_bits");  // states written before the flag existed: 32
  const std::string saved_bits = ob == f.metadata().end() ? "32" : ob->second;
  if (saved_bits != std::to_string(opt.state_bits()))
    throw_error(path, ": saved with --optimizer-bits ", saved_bits, ", this run uses --optimizer-bits ", opt.state_bits(),
                "; use the same --optimizer-bits or a new --out");
  auto pr = f.metadata().find("precision");  // states written before --precision existed: f32
  const std::string saved_precision = pr == f.metadata().end() ? "f32" : pr->second;
  if (saved_precision != lp.key)
    throw_error(path, ": saved with --precision settings '", saved_precision, "', this run uses '", lp.key,
                "'; use the same --precision settings or a new --out");
  auto restore = [&](const std::string& name, Tensor& dst) {
    Tensor t = f.load(name);
    if (t.shape() != dst.shape() || t.dtype() != dst.dtype())
      throw_error(path, ": tensor '", name, "' is ", t.describe(), " but the model expects ", dst.describe(),
                  " (different --config than the saved run?)");
    dst.copy_(t);
  };
  for (size_t i = 0; i < params.size(); ++i) restore("param." + std::to_string(i), params[i].mutable_value());
  auto st = opt.state_tensors();
  for (size_t i = 0; i < st.size(); ++i)
    restore("adamw." + std::to_string(state_index ? (*state_index)[i] : i), *st[i]);
  restore_lp_state(lp.products, [&](const std::string& name) { return f.find(name) ? f.load(name) : Tensor(); });
  const int64_t step = std::stoll(it->second);
  opt.set_steps(step);
  return step;
}

}  // namespace

std::vector<int64_t> train_window_starts(uint64_t seed, int64_t step, int64_t micro, int64_t B, int64_t T,
                                         int64_t n) {
  // SplitMix-style mixing of (seed, step, micro) so each micro-batch has its own stream.
  uint64_t z = seed * 0x9E3779B97F4A7C15ull ^ uint64_t(step) * 0xBF58476D1CE4E5B9ull ^ uint64_t(micro) * 0x94D049BB133111EBull;
  std::mt19937_64 rng(z);
  std::uniform_int_distribution<int64_t> u(0, n - T - 1);
  std::vector<int64_t> s(static_cast<size_t>(B));
  for (auto& x : s) x = u(rng);
  return s;
}

std::vector<int64_t> validation_window_starts(int64_t n, int64_t T, int64_t B, int64_t batches) {
  const int64_t windows = B * batches;
  const int64_t span = n - T - 1;
  if (span <= 0) throw_error("validation stream (", n, " tokens) is shorter than one sequence of ", T + 1);
  std::vector<int64_t> starts;
  starts.reserve(size_t(std::max<int64_t>(windows, 0)));
  for (int64_t w = 0; w < windows; ++w) starts.push_back(w * span / std::max<int64_t>(windows, 1));
  return starts;
}

void write_data_order(const std::string& path, const TrainOptions& o, int64_t n_train, int64_t n_val) {
  if (o.max_steps < 0 || o.grad_accum < 1 || o.batch_size < 1) throw_error("write_data_order: bad options");
  if (n_train < o.seq_len + 2) throw_error("training stream has ", n_train, " tokens: too short for --seq-len ", o.seq_len);
  if (auto parent = fs::path(path).parent_path(); !parent.empty()) fs::create_directories(parent);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw_error(path, ": cannot write the data order");
    auto put = [&](const std::vector<int64_t>& v) {
      static_assert(std::endian::native == std::endian::little, "the order file is little-endian");
      f.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * sizeof(int64_t)));
    };
    put({int64_t(kDataOrderMagic), o.max_steps, o.grad_accum, o.batch_size, o.seq_len, n_val > 0 ? o.eval_batches : 0,
         n_train, n_val, int64_t(o.seed)});
    for (int64_t s = 0; s < o.max_steps; ++s)
      for (int64_t m = 0; m < o.grad_accum; ++m) put(train_window_starts(o.seed, s, m, o.batch_size, o.seq_len, n_train));
    if (n_val > 0) put(validation_window_starts(n_val, o.seq_len, o.batch_size, o.eval_batches));
    if (!f) throw_error(path, ": write failed");
  }
  fs::rename(tmp, path);
}

double validation_loss(const LlamaModel& model, const std::vector<int32_t>& stream, int64_t T, int64_t B,
                       int64_t batches) {
  return validation_loss([&](const Tensor& in) { return model.forward(in); }, stream, T, B, batches);
}

double validation_loss(const std::function<Var(const Tensor&)>& forward, const std::vector<int32_t>& stream, int64_t T,
                       int64_t B, int64_t batches) {
  NoGradGuard ng;
  const std::vector<int64_t> all = validation_window_starts(int64_t(stream.size()), T, B, batches);
  double total = 0;
  for (int64_t k = 0; k < batches; ++k) {
    std::vector<int64_t> starts(all.begin() + k * B, all.begin() + (k + 1) * B);
    Tensor in, tgt;
    make_lm_windows(stream, starts, T, in, tgt);
    Var logits = forward(in);
    total += cross_entropy(logits, tgt.to(logits.value().device())).value().item();
  }
  return total / double(batches);
}

void check_training_inputs(const TrainOptions& o, const std::vector<int32_t>& train, const std::vector<int32_t>& val) {
  if (o.batch_size < 1) throw_error("--batch must be at least 1, got ", o.batch_size);
  if (o.seq_len < 1) throw_error("--seq-len must be at least 1, got ", o.seq_len);
  if (o.grad_accum < 1) throw_error("--grad-accum must be at least 1, got ", o.grad_accum);
  if (o.max_steps < 0) throw_error("--steps must be at least 0, got ", o.max_steps);
  if (o.warmup_steps < 0) throw_error("--warmup must be at least 0, got ", o.warmup_steps);
  if (o.eval_batches < 1) throw_error("--eval-batches must be at least 1, got ", o.eval_batches);
  if (o.optimizer_bits != 32 && o.optimizer_bits != 8)
    throw_error("--optimizer-bits must be 32 or 8, got ", o.optimizer_bits);
  if (!std::isfinite(o.lr) || o.lr <= 0) throw_error("--lr must be a finite number greater than 0, got ", o.lr);
  // A window is seq_len + 1 tokens (inputs and shifted targets) drawn from [0, n - seq_len - 1).
  const auto need = o.seq_len + 2;
  if (int64_t(train.size()) < need)
    throw_error("training data has ", train.size(), " tokens: at least ", need, " are needed for --seq-len ", o.seq_len,
                " (give more data or a smaller --seq-len)");
  if (!val.empty() && int64_t(val.size()) < need)
    throw_error("validation data has ", val.size(), " tokens: at least ", need, " are needed for --seq-len ", o.seq_len,
                " (give more data or a smaller --seq-len)");
}

namespace {
// The training loop; with `mixed`, forward passes run on its bf16 copies and their gradients are
// collected into the f32 masters (`params`) after each backward.
TrainResult run_training_impl(const LlamaModel& model, const std::vector<Var>& params, const TrainOptions& o,
                              const std::vector<int32_t>& train, const std::vector<int32_t>& val,
                              const std::function<void(const TrainRecord&)>& on_step, MixedPrecisionModel* mixed,
                              const std::function<void(int64_t)>& before_step = nullptr, const LpStatePart& lp = {}) {
  if (params.empty()) throw_error("training: no trainable parameters");
  check_training_inputs(o, train, val);
  const bool dp = o.comm && o.comm->world_size() > 1;
  const bool writer = !o.comm || o.comm->rank() == 0;  // the log, the state
  if (dp && o.batch_size < o.comm->world_size())
    throw_error("--batch ", o.batch_size, ": data-parallel training splits each micro-batch's windows over the ",
                o.comm->world_size(), " ranks (give at least one window per rank)");
  if (writer) fs::create_directories(o.out_dir);
  const std::string state_path = (fs::path(o.out_dir) / "state.safetensors").string();
  const std::string log_path = (fs::path(o.out_dir) / "log.jsonl").string();
  // No weight decay on norms (1-D), as in llama2.c's train.py.
  ParamGroup decay{{}, {o.lr, o.beta1, o.beta2, 1e-8, o.weight_decay}}, no_decay{{}, {o.lr, o.beta1, o.beta2, 1e-8, 0.0}};
  for (auto& p : params) (p.value().dim() >= 2 ? decay : no_decay).params.push_back(p);
  AdamWStateOptions state_options;
  state_options.bits = o.optimizer_bits;
  if (model.token_embedding().defined()) state_options.keep_32bit.push_back(model.token_embedding());
  std::vector<Var> ordered = decay.params;
  ordered.insert(ordered.end(), no_decay.params.begin(), no_decay.params.end());
  // ZeRO: this rank's optimizer holds the state of its own parameters only.
  const bool zero = dp && o.zero;
  ZeroLayout zl;
  std::vector<size_t> own_state;  // the state file's tensors for this rank's optimizer (m, v per own parameter)
  if (o.zero && !dp) throw_error("--zero shards the optimizer state over several ranks (--gpus N or a launcher)");
  if (zero) {
    if (o.optimizer_bits != 32) throw_error("--zero: f32 optimizer state only (--optimizer-bits 32)");
    if (mixed) throw_error("--zero: not with --bf16 mixed precision");
    for (const auto& p : ordered)
      if (p.value().dtype() != DType::F32) throw_error("--zero: f32 parameters only, got ", p.value().describe());
    zl = zero_layout(ordered, o.comm->world_size());
    ParamGroup d{{}, decay.options}, nd{{}, no_decay.options};
    for (size_t i = 0; i < ordered.size(); ++i)
      if (zl.owns(i, o.comm->rank())) {
        (i < decay.params.size() ? d : nd).params.push_back(ordered[i]);
        own_state.push_back(2 * i);
        own_state.push_back(2 * i + 1);
      }
    decay = d;
    no_decay = nd;
  }
  AdamW opt({decay, no_decay}, state_options);
  // The whole state file (rank 0 writes it): with ZeRO the moments are gathered from their owners first.
  auto save_now = [&](int64_t at) {
    if (!zero) {
      if (writer) save_state(state_path, ordered, opt, at, o.config, o.seed, arch_name(o), lp);
      return;
    }
    std::vector<Tensor*> st = opt.state_tensors();
    std::map<size_t, std::pair<Tensor*, Tensor*>> mine;  // own parameter -> (m, v)
    for (size_t i = 0, k = 0; i < ordered.size(); ++i)
      if (zl.owns(i, o.comm->rank())) mine[i] = {st[k], st[k + 1]}, k += 2;
    const Tensor m = zero_gather(ordered, zl, *o.comm, [&](size_t i) { return *mine.at(i).first; });
    const Tensor v = zero_gather(ordered, zl, *o.comm, [&](size_t i) { return *mine.at(i).second; });
    if (!writer) return;
    std::vector<Tensor> all;
    for (size_t i = 0; i < ordered.size(); ++i) {
      all.push_back(zero_slot(m, zl, i, ordered[i].value()));
      all.push_back(zero_slot(v, zl, i, ordered[i].value()));
    }
    save_state_tensors(state_path, ordered, all, 32, at, o.config, o.seed, arch_name(o), lp);
  };

  TrainResult result;
  result.optimizer_state_bytes = opt.state_bytes();
  result.optimizer_params_8bit = opt.params_8bit();
  int64_t step = 0;
  if (o.resume && fs::exists(state_path)) {
    step = load_state(state_path, ordered, opt, o.seed, arch_name(o), lp, zero ? &own_state : nullptr);
    result.resumed = true;
  }
  // Keep the log consistent with the state: drop lines past the resumed step.
  if (writer) {
    std::vector<std::string> keep;
    std::ifstream in(log_path);
    for (std::string line; std::getline(in, line);) {
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.value("step", int64_t(1) << 62) <= step) keep.push_back(line);
    }
    std::ofstream out(log_path, std::ios::trunc);
    for (auto& l : keep) out << l << "\n";
  }
  std::ofstream log;
  if (writer) log.open(log_path, std::ios::app);

  // With mixed precision the bf16 copies are rewritten from the masters before the first forward
  // pass after each update (and after a resume).
  bool copies_fresh = false;
  auto forward = [&](const Tensor& in) -> Var {
    if (!mixed) return model.forward(in);
    if (!copies_fresh) mixed->refresh();
    copies_fresh = true;
    return mixed->forward(in);
  };

  // The layers' mode for a step (BitNet's transition) is set before it; also before a final
  // validation of a run resumed at its end.
  if (before_step && o.max_steps > 0) before_step(std::min(step, o.max_steps - 1));
  ProgressBar bar("train", o.max_steps, "steps");
  bar.update(step);
  int64_t run_steps = 0;
  while (step < o.max_steps) {
    auto t0 = std::chrono::steady_clock::now();
    if (before_step) before_step(step);
    if (o.bitnet.two_stage) opt.groups()[0].options.weight_decay = o.weight_decay * two_stage_wd(step, o.max_steps);
    opt.zero_grad();
    double loss_sum = 0;
    for (int64_t m = 0; m < o.grad_accum; ++m) {
      Tensor in, tgt;
      std::vector<int64_t> starts = train_window_starts(o.seed, step, m, o.batch_size, o.seq_len, int64_t(train.size()));
      double share = 1;  // this rank's fraction of the micro-batch's windows (its weight in the mean loss)
      if (dp) {
        const auto [b, e] = comm::shard_range(int64_t(starts.size()), o.comm->rank(), o.comm->world_size(), "--batch");
        share = double(e - b) / double(starts.size());
        starts = std::vector<int64_t>(starts.begin() + b, starts.begin() + e);
      }
      make_lm_windows(train, starts, o.seq_len, in, tgt);
      Var logits = forward(in);
      Var loss = cross_entropy(logits, tgt.to(o.device));
      loss_sum += loss.value().item() * share;
      const double w = share / double(o.grad_accum);
      backward(w != 1.0 ? scale(loss, w) : loss);
      if (mixed) mixed->collect_grads();  // sum micro-batches in f32
    }
    if (dp) {  // the mean over every rank's windows: sums of the weighted losses and gradients
      if (!zero) all_reduce_grads(ordered, *o.comm);
      loss_sum = o.comm->all_reduce_sum(loss_sum);
    }
    TrainRecord r;
    r.step = step + 1;
    r.loss = loss_sum / double(o.grad_accum);
    r.grad_norm = zero ? zero_reduce_grads(ordered, zl, *o.comm, o.grad_clip) : clip_grad_norm(ordered, o.grad_clip);
    const double lr_scale = o.bitnet.two_stage ? two_stage_lr(step, o.warmup_steps, o.max_steps, o.min_lr_ratio)
                                               : warmup_cosine(step, o.warmup_steps, o.max_steps, o.min_lr_ratio);
    r.lr = o.lr * lr_scale;
    opt.step(lr_scale);
    if (zero) zero_gather_params(ordered, zl, *o.comm);  // every rank's updated parameters to every rank
    copies_fresh = false;
    ++step;
    ++run_steps;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.tokens_per_second = double(o.batch_size * o.seq_len * o.grad_accum) / std::max(r.seconds, 1e-9);
    result.train_seconds += r.seconds;
    if (!std::isfinite(r.loss)) throw_error("training diverged at step ", step, " (loss ", r.loss, "); lower --lr");
    const bool last = step == o.max_steps;
    if (!val.empty() && (last || (o.eval_every > 0 && step % o.eval_every == 0)))
      r.val_loss = validation_loss(forward, val, o.seq_len, o.batch_size, o.eval_batches);
    nlohmann::json j = {{"step", r.step}, {"loss", r.loss}, {"lr", r.lr}, {"grad_norm", r.grad_norm},
                        {"tokens_per_second", r.tokens_per_second}};
    if (r.val_loss >= 0) j["val_loss"] = r.val_loss;
    if (writer) {
      log << j.dump() << "\n";
      log.flush();
    }
    result.records.push_back(r);
    if (r.val_loss >= 0) result.final_val_loss = r.val_loss;
    if (on_step) on_step(r);
    bar.update(step, "loss " + std::to_string(r.loss).substr(0, 6));
    if (last || (o.checkpoint_every > 0 && step % o.checkpoint_every == 0)) save_now(step);
    if (o.stop_after > 0 && run_steps >= o.stop_after && !last) {
      save_now(step);
      result.steps_done = step;
      return result;
    }
  }
  bar.finish();
  // A run resumed at its last step (or with --steps 0) still reports the model's validation loss.
  if (result.final_val_loss < 0 && !val.empty())
    result.final_val_loss = validation_loss(forward, val, o.seq_len, o.batch_size, o.eval_batches);
  result.steps_done = step;
  result.complete = true;
  return result;
}
}  // namespace

TrainResult run_training(const LlamaModel& model, const std::vector<Var>& params, const TrainOptions& o,
                         const std::vector<int32_t>& train, const std::vector<int32_t>& val,
                         const std::function<void(const TrainRecord&)>& on_step, const LpTraining* lp) {
  if (o.bf16) throw_error("training: bf16 mixed precision is supported for pretraining (lowbit train) only");
  if (o.low_precision.enabled() && (!lp || !lp->context))
    throw_error("training: --precision needs the low-precision layers of the run (lowbit train, lowbit finetune)");
  if (o.bitnet.enabled || o.bitnet.two_stage) throw_error("training: BitNet options are for pretraining (lowbit train) only");
  if (!o.low_precision.enabled() || !lp) return run_training_impl(model, params, o, train, val, on_step, nullptr);
  if (o.comm && o.comm->world_size() > 1)
    throw_error("--precision ", lp_precision_name(o.low_precision.recipe.precision),
                ": one process only for now (the fp8 amax histories are not reduced over ranks)");
  const std::shared_ptr<LpContext> ctx = lp->context;
  return run_training_impl(model, params, o, train, val, on_step, nullptr, [ctx](int64_t s) { ctx->step = s; },
                           LpStatePart{lp->products, lp->key});
}

TrainResult train_model(const TrainOptions& o, const std::vector<int32_t>& train, const std::vector<int32_t>& val,
                        const std::function<void(const TrainRecord&)>& on_step) {
  o.config.validate("training config");
  if (o.bf16 && o.device != Device::CUDA)
    throw_error("--bf16 needs --device cuda: bf16 activations and matmuls exist only in the CUDA backend "
                "(the CPU kernels compute in f32/f64)");
  if (o.seq_len > o.config.max_seq_len) throw_error("--seq-len ", o.seq_len, " exceeds the model's max_seq_len ", o.config.max_seq_len);
  check_training_inputs(o, train, val);
  check_bitnet_options(o.bitnet, o.max_steps);
  if (o.bitnet.enabled && o.bf16)
    throw_error("--arch ", bitnet_arch_name(o.bitnet),
                " trains in f32, not --bf16 (BitLinear's quantizers and the Hadamard transform take f32/f64 operands)");
  const LowPrecisionOptions& lpo = o.low_precision;
  if (lpo.enabled()) {
    if (o.bitnet.enabled)
      throw_error("--precision ", lp_precision_name(lpo.recipe.precision), ": not with --arch ", bitnet_arch_name(o.bitnet));
    if (o.bf16)
      throw_error("--precision ", lp_precision_name(lpo.recipe.precision),
                  ": not with --bf16 (the emulated GEMMs read f32 master weights; --precision bf16 rounds their operands)");
    if (o.comm && o.comm->world_size() > 1)
      throw_error("--precision ", lp_precision_name(lpo.recipe.precision),
                  ": one process only for now (the fp8 amax histories are not reduced over ranks)");
    if (lpo.recipe.precision == LpPrecision::FP4_DGE && o.device != Device::CPU)
      throw_error("--precision fp4-dge: no CUDA body yet (the outlier quantile of OCC and the DGE derivative run on "
                  "the CPU only): train it with --device cpu");
  }
  check_low_precision_options(lpo, o.config.n_layers);
  for (const auto* s : {&train, &val})
    for (int32_t id : *s)
      if (id < 0 || id >= o.config.vocab_size)
        throw_error("token id ", id, " in the data is outside the model vocabulary (", o.config.vocab_size, ")");
  if (o.out_dir.empty()) throw_error("train: an output directory (--out) is required");
  const bool writer = !o.comm || o.comm->rank() == 0;  // data parallel: rank 0 writes
  if (writer) fs::create_directories(o.out_dir);
  // The order is a pure function of (seed, shapes, stream sizes): written in full, also on resume.
  if (writer && !o.dump_order.empty()) write_data_order(o.dump_order, o, int64_t(train.size()), int64_t(val.size()));

  LlamaWeights w = init_weights(o.config, o.seed);
  if (o.device != Device::CPU) for_each_weight(w, [&](const std::string&, Tensor& t) { t = t.to(o.device); });
  LlamaModel model(o.config, w, true);
  std::function<void(int64_t)> before_step;
  if (o.bitnet.enabled) {
    make_bitnet(model, o.bitnet, o.seed);
    before_step = [&](int64_t s) { set_bitnet_step(model, o.bitnet, s, o.max_steps); };
  }
  LpStatePart lp;
  std::shared_ptr<LpContext> lp_ctx;
  if (lpo.enabled()) {
    lp_ctx = make_low_precision(model, lpo, o.seed);
    before_step = [&](int64_t s) { lp_ctx->step = s; };
    lp.products = lp_products(model);
  }
  lp.key = low_precision_key(lpo, o.config.n_layers);
  std::unique_ptr<MixedPrecisionModel> mixed;
  if (o.bf16) mixed = std::make_unique<MixedPrecisionModel>(model);
  TrainResult result =
      run_training_impl(model, model.parameters(), o, train, val, on_step, mixed.get(), before_step, lp);
  if (lp_ctx && result.complete && !val.empty()) {  // the master weights with f32 GEMMs
    lp_ctx->high_precision = true;
    result.final_val_loss_f32 = validation_loss(model, val, o.seq_len, o.batch_size, o.eval_batches);
    lp_ctx->high_precision = false;
  }
  if (!result.complete || !writer) return result;
  // Final model in the formats other tools load.
  LlamaWeights final_w = model.weights();
  for_each_weight(final_w, [](const std::string&, Tensor& t) { t = t.to(Device::CPU); });
  save_llama2c((fs::path(o.out_dir) / "model.bin").string(), o.config, final_w);
  save_hf_dir((fs::path(o.out_dir) / "hf").string(), o.config, final_w);
  // BitNet: also the packed ternary checkpoint (model.bin and hf/ hold its dequantized weights).
  if (o.bitnet.enabled) save_bitnet_checkpoint((fs::path(o.out_dir) / "ternary").string(), model);
  return result;
}

void make_lm_windows(const std::vector<int32_t>& stream, const std::vector<int64_t>& starts, int64_t T, Tensor& in,
                     Tensor& tgt) {
  const int64_t B = int64_t(starts.size());
  in = Tensor::empty({B, T}, DType::I32);
  tgt = Tensor::empty({B * T}, DType::I32);
  int32_t *ip = in.data<int32_t>(), *tp = tgt.data<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      ip[b * T + t] = stream[size_t(starts[size_t(b)] + t)];
      tp[b * T + t] = stream[size_t(starts[size_t(b)] + t + 1)];
    }
}

}  // namespace lowbit
