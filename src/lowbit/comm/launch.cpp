#include "lowbit/comm/launch.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

extern char** environ;

#include "lowbit/core/error.h"

namespace lowbit::comm {

int free_local_port() {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw_error("comm: socket(): ", std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    const std::string e = std::strerror(errno);
    close(fd);
    throw_error("comm: no free local port: ", e);
  }
  close(fd);
  return ntohs(a.sin_port);
}

namespace {
// SIGINT / SIGTERM sent to the launcher by another process (kill, a supervisor), to be passed on to
// the ranks. A terminal's Ctrl-C (si_code SI_KERNEL) reaches the ranks' process group itself.
std::atomic<int> g_forward{0};
void remember_signal(int sig, siginfo_t* info, void*) {
  if (!info || info->si_code <= 0) g_forward.store(sig);  // SI_USER, SI_QUEUE, SI_TKILL: from a process
}

int status_code(int st) {
  if (WIFEXITED(st)) return WEXITSTATUS(st);
  if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
  return 1;
}
}  // namespace

int launch_local_ranks(int n, const std::vector<std::string>& args) {
  if (n < 1) throw_error("--gpus ", n, ": at least 1");
  if (args.empty()) throw_error("launch_local_ranks: no arguments");
  const char* addr_env = std::getenv("MASTER_ADDR");
  const char* port_env = std::getenv("MASTER_PORT");
  const std::string addr = addr_env && *addr_env ? addr_env : "127.0.0.1";
  const std::string port = port_env && *port_env ? port_env : std::to_string(free_local_port());
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t parent = getpid();
  std::vector<pid_t> pids;
  auto kill_all = [&](int sig) {
    for (pid_t p : pids)
      if (p > 0) kill(p, sig);
  };
  // Each rank's environment, built before fork (the child calls only async-signal-safe functions).
  std::vector<std::vector<std::string>> envs(static_cast<size_t>(n));
  std::vector<std::vector<char*>> envps(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) {
    auto& e = envs[size_t(r)];
    for (char** v = environ; *v; ++v) {
      const std::string s = *v;
      const std::string k = s.substr(0, s.find('='));
      if (k != "RANK" && k != "LOCAL_RANK" && k != "WORLD_SIZE" && k != "MASTER_ADDR" && k != "MASTER_PORT") e.push_back(s);
    }
    e.push_back("RANK=" + std::to_string(r));
    e.push_back("LOCAL_RANK=" + std::to_string(r));
    e.push_back("WORLD_SIZE=" + std::to_string(n));
    e.push_back("MASTER_ADDR=" + addr);
    e.push_back("MASTER_PORT=" + port);
    for (auto& s : e) envps[size_t(r)].push_back(s.data());
    envps[size_t(r)].push_back(nullptr);
  }
  for (int r = 0; r < n; ++r) {
    const pid_t pid = fork();
    if (pid < 0) {
      const std::string e = std::strerror(errno);
      kill_all(SIGTERM);
      for (pid_t p : pids) waitpid(p, nullptr, 0);
      throw_error("--gpus ", n, ": cannot start rank ", r, ": ", e);
    }
    if (pid == 0) {  // the rank: only async-signal-safe calls until exec
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() != parent) _exit(126);
      if (r > 0) {
        const int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) dup2(devnull, 1);
      }
      execve("/proc/self/exe", argv.data(), envps[size_t(r)].data());
      _exit(127);
    }
    pids.push_back(pid);
  }
  // While waiting, a SIGINT / SIGTERM sent to this process goes to every rank (lowbit serve --tp
  // drains on rank 0, whose stop then ends the other ranks); the previous handlers come back after.
  struct sigaction fwd {}, old_int{}, old_term{};
  fwd.sa_sigaction = remember_signal;
  fwd.sa_flags = SA_SIGINFO;  // no SA_RESTART: waitpid returns EINTR
  sigemptyset(&fwd.sa_mask);
  sigaction(SIGINT, &fwd, &old_int);
  sigaction(SIGTERM, &fwd, &old_term);
  int first_bad = -1, code = 0, alive = n;
  auto t_fail = std::chrono::steady_clock::time_point();
  bool termed = false, killed = false;
  while (alive > 0) {
    int st = 0;
    const pid_t p = waitpid(-1, &st, first_bad >= 0 ? WNOHANG : 0);
    if (p < 0) {
      if (errno == EINTR) {
        if (const int sig = g_forward.exchange(0)) kill_all(sig);
        continue;
      }
      break;
    }
    if (p == 0) {  // a rank failed: the others see its closed connection and fail on their own (and
                   // clean up their outputs); one still running after 10 s gets SIGTERM, after 15 s SIGKILL
      const auto waited = std::chrono::steady_clock::now() - t_fail;
      if (!termed && waited > std::chrono::seconds(10)) {
        kill_all(SIGTERM);
        termed = true;
      }
      if (!killed && waited > std::chrono::seconds(15)) {
        kill_all(SIGKILL);
        killed = true;
      }
      if (const int sig = g_forward.exchange(0)) kill_all(sig);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    int r = -1;
    for (int i = 0; i < n; ++i)
      if (pids[size_t(i)] == p) r = i;
    if (r < 0) continue;
    pids[size_t(r)] = -1;
    --alive;
    const int c = status_code(st);
    if (c != 0 && first_bad < 0) {
      first_bad = r;
      code = c;
      std::fprintf(stderr, "lowbit: rank %d of %d failed (exit status %d)\n", r, n, c);
      t_fail = std::chrono::steady_clock::now();
    }
  }
  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);
  return code;
}

}  // namespace lowbit::comm
