#include "lowbit/autograd/variable.h"

#include "lowbit/autograd/leaf_hook.h"

#include <unordered_map>
#include <unordered_set>

#include "lowbit/ops/ops.h"

namespace lowbit {

namespace {
thread_local bool t_grad_enabled = true;
}

Var::Var(Tensor value, bool requires_grad) : node_(std::make_shared<Node>()) {
  node_->value = std::move(value);
  node_->requires_grad = requires_grad;
}

const Tensor& Var::value() const {
  if (!node_) throw_error("use of an undefined Var");
  return node_->value;
}
Tensor& Var::mutable_value() {
  if (!node_) throw_error("use of an undefined Var");
  return node_->value;
}
Tensor& Var::grad() const {
  if (!node_) throw_error("use of an undefined Var");
  return node_->grad;
}
bool Var::requires_grad() const { return node_ && node_->requires_grad; }
void Var::zero_grad() {
  if (node_) node_->grad = Tensor();
}
Var Var::detach() const { return Var(value(), false); }
std::string Var::name() const { return node_ ? node_->name : std::string(); }
void Var::set_name(std::string n) {
  if (node_) node_->name = std::move(n);
}

bool grad_enabled() { return t_grad_enabled; }
NoGradGuard::NoGradGuard() : prev_(t_grad_enabled) { t_grad_enabled = false; }
NoGradGuard::~NoGradGuard() { t_grad_enabled = prev_; }
EnableGradGuard::EnableGradGuard() : prev_(t_grad_enabled) { t_grad_enabled = true; }
EnableGradGuard::~EnableGradGuard() { t_grad_enabled = prev_; }

Var make_result(Tensor value, std::vector<Var> inputs, const char* op, std::function<void(const Tensor&)> backward) {
  bool needs = false;
  if (t_grad_enabled)
    for (const auto& in : inputs) needs = needs || in.requires_grad();
  Var r(std::move(value), needs);
  r.node_->op = op;
  if (needs) {
    r.node_->inputs = std::move(inputs);
    r.node_->backward = std::move(backward);
  }
  return r;
}

void accumulate_grad(const Var& v, const Tensor& g) {
  if (!v.requires_grad()) return;
  Node& n = *v.node();
  if (g.shape() != n.value.shape())
    throw_error("autograd: gradient of shape ", shape_str(g.shape()), " for a value of shape ", shape_str(n.value.shape()),
                " (op '", n.op, "')");
  if (!n.grad.defined()) {
    // Stored without a copy: several inputs may share one gradient tensor (add), so gradients are
    // never modified in place anywhere (accumulation and clipping build new tensors).
    n.grad = g;
  } else {
    Tensor sum = Tensor::empty(g.shape(), g.dtype(), g.device());
    ops::add(n.grad, g, sum);
    n.grad = sum;
  }
}

namespace {

void run_backward(const Var& root, const Tensor& seed, const LeafGradHook& on_leaf_done) {
  if (!root.requires_grad()) throw_error("backward: the value does not require grad (no parameter reaches it)");
  // Topological order by iterative depth-first search (graphs can be thousands of nodes deep).
  // Holds shared ownership: releasing a node's edges below must not free nodes still queued.
  std::vector<std::shared_ptr<Node>> order;
  std::unordered_set<Node*> seen;
  std::vector<std::pair<std::shared_ptr<Node>, size_t>> stack{{root.node(), 0}};
  seen.insert(root.node().get());
  while (!stack.empty()) {
    auto& [n, i] = stack.back();
    if (i < n->inputs.size()) {
      std::shared_ptr<Node> child = n->inputs[i++].node();
      if (child->requires_grad && child->backward && !seen.count(child.get())) {
        seen.insert(child.get());
        stack.push_back({std::move(child), 0});
      }
    } else {
      order.push_back(n);
      stack.pop_back();
    }
  }
  Tensor g = seed;
  if (!g.defined()) {
    g = Tensor::empty(root.shape(), root.value().dtype(), root.value().device());
    g.fill_(1.0);
  }
  accumulate_grad(root, g);
  // With a hook: the leaves whose last user is the k-th node to run (in running order), each
  // list in the order of that node's inputs, so the hook order is deterministic.
  std::vector<std::vector<Node*>> finished;
  if (on_leaf_done) {
    const auto node_at = [&](size_t k) { return order[order.size() - 1 - k].get(); };
    std::unordered_map<Node*, size_t> last;
    for (size_t k = 0; k < order.size(); ++k)
      for (const Var& in : node_at(k)->inputs)
        if (in.requires_grad() && !in.node()->backward) last[in.node().get()] = k;
    finished.resize(order.size());
    for (size_t k = 0; k < order.size(); ++k)
      for (const Var& in : node_at(k)->inputs) {
        auto it = last.find(in.node().get());
        if (it != last.end() && it->second == k) {
          finished[k].push_back(it->first);
          last.erase(it);  // listed once
        }
      }
  }
  size_t k = 0;
  for (auto it = order.rbegin(); it != order.rend(); ++it, ++k) {
    Node* n = it->get();
    if (!n->backward) continue;  // a leaf root keeps its gradient
    if (n->grad.defined()) n->backward(n->grad);
    if (on_leaf_done)
      for (Node* leaf : finished[k])
        if (leaf->grad.defined()) on_leaf_done(*leaf);
    // Release this node's part of the graph and its (intermediate) gradient.
    n->backward = nullptr;
    n->inputs.clear();
    n->grad = Tensor();
  }
}

}  // namespace

void backward(const Var& root, const Tensor& seed) { run_backward(root, seed, nullptr); }

void backward_with_leaf_hook(const Var& root, const LeafGradHook& on_leaf_done, const Tensor& seed) {
  LB_CHECK(on_leaf_done, "backward_with_leaf_hook: no hook given");
  run_backward(root, seed, on_leaf_done);
}

}  // namespace lowbit
