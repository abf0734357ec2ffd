#include "lowbit/train/qat.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <utility>
#include <sstream>

#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/optim.h"
#include "lowbit/core/progress.h"
#include "lowbit/io/file_util.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/methods/block_ap.h"
#include "lowbit/quant/matryoshka.h"
#include "lowbit/methods/block_train.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/pipeline.h"
#include "lowbit/quant/l4q_linear.h"
#include "lowbit/quant/lrqat_linear.h"
#include "lowbit/quant/lsq_linear.h"
#include "lowbit/quant/onebit.h"
#include "lowbit/quant/paretoq_linear.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/train/llm_qat.h"
#include "lowbit/train/trainer.h"
#include "lowbit/train/zero.h"

namespace lowbit {

namespace fs = std::filesystem;

uint64_t token_hash(const std::vector<int32_t>& stream) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (int32_t t : stream) {
    uint32_t u = uint32_t(t);
    for (int k = 0; k < 4; ++k) {
      h ^= (u >> (8 * k)) & 0xffu;
      h *= 0x100000001b3ull;
    }
  }
  return h;
}

namespace {
constexpr double kHiddenNormEps = 1e-12;  // on the mean square: F.normalize's max(||x||, 1e-12), near enough

// x / ||x||_2 * sqrt(D) per row (rmsnorm with unit weights).
Var unit_rows(const Var& x) {
  const Tensor& v = x.value();
  const Tensor w = Tensor::full({v.size(-1)}, 1.0, v.dtype()).to(v.device());
  return rmsnorm(x, Var(w), kHiddenNormEps);
}
}  // namespace

Var hidden_state_mse(const Var& student, const Tensor& teacher) {
  const Tensor& s = student.value();
  if (s.dim() != 2 || teacher.shape() != s.shape() || teacher.dtype() != s.dtype())
    throw_error("hidden_state_mse: student ", s.describe(), " and teacher ", teacher.describe(),
                " must be [M, D] of the same shape and dtype");
  Tensor t;
  {
    NoGradGuard ng;
    t = unit_rows(Var(teacher.to(s.device()))).value();
  }
  // mean over M*D elements of (sqrt(D) (s^ - t^))^2 = mean over rows of ||s^ - t^||^2.
  return mse(unit_rows(student), Var(t));
}

Var e2e_objective(const LlamaModel& student, const LlamaModel* teacher, const Tensor& in, const Tensor& tgt,
                  const E2eOptions& o) {
  if (!o.distill) {
    Var logits = student.forward(in);
    return cross_entropy(logits, tgt.to(logits.value().device()));
  }
  Var logits, hidden;  // hidden: Σ_l hidden_state_mse over the blocks (o.hidden_mse > 0)
  Tensor tl;
  if (o.hidden_mse > 0) {
    // OneBit's L_KD = L_CE + α L_MSE (arXiv 2402.11295 §3.4): both models block by block, the
    // teacher's block outputs kept (without gradient) for the student's.
    LB_CHECK(in.dim() == 2, "e2e objective: tokens must be [B, T], got ", in.describe());
    LB_CHECK(teacher->n_layers() == student.n_layers() && teacher->config().dim == student.config().dim,
             "qat: the hidden-state MSE needs a teacher of the student's shape");
    const int64_t B = in.size(0), T = in.size(1);
    std::vector<Tensor> th;
    {
      NoGradGuard ng;
      Var x = teacher->embed(in);
      for (int i = 0; i < teacher->n_layers(); ++i) {
        x = teacher->block_forward(i, x, B, T);
        th.push_back(x.value());
      }
      tl = teacher->head(x).value();
    }
    Var x = student.embed(in);
    for (int i = 0; i < student.n_layers(); ++i) {
      x = student.block_forward(i, x, B, T);
      Var term = hidden_state_mse(x, th[size_t(i)]);
      hidden = hidden.defined() ? add(hidden, term) : term;
    }
    logits = student.head(x);
  } else {
    logits = student.forward(in);
    NoGradGuard ng;
    tl = teacher->forward(in).value();
  }
  Var loss = kl_div(Var(tl), logits);
  if (hidden.defined()) loss = add(loss, scale(hidden, o.hidden_mse));
  if (o.lm_weight > 0) loss = add(loss, scale(cross_entropy(logits, tgt.to(logits.value().device())), o.lm_weight));
  return loss;
}

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

void save_e2e_state(const std::string& path, const std::vector<Var>& state, AdamW& opt, int64_t step,
                    const std::string& key, double loss_before, const LpTraining* lp) {
  if (auto parent = fs::path(path).parent_path(); !parent.empty()) fs::create_directories(parent);
  std::vector<std::pair<std::string, Tensor>> ts;
  for (size_t i = 0; i < state.size(); ++i) ts.emplace_back("state." + std::to_string(i), state[i].value());
  auto st = opt.state_tensors();
  for (size_t i = 0; i < st.size(); ++i) ts.emplace_back("adamw." + std::to_string(i), *st[i]);
  if (lp)
    for (auto& t : lp_state_tensors(lp->products)) ts.push_back(std::move(t));
  std::ostringstream lb;
  lb.precision(17);
  lb << loss_before;
  save_safetensors(path, ts, {{"step", std::to_string(step)}, {"key", key}, {"loss_before", lb.str()},
                              {"optimizer_bits", std::to_string(opt.state_bits())},
                              {"precision", lp ? lp->key : std::string("f32")}});
}

int64_t load_e2e_state(const std::string& path, const std::vector<Var>& state, AdamW& opt, const std::string& key,
                       double* loss_before, const LpTraining* lp) {
  SafetensorsFile f = SafetensorsFile::open(path);
  const auto& md = f.metadata();
  auto k = md.find("key");
  auto s = md.find("step");
  auto lb = md.find("loss_before");
  if (k == md.end() || s == md.end() || lb == md.end())
    throw_error(path, ": not a qat training state (missing 'key', 'step' or 'loss_before' metadata)");
  auto pr = md.find("precision");  // states written before --precision existed: f32
  const std::string saved_precision = pr == md.end() ? "f32" : pr->second;
  const std::string precision = lp ? lp->key : "f32";
  if (saved_precision != precision)
    throw_error(path, ": saved with --precision settings '", saved_precision, "', this run uses '", precision,
                "'; use the same --precision settings or remove the state");
  if (k->second != key)
    throw_error(path, ": this training state was written with other settings or data (saved: ", k->second,
                "; this run: ", key, "); remove it or choose another output/state directory");
  auto ob = md.find("optimizer_bits");  // states written before the flag existed: 32
  const std::string saved_bits = ob == md.end() ? "32" : ob->second;
  if (saved_bits != std::to_string(opt.state_bits()))
    throw_error(path, ": saved with --optimizer-bits ", saved_bits, ", this run uses --optimizer-bits ", opt.state_bits(),
                "; use the same --optimizer-bits or remove the state");
  auto restore = [&](const std::string& name, Tensor& dst) {
    Tensor t = f.load(name);
    if (t.shape() != dst.shape() || t.dtype() != dst.dtype())
      throw_error(path, ": tensor '", name, "' is ", t.describe(), " but the run expects ", dst.describe());
    dst.copy_(t);
  };
  for (size_t i = 0; i < state.size(); ++i) {
    Var v = state[i];
    restore("state." + std::to_string(i), v.mutable_value());
  }
  auto st = opt.state_tensors();
  for (size_t i = 0; i < st.size(); ++i) restore("adamw." + std::to_string(i), *st[i]);
  if (lp) restore_lp_state(lp->products, [&](const std::string& name) { return f.find(name) ? f.load(name) : Tensor(); });
  int64_t step = 0;
  try {
    step = std::stoll(s->second);
    *loss_before = std::stod(lb->second);
  } catch (const std::exception&) {
    throw_error(path, ": bad 'step' or 'loss_before' metadata");
  }
  if (step < 0) throw_error(path, ": negative step ", step);
  opt.set_steps(step);
  return step;
}

void write_text_atomic(const std::string& path, const std::string& text) {
  if (auto parent = fs::path(path).parent_path(); !parent.empty()) fs::create_directories(parent);
  io::AtomicFileWriter w(path);
  w.write(text.data(), text.size());
  w.commit();
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

template <class T>
T pick(T v, T def) {
  return v < 0 ? def : v;
}

}  // namespace

