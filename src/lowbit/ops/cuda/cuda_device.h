// Host-side control of the CUDA backend (device selection, memory statistics, options, per-op
// timing). Plain C++ so that ops/device_init.cpp can call it; users go through
// ops/device_init.h, which also compiles in CPU-only builds.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace lowbit::cuda_rt {

bool init(int device);  // false when no usable GPU; idempotent
bool initialized();
int64_t peak_bytes();
void reset_peak();
int64_t in_use_bytes();
int64_t reserved_bytes();
void release_cached();
void set_allow_tf32(bool allow);
bool allow_tf32();
void synchronize();
std::string device_name();

struct OpTime {
  std::string op;
  int64_t calls = 0;
  double ms = 0;
};
void profile_enable(bool on);
std::vector<OpTime> profile_report();  // synchronises; sorted by time, descending; clears the log

}  // namespace lowbit::cuda_rt
