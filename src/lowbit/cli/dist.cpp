#include "lowbit/cli/dist.h"

#include <CLI/CLI.hpp>

#include <cstdlib>
#include <vector>

#include "lowbit/cli/common.h"
#include "lowbit/comm/launch.h"
#include "lowbit/core/error.h"
#include "lowbit/core/progress.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/io/tensor_parallel_load.h"

namespace lowbit::cli {

namespace {
std::vector<std::string> g_args;
int g_local_rank = 0;
}  // namespace

void set_command_line(int argc, char** argv) { g_args.assign(argv, argv + argc); }

int cuda_device_index() { return g_local_rank; }

namespace {
void add_comm_backend_option(CLI::App* app, DistArgs* d) {
  app->add_option("--comm-backend", d->backend,
                  "collectives between the ranks: auto (nccl for a GPU run of a CUDA build, else cpu), cpu (TCP), "
                  "nccl, single (overrides LOWBIT_COMM_BACKEND)")
      ->check(CLI::IsMember({"auto", "cpu", "nccl", "single"}))
      ->capture_default_str();
}
}  // namespace

void add_dist_options(CLI::App* app, DistArgs* d) {
  app->add_option("--gpus", d->gpus,
                  "ranks (processes) of a data-parallel run on this host, one GPU each with --device cuda; lowbit "
                  "starts them itself (an external launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
                  "MASTER_PORT instead)")
      ->check(between(1, 256));
  add_comm_backend_option(app, d);
}

void add_tp_options(CLI::App* app, DistArgs* d) {
  app->add_option("--tp", d->gpus,
                  "tensor-parallel ranks (processes; one GPU each with --device cuda): each reads from the checkpoint "
                  "and holds only its share of the heads and of the MLP width (plus the embedding, norms and head) "
                  "and its own KV cache, the partial outputs are all-reduced after "
                  "attention and MLP; rank 0 samples and prints (an external launcher sets RANK, WORLD_SIZE, ... "
                  "instead)")
      ->check(between(1, 256));
  add_comm_backend_option(app, d);
}

Device tensor_parallel_load_device(const std::string& path, Device device, const comm::Communicator& comm) {
  if (comm.world_size() == 1 || device == Device::CPU || is_lowbit_quantized_dir(path) || is_packed_gguf(path)) return device;
  return Device::CPU;
}

namespace {
// The checkpoint's copies of the block linears (and q/k/v biases) released: the model holds the pieces.
void drop_linears(Checkpoint& c) {
  for (auto& l : c.weights.layers)
    for (Tensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down, &l.bq, &l.bk, &l.bv}) *t = Tensor();
}
}  // namespace

LoadedModel load_model_for_ranks(const std::string& path, Device device, comm::Communicator& comm, bool packed_vocab,
                                 bool rank_local) {
  const char* env = std::getenv("LOWBIT_TP_LOAD");
  const std::string mode = env ? env : "";
  if (!mode.empty() && mode != "whole" && mode != "local")
    throw_error("LOWBIT_TP_LOAD must be 'whole' or 'local' (the default), got '", mode, "'");
  const bool whole = mode == "whole";
  if (comm.world_size() == 1 || !rank_local || whole)
    return load_model(path, tensor_parallel_load_device(path, device, comm), false, packed_vocab);
  LoadedModel m;
  // As load_model: a lowbit directory's dense vocabulary is packed (q8_0) for a CPU inference load —
  // here as it is read, a chunk of rows at a time.
  const bool pack = packed_vocab && device == Device::CPU && is_lowbit_quantized_dir(path);
  LazyCheckpoint lazy = pack ? open_quantized_dir_lazily(path, true) : open_checkpoint_lazily(path);
  QuantizedCheckpoint q = load_tensor_parallel_piece(std::move(lazy), comm.rank(), comm.world_size());
  m.model = make_quantized_model(q, device);
  m.model->join_tensor_parallel(comm);
  m.checkpoint = std::move(q.dense);
  drop_linears(m.checkpoint);
  if (m.model->packed_output()) {
    m.checkpoint.weights.tok_embeddings = m.checkpoint.weights.output = Tensor();
    for (const char* name : {"model.embed_tokens", "lm_head"})
      if (auto it = q.quantized.find(name); it != q.quantized.end()) m.packed_vocab_bytes += it->second.nbytes();
  }
  return m;
}

void shard_for_tensor_parallel(LoadedModel& m, comm::Communicator& comm, Device device) {
  if (comm.world_size() == 1 || m.model->tensor_parallel()) return;
  m.model = m.model->tensor_parallel_shard(comm, device);
  drop_linears(m.checkpoint);
}

std::unique_ptr<comm::Communicator> start_ranks(const DistArgs& d, bool uses_gpu, const char* flag) {
  const comm::DistEnv env = comm::dist_env_from_environment();
  if (!env.from_environment) {
    if (d.gpus > 1) {
      if (g_args.empty()) throw_error("--gpus: the command line is unknown (internal)");
      throw ExitRequest{comm::launch_local_ranks(d.gpus, g_args)};
    }
    return comm::make_communicator(env, d.backend, uses_gpu);
  }
  if (d.gpus > 0 && d.gpus != env.world_size)
    throw_error(flag, " ", d.gpus, " but the launcher's WORLD_SIZE is ", env.world_size,
                " (drop ", flag, " under an external launcher)");
  g_local_rank = env.local_rank;
  if (env.rank > 0) set_progress_enabled(false);
  return comm::make_communicator(env, d.backend, uses_gpu);
}

}  // namespace lowbit::cli
