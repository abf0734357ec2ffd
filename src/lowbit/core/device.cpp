#include "lowbit/core/device.h"

#include <cstdlib>
#include <new>

#include "lowbit/core/error.h"

namespace lowbit {

namespace {
DeviceBackend* g_backends[2] = {nullptr, nullptr};
}

const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

void register_device_backend(Device d, DeviceBackend* backend) { g_backends[int(d)] = backend; }

DeviceBackend& get_device_backend(Device d) {
  DeviceBackend* b = g_backends[int(d)];
  if (!b) throw_error("device '", device_name(d), "' is not available (lowbit built without it, or no device found)");
  return *b;
}

bool device_available(Device d) { return d == Device::CPU || g_backends[int(d)] != nullptr; }

void* aligned_host_alloc(size_t nbytes) {
  size_t n = (nbytes + 63) / 64 * 64;
  if (n == 0) n = 64;
  void* p = std::aligned_alloc(64, n);
  if (!p) throw_error("out of host memory allocating ", nbytes, " bytes");
  return p;
}

void aligned_host_free(void* p) { std::free(p); }

}  // namespace lowbit