QatStage train_end_to_end(const LlamaModel& student, const LlamaModel* teacher, const std::vector<E2eGroup>& groups,
                          const std::vector<Var>& state, const std::vector<int32_t>& stream, const E2eOptions& o,
                          bool* complete) {
  LB_CHECK(o.steps >= 0, "qat: --steps must be >= 0, got ", o.steps);
  LB_CHECK(o.batch >= 1 && o.seqlen >= 1, "qat: --batch and --seqlen must be >= 1");
  LB_CHECK(!o.distill || teacher, "qat: distillation needs the full-precision teacher");
  LB_CHECK(std::isfinite(o.hidden_mse) && o.hidden_mse >= 0, "qat: --hidden-mse must be a finite number >= 0, got ",
           o.hidden_mse);
  LB_CHECK(o.hidden_mse == 0 || o.distill, "qat: --hidden-mse ", o.hidden_mse,
           " adds a term to the distillation loss; it needs distillation (--distill)");
  LB_CHECK(int64_t(stream.size()) >= o.seqlen + 2, "qat: the training data has ", stream.size(),
           " tokens; at least ", o.seqlen + 2, " are needed for --seqlen ", o.seqlen, " (give more data or a smaller --seqlen)");
  const bool dp = o.comm && o.comm->world_size() > 1;
  LB_CHECK(!dp || o.state_path.empty(), "qat: a data-parallel run keeps no resumable state");
  if (o.lp && dp)
    throw_error("qat --precision: one process only for now (the fp8 amax histories are not reduced over ranks)");
  if (o.lp && o.bf16)
    throw_error("qat --precision: not with --bf16 (the low-precision products read f32 operands; --precision bf16 "
                "rounds them)");
  if (dp && o.batch < o.comm->world_size())
    throw_error("--batch ", o.batch, ": data-parallel qat splits each step's windows over the ", o.comm->world_size(),
                " ranks (give at least one window per rank)");
  const auto t0 = Clock::now();
  std::vector<ParamGroup> pg;
  std::vector<Var> all;
  for (const auto& g : groups) {
    if (g.params.empty()) continue;
    pg.push_back(ParamGroup{g.params, AdamWOptions{g.lr, 0.9, 0.999, 1e-8, g.weight_decay}});
    all.insert(all.end(), g.params.begin(), g.params.end());
  }
  LB_CHECK(!all.empty(), "qat: nothing to train");
  AdamWStateOptions state_options;
  state_options.bits = o.optimizer_bits;
  if (student.token_embedding().defined()) state_options.keep_32bit.push_back(student.token_embedding());
  // ZeRO: this rank's optimizer holds the state of its own parameters only.
  const bool zero = dp && o.zero;
  if (o.zero && !dp) throw_error("--zero shards the optimizer state over several ranks (--gpus N or a launcher)");
  ZeroLayout zl;
  if (zero) {
    if (o.optimizer_bits != 32) throw_error("--zero: f32 optimizer state only (--optimizer-bits 32)");
    for (const auto& p : all)
      if (p.value().dtype() != DType::F32) throw_error("--zero: f32 parameters only, got ", p.value().describe());
    zl = zero_layout(all, o.comm->world_size());
    pg = zero_own_groups(pg, zl, o.comm->rank());
  }
  AdamW opt(pg, state_options);
  const int64_t n = int64_t(stream.size());
  const int64_t L = o.sequence_length;
  LB_CHECK(L == 0 || (o.seqlen + 1 <= L && n % L == 0), "qat: sequences of ", L, " tokens (", n,
           " in all) cannot hold training windows of --seqlen ", o.seqlen, " + 1 tokens");
  const int64_t nseq = L > 0 ? n / L : 0;
  // Window starts of a step: random offsets, or with whole sequences the starts of random sequences.
  auto starts_of = [&](int64_t s) {
    if (L == 0) return train_window_starts(o.seed, s, 0, o.batch, o.seqlen, n);
    std::vector<int64_t> st = train_window_starts(o.seed, s, 0, o.batch, 0, nseq);  // in [0, nseq - 1]
    for (auto& x : st) x *= L;
    return st;
  };
  // Data parallel: this rank's windows of a step's (all of them with one rank) and their share.
  auto my_share = [&](std::vector<int64_t> st, double* share) {
    *share = 1;
    if (!dp) return st;
    const auto [b, e] = comm::shard_range(int64_t(st.size()), o.comm->rank(), o.comm->world_size(), "--batch");
    *share = double(e - b) / double(st.size());
    return std::vector<int64_t>(st.begin() + b, st.begin() + e);
  };
  // Fixed windows for the before/after objective (one batch, evenly spaced).
  std::vector<int64_t> fixed_starts;
  if (L == 0) {
    fixed_starts = validation_window_starts(n, o.seqlen, o.batch, 1);
  } else {
    for (int64_t b = 0; b < o.batch; ++b) fixed_starts.push_back(b * nseq / o.batch * L);
  }
  double fixed_share = 1;
  Tensor fin, ftgt;
  make_lm_windows(stream, my_share(fixed_starts, &fixed_share), o.seqlen, fin, ftgt);
  auto fixed_loss = [&] {
    NoGradGuard ng;
    AutocastBf16Guard autocast(o.bf16);
    const double v = e2e_objective(student, teacher, fin, ftgt, o).value().item() * fixed_share;
    return dp ? o.comm->all_reduce_sum(v) : v;
  };
  QatStage rep;
  rep.name = o.stage;
  int64_t step = 0;
  if (!o.state_path.empty() && fs::exists(o.state_path)) {
    step = load_e2e_state(o.state_path, state, opt, o.key, &rep.loss_before, o.lp);
    rep.resumed_from = step;
  } else {
    rep.loss_before = fixed_loss();
  }
  std::optional<ProgressBar> bar;
  if (o.progress) {
    bar.emplace(o.stage, o.steps, "steps");
    bar->update(step);
  }
  auto last_save = Clock::now();
  int64_t run_steps = 0;
  *complete = true;
  while (step < o.steps) {
    Tensor in, tgt;
    double share = 1;
    make_lm_windows(stream, my_share(starts_of(step), &share), o.seqlen, in, tgt);
    if (o.lp) o.lp->context->step = step;  // the step's stochastic-rounding and Hadamard seeds
    double lv = 0;
    {
      AutocastBf16Guard autocast(o.bf16);  // the backward does what its forward chose
      Var loss = e2e_objective(student, teacher, in, tgt, o);
      lv = loss.value().item() * share;
      if (dp) lv = o.comm->all_reduce_sum(lv);  // the step's loss over all ranks' windows: every rank decides alike
      if (!std::isfinite(lv)) throw_error("qat: ", o.stage, " loss is ", lv, " at step ", step + 1, "; lower the learning rates");
      backward(share != 1.0 ? scale(loss, share) : loss);
    }
    if (zero) {
      zero_reduce_grads(all, zl, *o.comm, 1.0);  // own parameters' summed gradients, clipped by the global norm
    } else {
      if (dp) all_reduce_grads(all, *o.comm);
      clip_grad_norm(all, 1.0);
    }
    opt.step(warmup_cosine(step, o.warmup, o.steps, 0.1));
    if (zero) zero_gather_params(all, zl, *o.comm);
    opt.zero_grad();  // with zero the reduce-scatter dropped the other ranks' parameters' gradients already
    ++step;
    ++run_steps;
    if (bar) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "loss %.4f", lv);
      bar->update(step, buf);
    }
    const bool stop = o.stop_after > 0 && run_steps >= o.stop_after && step < o.steps;
    if (!o.state_path.empty() && step < o.steps && (stop || since(last_save) >= o.checkpoint_seconds)) {
      save_e2e_state(o.state_path, state, opt, step, o.key, rep.loss_before, o.lp);
      last_save = Clock::now();
    }
    if (stop) {
      *complete = false;
      break;
    }
  }
  if (bar) bar->finish();
  rep.steps = step;
  rep.tokens = step * o.batch * o.seqlen;
  rep.optimizer_state_bytes = opt.state_bytes();
  if (*complete) rep.loss_after = fixed_loss();
  rep.seconds = since(t0);
  return rep;
}

