#include "lowbit/cli/dist.h"

#include <CLI/CLI.hpp>

#include <vector>

#include "lowbit/cli/common.h"
#include "lowbit/comm/launch.h"
#include "lowbit/core/error.h"
#include "lowbit/core/progress.h"

namespace lowbit::cli {

namespace {
std::vector<std::string> g_args;
int g_local_rank = 0;
}  // namespace

void set_command_line(int argc, char** argv) { g_args.assign(argv, argv + argc); }

int cuda_device_index() { return g_local_rank; }

void add_dist_options(CLI::App* app, DistArgs* d) {
  app->add_option("--gpus", d->gpus,
                  "ranks (processes) of a data-parallel run on this host, one GPU each with --device cuda; lowbit "
                  "starts them itself (an external launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
                  "MASTER_PORT instead)")
      ->check(between(1, 256));
  app->add_option("--comm-backend", d->backend,
                  "collectives between the ranks: auto (nccl for a GPU run of a CUDA build, else cpu), cpu (TCP), "
                  "nccl, single (overrides LOWBIT_COMM_BACKEND)")
      ->check(CLI::IsMember({"auto", "cpu", "nccl", "single"}))
      ->capture_default_str();
}

std::unique_ptr<comm::Communicator> start_ranks(const DistArgs& d, bool uses_gpu) {
  const comm::DistEnv env = comm::dist_env_from_environment();
  if (!env.from_environment) {
    if (d.gpus > 1) {
      if (g_args.empty()) throw_error("--gpus: the command line is unknown (internal)");
      throw ExitRequest{comm::launch_local_ranks(d.gpus, g_args)};
    }
    return comm::make_communicator(env, d.backend, uses_gpu);
  }
  if (d.gpus > 0 && d.gpus != env.world_size)
    throw_error("--gpus ", d.gpus, " but the launcher's WORLD_SIZE is ", env.world_size,
                " (drop --gpus under an external launcher)");
  g_local_rank = env.local_rank;
  if (env.rank > 0) set_progress_enabled(false);
  return comm::make_communicator(env, d.backend, uses_gpu);
}

}  // namespace lowbit::cli
