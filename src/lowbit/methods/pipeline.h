// The block-wise quantization pipeline shared by every method (RTN, GPTQ, AWQ, ApiQ, ...).
//
// Calibration activations are pushed through the model one decoder block at a time; only the
// current block and its inputs/targets are held (activations in host memory). For block i:
//   X   = inputs on the quantized path (outputs of the already quantized blocks),
//   Xfp = inputs on the full-precision path (used when next inputs come from FP blocks),
//   Y   = FP block i applied to Xfp  (the reconstruction target),
// the method replaces the block's linear layers (and may change its norms), then the next
// block's inputs become quantized-block(X) (default) or Y (next_from_fp).
// The state is saved after a block (when a checkpoint directory is given) so a killed run resumes
// at the next unsaved block with an identical result: after every block whose end is at least
// checkpoint_seconds after the last save, and always before an early stop. A save writes the
// calibration activations (N x L x dim floats, twice), e.g. 1.2 GB for SmolLM2 at 128 x 2048, so
// saving after every block would cost more than a fast method's work (RTN: 70 s of 75 on an H100).
//
// Activation dtype (PipelineOptions::cache_dtype): the calibration activations X, Xfp and Y are f32
// by default. A method that accepts it (BlockMethod::accepts_bf16_cache: ApiQ/SAPR) can have them
// kept in bf16, half the memory (at the Llama-2-7B shape with 128 x 2048 tokens each is 4 GiB in f32,
// 2 GiB in bf16; ApiQ's own calibrate.py caches them in fp16). Every computation still runs in f32:
// run_block converts each batch of windows to f32 and rounds its outputs to the cache's dtype, and
// gather_windows (block_train.h) returns f32 windows. The saved state keeps the cache's dtype (a
// resumed run is bit-identical to an uninterrupted one), and the dtype is part of the resume key.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/comm/comm.h"
#include "lowbit/model/llama.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

// Captures the inputs of each linear layer of a block during a forward pass.
using LinearInputHook = std::function<void(const std::string& linear_name, const Tensor& x)>;

// A layer that answers everything from the layer it wraps; subclasses observe its forward pass
// (HookedLinear: inputs; guided.cpp's GradTapLinear: output gradients).
class WrappedLinear : public Linear {
 public:
  explicit WrappedLinear(std::shared_ptr<Linear> inner) : inner_(std::move(inner)) {}
  Var forward(const Var& x) const override { return inner_->forward(x); }
  int64_t in_features() const override { return inner_->in_features(); }
  int64_t out_features() const override { return inner_->out_features(); }
  std::vector<Var> parameters() const override { return inner_->parameters(); }
  Tensor effective_weight() const override { return inner_->effective_weight(); }
  Tensor bias() const override { return inner_->bias(); }
  std::string kind() const override { return inner_->kind(); }

 protected:
  std::shared_ptr<Linear> inner_;
};

// Wraps a layer: passes each input to a hook (with the layer's name), then computes the layer.
class HookedLinear : public WrappedLinear {
 public:
  HookedLinear(std::shared_ptr<Linear> inner, std::string name, LinearInputHook hook)
      : WrappedLinear(std::move(inner)), name_(std::move(name)), hook_(std::move(hook)) {}
  Var forward(const Var& x) const override {
    hook_(name_, x.value());
    return inner_->forward(x);
  }

 private:
  std::string name_;
  LinearInputHook hook_;
};

// Puts HookedLinear wrappers on the named slots for the scope's lifetime; the original layers are
// back when it ends, also when an exception leaves the scope.
class LinearHookScope {
 public:
  LinearHookScope(const std::vector<std::pair<std::string, std::shared_ptr<Linear>*>>& slots, const LinearInputHook& hook) {
    for (const auto& [name, slot] : slots) {
      saved_.emplace_back(slot, *slot);
      *slot = std::make_shared<HookedLinear>(*slot, name, hook);
    }
  }
  ~LinearHookScope() {
    for (auto& [slot, orig] : saved_) *slot = orig;
  }
  LinearHookScope(const LinearHookScope&) = delete;
  LinearHookScope& operator=(const LinearHookScope&) = delete;