namespace {

// The block linears of `model` with their slots.
template <class Fn>
void for_each_linear(LlamaModel& model, Fn&& fn) {
  for (int i = 0; i < model.n_layers(); ++i)
    for (auto& [name, slot] : model.block(i).linears()) fn(i, name, slot);
}

// The device the model's tensors live on (the CLI's --device): the trained layers are put there.
// Read from a norm weight, which is always resident: a packed vocabulary's token_embedding is a
// shape-only placeholder on the host (a GGUF's Q8_0 token_embd on the GPU), and reading the device
// from it put every end-to-end stage of a GGUF model loaded with --device cuda on the CPU.
Device model_device(const LlamaModel& m) {
  if (m.n_layers() > 0) return m.block(0).attn_norm.value().device();
  const Var& e = m.token_embedding();
  return e.defined() ? e.value().device() : Device::CPU;
}

// A block linear's weight as the training layers take it: F32 on the model's device (`dev`), and its
// CPU copy for the initialisation of the quantizer (lsq_init, paretoq_init_alpha: host code).
struct LayerWeight {
  Tensor dev, cpu;
};
LayerWeight layer_weight(const Linear& l) {
  LayerWeight w;
  w.dev = l.effective_weight().to(DType::F32).contiguous();
  w.cpu = w.dev.to(Device::CPU);
  return w;
}

// The method's result: its stages and, once training completed, the trained model with every block
// linear replaced by the packed encoding of its trained layer (`layers` in for_each_linear's order),
// on the model's device. The packed tensors are encoded on the host, so the checkpoint is the same
// whichever device trained.
template <class Layer>
QatResult packed_result(std::vector<QatStage> stages, bool complete, std::unique_ptr<LlamaModel> model,
                        const std::vector<std::shared_ptr<Layer>>& layers, Clock::time_point t0) {
  QatResult r;
  r.stages = std::move(stages);
  r.complete = complete;
  if (complete) {
    const Device dev = model_device(*model);
    size_t k = 0;
    for_each_linear(*model, [&](int, const std::string&, std::shared_ptr<Linear>* slot) {
      const auto& t = layers[k++];
      *slot = std::make_shared<QuantLinear>(t->encode(), t->bias().defined() ? t->bias().to(Device::CPU) : Tensor(), dev);
    });
    r.model = std::move(model);
  }
  r.seconds = since(t0);
  return r;
}

// Replaces every block linear of `model` by a LoRA-in-the-quantizer training layer (l4q, lr-qat):
// LSQ steps from `init`, one seeded A per layer, LSQ's gradient scale; collects the layers and the
// LoRA, quantizer and state variables.
template <class Layer, class Options>
std::vector<std::shared_ptr<Layer>> install_lora_quant_layers(LlamaModel& model, const QatConfig& c, const QuantFormat& f,
                                                              LsqInit init, const Options& lo, const char* method,
                                                              std::vector<Var>& lora, std::vector<Var>& quant,
                                                              std::vector<Var>& state) {
  std::vector<std::shared_ptr<Layer>> layers;
  uint64_t k = 0;
  for_each_linear(model, [&](int, const std::string&, std::shared_ptr<Linear>* slot) {
    const auto [wd, w] = layer_weight(**slot);
    LB_CHECK(lo.rank <= std::min(w.size(0), w.size(1)), "qat --method ", method, ": --lora-rank ", lo.rank,
             " exceeds the smaller side of a ", w.size(0), " x ", w.size(1), " weight");
    Options o = lo;
    o.seed = c.seed * 1000003ull + k++;  // one A per layer
    o.grad_scale = lsq_grad_scale(f, w.size(1));
    auto t = std::make_shared<Layer>(wd, (*slot)->bias(), f, lsq_init(w, f, init), o);
    for (auto& p : t->lora_parameters()) lora.push_back(p);
    for (auto& p : t->quant_parameters()) quant.push_back(p);
    for (auto& p : t->state()) state.push_back(p);
    *slot = t;  // the layer keeps what its method stores (lr-qat: only the downcast W0/s0, not `w`)
    layers.push_back(t);
  });
  return layers;
}

std::string e2e_key(const std::string& method, const QuantFormat& f, const E2eOptions& o, const std::vector<E2eGroup>& g,
                    const std::vector<int32_t>& stream, const std::string& extra) {
  std::string k = method + ",format=" + f.name + ",steps=" + std::to_string(o.steps) + ",batch=" + std::to_string(o.batch) +
                  ",seqlen=" + std::to_string(o.seqlen) + ",warmup=" + std::to_string(o.warmup) +
                  ",seed=" + std::to_string(o.seed) + ",distill=" + std::to_string(o.distill) +
                  ",lm_weight=" + key_number(o.lm_weight);
  for (const auto& gr : g) k += ",lr=" + key_number(gr.lr);
  if (o.sequence_length > 0) k += ",sequences_of=" + std::to_string(o.sequence_length);
  if (o.bf16) k += ",bf16";
  if (o.hidden_mse > 0) k += ",hidden_mse=" + key_number(o.hidden_mse);
  k += ",tokens=" + std::to_string(stream.size()) + "/" + std::to_string(token_hash(stream)) + extra;
  return k;
}

// --precision (QatConfig::low_precision): one LpProduct per block linear (ids in for_each_linear's
// order) outside the blocks --lp-keep-first / --lp-keep-last keep in f32, sharing one context seeded
// with the run's seed. next(block) is null for a kept block or without --precision.
class QatLowPrecision {
 public:
  QatLowPrecision(const QatConfig& c, int n_layers) : o_(c.low_precision), n_layers_(n_layers) {
    if (!o_.enabled()) return;
    check_low_precision_options(o_, n_layers);
    run_.context = std::make_shared<LpContext>();
    run_.context->seed = c.seed;
    run_.key = low_precision_key(o_, n_layers);
  }
  std::shared_ptr<const LpProduct> next(int block) {
    const int64_t id = next_id_++;
    if (!o_.enabled() || lp_block_kept(o_, block, n_layers_)) return nullptr;
    auto p = std::make_shared<const LpProduct>(o_.recipe, run_.context, id);
    run_.products.push_back(p.get());
    owned_.push_back(p);
    return p;
  }
  const LpTraining* training() const { return o_.enabled() ? &run_ : nullptr; }
  std::string key_part() const { return o_.enabled() ? ",precision=" + run_.key : ""; }
  void describe(nlohmann::json& hyper) const {
    hyper["precision"] = o_.enabled() ? run_.key : "f32";
    if (o_.enabled()) hyper["lp_gemm"] = o_.recipe.native_gemm ? "native" : "emulated";
  }

