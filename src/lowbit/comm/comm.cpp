#include "lowbit/comm/comm.h"

#include <cstdlib>
#include <cstring>
#include <vector>

#include "lowbit/comm/tcp.h"
#include "lowbit/core/error.h"

namespace lowbit::comm {

int64_t parse_env_int(const std::string& what, const std::string& text, int64_t lo, int64_t hi) {
  if (text.empty() || text.size() > 18 || text.find_first_not_of("0123456789") != std::string::npos)
    throw_error(what, ": '", text, "' is not a number (expected an integer in ", lo, "..", hi, ")");
  const int64_t v = std::stoll(text);
  if (v < lo || v > hi) throw_error(what, ": ", v, " is out of range (expected ", lo, "..", hi, ")");
  return v;
}

namespace {
const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}
}  // namespace

DistEnv dist_env_from_environment() {
  DistEnv e;
  const char* ws = env("WORLD_SIZE");
  if (!ws) {
    if (env("RANK") && std::strcmp(env("RANK"), "0") != 0)
      throw_error("RANK=", env("RANK"), " is set but WORLD_SIZE is not (set both, as a launcher does)");
    return e;
  }
  e.from_environment = true;
  e.world_size = int(parse_env_int("WORLD_SIZE", ws, 1, 65536));
  const char* r = env("RANK");
  if (!r && e.world_size > 1) throw_error("WORLD_SIZE=", e.world_size, " is set but RANK is not");
  e.rank = r ? int(parse_env_int("RANK", r, 0, 65535)) : 0;
  if (e.rank >= e.world_size) throw_error("RANK=", e.rank, " must be below WORLD_SIZE=", e.world_size);
  e.local_rank = env("LOCAL_RANK") ? int(parse_env_int("LOCAL_RANK", env("LOCAL_RANK"), 0, 65535)) : e.rank;
  if (const char* a = env("MASTER_ADDR")) e.master_addr = a;
  if (const char* p = env("MASTER_PORT")) e.master_port = int(parse_env_int("MASTER_PORT", p, 1, 65535));
  return e;
}

std::pair<int64_t, int64_t> shard_range(int64_t n, int rank, int world, const std::string& what) {
  if (world < 1 || rank < 0 || rank >= world) throw_error("shard_range: rank ", rank, " of ", world);
  if (n < world) throw_error(what, ": ", n, " items cannot be split over ", world, " ranks (every rank needs at least one)");
  const int64_t base = n / world, extra = n % world;
  const int64_t b = rank * base + std::min<int64_t>(rank, extra);
  return {b, b + base + (rank < extra ? 1 : 0)};
}

double Communicator::all_reduce_sum(double v) {
  Tensor t = Tensor::from_vector(std::vector<double>{v}, {1});
  all_reduce_sum(t);
  return t.data<double>()[0];
}

int64_t Communicator::all_reduce_sum(int64_t v) {
  Tensor t = Tensor::empty({1}, DType::I64);
  t.data<int64_t>()[0] = v;
  all_reduce_sum(t);
  return t.data<int64_t>()[0];
}

