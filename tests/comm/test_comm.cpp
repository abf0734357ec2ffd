// The communicator layer (src/lowbit/comm): collectives on the CPU backend with 1-4 ranks as
// forked processes (each test bounded in time; children always reaped or killed), the environment
// parser's bad-input rows, the rendezvous' errors, and through the CLI: `lowbit comm --gpus N`
// and data-parallel GPTQ/AWQ, ApiQ/SAPR, train and qat against one rank on stories260K (the
// block trainers' window sharding and gradient all-reduce also directly). The NCCL backend is checked with one
// rank where the build has NCCL and a GPU is visible (skipped otherwise).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <thread>

#include <nlohmann/json.hpp>

#include "comm/fork_ranks.h"
#include "common/test_util.h"
#include "lowbit/comm/comm.h"
#include "lowbit/comm/launch.h"
#include "lowbit/io/safetensors.h"
#include "lowbit/methods/block_train.h"
#include "lowbit/ops/device_init.h"

namespace fs = std::filesystem;
using lowbit::Device;
using lowbit::DType;
using lowbit::Tensor;
using namespace lowbit::comm;
using lowbit::test::env_for;
using lowbit::test::run_forked;

namespace {

// Rank r's values: not exactly representable sums, so the reduction order matters.
float value(int r, int64_t i) { return 0.1f * float(r + 1) + 1e-3f * float(i) + 1.0f / float(3 + r + i % 11); }

// Runs collective `op` on a copy of t on `dev` and returns the result on the host.
Tensor on(Device dev, const Tensor& t, const std::function<void(Tensor&)>& op) {
  Tensor d = t.to(dev);
  op(d);
  return d.to(Device::CPU);
}

// Every collective with checks; the tensors handed to the communicator live on `dev`.
void collectives(Communicator& c, Device dev = Device::CPU) {
  const int W = c.world_size(), R = c.rank();
  const int64_t n = 1003;
  // all_reduce f32: the reference sums in rank order (0 + 1 + ...) in f32, bit for bit.
  Tensor t = Tensor::empty({n});
  for (int64_t i = 0; i < n; ++i) t.data<float>()[i] = value(R, i);
  t = on(dev, t, [&](Tensor& x) { c.all_reduce_sum(x); });
  for (int64_t i = 0; i < n; ++i) {
    float want = value(0, i);
    for (int r = 1; r < W; ++r) want += value(r, i);
    CHECK_OR_THROW(t.data<float>()[i] == want, "all_reduce f32 element ", i);
  }
  Tensor d = Tensor::empty({n}, DType::F64);
  for (int64_t i = 0; i < n; ++i) d.data<double>()[i] = double(value(R, i)) / 7.0;
  d = on(dev, d, [&](Tensor& x) { c.all_reduce_sum(x); });
  for (int64_t i = 0; i < n; ++i) {
    double want = double(value(0, i)) / 7.0;
    for (int r = 1; r < W; ++r) want += double(value(r, i)) / 7.0;
    CHECK_OR_THROW(d.data<double>()[i] == want, "all_reduce f64 element ", i);
  }
  CHECK_OR_THROW(c.all_reduce_sum(int64_t(R + 1)) == int64_t(W) * (W + 1) / 2, "scalar i64");
  CHECK_OR_THROW(c.all_reduce_sum(0.5) == 0.5 * W, "scalar f64");
  Tensor i32 = Tensor::empty({3}, DType::I32);
  for (int k = 0; k < 3; ++k) i32.data<int32_t>()[k] = R * 10 + k;
  i32 = on(dev, i32, [&](Tensor& x) { c.all_reduce_sum(x); });
  for (int k = 0; k < 3; ++k) CHECK_OR_THROW(i32.data<int32_t>()[k] == 10 * W * (W - 1) / 2 + W * k, "i32");
  // all_gather (bf16 too: moves need no arithmetic)
  Tensor in = Tensor::empty({5}, DType::I64), out = Tensor::empty({5 * int64_t(W)}, DType::I64);
  for (int k = 0; k < 5; ++k) in.data<int64_t>()[k] = R * 100 + k;
  out = on(dev, out, [&](Tensor& x) { c.all_gather(in.to(dev), x); });
  for (int r = 0; r < W; ++r)
    for (int k = 0; k < 5; ++k) CHECK_OR_THROW(out.data<int64_t>()[r * 5 + k] == r * 100 + k, "all_gather");
  Tensor hb = Tensor::full({4}, double(R), DType::BF16), ob = Tensor::empty({4 * int64_t(W)}, DType::BF16);
  ob = on(dev, ob, [&](Tensor& x) { c.all_gather(hb.to(dev), x); });
  const Tensor obf = ob.to(DType::F32);
  for (int r = 0; r < W; ++r) CHECK_OR_THROW(obf.data<float>()[r * 4 + 3] == float(r), "all_gather bf16");
  // reduce_scatter: chunk R of the rank-order sum
  const int64_t m = 7;
  Tensor rin = Tensor::empty({m * W}), rout = Tensor::empty({m});
  for (int64_t i = 0; i < m * W; ++i) rin.data<float>()[i] = value(R, i);
  rout = on(dev, rout, [&](Tensor& x) { c.reduce_scatter_sum(rin.to(dev), x); });
  for (int64_t i = 0; i < m; ++i) {
    float want = value(0, R * m + i);
    for (int r = 1; r < W; ++r) want += value(r, R * m + i);
    CHECK_OR_THROW(rout.data<float>()[i] == want, "reduce_scatter element ", i);
  }
  // broadcast from every root
  for (int root = 0; root < W; ++root) {
    Tensor b = Tensor::full({9}, double(R * 3 + 1), DType::F32);
    b = on(dev, b, [&](Tensor& x) { c.broadcast(x, root); });
    for (int k = 0; k < 9; ++k) CHECK_OR_THROW(b.data<float>()[k] == float(root * 3 + 1), "broadcast root ", root);
  }
  c.barrier();
  if (dev != Device::CPU) return;
  // A strided view is reduced in place too.
  Tensor base = Tensor::full({4, 2}, 1.0);
  Tensor col = base.slice(1, 0, 1);
  c.all_reduce_sum(col);
  CHECK_OR_THROW(base.data<float>()[0] == float(W) && base.data<float>()[1] == 1.0f, "strided all_reduce");
}

}  // namespace