 private:
  LowPrecisionOptions o_;
  int n_layers_;
  int64_t next_id_ = 0;
  LpTraining run_;
  std::vector<std::shared_ptr<const LpProduct>> owned_;
};

E2eOptions e2e_options(const QatConfig& c, const LlamaConfig& mc, int64_t def_steps, int64_t def_batch) {
  E2eOptions o;
  o.steps = pick<int64_t>(c.steps, def_steps);
  o.batch = pick<int64_t>(c.batch, def_batch);
  o.seqlen = std::min<int64_t>(pick<int64_t>(c.seqlen, 256), mc.max_seq_len);
  o.warmup = pick<int64_t>(c.warmup, o.steps / 20);
  o.seed = c.seed;
  o.distill = c.distill;
  o.lm_weight = c.lm_weight;
  o.optimizer_bits = c.optimizer_bits;
  o.bf16 = c.bf16;
  o.checkpoint_seconds = c.checkpoint_seconds;
  o.stop_after = c.stop_after_steps;
  o.progress = c.progress;
  o.sequence_length = c.sequence_length;
  o.comm = c.comm;
  o.zero = c.zero;
  return o;
}

nlohmann::json e2e_hyper(const E2eOptions& o) {
  return {{"steps", o.steps}, {"batch", o.batch}, {"seqlen", o.seqlen}, {"warmup", o.warmup}, {"seed", o.seed},
          {"distill", o.distill}, {"lm_weight", o.lm_weight}, {"bf16", o.bf16},
          {"schedule", "warmup+cosine to 0.1, grad clip 1"}};
}

void check_format(const QatConfig& c, const char* method) {
  LB_CHECK(c.format, "qat: no format given");
  LB_CHECK(lsq_supports(*c.format), "qat --method ", method, ": format ", c.format->name,
           " is not a uniform integer format (use intB gG / pc, asymmetric or symmetric: int2g64, int3g64, int4g128s, ...)");
}

// ---- lsq ---------------------------------------------------------------------------------------
class LsqQat : public QatMethod {
 public:
  explicit LsqQat(const QatConfig& c) : c_(c) { check_format(c, "lsq"); }
  std::string name() const override { return "lsq"; }
  QatResult run(const LlamaModel& fp, const std::vector<int32_t>& stream) override {
    const QuantFormat& f = *c_.format;
    const auto t0 = Clock::now();
    auto work = std::make_unique<LlamaModel>(fp.config(), fp.weights(), false);
    std::vector<std::shared_ptr<LsqTrainLinear>> layers;
    std::vector<Var> weights, quant, state;
    QatLowPrecision lp(c_, work->n_layers());
    for_each_linear(*work, [&](int block, const std::string&, std::shared_ptr<Linear>* slot) {
      const auto [wd, w] = layer_weight(**slot);
      QatLinearOptions lo;
      lo.grad_scale = lsq_grad_scale(f, w.size(1));
      auto t = std::make_shared<LsqTrainLinear>(wd, (*slot)->bias(), f, lsq_init(w, f, c_.init), lo);
      t->set_lp_product(lp.next(block));
      for (auto& p : t->weight_parameters()) weights.push_back(p);
      for (auto& p : t->quant_parameters()) quant.push_back(p);
      for (auto& p : t->state()) state.push_back(p);
      *slot = t;
      layers.push_back(t);
    });
    E2eOptions o = e2e_options(c_, fp.config(), 300, 8);
    o.stage = "lsq";
    const double lr = pick(c_.lr, 1e-4), qlr = pick(c_.quant_lr, 1e-3);
    std::vector<E2eGroup> groups{{weights, lr, 0.0}, {quant, qlr, 0.0}};
    o.key = e2e_key("lsq", f, o, groups, stream, std::string(",init=") + lsq_init_name(c_.init) + lp.key_part());
    o.lp = lp.training();
    if (!c_.state_dir.empty()) o.state_path = (fs::path(c_.state_dir) / "lsq.safetensors").string();
    bool complete = true;
    QatStage st = train_end_to_end(*work, &fp, groups, state, stream, o, &complete);
    st.hyper = e2e_hyper(o);
    st.hyper["weight_lr"] = lr;
    st.hyper["quant_lr"] = qlr;
    st.hyper["init"] = lsq_init_name(c_.init);
    st.hyper["offset"] = f.kind == QuantKind::IntAsym ? "learned (LSQ+)" : "none (symmetric)";
    st.hyper["grad_scale"] = "1/sqrt(N Qp)";
    lp.describe(st.hyper);
    return packed_result({st}, complete, std::move(work), layers, t0);
  }

 private:
  QatConfig c_;
};

// ---- paretoq ------------------------------------------------------------------------------------
ParetoQBits paretoq_bits_of(const QatConfig& c) {
  LB_CHECK(c.format, "qat: no format given");
  const ParetoQBits b = c.paretoq_bits.empty() ? paretoq_default_bits(*c.format) : parse_paretoq_bits(c.paretoq_bits);
  paretoq_check_format(b, *c.format);
  return b;
}

class ParetoQQat : public QatMethod {
 public:
  explicit ParetoQQat(const QatConfig& c) : c_(c), bits_(paretoq_bits_of(c)) {}
  std::string name() const override { return "paretoq"; }
  QatResult run(const LlamaModel& fp, const std::vector<int32_t>& stream) override {
    const QuantFormat& f = *c_.format;
    const auto t0 = Clock::now();
    const bool seq = paretoq_is_seq(bits_);
    auto work = std::make_unique<LlamaModel>(fp.config(), fp.weights(), false);
    std::vector<std::shared_ptr<SeqTrainLinear>> seq_layers;
    std::vector<std::shared_ptr<LsqTrainLinear>> lsq_layers;
    std::vector<Var> weights, quant, state;
    auto collect = [&](const auto& t) {
      for (auto& p : t->weight_parameters()) weights.push_back(p);
      for (auto& p : t->quant_parameters()) quant.push_back(p);
      for (auto& p : t->state()) state.push_back(p);
    };
    QatLowPrecision lp(c_, work->n_layers());
    for_each_linear(*work, [&](int block, const std::string&, std::shared_ptr<Linear>* slot) {
      const auto [wd, w] = layer_weight(**slot);
      const double g = paretoq_grad_scale(bits_, w.numel());
      if (seq) {
        auto t = std::make_shared<SeqTrainLinear>(wd, (*slot)->bias(), f, bits_, paretoq_init_alpha(w, bits_, f), g);
        t->set_lp_product(lp.next(block));
        collect(t);
        *slot = t;
        seq_layers.push_back(t);
      } else {
        QatLinearOptions lo;
        lo.train_offset = false;  // the signed grid: zero point fixed at 2^(b-1)
        lo.grad_scale = g;
        auto t = std::make_shared<LsqTrainLinear>(wd, (*slot)->bias(), f, paretoq_lsq_params(w, bits_, f), lo);
        t->set_lp_product(lp.next(block));
        collect(t);
        *slot = t;
        lsq_layers.push_back(t);
      }
    });
    E2eOptions o = e2e_options(c_, fp.config(), 300, 8);
    o.warmup = pick<int64_t>(c_.warmup, 0);  // the reference's warmup_ratio 0
    o.stage = "paretoq";
    // α lr: 1e-3, chosen on stories260K's validation split (bench/qat_260k.sh: valid perplexity 11.60
    // against 13.90 with the reference's choice, α at the weights' lr); the paper trains much longer.
    const double lr = pick(c_.lr, 1e-4), qlr = pick(c_.quant_lr, 1e-3);
    std::vector<E2eGroup> groups{{weights, lr, 0.0}, {quant, qlr, 0.0}};
    o.key = e2e_key("paretoq", f, o, groups, stream, std::string(",bits=") + paretoq_bits_name(bits_) + lp.key_part());
    o.lp = lp.training();
    if (!c_.state_dir.empty()) o.state_path = (fs::path(c_.state_dir) / "paretoq.safetensors").string();
    bool complete = true;
    QatStage st = train_end_to_end(*work, &fp, groups, state, stream, o, &complete);
    st.hyper = e2e_hyper(o);
    st.hyper["bits"] = paretoq_bits_name(bits_);
    st.hyper["quantizer"] = bits_ == ParetoQBits::One ? "sign" : seq ? "SEQ" : f.kind == QuantKind::IntAsym
                                                                            ? "LSQ, signed grid (zero point fixed at 2^(b-1))"
                                                                            : "LSQ, symmetric grid";
    st.hyper["init"] = bits_ == ParetoQBits::One ? "mean|w|" : seq ? "max|w|" : "max|w| / (2^(b-1) - 1)";
    st.hyper["weight_lr"] = lr;
    st.hyper["quant_lr"] = qlr;
    st.hyper["grad_scale"] = "1/sqrt(numel(W) Qp)";
    lp.describe(st.hyper);
    if (!seq) return packed_result({st}, complete, std::move(work), lsq_layers, t0);
    if (complete)
      for (const auto& t : seq_layers) t->snap_alpha();  // the trained layers' function is now exactly the packed one
    return packed_result({st}, complete, std::move(work), seq_layers, t0);
  }

