// Reverse-mode automatic differentiation over Tensors.
//
// A Var is a handle to a graph node: its value, its gradient, and (for results of ops) the
// inputs it came from plus a backward closure written next to the op (functions.cpp, which pairs
// each op's forward and backward kernels from ops/ops.h). The graph is built as ops run and is
// released by backward(): every closure and edge is dropped after use, so memory is freed as
// the backward pass proceeds. In no_grad mode (NoGradGuard) ops record nothing at all.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/core/tensor.h"

namespace lowbit {

struct Node;

class Var {
 public:
  Var() = default;
  // A leaf. requires_grad = true makes it a trainable parameter that accumulates .grad().
  explicit Var(Tensor value, bool requires_grad = false);

  bool defined() const { return node_ != nullptr; }
  const Tensor& value() const;
  Tensor& mutable_value();  // in-place updates of a leaf (optimizers)
  Tensor& grad() const;     // undefined until a backward pass reaches this Var
  bool requires_grad() const;
  void zero_grad();         // drops the gradient
  const Shape& shape() const { return value().shape(); }
  int64_t numel() const { return value().numel(); }
  Var detach() const;       // same value, no history
  const std::shared_ptr<Node>& node() const { return node_; }
  std::string name() const;
  void set_name(std::string n);

 private:
  std::shared_ptr<Node> node_;
  friend Var make_result(Tensor, std::vector<Var>, const char*, std::function<void(const Tensor&)>);
};

struct Node {
  Tensor value;
  Tensor grad;
  bool requires_grad = false;
  const char* op = "leaf";
  std::string name;
  std::vector<Var> inputs;                          // empty for leaves and after release
  std::function<void(const Tensor& grad)> backward;  // accumulates into inputs' grads
  // Under AutocastBf16Guard: value's bf16 copy, made by the first bf16 product that reads this
  // activation and reused by the others (q/k/v read one normed input; functions.h autocast_bf16_input).
  // Only for op outputs, whose value is never updated in place.
  Tensor bf16_copy;
};

// Grad mode (thread local). Ops record a graph only when enabled and an input requires grad.
bool grad_enabled();
class NoGradGuard {
 public:
  NoGradGuard();
  ~NoGradGuard();
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool prev_;
};

// The opposite (torch.enable_grad): ops record again inside, e.g. a method that trains or takes
// gradients when its caller runs under a NoGradGuard.
class EnableGradGuard {
 public:
  EnableGradGuard();
  ~EnableGradGuard();
  EnableGradGuard(const EnableGradGuard&) = delete;
  EnableGradGuard& operator=(const EnableGradGuard&) = delete;

 private:
  bool prev_;
};

// Builds the result of an op: records inputs and the backward closure when any input requires
// grad (and grad mode is on); otherwise returns a plain constant.
Var make_result(Tensor value, std::vector<Var> inputs, const char* op, std::function<void(const Tensor&)> backward);

// Adds g into v's gradient (v may not require grad: then nothing happens).
void accumulate_grad(const Var& v, const Tensor& g);

// Runs backpropagation from `root` (seed: ones of root's shape, or `seed`) and frees the graph.
// Leaves (parameters) keep their accumulated .grad(); intermediate gradients are freed.
void backward(const Var& root, const Tensor& seed = Tensor());

}  // namespace lowbit
