// The NCCL backend (compiled when the CUDA toolkit has nccl.h: LOWBIT_WITH_NCCL). The rank's GPU
// is LOCAL_RANK; the unique id travels over the TCP star of the CPU backend, which also carries
// each collective's header so a mismatch between ranks is an error, not a hang.
#include "lowbit/comm/comm.h"

#include "lowbit/core/error.h"

#if LOWBIT_WITH_NCCL
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdlib>
#include <cstring>
#include <vector>
#endif

namespace lowbit::comm {

#if LOWBIT_WITH_NCCL

bool nccl_available() { return true; }

namespace {

#define LB_NCCL(call)                                                                        \
  do {                                                                                       \
    const ncclResult_t rc_ = (call);                                                         \
    if (rc_ != ncclSuccess) ::lowbit::throw_error("nccl: ", #call, ": ", ncclGetErrorString(rc_)); \
  } while (0)
#define LB_CUDART(call)                                                                      \
  do {                                                                                       \
    const cudaError_t rc_ = (call);                                                          \
    if (rc_ != cudaSuccess) ::lowbit::throw_error("nccl backend: ", #call, ": ", cudaGetErrorString(rc_)); \
  } while (0)

bool nccl_type(DType d, ncclDataType_t& t) {
  switch (d) {
    case DType::F32: t = ncclFloat32; return true;
    case DType::F64: t = ncclFloat64; return true;
    case DType::I32: t = ncclInt32; return true;
    case DType::I64: t = ncclInt64; return true;
    case DType::F16: t = ncclFloat16; return true;
    case DType::BF16: t = ncclBfloat16; return true;
    case DType::I8: t = ncclInt8; return true;
    case DType::U8: t = ncclUint8; return true;
    default: return false;
  }
}

// A tensor's elements on the rank's GPU: the tensor itself when it is a contiguous device tensor,
// else a staging buffer copied in (and back out by finish()).
class DeviceView {
 public:
  DeviceView(const Tensor& t, bool copy_in) : t_(t) {
    if (t.device() == Device::CUDA) {
      if (!t.is_contiguous()) throw_error("nccl: device tensors must be contiguous");
      ptr_ = t.raw_data();
      return;
    }
    host_ = t.is_contiguous() ? t : t.contiguous();
    LB_CUDART(cudaMalloc(&ptr_, std::max<size_t>(1, t.nbytes())));
    owned_ = true;
    if (copy_in && t.nbytes()) LB_CUDART(cudaMemcpy(ptr_, host_.raw_data(), t.nbytes(), cudaMemcpyHostToDevice));
  }
  ~DeviceView() {
    if (owned_) cudaFree(ptr_);
  }
  void* ptr() const { return ptr_; }
  void finish(Tensor& out) {
    if (!owned_) return;
    if (out.nbytes()) LB_CUDART(cudaMemcpy(host_.raw_data(), ptr_, out.nbytes(), cudaMemcpyDeviceToHost));
    if (host_.raw_data() != out.raw_data()) out.copy_(host_);
  }

 private:
  Tensor t_, host_;
  void* ptr_ = nullptr;
  bool owned_ = false;
};

class NcclComm final : public Communicator {
 public:
  NcclComm(const DistEnv& env, double connect_timeout_s)
      : Communicator(env.rank, env.world_size, env.local_rank), cpu_(make_cpu_communicator(env, connect_timeout_s)) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
      cudaGetLastError();
      throw_error("nccl backend: no CUDA GPU is visible to rank ", rank_, " (use LOWBIT_COMM_BACKEND=cpu)");
    }
    if (local_rank_ >= n) throw_error("nccl backend: LOCAL_RANK=", local_rank_, " but only ", n, " GPUs are visible");
    LB_CUDART(cudaSetDevice(local_rank_));
    // NVLink SHARP / multicast stays off (the lent machines' fabric manager does not support it).
    setenv("NCCL_NVLS_ENABLE", "0", 1);
    ncclUniqueId id;
    std::memset(&id, 0, sizeof id);
    if (rank_ == 0) LB_NCCL(ncclGetUniqueId(&id));
    Tensor idt = Tensor::empty({int64_t(sizeof id)}, DType::U8);
    std::memcpy(idt.raw_data(), &id, sizeof id);
    cpu_->broadcast(idt, 0);
    std::memcpy(&id, idt.raw_data(), sizeof id);
    LB_NCCL(ncclCommInitRank(&comm_, world_, id, rank_));
    LB_CUDART(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  ~NcclComm() override {
    if (comm_) ncclCommDestroy(comm_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  std::string backend() const override { return "nccl"; }

  void all_reduce_sum(Tensor& t) override {
    ncclDataType_t ty = type_of(t.dtype(), true);
    agree(1, t.dtype(), t.numel(), 0);
    DeviceView v(t, true);
    before();
    LB_NCCL(ncclAllReduce(v.ptr(), v.ptr(), size_t(t.numel()), ty, ncclSum, comm_, stream_));
    after();
    v.finish(t);
  }
  void all_gather(const Tensor& in, Tensor& out) override {
    if (out.numel() != in.numel() * world_ || out.dtype() != in.dtype())
      throw_error("all_gather: output must be ", world_, " x ", in.numel(), " elements of the input's dtype");
    agree(2, in.dtype(), in.numel(), 0);
    size_t count = 0;
    const ncclDataType_t ty = bytes_type(in.dtype(), in.numel(), count);
    DeviceView vi(in, true), vo(out, false);
    before();
    LB_NCCL(ncclAllGather(vi.ptr(), vo.ptr(), count, ty, comm_, stream_));
    after();
    vo.finish(out);
  }
  void reduce_scatter_sum(const Tensor& in, Tensor& out) override {
    const ncclDataType_t ty = type_of(in.dtype(), true);
    if (in.numel() != out.numel() * world_ || out.dtype() != in.dtype())
      throw_error("reduce_scatter: input must be ", world_, " x ", out.numel(), " elements of the output's dtype");
    agree(3, in.dtype(), in.numel(), 0);
    DeviceView vi(in, true), vo(out, false);
    before();
    LB_NCCL(ncclReduceScatter(vi.ptr(), vo.ptr(), size_t(out.numel()), ty, ncclSum, comm_, stream_));
    after();
    vo.finish(out);
  }
  void broadcast(Tensor& t, int root) override {
    if (root < 0 || root >= world_) throw_error("broadcast: root ", root, " outside world size ", world_);
    agree(4, t.dtype(), t.numel(), root);
    size_t count = 0;
    const ncclDataType_t ty = bytes_type(t.dtype(), t.numel(), count);
    DeviceView v(t, true);
    before();
    LB_NCCL(ncclBroadcast(v.ptr(), v.ptr(), count, ty, root, comm_, stream_));
    after();
    v.finish(t);
  }
  void barrier() override { cpu_->barrier(); }

 private:
  static ncclDataType_t type_of(DType d, bool reduce) {
    if (reduce && d != DType::F32 && d != DType::F64 && d != DType::I32 && d != DType::I64)
      throw_error("all_reduce: ", dtype_name(d), " is not summed (f32, f64, i32, i64)");
    ncclDataType_t t;
    if (!nccl_type(d, t)) throw_error("nccl: no NCCL type for ", dtype_name(d));
    return t;
  }
  // Moves that need no arithmetic go as bytes (any dtype).
  static ncclDataType_t bytes_type(DType d, int64_t n, size_t& count) {
    count = size_t(n) * size_t(dtype_size(d));
    return ncclUint8;
  }
  // The call's header over the TCP star: every rank sees every rank's (op, dtype, count, root).
  void agree(int op, DType d, int64_t count, int root) {
    Tensor mine = Tensor::empty({4}, DType::I64), all = Tensor::empty({4 * int64_t(world_)}, DType::I64);
    int64_t* m = mine.data<int64_t>();
    m[0] = op, m[1] = int64_t(d), m[2] = count, m[3] = root;
    cpu_->all_gather(mine, all);
    const int64_t* a = all.data<int64_t>();
    for (int r = 0; r < world_; ++r)
      if (std::memcmp(a + 4 * r, m, 4 * sizeof(int64_t)) != 0)
        throw_error("comm: rank ", rank_, " called collective ", op, " (", dtype_name(d), ", ", count, " elements, root ",
                    root, ") but rank ", r, " called collective ", a[4 * r], " (", a[4 * r + 2],
                    " elements, root ", a[4 * r + 3], ") (mismatched sizes between ranks)");
  }
  // The ops queue on their own stream: finish them before NCCL reads, and NCCL before anyone reads.
  void before() { LB_CUDART(cudaDeviceSynchronize()); }
  void after() { LB_CUDART(cudaStreamSynchronize(stream_)); }

  std::unique_ptr<Communicator> cpu_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(const DistEnv& env, double connect_timeout_s) {
  return std::make_unique<NcclComm>(env, connect_timeout_s);
}

#else  // no NCCL in this build

bool nccl_available() { return false; }

std::unique_ptr<Communicator> make_nccl_communicator(const DistEnv&, double) {
  throw_error("the nccl communicator backend needs a CUDA build of lowbit with NCCL (-DLOWBIT_CUDA=ON); "
              "use LOWBIT_COMM_BACKEND=cpu");
}

#endif

}  // namespace lowbit::comm