 private:
  QatConfig c_;
  ParetoQBits bits_;
};

// ---- efficientqat ------------------------------------------------------------------------------
// matquant (MatQuant, arXiv 2502.06786, quant/matryoshka.h) is this class's Block-AP stage with the
// loss summed over the Matryoshka widths of int8 codes, and no E2E-QP stage: its result is the
// Block-AP model, int8 codes whose top bits are the narrower models.
class EfficientQat : public QatMethod {
 public:
  EfficientQat(const QatConfig& c, bool matquant) : c_(c), matquant_(matquant) {
    check_format(c, matquant ? "matquant" : "efficientqat");
    if (matquant) {
      LB_CHECK(matryoshka_parent(*c.format), "qat --method matquant: --format ", c.format->name,
               " is not a Matryoshka parent format; use int8g32, int8g64 or int8g128 (asymmetric int8 codes)");
      const std::vector<int> w = c.widths.empty() ? std::vector<int>{8, 4, 2} : c.widths;
      for (int r : w) matryoshka_slice_format(*c.format, r, "--widths");
      LB_CHECK(c.width_weights.empty() || c.width_weights.size() == w.size(), "--width-weights: ",
               c.width_weights.size(), " weights for ", w.size(), " widths");
    } else {
      LB_CHECK(c.widths.empty() && c.width_weights.empty(), "--widths / --width-weights: only qat --method matquant ",
               "trains Matryoshka widths");
    }
  }
  std::string name() const override { return matquant_ ? "matquant" : "efficientqat"; }
  QatResult run(const LlamaModel& fp, const std::vector<int32_t>& stream) override {
    const QuantFormat& f = *c_.format;
    const auto t0 = Clock::now();
    QatResult r;
    // ---- Block-AP ----
    BlockApOptions bo;
    if (matquant_) {
      bo.widths = c_.widths.empty() ? std::vector<int>{8, 4, 2} : c_.widths;
      bo.width_weights = c_.width_weights.empty() ? std::vector<double>(bo.widths.size(), 1.0) : c_.width_weights;
    }
    bo.epochs = pick(c_.block_epochs, 5);
    bo.batch = pick<int64_t>(c_.block_batch, 2);
    bo.weight_lr = pick(c_.block_lr, 1e-3);
    bo.quant_lr = pick(c_.block_quant_lr, 1e-3);
    bo.seed = c_.seed;
    bo.verbose = c_.verbose;
    const int64_t seqlen = std::min<int64_t>(pick<int64_t>(c_.seqlen, 256), fp.config().max_seq_len);
    const int64_t nsamples = pick<int64_t>(c_.nsamples, 128);
    LB_CHECK(int64_t(stream.size()) >= seqlen + 1, "qat: the training data has ", stream.size(),
             " tokens; Block-AP needs at least one window of --seqlen ", seqlen, " tokens");
    BlockApMethod method(f, bo);
    const std::string key1 = std::string("block-ap,format=") + f.name + "," + method.options_key() +
                             ",nsamples=" + std::to_string(nsamples) + ",seqlen=" + std::to_string(seqlen) +
                             ",tokens=" + std::to_string(stream.size()) + "/" + std::to_string(token_hash(stream));
    QatStage s1;
    s1.name = "block-ap";
    s1.hyper = {{"epochs", bo.epochs}, {"batch", bo.batch}, {"weight_lr", bo.weight_lr}, {"quant_lr", bo.quant_lr},
                {"nsamples", nsamples}, {"seqlen", seqlen}, {"init", lsq_init_name(bo.init)}, {"seed", bo.seed}};
    if (matquant_) {
      s1.name = "matquant";
      s1.hyper["widths"] = bo.widths;
      s1.hyper["width_weights"] = bo.width_weights;
      s1.hyper["step_lr"] = bo.quant_lr / method.quant_lr_scale();
      s1.hyper["zero_lr"] = bo.quant_lr * method.quant_lr_scale();
    }
    const std::string sd = c_.state_dir;
    const std::string model_dir = sd.empty() ? "" : (fs::path(sd) / "block-ap-model").string();
    const std::string marker = sd.empty() ? "" : (fs::path(sd) / "block-ap.json").string();
    std::unique_ptr<LlamaModel> stage1;  // without a state directory: the Block-AP model in memory
    bool done = false;
    if (!marker.empty() && fs::exists(marker)) {
      auto j = nlohmann::json::parse(read_text(marker), nullptr, false);
      if (j.is_discarded() || !j.is_object() || j.value("key", "") != key1)
        throw_error(marker, ": Block-AP state written with other settings or data; remove the state directory ", sd,
                    " or choose another output");
      s1.steps = j.value("steps", int64_t(0));
      s1.tokens = j.value("tokens", int64_t(0));
      s1.loss_before = j.value("loss_before", -1.0);
      s1.loss_after = j.value("loss_after", -1.0);
      if (j.contains("width_loss")) s1.hyper["width_loss"] = j["width_loss"];
      s1.seconds = j.value("seconds", 0.0);
      s1.resumed_from = fp.n_layers();
      done = true;
    }
    if (!done) {
      const auto ts = Clock::now();
      auto work = std::make_unique<LlamaModel>(fp.config(), fp.weights(), false);
      Tensor calib = sample_calibration(stream, nsamples, seqlen, c_.seed);
      if (c_.comm && c_.comm->world_size() > 1) {  // data parallel: this rank's share of the windows
        const auto [b, e] = comm::shard_range(calib.size(0), c_.comm->rank(), c_.comm->world_size(), "--nsamples");
        calib = calib.slice(0, b, e).contiguous();
        LB_CHECK(sd.empty(), "qat: a data-parallel run keeps no resumable state");
      }
      method.set_communicator(c_.comm);
      PipelineOptions po;
      po.batch = 8;
      po.state_dir = sd.empty() ? "" : (fs::path(sd) / "block-ap").string();
      po.progress = c_.progress;
      po.checkpoint_seconds = c_.checkpoint_seconds;
      po.stop_after_blocks = c_.stop_after_blocks;
      PipelineReport pr = run_blockwise(*work, calib, method, f, po);
      s1.resumed_from = pr.resumed_from_block;
      if (!pr.complete) {
        r.complete = false;
        r.stages.push_back(s1);
        return r;
      }
      // A block's first and last epoch in the log of this run (null, null: not trained in this run).
      auto epochs_of = [&](int layer) {
        std::pair<const BlockApLog*, const BlockApLog*> fl{nullptr, nullptr};
        for (const auto& l : method.log())
          if (l.layer == layer) {
            if (!fl.first) fl.first = &l;
            fl.second = &l;
          }
        return fl;
      };
      // Loss per block: mean over the blocks trained in this run (after a resume, only those).
      double first = 0, last = 0;
      int nb = 0;
      for (int layer = 0; layer < fp.n_layers(); ++layer) {
        const auto [a, b] = epochs_of(layer);
        if (a) first += a->loss, last += b->loss, ++nb;
      }
      s1.loss_before = nb ? first / nb : -1;
      s1.loss_after = nb ? last / nb : -1;
      if (matquant_) {  // per width: the mean over blocks of the first / last epoch's MSE
        nlohmann::json wl = nlohmann::json::object();
        for (size_t w = 0; w < bo.widths.size(); ++w) {
          double a = 0, b = 0;
          int k = 0;
          for (int layer = 0; layer < fp.n_layers(); ++layer) {
            const auto [fl, ll] = epochs_of(layer);
            if (fl && w < fl->width_loss.size()) a += fl->width_loss[w], b += ll->width_loss[w], ++k;
          }
          wl[std::to_string(bo.widths[w])] = {{"before", k ? a / k : -1.0}, {"after", k ? b / k : -1.0}};
        }
        s1.hyper["width_loss"] = wl;
      }
      s1.steps = int64_t(fp.n_layers()) * bo.epochs * ((nsamples + bo.batch - 1) / bo.batch);
      s1.tokens = int64_t(bo.epochs) * nsamples * seqlen;
      s1.seconds = since(ts);
      if (!sd.empty()) {
        save_quantized_model(model_dir, *work, matquant_ ? "matquant" : "efficientqat-block-ap", f);
        nlohmann::json j = {{"key", key1}, {"steps", s1.steps}, {"tokens", s1.tokens}, {"loss_before", s1.loss_before},
                            {"loss_after", s1.loss_after}, {"seconds", s1.seconds}};
        if (s1.hyper.contains("width_loss")) j["width_loss"] = s1.hyper["width_loss"];
        write_text_atomic(marker, j.dump());
        std::error_code ec;
        fs::remove_all(po.state_dir, ec);
      } else {
        stage1 = std::move(work);
      }
    }
    r.stages.push_back(s1);
    if (matquant_) {  // MatQuant's result is the Block-AP model (int8 codes)
      r.model = stage1 ? std::move(stage1) : make_quantized_model(load_quantized_model(model_dir), model_device(fp));
      r.seconds = since(t0);
      return r;
    }
    // ---- E2E-QP: codes frozen, steps trained end to end ----
    // With a state directory the Block-AP model is always read back from its checkpoint, so a
    // resumed run and an uninterrupted one start E2E-QP from the same model.
    const Device dev = model_device(fp);
    std::unique_ptr<LlamaModel> model =
        stage1 ? std::move(stage1) : make_quantized_model(load_quantized_model(model_dir), dev);
    std::vector<std::shared_ptr<LsqTrainLinear>> layers;
    std::vector<Var> steps;
    for_each_linear(*model, [&](int i, const std::string& name, std::shared_ptr<Linear>* slot) {
      auto* ql = dynamic_cast<const QuantLinear*>(slot->get());
      if (!ql) throw_error("efficientqat: layer ", i, " ", name, " is not quantized after Block-AP");
      auto t = std::make_shared<LsqTrainLinear>(ql->quantized(), ql->bias(), dev);
      for (auto& p : t->quant_parameters()) steps.push_back(p);
      *slot = t;
      layers.push_back(t);
    });
    E2eOptions o = e2e_options(c_, fp.config(), 300, 8);
    o.stage = "e2e-qp";
    const double lr = pick(c_.lr, 1e-4);
    std::vector<E2eGroup> groups{{steps, lr, 0.0}};
    o.key = e2e_key("efficientqat-e2e-qp", f, o, groups, stream, "|" + key1);
    if (!sd.empty()) o.state_path = (fs::path(sd) / "e2e-qp.safetensors").string();
    bool complete = true;
    QatStage s2 = train_end_to_end(*model, &fp, groups, steps, stream, o, &complete);
    s2.hyper = e2e_hyper(o);
    s2.hyper["step_lr"] = lr;
    r.stages.push_back(s2);
    return packed_result(std::move(r.stages), complete, std::move(model), layers, t0);
  }

