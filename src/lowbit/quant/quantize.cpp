#include "lowbit/quant/quantize.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>

#include "lowbit/quant/onebit.h"
#include "lowbit/quant/ptq161_tensor.h"

namespace lowbit {

Tensor checked_weight(const Tensor& w, const QuantFormat& f, const char* who) {
  LB_CHECK(w.defined(), who, " [", f.name, "]: weight tensor is undefined");
  LB_CHECK(w.dim() == 2 && w.size(0) > 0 && w.size(1) > 0, who, " [", f.name,
           "]: expected a non-empty 2-D weight [out, in], got ", w.describe());
  // Each step returns its input when nothing is to be done: no copy for a contiguous f32 CPU weight.
  Tensor c = w.to(Device::CPU).to(DType::F32).contiguous();
  const float* p = c.data<float>();
  const int64_t rows = c.size(0), cols = c.size(1), n = c.numel();
  // The first non-finite element in row-major order: the smallest index over the rows' first ones.
  int64_t first = n;
#pragma omp parallel for schedule(static) reduction(min : first) if (n >= kParallelRowsMinWork)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = p + r * cols;
    for (int64_t j = 0; j < cols; ++j)
      if (!std::isfinite(row[j])) {
        first = std::min(first, r * cols + j);
        break;
      }
  }
  if (first < n)
    throw_error(who, " [", f.name, "]: weight ", w.describe(), " has a non-finite value (", p[first], ") at row ",
                first / cols, ", column ", first % cols);
  return c;
}

namespace {
// The group-parameter API belongs to lowbit's own formats; ggml blocks compute theirs per block.
void require_codec(const QuantFormat& f, const char* who) {
  LB_CHECK(f.codec != nullptr, who, " [", f.name,
           "]: a ggml block format has no per-group parameters (its scales live inside the blocks); use quantize()");
}

// quantize() of a ggml block format: its reference quantize_row, row by row.
QuantizedTensor quantize_ggml(const Tensor& w, const QuantFormat& f) {
  const int64_t out = w.size(0), in = w.size(1);
  LB_CHECK(f.quantize_row != nullptr, "quantize [", f.name,
           "]: lowbit has no reference quantizer for this ggml type yet (it can load and dequantize it)");
  f.check_row_length(in, "quantize " + shape_str(w.shape()));
  Tensor blocks = Tensor::empty({out, f.row_bytes(in)}, DType::U8);
  const float* pw = w.data<float>();
  uint8_t* pb = blocks.data<uint8_t>();
  const int64_t rb = f.row_bytes(in);
#pragma omp parallel for schedule(static) if (out * in >= kParallelRowsMinWork)
  for (int64_t r = 0; r < out; ++r) f.quantize_row(pw + r * in, in, pb + r * rb);
  return make_ggml_quantized_tensor(f, out, in, blocks, "quantize");
}
}  // namespace

float compute_tensor_scale(const QuantFormat& f, const Tensor& w) {
  require_codec(f, "compute_tensor_scale");
  return f.codec->tensor_scale(f, w.data<float>(), w.numel());
}

GroupParams fit_group_params(const QuantFormat& f, const float* x, int64_t n, float tensor_scale) {
  require_codec(f, "fit_group_params");
  float lo = x[0], hi = x[0];
  for (int64_t i = 1; i < n; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
  return f.codec->params_from_range(f, lo, hi, tensor_scale);
}

std::vector<GroupParams> fit_all_group_params(const QuantFormat& f, const Tensor& w, float tensor_scale) {
  const int64_t out = w.size(0), in = w.size(1), groups = f.n_groups(in);
  const float* pw = w.data<float>();
  std::vector<GroupParams> params(static_cast<size_t>(out * groups));
  // params_from_range may throw (a scale that does not fit the storage): parallel_rows rethrows the
  // error of the first such row, as the sequential loop would.
  parallel_rows(out, out * in, [&](int64_t r) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b = f.group_begin(g), e = f.group_end(g, in);
      params[size_t(r * groups + g)] = fit_group_params(f, pw + r * in + b, e - b, tensor_scale);
    }
  });
  return params;
}

namespace {

// quantize_with_params on a weight that checked_weight has already returned.
QuantizedTensor encode_checked(const Tensor& w, const QuantFormat& f, const std::vector<GroupParams>& params,
                               float tensor_scale) {
  require_codec(f, "quantize_with_params");
  const int64_t out = w.size(0), in = w.size(1), groups = f.n_groups(in);
  LB_CHECK(int64_t(params.size()) == out * groups, "quantize [", f.name, "]: ", params.size(),
           " group parameters for a ", shape_str(w.shape()), " weight, expected ", out * groups);
  const float* pw = w.data<float>();
  // Every code is written below: no zero fill (and the pages are first touched by the threads).
  std::unique_ptr<uint8_t[]> codes(new uint8_t[size_t(out * in)]);
  uint8_t* pc = codes.get();
  const GroupParams* pp = params.data();
  const auto encode_n = f.codec->encode_n;
#pragma omp parallel for schedule(static) if (out * in >= kParallelRowsMinWork)
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b = f.group_begin(g), e = f.group_end(g, in);
      encode_n(f, pw + r * in + b, e - b, pp[r * groups + g], pc + r * in + b);
    }
  return make_quantized_tensor(f, out, in, pc, pp, tensor_scale);
}

}  // namespace

QuantizedTensor quantize_with_params(const Tensor& w_in, const QuantFormat& f, const std::vector<GroupParams>& params,
                                     float tensor_scale) {
  return encode_checked(checked_weight(w_in, f, "quantize"), f, params, tensor_scale);
}

