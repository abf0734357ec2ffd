// The CUDA device backend: a caching allocator, one stream, copies, the cuBLAS handle, and the
// per-op event timer. Registered with the core (core/device.h) by init().
//
// Allocator. cudaMalloc/cudaFree synchronise the device and cost tens of microseconds, so freed
// blocks go to free lists keyed by a size bucket and are handed out again for a request of the
// same bucket: after the first training step no op calls cudaMalloc. Buckets are multiples of
// 512 bytes below 1 MiB and 1/8 of the enclosing power of two above (at most 12.5% waste). Every
// kernel runs on the backend's single stream, so a block freed by the host may be reused at once:
// later work on the stream is ordered after earlier reads of the block. When cudaMalloc fails,
// the cached blocks are returned to the driver and the call is retried once.
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "lowbit/core/device.h"
#include "lowbit/ops/cuda/cuda_common.h"
#include "lowbit/ops/cuda/cuda_device.h"

namespace lowbit::cuda_rt {

void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  cudaGetLastError();  // clear a sticky launch error so later calls report their own status
  throw_error("CUDA error: ", call, " failed at ", file, ":", line, ": ", cudaGetErrorName(e), " (",
              cudaGetErrorString(e), ")");
}

void throw_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  throw_error("cuBLAS error: ", call, " failed at ", file, ":", line, ": ", cublasGetStatusName(s), " (",
              cublasGetStatusString(s), ")");
}

namespace {

size_t bucket_size(size_t n) {
  if (n <= 512) return 512;
  if (n < (size_t(1) << 20)) return (n + 511) / 512 * 512;
  size_t pow2 = size_t(1) << 20;
  while (pow2 * 2 <= n) pow2 *= 2;
  const size_t step = pow2 / 8;
  return (n + step - 1) / step * step;
}

// One element of an elem_size-byte pattern per thread (grid-stride).
template <class T>
__global__ void fill_kernel(T* p, size_t n, T v) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) p[i] = v;
}

template <class T>
void launch_fill(void* p, size_t n, const void* value, cudaStream_t s) {
  T v;
  std::memcpy(&v, value, sizeof(T));
  const unsigned blocks = unsigned(std::min<size_t>((n + 255) / 256, 4096));
  fill_kernel<T><<<blocks, 256, 0, s>>>(static_cast<T*>(p), n, v);
  LB_CUDA_CHECK(cudaGetLastError());
}

class CudaBackend final : public DeviceBackend {
 public:
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  bool allow_tf32 = false;
  int num_sms = 1;
  std::string name;

  void* allocate(size_t nbytes) override {
    const size_t b = bucket_size(nbytes);
    std::lock_guard<std::mutex> lock(mu_);
    void* p = nullptr;
    auto it = free_.find(b);
    if (it != free_.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
      cached_ -= b;
    } else {
      cudaError_t e = cudaMalloc(&p, b);
      if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        release_cached_locked();
        e = cudaMalloc(&p, b);
      }
      if (e != cudaSuccess) {
        cudaGetLastError();
        throw_error("CUDA out of memory: cudaMalloc of ", b, " bytes (request ", nbytes, ") failed: ",
                    cudaGetErrorString(e), "; ", in_use_, " bytes in use by tensors, ", reserved_, " reserved");
      }
      reserved_ += b;
      peak_reserved_ = std::max(peak_reserved_, reserved_);
    }
    live_[p] = b;
    in_use_ += b;
    peak_ = std::max(peak_, in_use_);
    return p;
  }

  // Called from Storage's destructor: must not throw, and calls no CUDA function.
  void deallocate(void* p, size_t) override {
    if (!p) return;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return;  // not ours; nothing safe to do in a destructor
    const size_t b = it->second;
    live_.erase(it);
    in_use_ -= b;
    cached_ += b;
    free_[b].push_back(p);
  }

  void copy_to_device(void* dst, const void* src, size_t n) override {
    if (n == 0) return;
    // From pageable host memory the call returns once the source has been staged, so the
    // caller may free it afterwards.
    LB_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream));
  }
  void copy_to_host(void* dst, const void* src, size_t n) override {
    if (n == 0) return;
    LB_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, stream));
    LB_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  void copy_on_device(void* dst, const void* src, size_t n) override {
    if (n == 0) return;
    LB_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, stream));
  }
  void memset_zero(void* p, size_t n) override {
    if (n == 0) return;
    LB_CUDA_CHECK(cudaMemsetAsync(p, 0, n, stream));
  }
  void fill(void* p, size_t n, size_t elem_size, const void* value) override {
    if (n == 0) return;
    switch (elem_size) {
      case 1: launch_fill<uint8_t>(p, n, value, stream); break;
      case 2: launch_fill<uint16_t>(p, n, value, stream); break;
      case 4: launch_fill<uint32_t>(p, n, value, stream); break;
      case 8: launch_fill<uint64_t>(p, n, value, stream); break;
      default: throw_error("CUDA fill: element size ", elem_size, " is not 1, 2, 4 or 8 bytes");
    }
  }
  void synchronize() override { LB_CUDA_CHECK(cudaStreamSynchronize(stream)); }

  int64_t peak() {
    std::lock_guard<std::mutex> lock(mu_);
    return int64_t(peak_);
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mu_);
    peak_ = in_use_;
  }
  int64_t in_use() {
    std::lock_guard<std::mutex> lock(mu_);
    return int64_t(in_use_);
  }
  int64_t reserved() {
    std::lock_guard<std::mutex> lock(mu_);
    return int64_t(reserved_);
  }
  void release_cached() {
    std::lock_guard<std::mutex> lock(mu_);
    release_cached_locked();
  }

 private:
  void release_cached_locked() {
    // Blocks in the cache may still be read by queued kernels of tensors freed meanwhile.
    cudaStreamSynchronize(stream);
    for (auto& [b, v] : free_) {
      for (void* p : v) {
        cudaFree(p);
        reserved_ -= b;
      }
      v.clear();
    }
    cached_ = 0;
  }

  std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;
  std::unordered_map<void*, size_t> live_;
  size_t in_use_ = 0, peak_ = 0, reserved_ = 0, peak_reserved_ = 0, cached_ = 0;
};

