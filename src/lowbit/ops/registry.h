// The op registry: one entry per op, listing what exists for it. Tests iterate it (every op
// with a backward must have a gradient check; every op with a CUDA body a parity test), and
// `lowbit` can print it. Keep it in step with ops.h: tests/ops/test_registry.cpp checks names.
#pragma once
#include <span>
#include <string_view>

namespace lowbit::ops {

struct OpInfo {
  std::string_view name;
  bool has_backward;
  bool has_cuda;  // a CUDA body exists (when the build has CUDA)
  std::string_view dtypes;  // CPU dtypes
};

std::span<const OpInfo> op_registry();

}  // namespace lowbit::ops