 private:
  QatConfig c_;
  bool matquant_ = false;
};

// ---- l4q ---------------------------------------------------------------------------------------
// L4Q (arXiv 2402.04902): LoRA-wise LSQ on every block linear, trained end to end like lsq.
class L4qQat : public QatMethod {
 public:
  explicit L4qQat(const QatConfig& c) : c_(c) {
    check_format(c, "l4q");
    LB_CHECK(c.lora_rank < 0 || c.lora_rank >= 1, "qat --method l4q: --lora-rank must be >= 1, got ", c.lora_rank);
    LB_CHECK(c.lora_alpha < 0 || c.lora_alpha > 0, "qat --method l4q: --lora-alpha must be > 0, got ", c.lora_alpha);
  }
  std::string name() const override { return "l4q"; }
  QatResult run(const LlamaModel& fp, const std::vector<int32_t>& stream) override {
    const QuantFormat& f = *c_.format;
    const auto t0 = Clock::now();
    auto work = std::make_unique<LlamaModel>(fp.config(), fp.weights(), false);
    std::vector<Var> lora, quant, state;
    // L4Q_init: the quantizer starts from W0's min-max range (no clipping); --init overrides.
    const LsqInit init = c_.init_set ? c_.init : LsqInit::MinMax;
    L4qOptions lo;
    lo.rank = pick<int64_t>(c_.lora_rank, 8);
    lo.lora_alpha = pick(c_.lora_alpha, 16.0);
    const auto layers = install_lora_quant_layers<L4qTrainLinear>(*work, c_, f, init, lo, "l4q", lora, quant, state);
    E2eOptions o = e2e_options(c_, fp.config(), 300, 8);
    o.stage = "l4q";
    const double lr = pick(c_.lr, 1e-3), qlr = pick(c_.quant_lr, 1e-3);
    std::vector<E2eGroup> groups{{lora, lr, 0.0}, {quant, qlr, 0.0}};
    o.key = e2e_key("l4q", f, o, groups, stream,
                    std::string(",init=") + lsq_init_name(init) + ",rank=" + std::to_string(lo.rank) +
                        ",alpha=" + key_number(lo.lora_alpha));
    if (!c_.state_dir.empty()) o.state_path = (fs::path(c_.state_dir) / "l4q.safetensors").string();
    bool complete = true;
    QatStage st = train_end_to_end(*work, &fp, groups, state, stream, o, &complete);
    st.hyper = e2e_hyper(o);
    st.hyper["lora_lr"] = lr;
    st.hyper["quant_lr"] = qlr;
    st.hyper["lora_rank"] = lo.rank;
    st.hyper["lora_alpha"] = lo.lora_alpha;
    st.hyper["init"] = lsq_init_name(init);
    st.hyper["offset"] = f.kind == QuantKind::IntAsym ? "learned (LSQ+)" : "none (symmetric)";
    st.hyper["grad_scale"] = "1/sqrt(N Qp)";
    return packed_result({st}, complete, std::move(work), layers, t0);
  }

 private:
  QatConfig c_;
};

// ---- lr-qat ------------------------------------------------------------------------------------
// LR-QAT (arXiv 2406.06385): low-rank adapters inside the quantizer on a frozen, downcast W0
// (quant/lrqat_linear.h), trained end to end like lsq and l4q.
// Defaults (docs/results/lr-qat.md): the learning rates are the reference code's (A/B 1e-3, steps
// 1e-5: also the best step lr at int4g64 on stories260K's validation split; at int2g64 --lr 3e-3
// --quant-lr 1e-4 is better there); rank 8 and alpha 16 are lowbit's choices for a 64-wide model (the
// reference runs 7B models at rank 32, alpha 1).
constexpr int64_t kLrQatRank = 8;
constexpr double kLrQatAlpha = 16, kLrQatLr = 1e-3, kLrQatQuantLr = 1e-5;

class LrQat : public QatMethod {
 public:
  explicit LrQat(const QatConfig& c) : c_(c) {
    check_format(c, "lr-qat");
    lrqat_grid(*c.format);
    LB_CHECK(c.lora_rank < 0 || c.lora_rank >= 1, "qat --method lr-qat: --lora-rank must be >= 1, got ", c.lora_rank);
    LB_CHECK(c.lora_alpha < 0 || (c.lora_alpha > 0 && std::isfinite(c.lora_alpha)),
             "qat --method lr-qat: --lora-alpha must be > 0, got ", c.lora_alpha);
    if (!c.downcast.empty()) parse_lrqat_downcast(c.downcast);
  }
  std::string name() const override { return "lr-qat"; }
  QatResult run(const LlamaModel& fp, const std::vector<int32_t>& stream) override {
    LB_CHECK(model_device(fp) == Device::CPU, "qat --method lr-qat: the LR-QAT quantizer has CPU bodies only; load the "
             "model on the CPU (--device cpu)");
    const QuantFormat& f = *c_.format;
    const auto t0 = Clock::now();
    auto work = std::make_unique<LlamaModel>(fp.config(), fp.weights(), false);
    std::vector<Var> lora, quant, state;
    const LsqInit init = c_.init_set ? c_.init : LsqInit::Mse;
    LrQatOptions lo;
    lo.rank = pick<int64_t>(c_.lora_rank, kLrQatRank);
    lo.lora_alpha = pick(c_.lora_alpha, kLrQatAlpha);
    lo.downcast = c_.downcast.empty() ? LrQatDowncast::Int8 : parse_lrqat_downcast(c_.downcast);
    lo.checkpoint = c_.grad_checkpoint;
    const auto layers =
        install_lora_quant_layers<LrQatTrainLinear>(*work, c_, f, init, lo, "lr-qat", lora, quant, state);
    E2eOptions o = e2e_options(c_, fp.config(), 300, 8);
    o.stage = "lr-qat";
    const double lr = pick(c_.lr, kLrQatLr), qlr = pick(c_.quant_lr, kLrQatQuantLr);
    std::vector<E2eGroup> groups{{lora, lr, 0.0}, {quant, qlr, 0.0}};
    o.key = e2e_key("lr-qat", f, o, groups, stream,
                    std::string(",init=") + lsq_init_name(init) + ",rank=" + std::to_string(lo.rank) +
                        ",alpha=" + key_number(lo.lora_alpha) + ",downcast=" + lrqat_downcast_name(lo.downcast));
    if (!c_.state_dir.empty()) o.state_path = (fs::path(c_.state_dir) / "lr-qat.safetensors").string();
    bool complete = true;
    QatStage st = train_end_to_end(*work, &fp, groups, state, stream, o, &complete);
    st.hyper = e2e_hyper(o);
    st.hyper["lora_lr"] = lr;
    st.hyper["quant_lr"] = qlr;
    st.hyper["lora_rank"] = lo.rank;
    st.hyper["lora_alpha"] = lo.lora_alpha;
    st.hyper["init"] = lsq_init_name(init);
    st.hyper["downcast"] = lrqat_downcast_name(lo.downcast);
    st.hyper["grad_checkpoint"] = lo.checkpoint;
    st.hyper["zero_point"] = f.kind == QuantKind::IntAsym ? "fixed at the initial integer zero point" : "none (symmetric)";
    st.hyper["grad_scale"] = "1/sqrt(N Qp)";
    return packed_result({st}, complete, std::move(work), layers, t0);
  }

