// Internal helpers shared by the op bodies: argument checks and device/dtype dispatch.
#pragma once
#include <string>

#include "lowbit/core/tensor.h"
#include "lowbit/ops/ops.h"

#ifdef LOWBIT_WITH_CUDA
#include "lowbit/ops/cuda/cuda_ops.h"
#endif

namespace lowbit::ops::detail {

inline void check_same_shape(const char* op, const Tensor& a, const Tensor& b, const char* an, const char* bn) {
  if (a.shape() != b.shape())
    throw_error(op, ": ", an, " has shape ", shape_str(a.shape()), " but ", bn, " has shape ", shape_str(b.shape()));
}

inline void check_shape(const char* op, const Tensor& t, const Shape& s, const char* name) {
  if (!t.defined()) throw_error(op, ": ", name, " is undefined");
  if (t.shape() != s) throw_error(op, ": ", name, " has shape ", shape_str(t.shape()), ", expected ", shape_str(s));
}

inline void check_contiguous(const char* op, const Tensor& t, const char* name) {
  if (!t.defined()) throw_error(op, ": ", name, " is undefined");
  if (!t.is_contiguous()) throw_error(op, ": ", name, " must be contiguous (", t.describe(), ")");
}

// All float tensors of one op share a dtype and a device.
inline void check_same_kind(const char* op, const Tensor& ref, const Tensor& t, const char* name) {
  if (t.dtype() != ref.dtype() || t.device() != ref.device())
    throw_error(op, ": ", name, " is ", t.describe(), " but the op runs on ", ref.describe());
}

// Calls f(T{}) with T = float or double according to the dtype (CPU bodies).
template <class F>
auto dispatch_float(const char* op, DType dt, F&& f) {
  switch (dt) {
    case DType::F32: return f(float{});
    case DType::F64: return f(double{});
    default: throw_error(op, ": CPU body supports f32 and f64, got ", dtype_name(dt));
  }
}

inline bool on_cuda(const Tensor& t) { return t.device() == Device::CUDA; }

[[noreturn]] inline void no_cuda(const char* op) {
  throw_error(op, ": tensor is on CUDA but this build has no CUDA backend");
}

}  // namespace lowbit::ops::detail

// Routes a call to ops::cuda::<name>(args...) when the first tensor is on the GPU.
#ifdef LOWBIT_WITH_CUDA
#define LB_CUDA_ROUTE(tensor, name, ...)                     \
  if (::lowbit::ops::detail::on_cuda(tensor)) {              \
    ::lowbit::ops::cuda::name(__VA_ARGS__);                  \
    return;                                                  \
  }
#else
#define LB_CUDA_ROUTE(tensor, name, ...) \
  if (::lowbit::ops::detail::on_cuda(tensor)) ::lowbit::ops::detail::no_cuda(#name);
#endif
