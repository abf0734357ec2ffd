#pragma once
// Pieces the block-wise trainers share (ApiQ/SAPR in apiq.cpp, EfficientQAT's Block-AP in
// block_ap.cpp): seed mixing, a portable shuffle of the calibration windows, gathering a
// mini-batch of windows from a block's stacked inputs, and their data-parallel form (issue 20):
// which windows of a step a rank holds, and the gradient all-reduce (also train/'s trainers').
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "lowbit/autograd/variable.h"
#include "lowbit/comm/comm.h"
#include "lowbit/core/tensor.h"

namespace lowbit {

// SplitMix64 finaliser: decorrelates seeds derived from (seed, layer, linear, epoch).
uint64_t splitmix64(uint64_t x);

// 0..n-1 in a Fisher-Yates order drawn with our own index draw from mt19937_64(seed)
// (std::shuffle's use of the engine is implementation-defined).
std::vector<int64_t> shuffled_indices(int64_t n, uint64_t seed);

// Rows of the windows idx[b..e) of x [N*L, C] (window k = rows k*L .. k*L+L-1), concatenated, on
// x's device. One window of a contiguous x is a view, not a copy. A bf16 (or f16) x, the
// pipeline's 16-bit activation cache, is returned converted to f32 on its device.
Tensor gather_windows(const Tensor& x, const std::vector<int64_t>& idx, size_t b, size_t e, int64_t L);

// The calibration windows of a data-parallel block trainer. Every rank's pipeline holds a
// contiguous share of the run's windows in rank order (rank r: global windows offset ..
// offset + local - 1, as cmd_quantize's shard_range split). The trainer shuffles and batches the
// GLOBAL indices 0..total-1 exactly as one process would, and each rank computes the part of a
// step's mean loss that its own windows make: mean over its windows x (its windows / the step's),
// so that the gradients summed over the ranks (all_reduce_grads) are the one-process step's. A rank
// may hold none of a step's windows (it then contributes zeros). With one rank (comm null or
// world 1) every window is local and nothing is exchanged.
class WindowShards {
 public:
  WindowShards(comm::Communicator* comm, int64_t local_windows);  // all-gathers the ranks' counts
  bool distributed() const { return comm_ && comm_->world_size() > 1; }
  int64_t total() const { return total_; }
  int64_t local_count() const { return local_; }
  // The rank that adds the data-free terms of a loss (SAPR's regularizer) once: rank 0.
  bool is_root() const { return !comm_ || comm_->rank() == 0; }
  // This rank's indices (into its own windows) of the global windows idx[b..e) it holds, in idx order.
  std::vector<int64_t> local(const std::vector<int64_t>& idx, size_t b, size_t e) const;
  // This rank's part of the mean loss of the step on the global windows idx[b..e): loss(mine, 0, k)
  // on the k windows it holds, times k / (e - b); undefined when it holds none. One rank:
  // loss(idx, b, e) itself.
  Var step_loss(const std::vector<int64_t>& idx, size_t b, size_t e,
                const std::function<Var(const std::vector<int64_t>&, size_t, size_t)>& loss) const;
  // v summed over the ranks (v itself with one rank): losses, so every rank takes the same branch.
  double sum(double v) const { return distributed() ? comm_->all_reduce_sum(v) : v; }
  comm::Communicator* comm() const { return comm_; }

 private:
  comm::Communicator* comm_ = nullptr;
  int64_t offset_ = 0, local_ = 0, total_ = 0;
};

// Data parallel: the gradients of `params` summed over the ranks through one flat f32 buffer on the
// parameters' device (out of place: gradient tensors may be shared between parameters). A rank
// without a gradient for a parameter adds zeros; a parameter that no rank has a gradient for keeps
// none (as in one process, where the optimizer then skips it).
void all_reduce_grads(const std::vector<Var>& params, comm::Communicator& c);

}  // namespace lowbit