TEST(Comm, SingleRankIsANoOp) {
  auto c = make_single_communicator();
  EXPECT_EQ(c->world_size(), 1);
  EXPECT_EQ(c->backend(), "single");
  collectives(*c);
  Tensor bad = Tensor::full({2}, 1.0, DType::BF16);
  EXPECT_THROW(c->all_reduce_sum(bad), lowbit::Error);
  Tensor out = Tensor::empty({3});
  EXPECT_THROW(c->all_gather(Tensor::empty({2}), out), lowbit::Error);
}

TEST(Comm, CpuBackendCollectivesWithOneToFourRanks) {
  for (int world = 1; world <= 4; ++world) {
    SCOPED_TRACE("world size " + std::to_string(world));
    const int port = free_local_port();
    const auto st = run_forked(world, [&](int r) {
      auto c = make_cpu_communicator(env_for(r, world, port), 20, 20);
      CHECK_OR_THROW(c->backend() == "cpu" && c->rank() == r && c->world_size() == world, "identity");
      collectives(*c);
    });
    for (int r = 0; r < world; ++r) EXPECT_EQ(st[size_t(r)], 0) << "rank " << r;
  }
}

// The data-parallel block trainers' pieces (methods/block_train.h) on 3 forked ranks holding 4, 3
// and 3 windows: the global window numbering, which of a step's windows each rank holds, the
// weighted step loss, and the gradient all-reduce (a gradient present on some ranks only is summed
// with zeros; one present on none stays absent, as in one process).
TEST(Comm, WindowShardsAndGradientAllReduce) {
  const int port = free_local_port();
  const auto st = run_forked(3, [&](int r) {
    auto c = make_cpu_communicator(env_for(r, 3, port), 20, 20);
    const lowbit::WindowShards s(c.get(), r == 0 ? 4 : 3);
    CHECK_OR_THROW(s.distributed() && s.total() == 10 && s.local_count() == (r == 0 ? 4 : 3), "counts");
    const std::vector<int64_t> idx = {9, 0, 5, 4, 3};
    const std::vector<int64_t> want[] = {{0, 3}, {1, 0}, {2}};  // rank 0: 0..3, rank 1: 4..6, rank 2: 7..9
    CHECK_OR_THROW(s.local(idx, 0, idx.size()) == want[r], "local windows of rank ", r);
    CHECK_OR_THROW(s.local(idx, 1, 2) == (r == 0 ? std::vector<int64_t>{0} : std::vector<int64_t>{}), "sub-range");
    // step_loss: this rank's loss times its share of the 5 windows (the loss here: its window count).
    auto count = [](const std::vector<int64_t>&, size_t b, size_t e) {
      return lowbit::Var(Tensor::full({}, double(e - b)), false);
    };
    const double part = s.step_loss(idx, 0, idx.size(), count).value().item();
    CHECK_OR_THROW(std::abs(part - double(want[r].size()) * double(want[r].size()) / 5.0) < 1e-6, "step_loss ", part);
    CHECK_OR_THROW(s.sum(1.5) == 4.5, "sum");
    lowbit::Var all(Tensor::zeros({3}), true), some(Tensor::zeros({2, 2}), true), none(Tensor::zeros({2}), true);
    all.grad() = Tensor::full({3}, double(r + 1));
    if (r == 1) some.grad() = Tensor::full({2, 2}, 7.0);
    lowbit::all_reduce_grads({all, some, none}, *c);
    CHECK_OR_THROW(all.grad().defined() && all.grad().data<float>()[2] == 6.0f, "summed");
    CHECK_OR_THROW(some.grad().defined() && some.grad().shape() == lowbit::Shape({2, 2}) &&
                       some.grad().contiguous().data<float>()[3] == 7.0f, "one rank's");
    CHECK_OR_THROW(!none.grad().defined(), "none stays none");
  });
  for (int r = 0; r < 3; ++r) EXPECT_EQ(st[size_t(r)], 0) << "rank " << r;
  // One rank: everything is local and step_loss is the loss itself.
  const lowbit::WindowShards one(nullptr, 5);
  EXPECT_FALSE(one.distributed());
  EXPECT_EQ(one.total(), 5);
  EXPECT_EQ(one.local({4, 1}, 0, 2), (std::vector<int64_t>{4, 1}));
}

