// `lowbit <command> --gpus N`: this program started N times as the ranks of one run on this host.
#pragma once
#include <string>
#include <vector>

namespace lowbit::comm {

// A free TCP port on 127.0.0.1 (bound and released: a later bind by rank 0 can, rarely, race).
int free_local_port();

// Runs `args` (args[0] is ignored: the program is /proc/self/exe) as ranks 0..n-1 with RANK,
// LOCAL_RANK, WORLD_SIZE, MASTER_ADDR (kept when set, else 127.0.0.1) and MASTER_PORT (kept
// when set, else a free port) in their environment, ranks >= 1 with stdout sent to /dev/null (rank
// 0 reports). Each rank dies with this process (PR_SET_PDEATHSIG). Waits for all; when one
// fails, the others are expected to fail on their own (its connection closes); any still running
// 10 s later gets SIGTERM, 15 s later SIGKILL. A SIGINT or SIGTERM that another process sends to
// this one while it waits is passed on to every rank. Returns 0 when every rank
// exited 0, else the first failing rank's exit status (128 + signal for a killed rank), after
// naming it on stderr.
int launch_local_ranks(int n, const std::vector<std::string>& args);

}  // namespace lowbit::comm
