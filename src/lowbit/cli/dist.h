// Several ranks for one command (issue 20): `--gpus N` and the launcher environment.
//
//   lowbit quantize ... --gpus 4          this process starts 4 ranks of the same command line
//                                         (RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set,
//                                         comm/launch.h) and waits for them;
//   torchrun --nproc-per-node 4 ... lowbit quantize ...   (or any launcher that sets the variables)
//                                         each process joins as the rank the environment names.
// Rank r uses GPU LOCAL_RANK; rank 0 writes the outputs and prints; the other ranks' progress bars
// are off.
#pragma once
#include <memory>
#include <string>

#include "lowbit/comm/comm.h"
#include "lowbit/core/device.h"

namespace CLI {
class App;
}

namespace lowbit::cli {

// Thrown by start_ranks in the process that launched the ranks: main() exits with `code`.
struct ExitRequest {
  int code = 0;
};

void set_command_line(int argc, char** argv);  // main() keeps it for the launcher

struct DistArgs {
  int gpus = 0;  // 0: not given
  std::string backend = "auto";
};
// Adds --gpus N (and --comm-backend auto|cpu|nccl|single).
void add_dist_options(CLI::App* app, DistArgs* d);

// --tp N (tensor-parallel decoding: generate, bench) and --comm-backend. N ranks are started as
// --gpus N starts them (d->gpus = N), or joined under a launcher (N must then be its WORLD_SIZE).
void add_tp_options(CLI::App* app, DistArgs* d);

// Call first in a command: launches the ranks (throws ExitRequest with their exit status) or joins
// the run the environment describes and returns this rank's communicator (the single-rank one
// without either). uses_gpu: the command runs on the GPU (picks NCCL under backend "auto").
// flag: the option that set d.gpus, for messages.
std::unique_ptr<comm::Communicator> start_ranks(const DistArgs& d, bool uses_gpu, const char* flag = "--gpus");

struct LoadedModel;
// Loads `path` for this rank of a tensor-parallel run. With several ranks and rank_local (the
// command asks for no transform: --rotate, --act, --kv-quant, --kv-token-quant, --dequantize), each
// rank reads only its piece of every block linear plus the replicated tensors
// (io/tensor_parallel_load.h) and m.model is already its piece on `device`; otherwise (or with
// LOWBIT_TP_LOAD=whole in the environment: the measurement's baseline) load_model reads the whole
// checkpoint on tensor_parallel_load_device and shard_for_tensor_parallel cuts it. One rank:
// load_model.
LoadedModel load_model_for_ranks(const std::string& path, Device device, comm::Communicator& comm, bool packed_vocab,
                                 bool rank_local);
// Where a tensor-parallel run loads `path` for `device`: with several ranks on the GPU, a dense
// checkpoint is read on the CPU and cut there (each GPU receives only its piece); packed ones load
// on the device (their codes reach the GPU piece by piece, on first use). Else `device`.
Device tensor_parallel_load_device(const std::string& path, Device device, const comm::Communicator& comm);
// Tensor parallelism after loading: with several ranks, m.model becomes this rank's piece on
// `device` (LlamaModel::tensor_parallel_shard) and m.checkpoint loses its linear weights (the full
// ones are released; embedding and norms stay). Nothing with one rank or a model that is a piece
// already (load_model_for_ranks).
void shard_for_tensor_parallel(LoadedModel& m, comm::Communicator& comm, Device device);

// The GPU this process uses: LOCAL_RANK of a several-rank run, else 0 (parse_device).
int cuda_device_index();

}  // namespace lowbit::cli
