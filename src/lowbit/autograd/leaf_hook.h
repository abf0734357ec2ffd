// backward() for passes that only fold parameter gradients into statistics (SAPR's Fisher
// saliency): a hook runs once per leaf that requires grad, as soon as its gradient is final (the
// last node that uses the leaf has run its backward). The hook may read the gradient and drop it
// (leaf.grad = Tensor()), so such a pass never holds every parameter's gradient at once.
#pragma once
#include <functional>

#include "lowbit/autograd/variable.h"

namespace lowbit {

using LeafGradHook = std::function<void(Node& leaf)>;

// As backward(root, seed), calling on_leaf_done(leaf) for each finished leaf gradient, in a
// deterministic order (the order the graph's nodes run, then the order of their inputs).
void backward_with_leaf_hook(const Var& root, const LeafGradHook& on_leaf_done, const Tensor& seed = Tensor());

}  // namespace lowbit