// Never destroyed: tensors in static storage may be freed after main returns.
CudaBackend* g_backend = nullptr;
std::mutex g_init_mu;

CudaBackend& backend() {
  if (!g_backend) throw_error("CUDA backend used before init_cuda() (ops/device_init.h)");
  return *g_backend;
}

// ---- per-op timing -------------------------------------------------------------------------------
struct ProfileRecord {
  const char* op;
  cudaEvent_t start, stop;
};
bool g_profile = false;
std::mutex g_prof_mu;
std::vector<ProfileRecord> g_records;
std::vector<cudaEvent_t> g_event_pool;

cudaEvent_t take_event() {
  if (!g_event_pool.empty()) {
    cudaEvent_t e = g_event_pool.back();
    g_event_pool.pop_back();
    return e;
  }
  cudaEvent_t e = nullptr;
  LB_CUDA_CHECK(cudaEventCreate(&e));
  return e;
}

}  // namespace

cudaStream_t stream() { return backend().stream; }
cublasHandle_t cublas() { return backend().cublas; }
bool allow_tf32() { return backend().allow_tf32; }
int num_sms() { return backend().num_sms; }

OpScope::OpScope(const char* name) : name_(name) {
  if (!g_profile) return;
  std::lock_guard<std::mutex> lock(g_prof_mu);
  cudaEvent_t s = take_event(), e = take_event();
  LB_CUDA_CHECK(cudaEventRecord(s, stream()));
  g_records.push_back({name_, s, e});
  start_ = int(g_records.size()) - 1;
}

OpScope::~OpScope() {
  if (start_ < 0) return;
  std::lock_guard<std::mutex> lock(g_prof_mu);
  if (size_t(start_) < g_records.size()) cudaEventRecord(g_records[size_t(start_)].stop, g_backend->stream);
}

bool init(int device) {
  std::lock_guard<std::mutex> lock(g_init_mu);
  if (g_backend) return true;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count <= device || device < 0) {
    cudaGetLastError();
    return false;
  }
  auto* b = new CudaBackend();
  b->device = device;
  LB_CUDA_CHECK(cudaSetDevice(device));
  cudaDeviceProp prop{};
  LB_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  b->num_sms = prop.multiProcessorCount;
  b->name = prop.name;
  LB_CUDA_CHECK(cudaStreamCreateWithFlags(&b->stream, cudaStreamNonBlocking));
  LB_CUBLAS_CHECK(cublasCreate(&b->cublas));
  LB_CUBLAS_CHECK(cublasSetStream(b->cublas, b->stream));
  g_backend = b;
  register_device_backend(Device::CUDA, b);
  return true;
}

bool initialized() { return g_backend != nullptr; }
int64_t peak_bytes() { return g_backend ? g_backend->peak() : 0; }
void reset_peak() {
  if (g_backend) g_backend->reset_peak();
}
int64_t in_use_bytes() { return g_backend ? g_backend->in_use() : 0; }
int64_t reserved_bytes() { return g_backend ? g_backend->reserved() : 0; }
void release_cached() {
  if (g_backend) g_backend->release_cached();
}
void set_allow_tf32(bool allow) { backend().allow_tf32 = allow; }
void synchronize() {
  if (g_backend) g_backend->synchronize();
}
std::string device_name() { return g_backend ? g_backend->name : std::string(); }

void profile_enable(bool on) {
  if (on) backend();  // throws before init
  g_profile = on;
}

std::vector<OpTime> profile_report() {
  std::vector<OpTime> out;
  if (!g_backend) return out;
  LB_CUDA_CHECK(cudaStreamSynchronize(g_backend->stream));
  std::lock_guard<std::mutex> lock(g_prof_mu);
  std::map<std::string, OpTime> acc;
  for (auto& r : g_records) {
    float ms = 0;
    LB_CUDA_CHECK(cudaEventElapsedTime(&ms, r.start, r.stop));
    OpTime& t = acc[r.op];
    t.op = r.op;
    t.calls += 1;
    t.ms += ms;
    g_event_pool.push_back(r.start);
    g_event_pool.push_back(r.stop);
  }
  g_records.clear();
  for (auto& [k, v] : acc) out.push_back(v);
  std::sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) { return a.ms > b.ms; });
  return out;
}

}  // namespace lowbit::cuda_rt
