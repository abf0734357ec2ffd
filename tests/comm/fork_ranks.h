// Helpers of the multi-rank tests: ranks as forked processes (each with its own communicator), a
// launcher environment for rank r, a check that throws inside a rank (its status becomes 1), and
// the CLI run with a time limit.
#pragma once
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "common/test_util.h"
#include "lowbit/comm/comm.h"
#include "lowbit/core/error.h"

namespace lowbit::test {

// Runs fn(rank) in `n` forked processes; each returns 0 on success (an exception or a failed
// check is status 1, with its message on stderr). Returns the statuses; children still alive after
// timeout_s are killed (status 124).
inline std::vector<int> run_forked(int n, const std::function<void(int)>& fn, double timeout_s = 60) {
  std::fflush(stdout);
  std::fflush(stderr);
  std::vector<pid_t> pids;
  for (int r = 0; r < n; ++r) {
    const pid_t p = fork();
    if (p == 0) {
      int code = 0;
      try {
        fn(r);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", r, e.what());
        code = 1;
      }
      std::fflush(stderr);
      _exit(code);
    }
    pids.push_back(p);
  }
  std::vector<int> st(size_t(n), -1);
  const auto t0 = std::chrono::steady_clock::now();
  int left = n;
  while (left > 0) {
    for (int r = 0; r < n; ++r) {
      if (st[size_t(r)] != -1) continue;
      int s = 0;
      if (waitpid(pids[size_t(r)], &s, WNOHANG) == pids[size_t(r)]) {
        st[size_t(r)] = WIFEXITED(s) ? WEXITSTATUS(s) : 128 + WTERMSIG(s);
        --left;
      }
    }
    if (left > 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > timeout_s) {
      for (int r = 0; r < n; ++r)
        if (st[size_t(r)] == -1) {
          kill(pids[size_t(r)], SIGKILL);
          waitpid(pids[size_t(r)], nullptr, 0);
          st[size_t(r)] = 124;
        }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return st;
}

inline lowbit::comm::DistEnv env_for(int rank, int world, int port) {
  lowbit::comm::DistEnv e;
  e.rank = rank, e.world_size = world, e.local_rank = rank, e.master_port = port, e.from_environment = true;
  return e;
}

#define CHECK_OR_THROW(cond, ...)                                                    \
  do {                                                                               \
    if (!(cond)) lowbit::throw_error("check failed: ", #cond, " ", __VA_ARGS__);     \
  } while (0)

// ---- through the CLI ----
struct CliResult {
  int status = -1;
  std::string out, err;
};
// Runs lowbit with a time limit (timeout(1) kills it and, through PR_SET_PDEATHSIG, its ranks).
inline CliResult run_cli(const std::string& args, const std::filesystem::path& dir, const std::string& env = "") {
  const std::filesystem::path o = dir / "cli.out", e = dir / "cli.err";
  const std::string cmd = env + " timeout -k 5 300 " + cli_path() + " " + args + " > " + o.string() + " 2> " + e.string();
  CliResult r;
  const int st = std::system(cmd.c_str());
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128;
  auto slurp = [](const std::filesystem::path& p) {
    std::ifstream f(p);
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  r.out = slurp(o), r.err = slurp(e);
  return r;
}

}  // namespace lowbit::test
