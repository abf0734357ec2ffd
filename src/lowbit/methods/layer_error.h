// Output-error measures of a linear layer y = x W^T on calibration rows, shared by the methods and
// their tests: the quantity GPTQ and AWQ minimise.
#pragma once
#include "lowbit/core/tensor.h"

namespace lowbit {

// Y = X W^T for X [n, in], W [out, in] (f32, CPU; cblas_sgemm). Returns F32 [n, out].
Tensor linear_forward(const Tensor& x, const Tensor& w);

// Mean squared output error ||X W^T - X Q^T||_F^2 / (n * out) between a reference weight W and an
// approximation Q (both [out, in]).
double linear_output_mse(const Tensor& x, const Tensor& w, const Tensor& q);

}  // namespace lowbit
