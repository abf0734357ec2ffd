// Optimizers and schedules for training (lowbit train, ApiQ, finetuning).
#pragma once
#include <cstdint>
#include <vector>

#include "lowbit/autograd/variable.h"
#include "lowbit/ops/ops.h"

namespace lowbit {

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;
};

// A group of parameters sharing hyper-parameters (e.g. LoRA vs clipping in ApiQ).
struct ParamGroup {
  std::vector<Var> params;
  AdamWOptions options;
};

// How AdamW keeps its two moments. bits = 32: f32 tensors (m, v) per parameter. bits = 8: block-wise
// dynamic 8-bit quantization (Dettmers et al. 2022; ops/blockwise8.h, ops::adamw8_step): per
// parameter m as signed codes + f32 absmax per 2048 elements, v as unsigned codes + absmax -- except
// parameters with fewer than min_8bit_numel elements (bitsandbytes' min_8bit_size: norms, biases,
// small adapters) and those listed in keep_32bit (the token embedding, the paper's advice for
// stable training), which keep f32 state. bits = 8 needs every parameter on the CPU (a GPU one is an
// error) and f32 parameters for the 8-bit ones.
struct AdamWStateOptions {
  int bits = 32;
  int64_t min_8bit_numel = 4096;
  std::vector<Var> keep_32bit;
};

class AdamW {
 public:
  explicit AdamW(std::vector<ParamGroup> groups, AdamWStateOptions state = {});
  AdamW(std::vector<Var> params, AdamWOptions options, AdamWStateOptions state = {})
      : AdamW({ParamGroup{std::move(params), options}}, std::move(state)) {}
  // Applies one update with lr scaled by lr_scale (for schedules); parameters without a gradient
  // are skipped. Increments the step counter.
  void step(double lr_scale = 1.0);
  // step() of several optimizers at once: each increments its own counter and updates with its own
  // groups' hyper-parameters, but all their f32 tensors go into one ops::adamw_step_groups call (on
  // the GPU one fused launch per ops::kAdamwMultiMax tensors). ApiQ's trainer keeps its clipping and
  // LoRA groups in two optimizers (their bias-correction counts may differ) and steps both this way.
  static void step_all(const std::vector<AdamW*>& opts, double lr_scale = 1.0);
  void zero_grad();
  int64_t steps() const { return step_; }
  // Optimizer state for checkpoints, in group order: per parameter (m, v) for f32 state, (m codes,
  // m absmax, v codes, v absmax) for 8-bit state.
  std::vector<Tensor*> state_tensors();
  void set_steps(int64_t s) { step_ = s; }
  std::vector<ParamGroup>& groups() { return groups_; }
  int state_bits() const { return bits_; }
  // Whether parameter i of group gi has 8-bit state.
  bool is_8bit(size_t gi, size_t i) const { return m_absmax_[gi][i].defined(); }
  // Bytes of optimizer state (both moments, codes and absmax), and how many of them are 8-bit.
  int64_t state_bytes() const;
  int64_t params_8bit() const;

 private:
  // Increments the counter, updates the 8-bit tensors, and appends the f32 ones (with their
  // groups' hyper-parameters) to `out` for one adamw_step_groups call.
  void prepare_step(double lr_scale, std::vector<ops::AdamwGroupStep>& out);
  std::vector<ParamGroup> groups_;
  // m_/v_: f32 moments, or u8 codes for 8-bit state (then m_absmax_/v_absmax_ are defined).
  std::vector<std::vector<Tensor>> m_, v_, m_absmax_, v_absmax_;
  int bits_ = 32;
  int64_t step_ = 0;
};

// Scales all gradients so their global L2 norm is at most max_norm; returns the norm before.
double clip_grad_norm(const std::vector<Var>& params, double max_norm);

// Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total` steps.
double warmup_cosine(int64_t step, int64_t warmup, int64_t total, double min_ratio = 0.1);

}  // namespace lowbit
