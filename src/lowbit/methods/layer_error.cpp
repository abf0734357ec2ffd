#include "lowbit/methods/layer_error.h"

#include "lowbit/core/blas.h"

namespace lowbit {

Tensor linear_forward(const Tensor& x_in, const Tensor& w_in) {
  LB_CHECK(x_in.defined() && w_in.defined() && x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1),
           "linear_forward: expected X [n, in] and W [out, in], got ", x_in.describe(), " and ", w_in.describe());
  Tensor x = x_in.to(Device::CPU).to(DType::F32).contiguous(), w = w_in.to(Device::CPU).to(DType::F32).contiguous();
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  Tensor y = Tensor::zeros({n, out});
  if (n && out && in)
    blas::gemm(false, true, n, out, in, 1.0f, x.data<float>(), in, w.data<float>(), in, 0.0f, y.data<float>(), out);
  return y;
}

double linear_output_mse(const Tensor& x, const Tensor& w, const Tensor& q) {
  LB_CHECK(w.shape() == q.shape(), "linear_output_mse: weight shapes differ: ", w.describe(), " vs ", q.describe());
  Tensor d = w.to(DType::F64).contiguous().clone();
  Tensor qd = q.to(DType::F64).contiguous();
  for (int64_t i = 0; i < d.numel(); ++i) d.data<double>()[i] -= qd.data<double>()[i];
  Tensor y = linear_forward(x, d.to(DType::F32));  // X (W - Q)^T
  double s = 0;
  const float* py = y.data<float>();
  for (int64_t i = 0; i < y.numel(); ++i) s += double(py[i]) * double(py[i]);
  return y.numel() ? s / double(y.numel()) : 0.0;
}

}  // namespace lowbit
