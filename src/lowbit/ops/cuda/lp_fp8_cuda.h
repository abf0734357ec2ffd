// CUDA body of the one-pass FP8 encoder (ops/lp_fp8.h; ops/cuda/lp_fp8.cu). Plain C++ (no CUDA
// headers): included by the op's host file only.
#pragma once
#include "lowbit/core/tensor.h"
#include "lowbit/ops/lp_fp8.h"

namespace lowbit::ops::cuda {

void lp_encode_fp8_dual(const Tensor& x, LpFormat format, float scale, Tensor* codes, Tensor* codes_t, LpAmax* amax);

}  // namespace lowbit::ops::cuda
