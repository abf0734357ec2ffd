#include "lowbit/quant/quantize.h"

#include <algorithm>
#include <cmath>

namespace lowbit {

Tensor checked_weight(const Tensor& w, const QuantFormat& f, const char* who) {
  LB_CHECK(w.defined(), who, " [", f.name, "]: weight tensor is undefined");
  LB_CHECK(w.dim() == 2 && w.size(0) > 0 && w.size(1) > 0, who, " [", f.name,
           "]: expected a non-empty 2-D weight [out, in], got ", w.describe());
  Tensor c = w.to(Device::CPU).to(DType::F32).contiguous();
  const float* p = c.data<float>();
  for (int64_t i = 0; i < c.numel(); ++i)
    if (!std::isfinite(p[i]))
      throw_error(who, " [", f.name, "]: weight ", w.describe(), " has a non-finite value (", p[i], ") at row ",
                  i / c.size(1), ", column ", i % c.size(1));
  return c;
}

float compute_tensor_scale(const QuantFormat& f, const Tensor& w) {
  return f.codec->tensor_scale(f, w.data<float>(), w.numel());
}

GroupParams fit_group_params(const QuantFormat& f, const float* x, int64_t n, float tensor_scale) {
  float lo = x[0], hi = x[0];
  for (int64_t i = 1; i < n; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
  return f.codec->params_from_range(f, lo, hi, tensor_scale);
}

std::vector<GroupParams> fit_all_group_params(const QuantFormat& f, const Tensor& w, float tensor_scale) {
  int64_t out = w.size(0), in = w.size(1), groups = f.n_groups(in);
  const float* pw = w.data<float>();
  std::vector<GroupParams> params(static_cast<size_t>(out * groups));
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      int64_t b = f.group_begin(g), e = f.group_end(g, in);
      params[size_t(r * groups + g)] = fit_group_params(f, pw + r * in + b, e - b, tensor_scale);
    }
  return params;
}

QuantizedTensor quantize_with_params(const Tensor& w_in, const QuantFormat& f, const std::vector<GroupParams>& params,
                                     float tensor_scale) {
  Tensor w = checked_weight(w_in, f, "quantize");
  int64_t out = w.size(0), in = w.size(1), groups = f.n_groups(in);
  LB_CHECK(int64_t(params.size()) == out * groups, "quantize [", f.name, "]: ", params.size(),
           " group parameters for a ", shape_str(w.shape()), " weight, expected ", out * groups);
  const float* pw = w.data<float>();
  std::vector<uint8_t> codes(static_cast<size_t>(out * in));
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t c = f.group_begin(g); c < f.group_end(g, in); ++c)
        codes[size_t(r * in + c)] = f.codec->encode(f, pw[r * in + c], params[size_t(r * groups + g)]);
  return make_quantized_tensor(f, out, in, codes.data(), params.data(), tensor_scale);
}

QuantizedTensor quantize(const Tensor& w_in, const QuantFormat& f) {
  Tensor w = checked_weight(w_in, f, "quantize");
  float t = compute_tensor_scale(f, w);
  return quantize_with_params(w, f, fit_all_group_params(f, w, t), t);
}

Tensor fake_quantize(const Tensor& w_in, const QuantFormat& f) {
  Tensor w2 = w_in.defined() && w_in.dim() == 1 ? w_in.reshape({1, w_in.numel()}) : w_in;
  Tensor w = checked_weight(w2, f, "fake_quantize");
  float t = compute_tensor_scale(f, w);
  int64_t in = w.size(1), groups = f.n_groups(in);
  std::vector<GroupParams> params = fit_all_group_params(f, w, t);
  Tensor out = Tensor::empty(w.shape());
  const float* pw = w.data<float>();
  float* po = out.data<float>();
  for (int64_t r = 0; r < w.size(0); ++r)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t c = f.group_begin(g); c < f.group_end(g, in); ++c)
        po[r * in + c] = quantize_dequantize(f, pw[r * in + c], params[size_t(r * groups + g)]);
  return w_in.dim() == 1 ? out.view(w_in.shape()) : out;
}

}  // namespace lowbit
