// AdaRound's two per-iteration element-wise passes as ops (methods/adaround.h runs the loop on
// them: soft error -> gemm(E, H) -> Adam step), so that the 10k iterations a layer can run on the GPU.
// The per-weight arithmetic is ops/adaround_math.h, shared by the CPU reference body (ops/adaround.cpp)
// and the CUDA body (ops/cuda/adaround.cu). Every tensor is [out, in], contiguous, of one float dtype
// (f64 or f32) and on one device; fl, s and z are per weight (fl = floor(W/s) + z).
#pragma once
#include "lowbit/core/tensor.h"
#include "lowbit/ops/adaround_math.h"

namespace lowbit::ops {

// e = W - Q_soft(V) (adaround::soft's q).
void adaround_soft_error(const Tensor& v, const Tensor& w, const Tensor& fl, const Tensor& s, const Tensor& z,
                         const adaround::Grid& g, Tensor& e);

// The Adam step of every V from eh = (W - Q_soft) H: d loss/dV = adaround::grad (the reconstruction
// term and, with reg > 0, the regularizer's), then adaround::adam with PyTorch's defaults
// (beta1 0.9, beta2 0.999, eps 1e-8) at step t >= 1 (m and m2 its moments, updated in place).
struct AdaRoundStep {
  double beta = 20, reg = 0;  // the regularizer's exponent and weight (0: off)
  double lr = 1e-3;
  int64_t t = 1;
};
void adaround_adam_step(Tensor& v, Tensor& m, Tensor& m2, const Tensor& eh, const Tensor& fl, const Tensor& s,
                        const Tensor& z, const adaround::Grid& g, const AdaRoundStep& st);

}  // namespace lowbit::ops