 private:
  std::vector<std::pair<std::shared_ptr<Linear>*, std::shared_ptr<Linear>>> saved_;
};

// Per-linear formats (--format-map / --preset, quant/format_map.h): module name
// (model.layers.3.self_attn.v_proj) -> format.
using LayerFormats = std::map<std::string, QuantFormatId>;

struct BlockContext {
  LlamaModel& model;
  int layer = 0;
  int64_t n_samples = 0, seqlen = 0;
  const Tensor& inputs;      // [N*L, D] quantized-path inputs
  const Tensor& fp_targets;  // [N*L, D] FP block outputs on FP inputs
  int64_t batch = 8;         // samples per forward pass
  const LayerFormats* formats = nullptr;  // per-linear formats; null: every linear in the method's format

  // The format of this block's `linear` (self_attn.v_proj): the plan's, else `dflt` (the method's
  // own). Every method asks here, so a mixed plan reaches RTN, GPTQ, AWQ, ApiQ, ... alike.
  const QuantFormat& format_of(const std::string& linear, const QuantFormat& dflt) const;

  // Runs block `layer` over all inputs (in batches), calling hook with each linear's input.
  // Returns the outputs [N*L, D] in x's dtype (no grad). x may be f32 or bf16 (a bf16 cache): each
  // batch is converted to f32 first, so the block and the hook always see f32 activations.
  // keep_output false: only the hook's side effects are wanted; no output is allocated (returns an
  // undefined tensor), which saves N*L*D elements of memory.
  Tensor run_block(const Tensor& x, const LinearInputHook& hook = nullptr, bool keep_output = true) const;
};

struct LinearReport {
  std::string name;       // model.layers.3.self_attn.q_proj
  double rel_error = 0;   // ||X W^T - X Q^T||^2 / ||X W^T||^2 on calibration inputs
  double bits_per_weight = 0;
  int64_t params = 0;
};

// A hyper-parameter written for options_key(): every significant digit ("%.17g"), so that two
// different values never give the same key (std::to_string keeps 6 decimals: 1e-7 == 2e-7).
std::string key_number(double v);

class BlockMethod {
 public:
  virtual ~BlockMethod() = default;
  virtual std::string name() const = 0;
  // The method's hyper-parameters as text: part of the resume key, so that a state directory
  // written with other settings is refused instead of silently mixed into this run.
  virtual std::string options_key() const { return ""; }
  // Quantizes ctx.model.block(ctx.layer) in place: replaces its linears with QuantLinear and may
  // rescale its norms. Appends one report per linear.
  virtual void quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) = 0;
  // Called once by run_blockwise before anything else (before a saved state is restored): the model
  // is still the one to quantize, not yet changed by any block. Methods that need statistics of the
  // whole model (guided.h: end-loss gradients) gather them here; state_dir (may be empty) is the
  // run's resumable state directory, where such statistics can be kept across a kill.
  virtual void prepare(LlamaModel& /*model*/, const Tensor& /*tokens*/, const std::string& /*state_dir*/,
                       bool /*progress*/) {}

  // Data-parallel calibration (issue 20): each rank runs the pipeline on its own share of the
  // calibration windows, and a method that supports it sums its statistics over the ranks through
  // `comm` before it solves (GPTQ: the Hessians), so every rank computes the same block as one
  // process on all windows would, up to the rounding of the order of the sums. The per-linear error
  // reports stay those of the rank's own windows. Methods that do not support it are refused by
  // the CLI for more than one rank.
  virtual bool supports_data_parallel() const { return false; }
  void set_communicator(comm::Communicator* c) { comm_ = c; }
  comm::Communicator* communicator() const { return comm_; }

  // True when prepare() reads the whole model (guided.h's end-loss gradients): such a method cannot
  // run on a streamed model, whose blocks are loaded one at a time (methods/stream.h).
  virtual bool needs_whole_model() const { return false; }

  // True when the method reads ctx.inputs / ctx.fp_targets only through run_block and
  // gather_windows (which convert to f32), so the pipeline may keep them in bf16
  // (PipelineOptions::cache_dtype). Other methods are refused a bf16 cache.
  virtual bool accepts_bf16_cache() const { return false; }

 protected:
  // More than one rank: the statistics are to be summed over comm_.
  bool distributed() const { return comm_ && comm_->world_size() > 1; }
  comm::Communicator* comm_ = nullptr;
};

