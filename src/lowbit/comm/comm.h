// The communicator layer (issue 20): collectives between the ranks of a data-parallel run.
//
// Ranks are processes. Who is who comes from the launcher environment (RANK, WORLD_SIZE,
// LOCAL_RANK, MASTER_ADDR, MASTER_PORT: torchrun / Slurm wrappers / `lowbit ... --gpus N`, which
// starts N copies of itself with these variables set, launch.h). Rank 0 listens on
// MASTER_ADDR:MASTER_PORT and every other rank connects to it (a TCP star, tcp.h): that rendezvous
// hands NCCL its unique id and is the transport of the CPU backend.
//
// Backends:
//   * "single": one rank, every collective a no-op (the default without a launcher environment);
//   * "cpu":    collectives over the TCP star; rank 0 reduces the ranks' buffers in rank order
//               (0 + 1 + 2 + ...), so every rank gets the same, reproducible result whatever the
//               order in which the buffers arrive. For tests and CPU runs on several processes;
//   * "nccl":   NCCL (builds with CUDA whose toolkit has nccl.h; NVLink multicast (NVLS) is turned
//               off with NCCL_NVLS_ENABLE=0 before init). Device tensors go straight to NCCL; host
//               tensors are staged through the GPU of the rank (LOCAL_RANK).
// Every collective checks that all ranks called the same operation with the same element type and
// count (CPU backend: compared by rank 0, a mismatch is an error on every rank naming both calls;
// NCCL backend: the operation headers go over the TCP star first, the same check).
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "lowbit/core/tensor.h"

namespace lowbit::comm {

// Who this process is in the run, from the environment (or the single-rank default).
struct DistEnv {
  int rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  bool from_environment = false;  // WORLD_SIZE was set
};

// Reads RANK, WORLD_SIZE, LOCAL_RANK (default: RANK), MASTER_ADDR (default 127.0.0.1) and
// MASTER_PORT (default 29500). Without WORLD_SIZE: one rank. Throws lowbit::Error naming the
// variable for a value that is not a number, out of range (RANK >= WORLD_SIZE, a port outside
// 1..65535) or missing (WORLD_SIZE > 1 without RANK).
DistEnv dist_env_from_environment();

// Parses a non-negative decimal integer the way the environment parser does (for tests and flags).
// Throws lowbit::Error("<what>: '<text>' is not a number ...").
int64_t parse_env_int(const std::string& what, const std::string& text, int64_t lo, int64_t hi);

class Communicator {
 public:
  virtual ~Communicator() = default;
  int rank() const { return rank_; }
  int world_size() const { return world_; }
  int local_rank() const { return local_rank_; }
  virtual std::string backend() const = 0;

  // In place: t := sum over ranks of t. F32, F64, I32 or I64, contiguous, same numel everywhere.
  virtual void all_reduce_sum(Tensor& t) = 0;
  // out = the ranks' `in` concatenated in rank order (as flat element arrays): out.numel() =
  // world * in.numel(). Any dtype.
  virtual void all_gather(const Tensor& in, Tensor& out) = 0;
  // out = chunk `rank` of the element-wise sum of the ranks' `in`: in.numel() = world * out.numel().
  virtual void reduce_scatter_sum(const Tensor& in, Tensor& out) = 0;
  // t := root's t on every rank. Any dtype.
  virtual void broadcast(Tensor& t, int root) = 0;
  virtual void barrier() = 0;

  // Scalars, summed over ranks.
  double all_reduce_sum(double v);
  int64_t all_reduce_sum(int64_t v);

 protected:
  Communicator(int rank, int world, int local_rank) : rank_(rank), world_(world), local_rank_(local_rank) {}
  int rank_, world_, local_rank_;
};

// One rank, nothing to exchange.
std::unique_ptr<Communicator> make_single_communicator();
// The TCP-star backend; blocks until every rank has joined (connect_timeout_s; then an error
// naming MASTER_ADDR:MASTER_PORT). op_timeout_s bounds the wait for any one message (0: none).
std::unique_ptr<Communicator> make_cpu_communicator(const DistEnv& env, double connect_timeout_s = 60,
                                                    double op_timeout_s = 1800);
// NCCL over the rank's GPU LOCAL_RANK; throws when the build has no NCCL or the GPU is missing.
std::unique_ptr<Communicator> make_nccl_communicator(const DistEnv& env, double connect_timeout_s = 60);
bool nccl_available();  // compiled with NCCL

// The communicator a command uses: backend "auto" (NCCL when built with it and the run uses the
// GPU, else cpu; one rank: single), "cpu", "nccl" or "single". LOWBIT_COMM_BACKEND overrides "auto";
// LOWBIT_COMM_TIMEOUT (seconds) the connect timeout.
std::unique_ptr<Communicator> make_communicator(const DistEnv& env, const std::string& backend, bool uses_gpu);

// Contiguous share [begin, end) of n items for `rank` of `world` (the first n % world ranks take one
// more). Throws when a rank would get nothing.
std::pair<int64_t, int64_t> shard_range(int64_t n, int rank, int world, const std::string& what);

}  // namespace lowbit::comm