namespace {

// ---- one rank -----------------------------------------------------------------------------
class SingleComm final : public Communicator {
 public:
  SingleComm() : Communicator(0, 1, 0) {}
  std::string backend() const override { return "single"; }
  void all_reduce_sum(Tensor& t) override { check_reducible(t); }
  void all_gather(const Tensor& in, Tensor& out) override {
    if (out.numel() != in.numel()) throw_error("all_gather: output has ", out.numel(), " elements, expected ", in.numel());
    out.copy_(in.reshape(out.shape()));
  }
  void reduce_scatter_sum(const Tensor& in, Tensor& out) override {
    check_reducible(in);
    if (out.numel() != in.numel()) throw_error("reduce_scatter: output has ", out.numel(), " elements, expected ", in.numel());
    out.copy_(in.reshape(out.shape()));
  }
  void broadcast(Tensor&, int root) override {
    if (root != 0) throw_error("broadcast: root ", root, " outside world size 1");
  }
  void barrier() override {}
  static void check_reducible(const Tensor& t) {
    const DType d = t.dtype();
    if (d != DType::F32 && d != DType::F64 && d != DType::I32 && d != DType::I64)
      throw_error("all_reduce: ", dtype_name(d), " is not summed (f32, f64, i32, i64)");
  }
};

// ---- the TCP star ----------------------------------------------------------------------------
enum class Op : uint8_t { AllReduce = 1, AllGather, ReduceScatter, Broadcast, Barrier };

const char* op_name(Op op) {
  switch (op) {
    case Op::AllReduce: return "all_reduce";
    case Op::AllGather: return "all_gather";
    case Op::ReduceScatter: return "reduce_scatter";
    case Op::Broadcast: return "broadcast";
    case Op::Barrier: return "barrier";
  }
  return "?";
}

struct Header {
  uint32_t magic = 0x4d43424c;
  uint8_t op = 0, dtype = 0;
  uint16_t pad = 0;
  int32_t root = 0;
  int64_t count = 0;
  uint64_t seq = 0;
};
struct Reply {
  uint32_t ok = 1;
  char msg[252] = {};
};

std::string describe(const Header& h) {
  std::string s = std::string(op_name(Op(h.op))) + "(";
  if (Op(h.op) != Op::Barrier)
    s += std::string(dtype_name(DType(h.dtype))) + ", " + std::to_string(h.count) + " elements";
  if (Op(h.op) == Op::Broadcast) s += ", root " + std::to_string(h.root);
  return s + ")";
}

template <class T>
void add_into(void* acc, const void* x, int64_t n) {
  T* a = static_cast<T*>(acc);
  const T* b = static_cast<const T*>(x);
  for (int64_t i = 0; i < n; ++i) a[i] += b[i];
}

void add_buffers(DType d, void* acc, const void* x, int64_t n) {
  switch (d) {
    case DType::F32: return add_into<float>(acc, x, n);
    case DType::F64: return add_into<double>(acc, x, n);
    case DType::I32: return add_into<int32_t>(acc, x, n);
    case DType::I64: return add_into<int64_t>(acc, x, n);
    default: throw_error("all_reduce: ", dtype_name(d), " is not summed (f32, f64, i32, i64)");
  }
}

// A tensor's elements on the host, contiguous; written back by finish() when it was staged.
struct HostView {
  Tensor& t;
  Tensor h;
  explicit HostView(Tensor& x) : t(x) {
    h = (x.device() == Device::CPU && x.is_contiguous()) ? x : x.to(Device::CPU).contiguous();
  }
  void* data() const { return h.raw_data(); }
  void finish() {
    if (h.raw_data() != t.raw_data() || h.device() != t.device()) t.copy_(h);
  }
};

class CpuComm final : public Communicator {
 public:
  CpuComm(const DistEnv& env, double connect_timeout_s, double op_timeout_s)
      : Communicator(env.rank, env.world_size, env.local_rank), star_(env, connect_timeout_s, op_timeout_s) {}
  std::string backend() const override { return "cpu"; }

  void all_reduce_sum(Tensor& t) override {
    SingleComm::check_reducible(t);
    agree(Op::AllReduce, t.dtype(), t.numel(), 0);
    if (world_ == 1) return;
    HostView v(t);
    const size_t nb = t.nbytes();
    if (rank_ == 0) {
      std::vector<char> tmp(nb);
      for (int r = 1; r < world_; ++r) {  // rank order: the same sum whatever the arrival order
        star_.recv(r, tmp.data(), nb);
        add_buffers(t.dtype(), v.data(), tmp.data(), t.numel());
      }
      for (int r = 1; r < world_; ++r) star_.send(r, v.data(), nb);
    } else {
      star_.send(0, v.data(), nb);
      star_.recv(0, v.data(), nb);
    }
    v.finish();
  }

  void all_gather(const Tensor& in, Tensor& out) override {
    if (out.numel() != in.numel() * world_)
      throw_error("all_gather: output has ", out.numel(), " elements, expected ", world_, " x ", in.numel());
    if (out.dtype() != in.dtype()) throw_error("all_gather: output dtype differs from the input's");
    agree(Op::AllGather, in.dtype(), in.numel(), 0);
    Tensor src = in.to(Device::CPU).contiguous();
    HostView v(out);
    const size_t nb = src.nbytes();
    char* o = static_cast<char*>(v.data());
    if (rank_ == 0) {
      std::memcpy(o, src.raw_data(), nb);
      for (int r = 1; r < world_; ++r) star_.recv(r, o + size_t(r) * nb, nb);
      for (int r = 1; r < world_; ++r) star_.send(r, o, nb * size_t(world_));
    } else {
      star_.send(0, src.raw_data(), nb);
      star_.recv(0, o, nb * size_t(world_));
    }
    v.finish();
  }

  void reduce_scatter_sum(const Tensor& in, Tensor& out) override {
    SingleComm::check_reducible(in);
    if (in.numel() != out.numel() * world_)
      throw_error("reduce_scatter: input has ", in.numel(), " elements, expected ", world_, " x ", out.numel());
    if (out.dtype() != in.dtype()) throw_error("reduce_scatter: output dtype differs from the input's");
    agree(Op::ReduceScatter, in.dtype(), in.numel(), 0);
    Tensor src = in.to(Device::CPU).contiguous();
    HostView v(out);
    const size_t nb = out.nbytes();
    if (rank_ == 0) {
      Tensor acc = src.clone();
      std::vector<char> tmp(nb * size_t(world_));
      for (int r = 1; r < world_; ++r) {
        star_.recv(r, tmp.data(), tmp.size());
        add_buffers(in.dtype(), acc.raw_data(), tmp.data(), in.numel());
      }
      const char* a = static_cast<const char*>(acc.raw_data());
      for (int r = 1; r < world_; ++r) star_.send(r, a + size_t(r) * nb, nb);
      std::memcpy(v.data(), a, nb);
    } else {
      star_.send(0, src.raw_data(), src.nbytes());
      star_.recv(0, v.data(), nb);
    }
    v.finish();
  }