// Block-wise streaming (methods/stream.h): the model's blocks hold no weights until the pipeline
// reaches them; each is loaded just before its calibration forward, and written out and released
// as soon as it is quantized, so the pipeline holds one block's weights (plus the calibration
// activations) whatever the depth. The finished blocks are the resumable state: the state file
// then holds only the activations, and a resumed run checks that every earlier block was written.
class BlockStream {
 public:
  virtual ~BlockStream() = default;
  // Where the blocks' weights and the activations live.
  virtual Device device() const = 0;
  // The calibration inputs of block 0: the embeddings of tokens [N, L] as [N*L, D] f32 on device().
  virtual Tensor embed(const Tensor& tokens) = 0;
  // Puts block i's full-precision weights into model.block(i).
  virtual void load(LlamaModel& model, int i) = 0;
  // Block i is final: writes it out (atomically, tagged with the run's `key`) and releases it.
  virtual void finish(LlamaModel& model, int i, const std::string& key) = 0;
  // Resuming at block `start`: throws naming the first of blocks 0..start-1 that was not written
  // with this key.
  virtual void check_finished(int start, const std::string& key) const = 0;
};

struct PipelineOptions {
  bool next_from_fp = false;   // next block inputs from the FP block (else from the quantized one)
  int64_t batch = 8;           // samples per forward pass
  std::string state_dir;       // resumable state (empty: none)
  bool progress = true;
  int stop_after_blocks = 0;   // testing aid: return after this many blocks of this run (0 = off)
  double checkpoint_seconds = 60;  // save the state at most this often (0: after every block)
  const LayerFormats* formats = nullptr;  // per-linear formats (part of the resume key); null: `format` for all
  BlockStream* stream = nullptr;  // streamed blocks (methods/stream.h); null: the model holds every block
  // dtype of the calibration activations X, Xfp, Y: F32 (the model's own: f32, or f64 for f64
  // models), or BF16 (half the memory; only for methods that accept it, see
  // BlockMethod::accepts_bf16_cache). Part of the resume key.
  DType cache_dtype = DType::F32;
};

struct PipelineReport {
  std::string method, format;
  std::vector<LinearReport> linears;
  double seconds = 0;
  double bits_per_weight = 0;  // over all quantized linears, metadata included
  int64_t peak_rss_bytes = 0;
  int resumed_from_block = 0;
  bool complete = true;  // false when stopped early by stop_after_blocks
  // The full-precision calibration forward (each block over all N x L calibration tokens, before
  // the block is quantized): total seconds and blocks run, for speed comparisons of the forward.
  double fp_forward_seconds = 0;
  int blocks_run = 0;
  int checkpoints_saved = 0;   // state saves of this run
  double checkpoint_seconds = 0;  // time spent saving them
  // Streaming: seconds spent loading blocks (reading and converting their weights) and writing the
  // finished ones; each block's wall time (load + calibration + quantization + write), this run's.
  double stream_load_seconds = 0, stream_write_seconds = 0;
  std::vector<double> block_seconds;
};

// tokens: i32 [N, L] calibration windows. Quantizes every block of `model` with `method`.
PipelineReport run_blockwise(LlamaModel& model, const Tensor& tokens, BlockMethod& method, const QuantFormat& format,
                             const PipelineOptions& options);

// Relative output error ||X (W - Q)^T||^2 / ||X W^T||^2 of W -> Q on the rows of x, computed on
// x's device. Used by methods for their per-layer reports.
double relative_output_error(const Tensor& x, const Tensor& w, const Tensor& q);

// Calibration rows behind the per-layer error reports (the errors are means over rows): 512 keeps
// a 7B-shaped layer's report well under a second even on a CPU.
constexpr int64_t kReportRows = 512;
// At most max_rows rows of x, evenly strided (x itself when it is small enough).
Tensor report_sample(const Tensor& x, int64_t max_rows = kReportRows);

// Peak resident memory of this process (bytes).
int64_t peak_rss_bytes();

}  // namespace lowbit
