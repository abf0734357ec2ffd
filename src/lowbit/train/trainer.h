// Pretraining a Llama-architecture model from scratch (lowbit train): random windows of a token
// stream, AdamW, linear warmup + cosine decay, gradient accumulation and clipping, periodic
// validation, and checkpoints that resume exactly.
//
// Exact resume: batch b of step s is drawn with an RNG seeded from (seed, s, b) alone, and the
// checkpoint holds the weights, the AdamW moments and the step; a run killed after a checkpoint
// and restarted therefore computes the same updates as an uninterrupted run (on the same machine
// and thread count: BLAS results depend on the blocking it picks).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/comm/comm.h"
#include "lowbit/model/llama.h"
#include "lowbit/train/bitnet.h"
#include "lowbit/train/low_precision.h"

namespace lowbit {

struct TrainOptions {
  LlamaConfig config;              // architecture (vocab_size must match the tokenizer)
  int64_t batch_size = 32;         // sequences per micro-batch
  int64_t seq_len = 256;           // tokens per sequence
  int64_t grad_accum = 1;          // micro-batches per optimizer step
  int64_t max_steps = 1000;
  int64_t warmup_steps = 100;
  double lr = 5e-4, min_lr_ratio = 0.1;
  double weight_decay = 0.1, beta1 = 0.9, beta2 = 0.95, grad_clip = 1.0;
  int64_t eval_every = 100;        // validation every N steps (and at the end); 0 = only at the end
  int64_t eval_batches = 10;       // validation micro-batches (fixed windows)
  int64_t checkpoint_every = 100;  // 0 = only at the end
  uint64_t seed = 1;
  Device device = Device::CPU;
  // Mixed precision (GPU only, train_model): bf16 activations and matmuls, fp32 master weights,
  // fp32 gradients for the update, fp32 AdamW state, fp32 loss (see MixedPrecisionModel).
  bool bf16 = false;
  // AdamW state: 32 = f32 moments; 8 = block-wise dynamic 8-bit moments (autograd/optim.h
  // AdamWStateOptions: tensors under 4096 elements and the token embedding keep f32 state). CPU only.
  int optimizer_bits = 32;
  std::string out_dir;             // state.safetensors, log.jsonl, model.bin, hf/
  bool resume = true;              // continue from out_dir/state.safetensors when present
  int64_t stop_after = 0;          // testing aid: return after this many steps of this run (0 = off)
  std::string dump_order;          // when set: write the data order to this file (see write_data_order)
  // BitNet b1.58 (train/bitnet.h): BitLinear blocks, the 16 -> 1.58-bit transition, and the
  // two-stage LR/WD schedule (which plain Llama runs may use too). CPU only.
  BitNetOptions bitnet;
  // Data parallel (issue 20; null or one rank: off): each micro-batch's windows are split over the
  // ranks (comm::shard_range), each rank's loss is weighted by its share of the windows, and the
  // gradients are summed over the ranks (one flat all-reduce per step) before clipping and the
  // AdamW step, which every rank then takes identically: the loss curve is the one-process curve up
  // to the rounding of the sums. Rank 0 alone writes the log, the state and the model.
  comm::Communicator* comm = nullptr;
  // With several ranks: shard the AdamW state (ZeRO, as PyTorch's ZeroRedundancyOptimizer: whole
  // parameters, in order, each owned by one rank, the ranks' shares balanced by size). The
  // gradients are reduce-scattered (each rank receives the summed gradients of its own parameters),
  // the clipping norm is all-reduced, each rank updates its parameters with its part of the state,
  // and the parameters are all-gathered. The state file is the same as without sharding (rank 0
  // gathers the moments to save; every rank restores its own part), so runs resume either way.
  // f32 optimizer state only.
  bool zero = false;
  // Low-precision training (train/low_precision.h, --precision): the block linears' GEMMs on
  // quantized operands (emulated), f32 master weights. The settings are stored in the state and a
  // resume with other ones is refused; the fp8 amax histories are part of the state. One process
  // only (no data parallel yet), not with --bf16 or --arch bitnet-b1.58.
  LowPrecisionOptions low_precision;
};

struct TrainRecord {
  int64_t step = 0;
  double loss = 0, lr = 0, grad_norm = 0, val_loss = -1, seconds = 0, tokens_per_second = 0;
};

struct TrainResult {
  std::vector<TrainRecord> records;  // this run's steps (after a resume: from the resumed step)
  double final_val_loss = -1;
  int64_t steps_done = 0;
  bool resumed = false;
  bool complete = false;  // reached max_steps (false when stopped by stop_after)
  double train_seconds = 0;  // sum of this run's step times (forward, backward, update; no validation)
  int64_t optimizer_state_bytes = 0;  // AdamW's two moments (8-bit: codes and absmax)
  int64_t optimizer_params_8bit = 0;  // parameters whose state is 8-bit
  // --precision other than f32: the final validation loss of the f32 master weights with f32 GEMMs
  // (final_val_loss is the low-precision forward's); -1 otherwise or without validation data.
  double final_val_loss_f32 = -1;
};

// Throws lowbit::Error naming the flag when the options or the data cannot make a run: batch,
// seq_len, grad_accum, eval_batches < 1, negative steps, a non-positive or non-finite lr, or a train
// (or non-empty validation) stream shorter than one window of seq_len + 1 tokens.
void check_training_inputs(const TrainOptions& options, const std::vector<int32_t>& train_stream,
                           const std::vector<int32_t>& val_stream);

TrainResult train_model(const TrainOptions& options, const std::vector<int32_t>& train_stream,
                        const std::vector<int32_t>& val_stream,
                        const std::function<void(const TrainRecord&)>& on_step = nullptr);

// The loop shared by pretraining and finetuning: trains `params` (parameters of `model`) with
// o's schedule on random windows of `train`, validates on `val`, keeps o.out_dir/state.safetensors
// and log.jsonl, and resumes from them. Writes no model files. With options.low_precision enabled,
// `lp` is required (finetune: the adapters' products).
TrainResult run_training(const LlamaModel& model, const std::vector<Var>& params, const TrainOptions& options,
                         const std::vector<int32_t>& train_stream, const std::vector<int32_t>& val_stream,
                         const std::function<void(const TrainRecord&)>& on_step = nullptr,
                         const LpTraining* lp = nullptr);

// bf16 mixed precision over an fp32 model (Micikevicius et al. 2018, with bf16: no loss scaling).
// The fp32 `master` model keeps the parameters that AdamW updates and checkpoints hold; a second
// model holds bf16 copies of them. Each forward pass:
//   x = cast(master.embed(tokens), bf16)        embedding lookup and its scatter-add gradient in f32
//   x = copy.block_forward(i, x) for every block  bf16 activations, bf16 GEMMs (fp32 accumulation),
//                                                 bf16 flash attention with an f32 log-sum-exp
//   logits = cast(copy.head(x), f32)             softmax cross-entropy and its lse in f32
// refresh() rewrites the copies from the masters (call it after every optimizer step, before
// the next forward); collect_grads() converts the copies' bf16 gradients to f32, adds them into
// the masters' gradients and drops them (call it after each backward, so gradient accumulation
// over micro-batches sums in f32). Gradient clipping and AdamW then run on the f32 masters.
// Needs the GPU: there are no bf16 CPU kernels.
class MixedPrecisionModel {
 public:
  explicit MixedPrecisionModel(const LlamaModel& master);
  void refresh();
  Var forward(const Tensor& tokens) const;  // tokens i32 [B, T] -> f32 logits [B*T, V]
  void collect_grads();
  const LlamaModel& copy() const { return *copy_; }