 private:
  QatConfig c_;
};

// ---- llm-qat ------------------------------------------------------------------------------------
// LLM-QAT (arXiv 2305.17888; train/llm_qat.h): MinMax-quantized latent weights, per-token activation
// and per-(token, head) KV quantization during training, KL distillation from the FP teacher.
class LlmQat : public QatMethod {
 public:
  explicit LlmQat(const QatConfig& c) : c_(c) {
    LB_CHECK(c.format, "qat: no format given");
    LB_CHECK(llm_qat_supports(*c.format), "qat --method llm-qat: format ", c.format->name,
             " is not a symmetric integer format; the paper's MinMax weight quantizer is symmetric: use intBgGs or "
             "intBpcs (int4g128s, int4pcs, int2g64s, ...)");
    LB_CHECK(c.act_bits == 0 || c.act_bits == 4 || c.act_bits == 8, "qat --method llm-qat: --act-bits must be 4 or 8 (",
             "per-token activation quantization as `eval ppl --act int4|int8` runs it), got ", c.act_bits);
    LB_CHECK(c.kv_bits == 0 || c.kv_bits == 2 || c.kv_bits == 4 || c.kv_bits == 8,
             "qat --method llm-qat: --kv-bits must be 2, 4 or 8, got ", c.kv_bits);
  }
  std::string name() const override { return "llm-qat"; }
  QatResult run(const LlamaModel& fp, const std::vector<int32_t>& stream) override {
    LB_CHECK(model_device(fp) == Device::CPU, "qat --method llm-qat: its weight, activation and KV quantizers have CPU "
             "bodies only; load the model on the CPU (--device cpu)");
    const QuantFormat& f = *c_.format;
    const auto t0 = Clock::now();
    const LlamaConfig& mc = fp.config();
    auto work = std::make_unique<LlamaModel>(mc, fp.weights(), false);
    std::vector<std::shared_ptr<MinMaxQatLinear>> layers;
    std::vector<Var> weights;
    for_each_linear(*work, [&](int, const std::string&, std::shared_ptr<Linear>* slot) {
      const Tensor w = (*slot)->effective_weight().to(Device::CPU).to(DType::F32).contiguous();
      auto t = std::make_shared<MinMaxQatLinear>(w, (*slot)->bias(), f);
      weights.push_back(t->latent_weight());
      *slot = t;
      layers.push_back(t);
    });
    if (c_.act_bits > 0 || c_.kv_bits > 0) {  // trained with, and recorded in the checkpoint
      ModelTransforms tr = work->transforms();
      if (c_.act_bits > 0) tr.act = ActQuantSpec{c_.act_bits, false, 1.0, ActFloat::None, {}};
      tr.kv_token_bits = c_.kv_bits;
      work->set_transforms(tr);
    }
    E2eOptions o = e2e_options(c_, mc, 300, 8);
    o.stage = "llm-qat";
    o.distill = true;  // the paper's loss
    // lr: lsq's 1e-4 at 3+ bits (best of 1e-4 / 3e-4 / 1e-3 on stories260K's validation split at
    // int4g64s); at 2 bits the ternary MinMax grid needs the weights to move further: 3e-3 (best of
    // 1e-4 / 3e-4 / 1e-3 / 3e-3 / 1e-2 there at int2g64s; docs/results/llm-qat.md).
    const double lr = pick(c_.lr, f.bits <= 2 ? 3e-3 : 1e-4);
    std::vector<E2eGroup> groups{{weights, lr, 0.0}};
    o.key = e2e_key("llm-qat", f, o, groups, stream,
                    ",act=" + std::to_string(c_.act_bits) + ",kv=" + std::to_string(c_.kv_bits));
    if (!c_.state_dir.empty()) o.state_path = (fs::path(c_.state_dir) / "llm-qat.safetensors").string();
    bool complete = true;
    QatStage st = train_end_to_end(*work, &fp, groups, weights, stream, o, &complete);
    st.hyper = e2e_hyper(o);
    st.hyper["weight_lr"] = lr;
    st.hyper["weight_quantizer"] = "symmetric MinMax per channel/group (alpha = max|w| / (2^(b-1) - 1)), STE";
    st.hyper["act"] = c_.act_bits ? "int" + std::to_string(c_.act_bits) + " per token, symmetric MinMax, STE" : "none";
    st.hyper["kv"] = c_.kv_bits ? "int" + std::to_string(c_.kv_bits) +
                                      " per (token, head), symmetric MinMax, STE, k_proj/v_proj outputs before RoPE"
                                : "none";
    st.hyper["loss"] = "KL(teacher || student)";
    return packed_result({st}, complete, std::move(work), layers, t0);
  }