TEST(Comm, MismatchedSizesAreAnErrorOnEveryRank) {
  const int port = free_local_port();
  const auto st = run_forked(3, [&](int r) {
    auto c = make_cpu_communicator(env_for(r, 3, port), 20, 20);
    Tensor t = Tensor::zeros({r == 2 ? 11 : 10});
    try {
      c->all_reduce_sum(t);
    } catch (const lowbit::Error& e) {
      const std::string m = e.what();
      CHECK_OR_THROW(m.find("mismatched sizes between ranks") != std::string::npos && m.find("rank 2 called") != std::string::npos,
                     m);
      return;
    }
    lowbit::throw_error("no error on rank ", r);
  });
  for (int r = 0; r < 3; ++r) EXPECT_EQ(st[size_t(r)], 0) << "rank " << r;
  // Another operation, not only another size.
  const int port2 = free_local_port();
  const auto st2 = run_forked(2, [&](int r) {
    auto c = make_cpu_communicator(env_for(r, 2, port2), 20, 20);
    try {
      if (r == 0) c->barrier();
      else {
        Tensor t = Tensor::zeros({4});
        c->broadcast(t, 0);
      }
    } catch (const lowbit::Error& e) {
      CHECK_OR_THROW(std::string(e.what()).find("rank 0 called barrier") != std::string::npos, e.what());
      return;
    }
    lowbit::throw_error("no error on rank ", r);
  });
  EXPECT_EQ(st2, (std::vector<int>{0, 0}));
}

TEST(Comm, RendezvousErrors) {
  // Nobody listening: a clear error within the connect timeout.
  const int port = free_local_port();
  const auto t0 = std::chrono::steady_clock::now();
  try {
    make_cpu_communicator(env_for(1, 2, port), 1, 5);
    ADD_FAILURE() << "no error";
  } catch (const lowbit::Error& e) {
    EXPECT_NE(std::string(e.what()).find("could not reach rank 0 at 127.0.0.1:" + std::to_string(port)), std::string::npos)
        << e.what();
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10);
  // Rank 0 alone: the other ranks never come.
  try {
    make_cpu_communicator(env_for(0, 3, port), 1, 5);
    ADD_FAILURE() << "no error";
  } catch (const lowbit::Error& e) {
    EXPECT_NE(std::string(e.what()).find("only 1 of 3 ranks joined"), std::string::npos) << e.what();
  }
  // A rank with another world size is refused, on both sides.
  const int port2 = free_local_port();
  const auto st = run_forked(2, [&](int r) {
    try {
      make_cpu_communicator(env_for(r, r == 0 ? 2 : 3, port2), 10, 10);
    } catch (const lowbit::Error& e) {
      CHECK_OR_THROW(std::string(e.what()).find("WORLD_SIZE 3 differs from rank 0's 2") != std::string::npos, e.what());
      return;
    }
    lowbit::throw_error("no error on rank ", r);
  });
  EXPECT_EQ(st, (std::vector<int>{0, 0}));
  // A rank that exits early: the others get an error naming it, not a hang.
  const int port3 = free_local_port();
  const auto st3 = run_forked(3, [&](int r) {
    auto c = make_cpu_communicator(env_for(r, 3, port3), 10, 10);
    if (r == 1) return;  // leaves without the collective
    Tensor t = Tensor::zeros({4});
    try {
      c->all_reduce_sum(t);
    } catch (const lowbit::Error& e) {
      CHECK_OR_THROW(std::string(e.what()).find("closed the connection") != std::string::npos, e.what());
      return;
    }
    lowbit::throw_error("no error on rank ", r);
  });
  EXPECT_EQ(st3, (std::vector<int>{0, 0, 0}));
}

namespace {
struct EnvRow {
  const char* world;
  const char* rank;
  const char* local;
  const char* port;
  const char* want;  // "" : valid
};
void set_or_unset(const char* k, const char* v) {
  if (v) setenv(k, v, 1);
  else unsetenv(k);
}
}  // namespace

