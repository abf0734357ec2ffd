#include "lowbit/comm/tcp.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "lowbit/core/error.h"

namespace lowbit::comm {

namespace {

constexpr uint32_t kMagic = 0x4d43424c;  // "LBCM"
constexpr uint32_t kVersion = 1;

struct Hello {
  uint32_t magic, version;
  int32_t rank, world;
};
struct HelloReply {
  uint32_t magic, ok;
  char msg[200];
};

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

sockaddr_storage resolve(const std::string& host, int port, socklen_t& len, const std::string& where) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string p = std::to_string(port);
  const int rc = getaddrinfo(host.c_str(), p.c_str(), &hints, &res);
  if (rc != 0 || !res) throw_error("comm: MASTER_ADDR '", host, "' does not resolve (", gai_strerror(rc), ")");
  sockaddr_storage ss{};
  std::memcpy(&ss, res->ai_addr, res->ai_addrlen);
  len = res->ai_addrlen;
  freeaddrinfo(res);
  (void)where;
  return ss;
}

void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// Waits until fd is readable (or writable); false on timeout. timeout_s <= 0: forever.
bool wait_fd(int fd, short events, double timeout_s) {
  pollfd p{fd, events, 0};
  const int ms = timeout_s <= 0 ? -1 : int(timeout_s * 1000.0) + 1;
  for (;;) {
    const int rc = poll(&p, 1, ms);
    if (rc > 0) return true;
    if (rc == 0) return false;
    if (errno != EINTR) return false;
  }
}

void send_raw(int fd, const void* data, size_t n, double timeout_s, const std::string& who) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    if (!wait_fd(fd, POLLOUT, timeout_s)) throw_error("comm: timed out after ", timeout_s, " s sending to ", who);
    const ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      if (errno == EPIPE || errno == ECONNRESET)
        throw_error("comm: ", who, " closed the connection (that rank failed or exited early)");
      throw_error("comm: sending to ", who, " failed: ", std::strerror(errno));
    }
    p += k;
    n -= size_t(k);
  }
}

void recv_raw(int fd, void* data, size_t n, double timeout_s, const std::string& who) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    if (!wait_fd(fd, POLLIN, timeout_s))
      throw_error("comm: timed out after ", timeout_s, " s waiting for ", who, " (LOWBIT_COMM_OP_TIMEOUT)");
    const ssize_t k = ::recv(fd, p, n, 0);
    if (k == 0 || (k < 0 && errno == ECONNRESET))
      throw_error("comm: ", who, " closed the connection (that rank failed or exited early)");
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      throw_error("comm: receiving from ", who, " failed: ", std::strerror(errno));
    }
    p += k;
    n -= size_t(k);
  }
}

std::string rank_name(int r) { return "rank " + std::to_string(r); }

}  // namespace

