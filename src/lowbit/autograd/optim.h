// Optimizers and schedules for training (lowbit train, ApiQ, finetuning).
#pragma once
#include <cstdint>
#include <vector>

#include "lowbit/autograd/variable.h"

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

class AdamW {
 public:
  explicit AdamW(std::vector<ParamGroup> groups);
  AdamW(std::vector<Var> params, AdamWOptions options) : AdamW({ParamGroup{std::move(params), options}}) {}
  // Applies one update with lr scaled by lr_scale (for schedules); parameters without a gradient
  // are skipped. Increments the step counter.
  void step(double lr_scale = 1.0);
  void zero_grad();
  int64_t steps() const { return step_; }
  // Optimizer state for checkpoints: per parameter (m, v), in group order.
  std::vector<Tensor*> state_tensors();
  void set_steps(int64_t s) { step_ = s; }
  std::vector<ParamGroup>& groups() { return groups_; }

 private:
  std::vector<ParamGroup> groups_;
  std::vector<std::vector<Tensor>> m_, v_;
  int64_t step_ = 0;
};

// Scales all gradients so their global L2 norm is at most max_norm; returns the norm before.
double clip_grad_norm(const std::vector<Var>& params, double max_norm);

// Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total` steps.
double warmup_cosine(int64_t step, int64_t warmup, int64_t total, double min_ratio = 0.1);

}  // namespace lowbit
