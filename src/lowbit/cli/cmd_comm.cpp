// lowbit comm: checks every collective of the communicator layer on this run's ranks and measures
// all-reduce bandwidth. The first command to run on a machine with several GPUs:
//   lowbit comm --gpus 8 --device cuda            (NCCL)
//   lowbit comm --gpus 4                          (CPU backend over TCP, any machine)
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/cli/dist.h"
#include "lowbit/core/error.h"

namespace lowbit::cli {

namespace {

struct CommArgs {
  DistArgs dist;
  std::string device = "cpu";
  int64_t elements = 1 << 20;
  int iters = 5;
  bool json = false;
};

// Element i of rank r's input: small integers times 0.5, so every sum is exact in any order.
double pattern(int r, int64_t i) { return 0.5 * double((r + 1) * ((i % 7) + 1)); }

Tensor filled(DType d, int64_t n, int r, Device dev) {
  Tensor t = Tensor::empty({n}, DType::F64);
  for (int64_t i = 0; i < n; ++i) t.data<double>()[i] = d == DType::I32 || d == DType::I64 ? 2 * pattern(r, i) : pattern(r, i);
  return t.to(d).to(dev);
}

void expect(const std::string& what, int rank, int64_t i, double got, double want) {
  if (got != want) throw_error("lowbit comm: ", what, " on rank ", rank, ": element ", i, " is ", got, ", expected ", want);
}

void check_collectives(comm::Communicator& c, Device dev, int64_t n) {
  const int W = c.world_size(), R = c.rank();
  for (DType d : {DType::F32, DType::F64, DType::I32, DType::I64}) {
    Tensor t = filled(d, n, R, dev);
    c.all_reduce_sum(t);
    const Tensor h = t.to(Device::CPU).to(DType::F64);
    for (int64_t i = 0; i < n; ++i) {
      double want = 0;
      for (int r = 0; r < W; ++r) want += pattern(r, i);
      if (d == DType::I32 || d == DType::I64) want *= 2;
      expect(std::string("all_reduce ") + dtype_name(d), R, i, h.data<double>()[i], want);
    }
  }
  {  // all_gather: rank r contributes r * 1000 + i
    Tensor in = Tensor::empty({n}, DType::I32);
    for (int64_t i = 0; i < n; ++i) in.data<int32_t>()[i] = int32_t(R * 1000 + i % 1000);
    Tensor out = Tensor::empty({W * n}, DType::I32, dev);
    c.all_gather(in.to(dev), out);
    const Tensor h = out.to(Device::CPU);
    for (int r = 0; r < W; ++r)
      for (int64_t i = 0; i < n; ++i) expect("all_gather", R, r * n + i, h.data<int32_t>()[r * n + i], r * 1000 + i % 1000);
  }
  {  // reduce_scatter: element j of every rank's input is pattern(r, j)
    Tensor in = filled(DType::F32, W * n, R, dev);
    Tensor out = Tensor::empty({n}, DType::F32, dev);
    c.reduce_scatter_sum(in, out);
    const Tensor h = out.to(Device::CPU);
    for (int64_t i = 0; i < n; ++i) {
      double want = 0;
      for (int r = 0; r < W; ++r) want += pattern(r, R * n + i);
      expect("reduce_scatter", R, i, h.data<float>()[i], want);
    }
  }
  {  // broadcast from the last rank
    const int root = W - 1;
    Tensor t = filled(DType::F32, n, R, dev);
    c.broadcast(t, root);
    const Tensor h = t.to(Device::CPU);
    for (int64_t i = 0; i < n; ++i) expect("broadcast", R, i, h.data<float>()[i], pattern(root, i));
  }
  c.barrier();
}

void run_comm(const CommArgs& a) {
  const auto world = start_ranks(a.dist, a.device != "cpu");
  const Device dev = parse_device(a.device);
  comm::Communicator& c = *world;
  check_collectives(c, dev, 1000);
  // Bandwidth of all-reduce on `elements` f32 (algorithm bandwidth = bytes / time; bus bandwidth
  // = algbw * 2 (W - 1) / W, NCCL's convention), the slowest rank's time.
  Tensor t = Tensor::zeros({a.elements}, DType::F32, dev);
  c.all_reduce_sum(t);  // warm-up
  c.barrier();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < a.iters; ++i) c.all_reduce_sum(t);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / a.iters;
  Tensor mx = Tensor::empty({int64_t(c.world_size())}, DType::F64);
  Tensor mine = Tensor::from_vector(std::vector<double>{s}, {1});
  c.all_gather(mine, mx);
  for (int r = 0; r < c.world_size(); ++r) s = std::max(s, mx.data<double>()[r]);
  const double bytes = double(a.elements) * 4, algbw = bytes / s / 1e9;
  const double busbw = algbw * 2.0 * double(c.world_size() - 1) / double(c.world_size());
  if (c.rank() != 0) return;
  nlohmann::json j = {{"ranks", c.world_size()}, {"backend", c.backend()}, {"device", a.device},
                      {"checks", "all_reduce f32/f64/i32/i64, all_gather, reduce_scatter, broadcast, barrier: ok"},
                      {"all_reduce_bytes", bytes}, {"all_reduce_seconds", s}, {"algbw_gb_s", algbw}, {"busbw_gb_s", busbw}};
  if (a.json) {
    print_json(j);
    return;
  }
  print_stdout("comm: %d ranks, %s backend, tensors on %s: all collectives ok\n", c.world_size(), c.backend().c_str(),
               a.device.c_str());
  if (c.world_size() == 1) {
    print_stdout("one rank: nothing to exchange, no bandwidth to time\n");
    return;
  }
  print_stdout("all_reduce %.1f MB f32: %.3f ms, algbw %.2f GB/s, busbw %.2f GB/s\n", bytes / 1e6, s * 1e3, algbw, busbw);
}

}  // namespace

void register_comm(CLI::App& app) {
  auto a = std::make_shared<CommArgs>();
  CLI::App* c = app.add_subcommand("comm", "check the collectives between ranks (--gpus N or a launcher) and time all-reduce");
  add_dist_options(c, &a->dist);
  c->add_option("--device", a->device, "where the tensors live: cpu or cuda")->capture_default_str();
  c->add_option("--elements", a->elements, "f32 elements of the timed all-reduce")->check(at_least(1))->capture_default_str();
  c->add_option("--iters", a->iters, "timed all-reduces")->check(at_least(1))->capture_default_str();
  c->add_flag("--json", a->json, "print the result as JSON");
  c->callback([a] { run_comm(*a); });
}

}  // namespace lowbit::cli
