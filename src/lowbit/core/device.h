// Devices and the seam between the core and device backends.
// The core only knows the interface below; the CUDA backend (src/lowbit/ops/cuda) registers an
// implementation at start-up. A CPU-only build never references CUDA.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace lowbit {

enum class Device : uint8_t { CPU = 0, CUDA = 1 };
const char* device_name(Device d);

// Memory and copies for a non-CPU device.
class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  virtual void* allocate(size_t nbytes) = 0;
  virtual void deallocate(void* p, size_t nbytes) = 0;
  virtual void copy_to_device(void* dst, const void* src, size_t nbytes) = 0;
  virtual void copy_to_host(void* dst, const void* src, size_t nbytes) = 0;
  virtual void copy_on_device(void* dst, const void* src, size_t nbytes) = 0;
  virtual void memset_zero(void* p, size_t nbytes) = 0;
  // Writes the elem_size-byte pattern at `value` (1, 2, 4 or 8 bytes) into n consecutive elements
  // at p, on the device, without waiting for it (Tensor::fill_ of a contiguous device tensor).
  virtual void fill(void* p, size_t n, size_t elem_size, const void* value) = 0;
  virtual void synchronize() = 0;
};

// Registration (done by the CUDA backend); get_device_backend throws if none is registered.
void register_device_backend(Device d, DeviceBackend* backend);
DeviceBackend& get_device_backend(Device d);
bool device_available(Device d);

// 64-byte aligned host memory (cache lines, AVX-512 loads).
void* aligned_host_alloc(size_t nbytes);
void aligned_host_free(void* p);

}  // namespace lowbit