TcpStar::TcpStar(const DistEnv& env, double connect_timeout_s, double op_timeout_s)
    : rank_(env.rank), world_(env.world_size), op_timeout_s_(op_timeout_s),
      where_(env.master_addr + ":" + std::to_string(env.master_port)) {
  if (world_ < 1 || rank_ < 0 || rank_ >= world_) throw_error("comm: rank ", rank_, " outside world size ", world_);
  socklen_t len = 0;
  sockaddr_storage addr = resolve(env.master_addr, env.master_port, len, where_);
  const auto t0 = Clock::now();
  if (world_ == 1) return;
  if (rank_ == 0) {
    fds_.assign(size_t(world_), -1);
    const int ls = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ls < 0) throw_error("comm: socket(): ", std::strerror(errno));
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, reinterpret_cast<sockaddr*>(&addr), len) != 0 || listen(ls, world_) != 0) {
      const std::string e = std::strerror(errno);
      close(ls);
      throw_error("comm: rank 0 cannot listen on ", where_, " (MASTER_ADDR:MASTER_PORT): ", e);
    }
    try {
      int joined = 1;
      while (joined < world_) {
        const double left = connect_timeout_s - seconds_since(t0);
        if (left <= 0 || !wait_fd(ls, POLLIN, left))
          throw_error("comm: rank 0 waited ", connect_timeout_s, " s on ", where_, " but only ", joined, " of ", world_,
                      " ranks joined (are the other ranks running with the same MASTER_ADDR/MASTER_PORT?)");
        const int fd = accept4(ls, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) continue;
        set_nodelay(fd);
        Hello h{};
        HelloReply rep{kMagic, 0, {}};
        try {
          recv_raw(fd, &h, sizeof h, 10, "a joining rank");
        } catch (const Error&) {
          close(fd);
          continue;
        }
        std::string why;
        if (h.magic != kMagic || h.version != kVersion) why = "not a lowbit rank of this version";
        else if (h.world != world_) why = "WORLD_SIZE " + std::to_string(h.world) + " differs from rank 0's " + std::to_string(world_);
        else if (h.rank <= 0 || h.rank >= world_) why = "RANK " + std::to_string(h.rank) + " out of range";
        else if (fds_[size_t(h.rank)] >= 0) why = "RANK " + std::to_string(h.rank) + " joined twice";
        if (!why.empty()) {
          std::snprintf(rep.msg, sizeof rep.msg, "%s", why.c_str());
          try {
            send_raw(fd, &rep, sizeof rep, 10, "a joining rank");
          } catch (const Error&) {
          }
          close(fd);
          if (h.magic == kMagic) throw_error("comm: rank 0 on ", where_, ": a joining process has ", why);
          continue;
        }
        rep.ok = 1;
        send_raw(fd, &rep, sizeof rep, 10, rank_name(h.rank));
        fds_[size_t(h.rank)] = fd;
        ++joined;
      }
    } catch (...) {
      close(ls);
      for (int fd : fds_)
        if (fd >= 0) close(fd);
      fds_.clear();
      throw;
    }
    close(ls);
    return;
  }
  // rank > 0: connect, retrying while rank 0 is not listening yet.
  int fd = -1;
  std::string last;
  for (;;) {
    fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw_error("comm: socket(): ", std::strerror(errno));
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), len) == 0) break;
    last = std::strerror(errno);
    close(fd);
    fd = -1;
    if (seconds_since(t0) >= connect_timeout_s)
      throw_error("comm: rank ", rank_, " could not reach rank 0 at ", where_, " (MASTER_ADDR:MASTER_PORT) within ",
                  connect_timeout_s, " s: ", last);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  set_nodelay(fd);
  fds_.assign(1, fd);
  Hello h{kMagic, kVersion, rank_, world_};
  HelloReply rep{};
  send_raw(fd, &h, sizeof h, connect_timeout_s, "rank 0");
  recv_raw(fd, &rep, sizeof rep, std::max(1.0, connect_timeout_s), "rank 0");
  if (rep.magic != kMagic || !rep.ok) {
    rep.msg[sizeof rep.msg - 1] = 0;
    close(fd);
    fds_.clear();
    throw_error("comm: rank 0 at ", where_, " refused rank ", rank_, ": ", rep.msg);
  }
}

TcpStar::~TcpStar() {
  for (int fd : fds_)
    if (fd >= 0) close(fd);
}

int TcpStar::fd_of(int peer) const {
  if (rank_ == 0) {
    if (peer <= 0 || peer >= world_) throw_error("comm: no connection to rank ", peer);
    return fds_[size_t(peer)];
  }
  if (peer != 0) throw_error("comm: rank ", rank_, " has no connection to rank ", peer);
  return fds_[0];
}

void TcpStar::send(int peer, const void* data, size_t n) { send_raw(fd_of(peer), data, n, op_timeout_s_, rank_name(peer)); }
void TcpStar::recv(int peer, void* data, size_t n) { recv_raw(fd_of(peer), data, n, op_timeout_s_, rank_name(peer)); }

}  // namespace lowbit::comm
