// The one-pass FP8 encoder of native FP8 training with delayed scaling (issue 18; autograd/lp_linear.h):
// given the per-tensor decode scale s (from the amax history), one read of x writes its E4M3/E5M2
// codes in one or both layouts — [rows, cols] for the GEMM that reduces over cols, [cols, rows] for
// the one that reduces over rows — and measures its amax for the history, without a host
// synchronisation: the amax arrives later through LpAmax (on CUDA: copied into pinned host memory
// behind an event, read when the next step asks for the history, by which time it is long done).
//
// Codes: code = fp8(x / s), the codec of ops::lp_quantize_fp8 with a given scale (so s * decode(code)
// is lp_quantize's value); a non-finite x gives the NaN code 0x7f in its place, and the amax is NaN.
// Bodies: CPU (f32) and CUDA (ops/cuda/lp_fp8.cu: 32 x 32 tiles through shared memory, so both
// layouts are written coalesced; the amax as a warp max + one atomicMax per warp).
#pragma once
#include <memory>

#include "lowbit/core/tensor.h"
#include "lowbit/ops/lp_quant_math.h"

namespace lowbit::ops {

// An amax measured by a kernel, read on the host later. Copyable (shared); a default-constructed
// one is undefined.
class LpAmax {
 public:
  struct Source {
    virtual ~Source() = default;
    virtual double wait() = 0;  // blocks until the value is there (CUDA: the event, not the stream)
  };
  LpAmax() = default;
  explicit LpAmax(double ready) : ready_(true), value_(ready) {}
  explicit LpAmax(std::shared_ptr<Source> s) : source_(std::move(s)) {}
  bool defined() const { return ready_ || source_ != nullptr; }
  double get();

 private:
  bool ready_ = false;
  double value_ = 0;
  std::shared_ptr<Source> source_;
};

// codes and/or codes_t may be null (that layout is not written); amax may be null.
void lp_encode_fp8_dual(const Tensor& x, LpFormat format, float scale, Tensor* codes, Tensor* codes_t, LpAmax* amax);

}  // namespace lowbit::ops