 private:
  const LlamaModel& master_;
  std::unique_ptr<LlamaModel> copy_;
  std::vector<Var> masters_, copies_;
};

// Initial weights as in llama2.c's train.py: N(0, 0.02), residual projections (wo, w2) scaled by
// 1/sqrt(2 * n_layers), norms 1.
LlamaWeights init_weights(const LlamaConfig& c, uint64_t seed);

// Start offsets of the training windows (seq_len + 1 tokens each) of micro-batch `micro` of
// optimizer step `step` (0-based), drawn from an RNG seeded by (seed, step, micro) alone; the
// stream has `stream_size` tokens.
std::vector<int64_t> train_window_starts(uint64_t seed, int64_t step, int64_t micro, int64_t batch_size,
                                         int64_t seq_len, int64_t stream_size);

// Start offsets of the fixed, evenly spaced validation windows, batch after batch.
std::vector<int64_t> validation_window_starts(int64_t stream_size, int64_t seq_len, int64_t batch_size,
                                              int64_t batches);

// Input [B, T] and target [B * T] token tensors of windows of T + 1 tokens of `stream` starting at
// `starts` (B = starts.size()): the batches of `train_model` and of the QAT trainer.
void make_lm_windows(const std::vector<int32_t>& stream, const std::vector<int64_t>& starts, int64_t T, Tensor& in,
                     Tensor& tgt);

// The data order of a run, for reference implementations that must consume the same windows
// (bench/torch_train_ref.py). All values are little-endian int64:
//   header: magic 0x315244524f54424c (the bytes "LBTORDR1"),
//           max_steps, grad_accum, batch_size, seq_len, eval_batches, n_train_tokens, n_val_tokens, seed
//   then max_steps * grad_accum * batch_size training window starts (step-major, then micro-batch,
//   then sequence), then eval_batches * batch_size validation window starts (none when
//   n_val_tokens is 0). A window starting at s covers tokens s .. s + seq_len (inputs s .. s+T-1,
//   targets s+1 .. s+T). The file does not depend on resuming: it is the whole run's order.
void write_data_order(const std::string& path, const TrainOptions& options, int64_t n_train_tokens,
                      int64_t n_val_tokens);
inline constexpr uint64_t kDataOrderMagic = 0x315244524f54424cull;  // "LBTORDR1"

// Mean validation loss over fixed, evenly spaced windows (no grad).
double validation_loss(const LlamaModel& model, const std::vector<int32_t>& stream, int64_t seq_len,
                       int64_t batch_size, int64_t batches);
// The same with any forward function (tokens [B, T] -> logits [B*T, V]), e.g. MixedPrecisionModel.
double validation_loss(const std::function<Var(const Tensor&)>& forward, const std::vector<int32_t>& stream,
                       int64_t seq_len, int64_t batch_size, int64_t batches);

}  // namespace lowbit
