// ZeRO-1 (issue 20): the AdamW state of a data-parallel run sharded over the ranks by whole
// parameters, as PyTorch's ZeroRedundancyOptimizer: each parameter belongs to one rank (the ranks'
// shares balanced by size), the gradients are reduce-scattered (each rank receives the summed
// gradients of its own parameters), the clipping norm all-reduced, each rank updates its own
// parameters with its part of the state, and the parameters are all-gathered. Used by `train`
// (trainer.cpp, which also gathers the moments for its state file) and `qat`'s end-to-end stage.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "lowbit/autograd/optim.h"
#include "lowbit/autograd/variable.h"
#include "lowbit/comm/comm.h"

namespace lowbit {

// ZeRO: parameter i of `ordered` belongs to rank owner[i]; a rank's parameters are consecutive and
// packed into its `chunk` elements at offset[i] (the padded flat layout of the collectives).
struct ZeroLayout {
  std::vector<int> owner;
  std::vector<int64_t> offset;
  int64_t chunk = 0;
  bool owns(size_t i, int rank) const { return owner[i] == rank; }
};

// The layout of `ps` (in order) over `world` ranks.
ZeroLayout zero_layout(const std::vector<Var>& ps, int world);

// Each rank's tensors (get(i) for the parameters it owns) packed into its chunk and all-gathered:
// the [world * chunk] result holds every parameter's tensor at owner * chunk + offset.
Tensor zero_gather(const std::vector<Var>& ps, const ZeroLayout& z, comm::Communicator& c,
                   const std::function<Tensor(size_t)>& get);

// Parameter i's tensor in zero_gather's result (`like`: its shape).
Tensor zero_slot(const Tensor& all, const ZeroLayout& z, size_t i, const Tensor& like);

// The gradients summed over the ranks, each rank receiving its own parameters' (reduce-scatter);
// the others' gradients are dropped. Returns the global gradient norm, clipped as clip_grad_norm.
double zero_reduce_grads(const std::vector<Var>& ps, const ZeroLayout& z, comm::Communicator& c, double max_norm);

// `groups` with only the parameters `rank` owns (same options; a group may become empty), where
// the layout's parameter order is the groups' parameters concatenated.
std::vector<ParamGroup> zero_own_groups(const std::vector<ParamGroup>& groups, const ZeroLayout& z, int rank);

// After each rank's AdamW step on its own parameters: every parameter's new value to every rank.
void zero_gather_params(const std::vector<Var>& ps, const ZeroLayout& z, comm::Communicator& c);

}  // namespace lowbit