namespace {
// quantize() of a column-masked format (ptq161) without calibration data: the nominal share of
// salient columns (FormatTraits::nominal_salient, 20 %) picked by the weight's column norm (ties:
// the lower index), their codes with the int4pc codec over the row's salient values, the other
// columns binarized around the row mean with the closed-form alpha = mean |w - mu| and r = 1.
// methods/ptq161.h is the method (activation-based mask, fitted factors).
QuantizedTensor quantize_masked(const Tensor& w, const QuantFormat& f) {
  const int64_t out = w.size(0), in = w.size(1), k = f.nominal_salient(in);
  const float* pw = w.data<float>();
  std::vector<double> norm(static_cast<size_t>(in), 0.0);
  for (int64_t i = 0; i < out; ++i)
    for (int64_t j = 0; j < in; ++j) norm[size_t(j)] += double(pw[i * in + j]) * pw[i * in + j];
  std::vector<int64_t> order(static_cast<size_t>(in));
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return norm[size_t(a)] > norm[size_t(b)]; });
  std::vector<uint8_t> mask(static_cast<size_t>(in), 0);
  for (int64_t t = 0; t < k; ++t) mask[size_t(order[size_t(t)])] = 1;
  const QuantFormat& f4 = quant_format(QuantFormatId::Int4PC);
  std::vector<int8_t> sign(static_cast<size_t>(out * in), 0);
  std::vector<uint8_t> q4(static_cast<size_t>(out * in), 0);
  std::vector<double> alpha(static_cast<size_t>(out)), mu(static_cast<size_t>(out)), col(static_cast<size_t>(in), 1.0);
  std::vector<float> s4(static_cast<size_t>(out), 1.0f), z4(static_cast<size_t>(out), 0.0f);
  for (int64_t i = 0; i < out; ++i) {
    const float* row = pw + i * in;
    float lo = 0.0f, hi = 0.0f;
    double sum = 0.0;
    for (int64_t j = 0; j < in; ++j)
      if (mask[size_t(j)]) lo = std::min(lo, row[j]), hi = std::max(hi, row[j]);
      else sum += row[j];
    const double m = in > k ? sum / double(in - k) : 0.0;
    double dev = 0.0;
    for (int64_t j = 0; j < in; ++j)
      if (!mask[size_t(j)]) dev += std::fabs(row[j] - m);
    mu[size_t(i)] = m;
    alpha[size_t(i)] = in > k ? dev / double(in - k) : 0.0;
    if (k > 0) {
      const GroupParams p = f4.codec->params_from_range(f4, lo, hi, 1.0f);
      s4[size_t(i)] = p.scale, z4[size_t(i)] = p.zero;
      for (int64_t j = 0; j < in; ++j)
        if (mask[size_t(j)]) q4[size_t(i * in + j)] = f4.codec->encode(f4, row[j], p);
    }
    for (int64_t j = 0; j < in; ++j)
      if (!mask[size_t(j)]) sign[size_t(i * in + j)] = row[j] >= m ? 1 : -1;
  }
  return pack_ptq161(out, in, mask, sign, q4, alpha, mu, s4, z4, col);
}
}  // namespace

QuantizedTensor quantize(const Tensor& w_in, const QuantFormat& f) {
  Tensor w = checked_weight(w_in, f, "quantize");
  if (f.is_ggml_block()) return quantize_ggml(w, f);
  if (f.has_column_mask()) return quantize_masked(w, f);
  if (f.kind == QuantKind::SignValue) return onebit_quantize(w);  // SVID (quant/onebit.h)
  float t = compute_tensor_scale(f, w);
  return encode_checked(w, f, fit_all_group_params(f, w, t), t);
}

Tensor fake_quantize(const Tensor& w_in, const QuantFormat& f) {
  Tensor w2 = w_in.defined() && w_in.dim() == 1 ? w_in.reshape({1, w_in.numel()}) : w_in;
  Tensor w = checked_weight(w2, f, "fake_quantize");
  if (f.is_ggml_block() || f.has_column_mask() || f.kind == QuantKind::SignValue) {
    Tensor out = (f.is_ggml_block()      ? quantize_ggml(w, f)
                  : f.has_column_mask() ? quantize_masked(w, f)
                                        : onebit_quantize(w))
                     .dequantize();
    return w_in.dim() == 1 ? out.view(w_in.shape()) : out;
  }
  float t = compute_tensor_scale(f, w);
  const int64_t rows = w.size(0), in = w.size(1), groups = f.n_groups(in);
  const std::vector<GroupParams> params = fit_all_group_params(f, w, t);
  Tensor out = Tensor::empty(w.shape());
  const float* pw = w.data<float>();
  float* po = out.data<float>();
  const auto encode_n = f.codec->encode_n;
  const auto decode_n = f.codec->decode_n;
  // decode(encode(x)) per element (quantize_dequantize), through a per-thread buffer of codes.
#pragma omp parallel if (rows * in >= kParallelRowsMinWork)
  {
    std::vector<uint8_t> q(static_cast<size_t>(in));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t b = f.group_begin(g), e = f.group_end(g, in);
        const GroupParams& p = params[size_t(r * groups + g)];
        encode_n(f, pw + r * in + b, e - b, p, q.data());
        decode_n(f, q.data(), e - b, p, po + r * in + b);
      }
  }
  return w_in.dim() == 1 ? out.view(w_in.shape()) : out;
}

}  // namespace lowbit
