// The TCP star behind the communicators: rank 0 listens on MASTER_ADDR:MASTER_PORT, every other
// rank connects to it (retrying until the connect timeout) and introduces itself (magic, rank,
// world size); rank 0 refuses a wrong world size, an out-of-range or a duplicate rank. Messages are
// whole buffers (send_all / recv_all loop over partial transfers; a peer that closes is an error
// naming its rank).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "lowbit/comm/comm.h"

namespace lowbit::comm {

class TcpStar {
 public:
  TcpStar(const DistEnv& env, double connect_timeout_s, double op_timeout_s);
  ~TcpStar();
  TcpStar(const TcpStar&) = delete;
  TcpStar& operator=(const TcpStar&) = delete;

  int rank() const { return rank_; }
  int world() const { return world_; }
  // Rank 0: the socket to rank r (r >= 1). Other ranks: peer 0 is rank 0.
  void send(int peer, const void* data, size_t n);
  void recv(int peer, void* data, size_t n);

 private:
  int fd_of(int peer) const;
  int rank_, world_;
  double op_timeout_s_;
  std::string where_;    // "127.0.0.1:29500"
  std::vector<int> fds_;  // rank 0: index r = rank r's socket; others: fds_[0] = rank 0
};

}  // namespace lowbit::comm
