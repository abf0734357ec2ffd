// Start-up and control of the CUDA backend. Compiles (and answers "no GPU") in CPU-only builds,
// so callers need no #ifdef:
//   if (!lowbit::init_cuda()) { /* stay on the CPU */ }
//   Tensor x = Tensor::randn({4, 8}, 1).to(Device::CUDA);
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace lowbit {

// Selects the GPU, creates the stream and cuBLAS handle and registers the device backend.
// Returns false when the build has no CUDA or no usable GPU is present; idempotent.
bool init_cuda(int device = 0);
bool cuda_ready();  // init_cuda() has succeeded

// Bytes held by live GPU tensors (rounded to the allocator's buckets, like PyTorch's
// max_memory_allocated): the peak since start-up or the last cuda_reset_peak(), and now.
int64_t cuda_peak_bytes();
void cuda_reset_peak();  // peak := bytes in use now
int64_t cuda_in_use_bytes();
int64_t cuda_reserved_bytes();  // taken from the driver: in use + cached free blocks
void cuda_release_cached();     // give cached free blocks back to the driver

// f32 GEMMs and f32 attention (head_dim 64/128) may use TF32 tensor cores (10-bit mantissa inputs,
// fp32 accumulation): several times faster on Hopper, relative error ~1e-3 instead of ~1e-6. Off by
// default (PyTorch's default for matmuls too).
void cuda_set_allow_tf32(bool allow);
bool cuda_allow_tf32();
// Sets the TF32 permission for its lifetime and restores the previous one (e.g. strict f32 for a
// measurement inside a TF32 run).
class CudaTf32Scope {
 public:
  explicit CudaTf32Scope(bool allow) : prev_(cuda_allow_tf32()) { cuda_set_allow_tf32(allow); }
  ~CudaTf32Scope() { cuda_set_allow_tf32(prev_); }
  CudaTf32Scope(const CudaTf32Scope&) = delete;
  CudaTf32Scope& operator=(const CudaTf32Scope&) = delete;

 private:
  bool prev_;
};
void cuda_synchronize();
std::string cuda_device_name();

// Per-op GPU timing with CUDA events around every CUDA op body (for benchmarks; adds a little
// host overhead while on). The report synchronises, sums by op name and clears the log.
struct CudaOpTime {
  std::string op;
  int64_t calls = 0;
  double ms = 0;
};
void cuda_profile_enable(bool on);
std::vector<CudaOpTime> cuda_profile_report();

}  // namespace lowbit