 private:
  QatConfig c_;
};

// ---- onebit ------------------------------------------------------------------------------------
// OneBit (Xu et al. 2024, arXiv 2402.11295; quant/onebit.h): every block linear becomes a
// OneBitTrainLinear (latent f32 W, its sign through the STE, the value vectors h and g from SVID),
// trained end to end by the paper's distillation loss (§3.4): KL to the FP model's logits + α Σ_l of
// the MSE of the l2-normalised hidden states of every block (hidden_state_mse), α = --hidden-mse
// (default 1: the authors' scripts' kd_beta). The packed result is the `onebit` format:
// sign(W), h and g at f16.
class OneBitQat : public QatMethod {
 public:
  explicit OneBitQat(const QatConfig& c) : c_(c), init_(parse_svid_method(c.svid.empty() ? "power" : c.svid)) {
    LB_CHECK(std::isfinite(c.hidden_mse), "qat --method onebit: --hidden-mse must be a finite number >= 0, got ",
             c.hidden_mse);
    LB_CHECK(c.format, "qat: no format given");
    LB_CHECK(c.format->kind == QuantKind::SignValue, "qat --method onebit: --format ", c.format->name,
             " cannot hold OneBit's sign bits and value vectors; use --format onebit (the default for this method)");
  }
  std::string name() const override { return "onebit"; }
  QatResult run(const LlamaModel& fp, const std::vector<int32_t>& stream) override {
    const QuantFormat& f = *c_.format;
    const auto t0 = Clock::now();
    LB_CHECK(model_device(fp) == Device::CPU, "qat --method onebit: the OneBit layer has CPU bodies only; load the "
             "model on the CPU (--device cpu)");
    auto work = std::make_unique<LlamaModel>(fp.config(), fp.weights(), false);
    std::vector<std::shared_ptr<OneBitTrainLinear>> layers;
    std::vector<Var> weights, values, state;
    for_each_linear(*work, [&](int, const std::string&, std::shared_ptr<Linear>* slot) {
      const auto [wd, w] = layer_weight(**slot);
      auto t = std::make_shared<OneBitTrainLinear>(w, (*slot)->bias(), init_);
      for (auto& p : t->weight_parameters()) weights.push_back(p);
      for (auto& p : t->value_parameters()) values.push_back(p);
      for (auto& p : t->state()) state.push_back(p);
      *slot = t;
      layers.push_back(t);
    });
    E2eOptions o = e2e_options(c_, fp.config(), 300, 8);
    o.stage = "onebit";
    // α = 1: the authors' training scripts' kd_beta (L_KD = L_CE + α L_MSE, the loss the paper trains with).
    // Without distillation (a library caller's LM-loss run) the default is off.
    o.hidden_mse = c_.hidden_mse < 0 ? (o.distill ? 1.0 : 0.0) : c_.hidden_mse;
    LB_CHECK(o.hidden_mse == 0 || o.distill, "qat --method onebit: --hidden-mse ", o.hidden_mse,
             " needs distillation (the method's loss; the CLI always distils)");
    // Latent weights 1e-3: chosen on stories260K's validation split (bench/onebit_260k.sh, seed 0:
    // valid perplexity 15.56 against 21.73 at 1e-4, ParetoQ's weight lr); value vectors 1e-3 (ParetoQ's α lr).
    const double lr = pick(c_.lr, 1e-3), qlr = pick(c_.quant_lr, 1e-3);
    std::vector<E2eGroup> groups{{weights, lr, 0.0}, {values, qlr, 0.0}};
    o.key = e2e_key("onebit", f, o, groups, stream, std::string(",svid=") + svid_method_name(init_));
    if (!c_.state_dir.empty()) o.state_path = (fs::path(c_.state_dir) / "onebit.safetensors").string();
    bool complete = true;
    QatStage st = train_end_to_end(*work, &fp, groups, state, stream, o, &complete);
    st.hyper = e2e_hyper(o);
    st.hyper["init"] = std::string("SVID (") + svid_method_name(init_) + ", rank-1 of |W|)";
    st.hyper["weight_lr"] = lr;
    st.hyper["value_lr"] = qlr;
    st.hyper["hidden_mse"] = o.hidden_mse;
    st.hyper["loss"] = !o.distill          ? "LM cross-entropy"
                       : o.hidden_mse > 0 ? "KL to the FP logits + hidden_mse * sum over blocks of the MSE of the "
                                            "l2-normalised block outputs (OneBit's L_KD)"
                                          : "KL to the FP logits (--hidden-mse 0: no hidden-state term)";
    if (complete)
      for (const auto& t : layers) t->snap_values();  // the trained function is now exactly the packed one
    return packed_result({st}, complete, std::move(work), layers, t0);
  }

 private:
  QatConfig c_;
  SvidMethod init_;
};

std::vector<QatMethodInfo>& registry_storage() {
  static std::vector<QatMethodInfo> r = [] {
    std::vector<QatMethodInfo> v;
    v.push_back({"lsq",
                 "end-to-end LSQ QAT: latent f32 weights (STE), learned steps (gradient scale 1/sqrt(N Qp)) and, on "
                 "asymmetric formats, learned zero points with MSE-optimal init (LSQ+), on the LM loss",
                 [](const QatConfig& c) { return std::unique_ptr<QatMethod>(new LsqQat(c)); }, true});
    v.push_back({"efficientqat",
                 "EfficientQAT: Block-AP (block-wise reconstruction training weights, steps and zero points) then "
                 "E2E-QP (steps only, integer codes frozen, end to end on the LM loss)",
                 [](const QatConfig& c) { return std::unique_ptr<QatMethod>(new EfficientQat(c, false)); }});
    v.push_back({"matquant",
                 "MatQuant (Matryoshka Quantization): Block-AP on int8 group codes (--format int8g64) with the loss "
                 "summed over --widths (default 8,4,2; weights --width-weights) of the codes' top bits; slice at load "
                 "(eval ppl / generate / convert --slice R)",
                 [](const QatConfig& c) { return std::unique_ptr<QatMethod>(new EfficientQat(c, true)); }});
    v.push_back({"paretoq",
                 "ParetoQ: end-to-end QAT with the paper's quantizer per bit width (sign 1 bit, SEQ 1.58/2 bits, "
                 "LSQ on the signed grid 3/4 bits; bit width from --format or --bits), learned alpha per group",
                 [](const QatConfig& c) { return std::unique_ptr<QatMethod>(new ParetoQQat(c)); }, true});
    v.push_back({"l4q",
                 "L4Q: LoRA-wise LSQ, the quantizer on the merged weight W0 + s B A (frozen W0; LoRA A/B, steps "
                 "and zero points trained jointly end to end); exported as one packed weight per layer",
                 [](const QatConfig& c) { return std::unique_ptr<QatMethod>(new L4qQat(c)); }});
    v.push_back({"llm-qat",
                 "LLM-QAT: data-free distillation (KL to the FP model's logits, on --self-generate data by default); "
                 "symmetric MinMax weights (no learned step, STE), --act-bits per token, --kv-bits per token and head",
                 [](const QatConfig& c) { return std::unique_ptr<QatMethod>(new LlmQat(c)); }, false,
                 "its MinMax weight quantizer and the per-token activation / KV quantizers have CPU bodies only"});
    v.push_back({"lr-qat",
                 "LR-QAT: low-rank adapters inside the quantizer, s (clamp(round(phi(W0/s0) + (alpha/r) B A)) - z), "
                 "W0 frozen and stored downcast (int8 fixed point by default), A/B and steps trained end to end; "
                 "exported as one packed weight per layer",
                 [](const QatConfig& c) { return std::unique_ptr<QatMethod>(new LrQat(c)); }, false,
                 "the LR-QAT quantizer (adapter inside the rounding, downcast W0) has CPU bodies only"});
    v.push_back({"onebit",
                 "OneBit: W ~ diag(h) sign(W) diag(g) (--format onebit, 1 bit + two f16 value vectors), SVID init "
                 "(rank-1 of |W|, --svid power|nmf), latent weights (STE) and h, g trained end to end by distillation "
                 "(KL to the FP logits + --hidden-mse x the normalised hidden-state MSE, default 1); CPU only",
                 [](const QatConfig& c) { return std::unique_ptr<QatMethod>(new OneBitQat(c)); }, false,
                 "the OneBit layer (sign through the STE, value vectors) has CPU bodies only"});
    return v;
  }();
  return r;
}

}  // namespace

const std::vector<QatMethodInfo>& qat_registry() { return registry_storage(); }

void register_qat_method(QatMethodInfo info) {
  LB_CHECK(!info.name.empty() && info.make, "register_qat_method: a method needs a name and a factory");
  for (const auto& m : registry_storage())
    LB_CHECK(m.name != info.name, "register_qat_method: '", info.name, "' is already registered");
  registry_storage().push_back(std::move(info));
}

std::string qat_method_names() {
  std::string s;
  for (const auto& m : qat_registry()) s += (s.empty() ? "" : ", ") + m.name;
  return s;
}

std::string qat_method_help() {
  std::string s;
  for (const auto& m : qat_registry()) s += "\n  " + m.name + "  " + m.help;
  return s;
}

const QatMethodInfo& find_qat_method(const std::string& name) {
  for (const auto& m : qat_registry())
    if (m.name == name) return m;
  throw_error("unknown qat --method '", name, "' (registered: ", qat_method_names(), ")");
}

std::unique_ptr<QatMethod> make_qat_method(const std::string& name, const QatConfig& config) {
  const QatMethodInfo& m = find_qat_method(name);
  if (config.low_precision.enabled() && !m.low_precision) {
    std::string takes;
    for (const auto& o : qat_registry())
      if (o.low_precision) takes += (takes.empty() ? "" : ", ") + o.name;
    throw_error("qat --method ", name, ": --precision ", lp_precision_name(config.low_precision.recipe.precision),
                " is not supported (it applies to the methods whose layers multiply a fake-quantized latent weight: ",
                takes, "; l4q and lr-qat fuse their product into the quantizer, efficientqat and matquant reconstruct "
                "blocks, llm-qat quantizes the activations itself)");
  }
  return m.make(config);
}

}  // namespace lowbit