TEST(Comm, EnvironmentRows) {
  const EnvRow rows[] = {
      {nullptr, nullptr, nullptr, nullptr, ""},
      {"4", "3", "1", "1234", ""},
      {"abc", "0", nullptr, nullptr, "WORLD_SIZE: 'abc' is not a number"},
      {"0", "0", nullptr, nullptr, "WORLD_SIZE: 0 is out of range"},
      {"-2", "0", nullptr, nullptr, "WORLD_SIZE: '-2' is not a number"},
      {"2", "2", nullptr, nullptr, "RANK=2 must be below WORLD_SIZE=2"},
      {"2", "x", nullptr, nullptr, "RANK: 'x' is not a number"},
      {"2", nullptr, nullptr, nullptr, "WORLD_SIZE=2 is set but RANK is not"},
      {nullptr, "1", nullptr, nullptr, "RANK=1 is set but WORLD_SIZE is not"},
      {"2", "1", "one", nullptr, "LOCAL_RANK: 'one' is not a number"},
      {"2", "1", nullptr, "0", "MASTER_PORT: 0 is out of range"},
      {"2", "1", nullptr, "70000", "MASTER_PORT: 70000 is out of range"},
      {"2", "1", nullptr, "29500x", "MASTER_PORT: '29500x' is not a number"},
      {"99999999999999999999", "0", nullptr, nullptr, "WORLD_SIZE: '99999999999999999999' is not a number"},
  };
  for (const EnvRow& row : rows) {
    set_or_unset("WORLD_SIZE", row.world);
    set_or_unset("RANK", row.rank);
    set_or_unset("LOCAL_RANK", row.local);
    set_or_unset("MASTER_PORT", row.port);
    SCOPED_TRACE(std::string("WORLD_SIZE=") + (row.world ? row.world : "-") + " RANK=" + (row.rank ? row.rank : "-"));
    if (!*row.want) {
      const DistEnv e = dist_env_from_environment();
      if (row.world) {
        EXPECT_EQ(e.world_size, 4);
        EXPECT_EQ(e.rank, 3);
        EXPECT_EQ(e.local_rank, 1);
        EXPECT_EQ(e.master_port, 1234);
      } else {
        EXPECT_EQ(e.world_size, 1);
        EXPECT_FALSE(e.from_environment);
      }
      continue;
    }
    try {
      dist_env_from_environment();
      ADD_FAILURE() << "no error, wanted " << row.want;
    } catch (const lowbit::Error& e) {
      EXPECT_NE(std::string(e.what()).find(row.want), std::string::npos) << e.what();
    }
  }
  for (const char* k : {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"}) unsetenv(k);
  // make_communicator: unknown or unusable backends.
  DistEnv two = env_for(0, 2, 1);
  EXPECT_THROW(make_communicator(two, "mpi", false), lowbit::Error);
  EXPECT_THROW(make_communicator(two, "single", false), lowbit::Error);
  EXPECT_EQ(make_communicator(DistEnv{}, "auto", false)->backend(), "single");
  if (!nccl_available()) {
    EXPECT_THROW(make_communicator(DistEnv{}, "nccl", true), lowbit::Error);
  }
}

TEST(Comm, ShardRange) {
  EXPECT_EQ(shard_range(10, 0, 3, "x"), (std::pair<int64_t, int64_t>{0, 4}));
  EXPECT_EQ(shard_range(10, 1, 3, "x"), (std::pair<int64_t, int64_t>{4, 7}));
  EXPECT_EQ(shard_range(10, 2, 3, "x"), (std::pair<int64_t, int64_t>{7, 10}));
  EXPECT_EQ(shard_range(5, 0, 1, "x"), (std::pair<int64_t, int64_t>{0, 5}));
  try {
    shard_range(2, 0, 3, "--nsamples");
    ADD_FAILURE();
  } catch (const lowbit::Error& e) {
    EXPECT_NE(std::string(e.what()).find("--nsamples: 2 items cannot be split over 3 ranks"), std::string::npos);
  }
}

// The NCCL backend with one rank (host tensors staged through the GPU): runs only on a CUDA build
// with NCCL and a visible GPU.
TEST(Comm, NcclOneRank) {
  if (!nccl_available()) GTEST_SKIP() << "this build has no NCCL (CUDA off)";
  const int port = free_local_port();
  const auto st = run_forked(1, [&](int) {
    std::unique_ptr<Communicator> c;
    try {
      c = make_nccl_communicator(env_for(0, 1, port), 20);
    } catch (const lowbit::Error& e) {
      if (std::string(e.what()).find("no CUDA GPU") != std::string::npos) _exit(77);
      throw;
    }
    collectives(*c);
  });
  if (st[0] == 77) GTEST_SKIP() << "no GPU visible";
  EXPECT_EQ(st[0], 0);
}

// NCCL with 2, 4 and 8 ranks on as many GPUs (device tensors, then host tensors staged), and the CPU
// backend on device tensors: runs where the build has NCCL and the GPUs exist (a multi-GPU kind);
// skipped otherwise, from the first world size that does not fit.
TEST(Comm, NcclSeveralRanksOnDeviceTensors) {
  if (!nccl_available()) GTEST_SKIP() << "this build has no NCCL (CUDA off)";
  int ran = 0;
  for (int world : {2, 4, 8}) {
    const int port = free_local_port(), port2 = free_local_port();
    const auto st = run_forked(world, [&](int r) {
      std::unique_ptr<Communicator> c;
      try {
        c = make_nccl_communicator(env_for(r, world, port), 60);
      } catch (const lowbit::Error& e) {
        const std::string m = e.what();
        if (m.find("no CUDA GPU") != std::string::npos || m.find("GPUs are visible") != std::string::npos) _exit(77);
        throw;
      }
      if (!lowbit::init_cuda(r)) lowbit::throw_error("init_cuda(", r, ") failed");
      collectives(*c, Device::CUDA);
      collectives(*c, Device::CPU);
      auto cpu = make_cpu_communicator(env_for(r, world, port2), 30, 30);
      collectives(*cpu, Device::CUDA);
    }, 300);
    bool skipped = false;
    for (int v : st) skipped = skipped || v == 77;
    if (skipped) break;
    for (int r = 0; r < world; ++r) EXPECT_EQ(st[size_t(r)], 0) << "world " << world << " rank " << r;
    ++ran;
  }
  if (ran == 0) GTEST_SKIP() << "fewer than 2 GPUs visible";
}

// ---- through the CLI: the launcher (--gpus) and data-parallel GPTQ ------------------------------

using lowbit::test::CliResult;
using lowbit::test::run_cli;
namespace {
// Two checkpoints' safetensors compared tensor by tensor: the fraction of differing bytes of the
// integer (code) tensors, the count of floating-point elements (scales, adapters, norms,
// embeddings) off by more than `tol` relative (denominator at least 1e-3), the largest such
// relative difference, and over the floating-point tensors the largest ||x - y|| / ||x|| and the
// largest max|x - y| / max|x|.
struct Diff {
  double code_fraction = 0;
  int64_t float_mismatches = 0;
  double max_float_rel = 0;
  double tensor_rel = 0, elem_of_max = 0;
};
Diff compare(const lowbit::SafetensorsFile& a, const lowbit::SafetensorsFile& b, double tol = 1e-4) {
  Diff d;
  double diff = 0, total = 0;
  for (const auto& info : a.tensors()) {
    const Tensor x = a.load(info.name), y = b.load(info.name);
    EXPECT_EQ(x.shape(), y.shape()) << info.name;
    if (x.shape() != y.shape()) continue;
    if (!lowbit::dtype_info(x.dtype()).is_float) {
      const auto* p = static_cast<const uint8_t*>(x.raw_data());
      const auto* q = static_cast<const uint8_t*>(y.raw_data());
      for (size_t i = 0; i < x.nbytes(); ++i) diff += p[i] != q[i];
      total += double(x.nbytes());
    } else {
      const Tensor xf = x.to(DType::F32), yf = y.to(DType::F32);
      double dd = 0, xx = 0, dmax = 0, xmax = 0;
      for (int64_t i = 0; i < xf.numel(); ++i) {
        const double u = xf.data<float>()[i], v = yf.data<float>()[i];
        const double rel = std::abs(u - v) / std::max(std::abs(u), 1e-3);
        d.max_float_rel = std::max(d.max_float_rel, rel);
        if (rel > tol) ++d.float_mismatches;
        dd += (u - v) * (u - v), xx += u * u;
        dmax = std::max(dmax, std::abs(u - v)), xmax = std::max(xmax, std::abs(u));
      }
      if (xx > 0) d.tensor_rel = std::max(d.tensor_rel, std::sqrt(dd / xx));
      if (xmax > 0) d.elem_of_max = std::max(d.elem_of_max, dmax / xmax);
    }
  }
  d.code_fraction = total > 0 ? diff / total : 0.0;
  return d;
}

}  // namespace

TEST(CommCli, CollectivesWithLaunchedRanks) {
  if (!fs::exists(lowbit::test::cli_path())) GTEST_SKIP() << "no " << lowbit::test::cli_path();
  const fs::path dir = lowbit::test::temp_dir("comm_cli");
  for (int n = 1; n <= 4; ++n) {
    const CliResult r = run_cli("comm --gpus " + std::to_string(n) + " --elements 4096 --iters 2", dir);
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_NE(r.out.find("comm: " + std::to_string(n) + " ranks, " + (n == 1 ? "single" : "cpu") +
                         " backend, tensors on cpu: all collectives ok"),
              std::string::npos)
        << r.out << r.err;
  }
  // An external launcher's environment (two processes started by hand).
  const int port = free_local_port();
  const std::string env = "WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port);
  const std::string bg = env + " RANK=1 timeout -k 5 120 " + lowbit::test::cli_path() + " comm --elements 64 > /dev/null 2>&1 &";
  ASSERT_EQ(std::system(bg.c_str()), 0);
  const CliResult r0 = run_cli("comm --elements 64", dir, env + " RANK=0");
  EXPECT_EQ(r0.status, 0) << r0.err;
  EXPECT_NE(r0.out.find("2 ranks, cpu backend"), std::string::npos) << r0.out;
  // Bad environments fail with status 1 and name the variable.
  const std::pair<std::string, std::string> bad[] = {
      {"WORLD_SIZE=two RANK=0", "WORLD_SIZE: 'two' is not a number"},
      {"WORLD_SIZE=2 RANK=5", "RANK=5 must be below WORLD_SIZE=2"},
      {"WORLD_SIZE=2 RANK=1 MASTER_PORT=" + std::to_string(free_local_port()) + " LOWBIT_COMM_TIMEOUT=1",
       "could not reach rank 0"},
      {"WORLD_SIZE=3 RANK=0 LOWBIT_COMM_BACKEND=tcp", "communicator backend 'tcp' is unknown"},
  };
  for (const auto& [e, want] : bad) {
    const CliResult r = run_cli("comm", dir, e);
    EXPECT_EQ(r.status, 1) << e;
    EXPECT_NE(r.err.find("lowbit: error: "), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(want), std::string::npos) << e << ": " << r.err;
  }
  const CliResult g = run_cli("comm --gpus 3", dir, "WORLD_SIZE=2 RANK=0");
  EXPECT_EQ(g.status, 1);
  EXPECT_NE(g.err.find("--gpus 3 but the launcher's WORLD_SIZE is 2"), std::string::npos) << g.err;
  fs::remove_all(dir);
}

// Data-parallel GPTQ (and AWQ): 2 and 3 ranks (CPU backend) write the same quantized model as one process on
// all windows (the Hessians are sums in another order: equal up to f32 rounding, so codes may in
// principle differ at a rounding tie; allowed: 1e-3 of the code bytes, scales within 1e-4
// relative), while one process on rank 0's share alone differs (the sums did reach every rank).
TEST(CommCli, DataParallelGptqMatchesOneRank) {
  if (!fs::exists(lowbit::test::cli_path())) GTEST_SKIP() << "no " << lowbit::test::cli_path();
  LOWBIT_REQUIRE_SHARED(model, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(tokens, "models/stories260K/sample-tokens.i32");
  const fs::path dir = lowbit::test::temp_dir("comm_gptq");
  auto quantize = [&](const std::string& name, int nsamples, int gpus, const std::string& method) {
    const CliResult r = run_cli("quantize -q -m " + model + " --method " + method + " --format int4g32 --calib-tokens " +
                                    tokens + " --nsamples " + std::to_string(nsamples) + " --seqlen 128 -o " + (dir / name).string() +
                                    (gpus ? " --gpus " + std::to_string(gpus) : ""),
                                dir);
    EXPECT_EQ(r.status, 0) << r.err;
    return lowbit::SafetensorsFile::open((dir / name / "model.safetensors").string());
  };
  const auto one = quantize("one", 24, 0, "gptq");
  const auto two = quantize("two", 24, 2, "gptq");
  const auto three = quantize("three", 24, 3, "gptq");
  const auto share = quantize("share", 12, 0, "gptq");  // rank 0's windows of the 2-rank run, alone
  for (const auto* dp : {&two, &three}) {
    const Diff d = compare(one, *dp);
    EXPECT_LE(d.code_fraction, 1e-3);
    EXPECT_EQ(d.float_mismatches, 0);
  }
  const Diff alone = compare(one, share);
  EXPECT_TRUE(alone.code_fraction > 1e-3 || alone.float_mismatches > 0)
      << "one process on all windows = one on rank 0's share: the test cannot tell an all-reduce from none";
  std::ifstream rep(dir / "two" / "quantize_report.json");
  const std::string j((std::istreambuf_iterator<char>(rep)), {});
  EXPECT_NE(j.find("\"ranks\": 2"), std::string::npos);
  EXPECT_NE(j.find("\"comm_backend\": \"cpu\""), std::string::npos);
  // AWQ: the searches' rows are all-gathered, so 2 and 3 ranks search on one process's rows.
  const auto awq1 = quantize("awq1", 24, 0, "awq"), awq2 = quantize("awq2", 24, 2, "awq");
  const auto awq3 = quantize("awq3", 24, 3, "awq");
  for (const auto* dp : {&awq2, &awq3}) {
    const Diff d = compare(awq1, *dp);
    EXPECT_LE(d.code_fraction, 1e-3);
    EXPECT_EQ(d.float_mismatches, 0);
  }
  // Methods without data-parallel statistics are refused; too few windows for the ranks too.
  const CliResult rsq = run_cli("quantize -q -m " + model + " --method rsq --calib-tokens " + tokens +
                                    " --nsamples 4 --seqlen 64 --gpus 2 -o " + (dir / "rsq").string(), dir);
  EXPECT_EQ(rsq.status, 1);
  EXPECT_NE(rsq.err.find("--method rsq has no data-parallel calibration"), std::string::npos) << rsq.err;
  EXPECT_FALSE(fs::exists(dir / "rsq"));
  const CliResult few = run_cli("quantize -q -m " + model + " --method gptq --calib-tokens " + tokens +
                                    " --nsamples 2 --seqlen 64 --gpus 3 -o " + (dir / "few").string(), dir);
  EXPECT_EQ(few.status, 1);
  EXPECT_NE(few.err.find("--nsamples: 2 items cannot be split over 3 ranks"), std::string::npos) << few.err;
  EXPECT_FALSE(fs::exists(dir / "few"));
  fs::remove_all(dir);
}

// Data-parallel `train`: each step's windows split over 2 and 3 ranks, gradients all-reduced; the
// loss curve is one process's to the rounding of the sums (1e-5 relative; an un-reduced gradient
// moves it by ~1e-3 from the second step on), and the trained model agrees to 1e-4.
TEST(CommCli, DataParallelTrainMatchesOneRank) {
  if (!fs::exists(lowbit::test::cli_path())) GTEST_SKIP() << "no " << lowbit::test::cli_path();
  LOWBIT_REQUIRE_SHARED(tokens, "models/stories260K/sample-tokens.i32");
  const fs::path dir = lowbit::test::temp_dir("comm_train");
  auto train = [&](const std::string& name, int gpus) {
    const CliResult r = run_cli("train -q --train-tokens " + tokens +
                                    " --vocab 512 --dim 32 --hidden-dim 64 --layers 2 --heads 4 --max-seq-len 64 --batch 6"
                                    " --seq-len 32 --grad-accum 2 --steps 6 --warmup 2 --eval-every 0 --out " +
                                    (dir / name).string() + (gpus ? " --gpus " + std::to_string(gpus) : ""),
                                dir);
    EXPECT_EQ(r.status, 0) << r.err;
    std::vector<double> loss;
    std::ifstream log(dir / name / "log.jsonl");
    for (std::string line; std::getline(log, line);) {
      const auto p = line.find("\"loss\":");
      if (p != std::string::npos) loss.push_back(std::stod(line.substr(p + 7)));
    }
    return loss;
  };
  const auto one = train("one", 0), two = train("two", 2), three = train("three", 3);
  ASSERT_EQ(one.size(), 6u);
  ASSERT_EQ(two.size(), 6u);
  ASSERT_EQ(three.size(), 6u);
  for (size_t i = 0; i < one.size(); ++i) {
    EXPECT_NEAR(two[i], one[i], 1e-5 * one[i]) << "step " << i + 1;
    EXPECT_NEAR(three[i], one[i], 1e-5 * one[i]) << "step " << i + 1;
  }
  EXPECT_TRUE(fs::exists(dir / "two" / "model.bin"));
  fs::remove_all(dir);
}

// ZeRO (--zero): the AdamW state sharded over 2 ranks gives the replicated run's loss curve, each
// rank holding about half the state; a run stopped after 3 steps resumes (sharded over 2 ranks, or
// unsharded in one process: the state file is the same) to the uninterrupted curve.
TEST(CommCli, ZeroShardedOptimizerMatchesAndResumes) {
  if (!fs::exists(lowbit::test::cli_path())) GTEST_SKIP() << "no " << lowbit::test::cli_path();
  LOWBIT_REQUIRE_SHARED(tokens, "models/stories260K/sample-tokens.i32");
  const fs::path dir = lowbit::test::temp_dir("comm_zero");
  auto train = [&](const std::string& name, const std::string& extra) {
    const CliResult r = run_cli("train -q --json --train-tokens " + tokens +
                                    " --vocab 512 --dim 32 --hidden-dim 64 --layers 2 --heads 4 --max-seq-len 64 --batch 6"
                                    " --seq-len 32 --steps 6 --warmup 2 --eval-every 0 --out " +
                                    (dir / name).string() + " " + extra,
                                dir);
    EXPECT_EQ(r.status, 0) << r.err;
    return r.out;
  };
  auto losses = [&](const std::string& name) {
    std::vector<double> loss;
    std::ifstream log(dir / name / "log.jsonl");
    for (std::string line; std::getline(log, line);) {
      const auto p = line.find("\"loss\":");
      if (p != std::string::npos) loss.push_back(std::stod(line.substr(p + 7)));
    }
    return loss;
  };
  auto state_bytes = [](const std::string& json) {
    const auto p = json.find("\"optimizer_state_bytes\":");
    return p == std::string::npos ? int64_t(-1) : std::stoll(json.substr(p + 24));
  };
  const std::string full = train("one", "");
  const std::string sharded = train("zero", "--gpus 2 --zero");
  const auto ref = losses("one"), z = losses("zero");
  ASSERT_EQ(ref.size(), 6u);
  ASSERT_EQ(z.size(), 6u);
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(z[i], ref[i], 1e-5 * ref[i]) << "step " << i + 1;
  EXPECT_LT(state_bytes(sharded), state_bytes(full) * 3 / 4) << sharded;  // rank 0's share
  // Stopped after 3 steps, resumed sharded and unsharded.
  train("resume-zero", "--gpus 2 --zero --stop-after 3");
  fs::copy(dir / "resume-zero", dir / "resume-one", fs::copy_options::recursive);
  train("resume-zero", "--gpus 2 --zero");
  train("resume-one", "");
  for (const char* name : {"resume-zero", "resume-one"}) {
    const auto l = losses(name);
    ASSERT_EQ(l.size(), 6u) << name;
    for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(l[i], ref[i], 1e-5 * ref[i]) << name << " step " << i + 1;
  }
  fs::remove_all(dir);
}

// ---- data-parallel training methods: ApiQ / SAPR (quantize) and qat (lsq, efficientqat) ----------

namespace {
nlohmann::json read_json(const fs::path& p) {
  std::ifstream f(p);
  return nlohmann::json::parse(f, nullptr, false);
}
// Largest relative difference of two equally long lists of losses (all must be positive).
double max_rel(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) m = std::max(m, std::abs(a[i] - b[i]) / std::abs(a[i]));
  return m;
}
}  // namespace

// ApiQ (block- and layer-wise) and SAPR with 2 and 3 CPU ranks against one process on the same 12
// windows, 4 per step (so a step's windows are spread over the ranks): the saliency map (Fisher sums
// all-reduced; 1e-6), every training run's first and last epoch loss (all-reduced) and the trained
// weights (Q(W) + s B A merged in f32: codes, scales and adapters at once) agree to the rounding of
// the sums; one process on 6 of the windows does not (the test can tell an all-reduce from none).
TEST(CommCli, DataParallelApiqSaprMatchOneRank) {
  if (!fs::exists(lowbit::test::cli_path())) GTEST_SKIP() << "no " << lowbit::test::cli_path();
  LOWBIT_REQUIRE_SHARED(model, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(tokens, "models/stories260K/sample-tokens.i32");
  const fs::path dir = lowbit::test::temp_dir("comm_apiq");
  struct Run {
    std::vector<double> losses;
    lowbit::SafetensorsFile ckpt;
  };
  auto quantize = [&](const std::string& method, int gpus, int nsamples = 12) {
    const std::string name = method + "-" + std::to_string(gpus) + "-" + std::to_string(nsamples);
    std::string extra;
    if (method == "sapr")
      extra = " --saliency " + (dir / (name + ".saliency")).string() + " --sapr-weight-epochs 1 --sapr-output-epochs 1";
    const CliResult r = run_cli("quantize -q -m " + model + " --method " + method + " --format int2g64 --calib-tokens " +
                                    tokens + " --nsamples " + std::to_string(nsamples) +
                                    " --seqlen 64 --epochs 4 --apiq-batch 4 --rank 4 --lora merge --merge-dtype f32 -o " +
                                    (dir / name).string() + extra +
                                    (gpus ? " --gpus " + std::to_string(gpus) : ""),
                                dir);
    EXPECT_EQ(r.status, 0) << r.err;
    const nlohmann::json rep = read_json(dir / name / "quantize_report.json");
    std::vector<double> losses;
    for (const auto& e : rep["apiq"]["epoch_loss"]) {
      losses.push_back(e["first"].get<double>());
      losses.push_back(e["last"].get<double>());
    }
    return Run{losses, lowbit::SafetensorsFile::open((dir / name / "model.safetensors").string())};
  };
  for (const std::string method : {"apiq", "apiq-layer", "sapr"}) {
    const Run one = quantize(method, 0);
    ASSERT_EQ(one.losses.size(), method == "apiq-layer" ? 70u : 10u) << method;
    for (int gpus : {2, 3}) {
      const Run dp = quantize(method, gpus);
      const double loss_rel = max_rel(one.losses, dp.losses);
      const Diff d = compare(one.ckpt, dp.ckpt);
      std::printf("[measured] %s, %d ranks: epoch losses max rel diff %.3g; merged f32 weights: max ||dW||/||W|| %.3g, "
                  "max |dW| / max|W| %.3g\n", method.c_str(), gpus, loss_rel, d.tensor_rel, d.elem_of_max);
      EXPECT_LE(loss_rel, 1e-5) << method << " " << gpus;
      // A flipped code would move an element by a quantization step, ~1e-1 of the tensor's max.
      EXPECT_LE(d.tensor_rel, 1e-4) << method << " " << gpus;
      EXPECT_LE(d.elem_of_max, 1e-4) << method << " " << gpus;
      if (method == "sapr") {
        const auto s1 = lowbit::SafetensorsFile::open((dir / "sapr-0-12.saliency").string());
        const auto sn = lowbit::SafetensorsFile::open((dir / ("sapr-" + std::to_string(gpus) + "-12.saliency")).string());
        const Diff ds = compare(s1, sn, 1e-6);
        std::printf("[measured] saliency, %d ranks: max rel diff %.3g\n", gpus, ds.max_float_rel);
        EXPECT_EQ(ds.float_mismatches, 0);
      }
    }
  }
  const Run one = quantize("apiq", 0), half = quantize("apiq", 0, 6);
  EXPECT_GT(max_rel(one.losses, half.losses), 1e-3) << "6 windows alone train like 12: the test cannot tell";
  fs::remove_all(dir);
}

// qat: lsq (end to end; also with --zero), efficientqat (Block-AP through the data-parallel
// pipeline, then E2E-QP) and matquant (its Block-AP) with 2 and 3 CPU ranks against one process: the stages' losses
// (all-reduced) and the checkpoint; with --zero rank 0 holds about half the AdamW state.
TEST(CommCli, DataParallelQatMatchesOneRank) {
  if (!fs::exists(lowbit::test::cli_path())) GTEST_SKIP() << "no " << lowbit::test::cli_path();
  LOWBIT_REQUIRE_SHARED(model, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(tokens, "models/stories260K/sample-tokens.i32");
  const fs::path dir = lowbit::test::temp_dir("comm_qat");
  struct Run {
    std::vector<double> losses;
    int64_t state_bytes = 0;  // the last stage's AdamW state on rank 0
    std::unique_ptr<lowbit::SafetensorsFile> ckpt;
  };
  const std::map<std::string, std::string> args = {
      {"lsq", "--steps 6 --batch 6 --seqlen 32"},
      {"efficientqat", "--nsamples 12 --seqlen 32 --block-epochs 2 --block-batch 4 --steps 3 --batch 6"},
      // MatQuant: Block-AP's data-parallel pipeline, each width on its own path (each rank its windows')
      {"matquant", "--nsamples 12 --seqlen 32 --block-epochs 2 --block-batch 4 --widths 8,4,2"}};
  for (const auto& [method, extra] : args) {
    auto qat = [&](int gpus, const std::string& flags = "") {
      const std::string name = method + "-" + std::to_string(gpus) + (flags.empty() ? "" : "-zero");
      const std::string format = method == "matquant" ? "int8g64" : "int2g64";
      const CliResult r = run_cli("qat --json -m " + model + " --method " + method + " --format " + format + " --train-tokens " +
                                      tokens + " " + extra + " -o " + (dir / name).string() +
                                      (gpus ? " --gpus " + std::to_string(gpus) : "") + " " + flags,
                                  dir);
      EXPECT_EQ(r.status, 0) << r.err;
      const nlohmann::json rep = nlohmann::json::parse(r.out, nullptr, false);
      Run run;
      for (const auto& st : rep["stages"]) {
        run.losses.push_back(st["loss_before"].get<double>());
        run.losses.push_back(st["loss_after"].get<double>());
        run.state_bytes = st.value("optimizer_state_bytes", int64_t(0));
      }
      EXPECT_EQ(rep.value("ranks", 0), gpus ? gpus : 1);
      run.ckpt = std::make_unique<lowbit::SafetensorsFile>(
          lowbit::SafetensorsFile::open((dir / name / "model.safetensors").string()));
      return run;
    };
    const Run one = qat(0);
    ASSERT_EQ(one.losses.size(), method == "efficientqat" ? 4u : 2u);
    std::vector<std::pair<int, std::string>> runs = {{2, ""}, {3, ""}};
    if (method == "lsq") runs.emplace_back(2, "--zero");
    for (const auto& [gpus, flags] : runs) {
      const Run dp = qat(gpus, flags);
      const double loss_rel = max_rel(one.losses, dp.losses);
      const Diff d = compare(*one.ckpt, *dp.ckpt, 1e-3);
      std::printf("[measured] qat %s, %d ranks %s: stage losses max rel diff %.3g; codes differing %.3g; floats max rel "
                  "diff %.3g (%lld over 1e-3); AdamW state on rank 0 %lld bytes (one process %lld)\n", method.c_str(),
                  gpus, flags.c_str(), loss_rel, d.code_fraction, d.max_float_rel, (long long)d.float_mismatches,
                  (long long)dp.state_bytes, (long long)one.state_bytes);
      EXPECT_LE(loss_rel, 1e-5) << method << " " << gpus << flags;
      EXPECT_LE(d.code_fraction, 1e-3) << method << " " << gpus << flags;
      EXPECT_EQ(d.float_mismatches, 0) << method << " " << gpus << flags;
      if (flags == "--zero") EXPECT_LT(dp.state_bytes, one.state_bytes * 3 / 4);
      else EXPECT_EQ(dp.state_bytes, one.state_bytes);
    }
  }
  fs::remove_all(dir);
}
