#include "lowbit/ops/device_init.h"

#ifdef LOWBIT_WITH_CUDA
#include "lowbit/ops/cuda/cuda_device.h"
#endif

namespace lowbit {

#ifdef LOWBIT_WITH_CUDA

bool init_cuda(int device) { return cuda_rt::init(device); }
bool cuda_ready() { return cuda_rt::initialized(); }
int64_t cuda_peak_bytes() { return cuda_rt::peak_bytes(); }
void cuda_reset_peak() { cuda_rt::reset_peak(); }
int64_t cuda_in_use_bytes() { return cuda_rt::in_use_bytes(); }
int64_t cuda_reserved_bytes() { return cuda_rt::reserved_bytes(); }
void cuda_release_cached() { cuda_rt::release_cached(); }
void cuda_set_allow_tf32(bool allow) { cuda_rt::set_allow_tf32(allow); }
bool cuda_allow_tf32() { return cuda_rt::allow_tf32(); }
void cuda_synchronize() { cuda_rt::synchronize(); }
std::string cuda_device_name() { return cuda_rt::device_name(); }
void cuda_profile_enable(bool on) { cuda_rt::profile_enable(on); }
std::vector<CudaOpTime> cuda_profile_report() {
  std::vector<CudaOpTime> out;
  for (const auto& t : cuda_rt::profile_report()) out.push_back({t.op, t.calls, t.ms});
  return out;
}

#else  // CPU-only build: no device, every query answers "nothing".

bool init_cuda(int) { return false; }
bool cuda_ready() { return false; }
int64_t cuda_peak_bytes() { return 0; }
void cuda_reset_peak() {}
int64_t cuda_in_use_bytes() { return 0; }
int64_t cuda_reserved_bytes() { return 0; }
void cuda_release_cached() {}
void cuda_set_allow_tf32(bool) {}
bool cuda_allow_tf32() { return false; }
void cuda_synchronize() {}
std::string cuda_device_name() { return {}; }
void cuda_profile_enable(bool) {}
std::vector<CudaOpTime> cuda_profile_report() { return {}; }

#endif

}  // namespace lowbit