  void broadcast(Tensor& t, int root) override {
    if (root < 0 || root >= world_) throw_error("broadcast: root ", root, " outside world size ", world_);
    agree(Op::Broadcast, t.dtype(), t.numel(), root);
    if (world_ == 1) return;
    HostView v(t);
    const size_t nb = t.nbytes();
    if (rank_ == 0) {
      if (root != 0) star_.recv(root, v.data(), nb);
      for (int r = 1; r < world_; ++r)
        if (r != root) star_.send(r, v.data(), nb);
    } else if (rank_ == root) {
      star_.send(0, v.data(), nb);
    } else {
      star_.recv(0, v.data(), nb);
    }
    v.finish();
  }

  void barrier() override { agree(Op::Barrier, DType::F32, 0, 0); }

 private:
  // Every rank announces the call; rank 0 compares them with its own and answers all ranks, so a
  // mismatch is the same clear error everywhere instead of a hang or garbage.
  void agree(Op op, DType d, int64_t count, int root) {
    Header h;
    h.op = uint8_t(op), h.dtype = uint8_t(d), h.root = root, h.count = count, h.seq = seq_++;
    if (world_ == 1) return;
    Reply rep;
    if (rank_ == 0) {
      std::string why;
      for (int r = 1; r < world_; ++r) {
        Header o;
        star_.recv(r, &o, sizeof o);
        if (!why.empty()) continue;
        if (o.magic != h.magic || o.seq != h.seq)
          why = "rank " + std::to_string(r) + " is out of step (collective #" + std::to_string(o.seq) + " vs #" +
                std::to_string(h.seq) + " on rank 0)";
        else if (o.op != h.op || o.dtype != h.dtype || o.count != h.count || o.root != h.root)
          why = "collective #" + std::to_string(h.seq) + ": rank 0 called " + describe(h) + " but rank " +
                std::to_string(r) + " called " + describe(o) + " (mismatched sizes between ranks)";
      }
      if (!why.empty()) {
        rep.ok = 0;
        std::snprintf(rep.msg, sizeof rep.msg, "%s", why.c_str());
      }
      for (int r = 1; r < world_; ++r) star_.send(r, &rep, sizeof rep);
    } else {
      star_.send(0, &h, sizeof h);
      star_.recv(0, &rep, sizeof rep);
    }
    if (!rep.ok) {
      rep.msg[sizeof rep.msg - 1] = 0;
      throw_error("comm: ", rep.msg);
    }
  }

  TcpStar star_;
  uint64_t seq_ = 0;
};

double env_seconds(const char* name, double dflt) {
  const char* v = std::getenv(name);
  if (!v || !*v) return dflt;
  return double(parse_env_int(name, v, 0, 1000000));
}

}  // namespace

std::unique_ptr<Communicator> make_single_communicator() { return std::make_unique<SingleComm>(); }

std::unique_ptr<Communicator> make_cpu_communicator(const DistEnv& env, double connect_timeout_s, double op_timeout_s) {
  return std::make_unique<CpuComm>(env, connect_timeout_s, op_timeout_s);
}

std::unique_ptr<Communicator> make_communicator(const DistEnv& env, const std::string& backend, bool uses_gpu) {
  std::string b = backend;
  if (b == "auto") {
    if (const char* e = std::getenv("LOWBIT_COMM_BACKEND"); e && *e) b = e;
  }
  if (b != "auto" && b != "cpu" && b != "nccl" && b != "single")
    throw_error("communicator backend '", b, "' is unknown (auto, cpu, nccl, single; LOWBIT_COMM_BACKEND)");
  if (b == "single" && env.world_size > 1)
    throw_error("communicator backend 'single' cannot serve WORLD_SIZE=", env.world_size);
  if (env.world_size == 1 && b != "nccl" && b != "cpu") return make_single_communicator();
  if (b == "auto") b = (uses_gpu && nccl_available()) ? "nccl" : "cpu";
  const double connect = env_seconds("LOWBIT_COMM_TIMEOUT", 60);
  if (b == "nccl") return make_nccl_communicator(env, connect);
  return make_cpu_communicator(env, connect, env_seconds("LOWBIT_COMM_OP_TIMEOUT", 1800));
}

}  // namespace lowbit::comm
