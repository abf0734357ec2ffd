// Reference (scalar, plain) round-to-nearest quantizer for every format of format.h, and the
// per-group "quantize given parameters" step that GPTQ and the clipping searches build on.
//
// Round to nearest (RTN): each group's parameters come from its min/max (asymmetric int), its
// absmax (symmetric int, fp4) or the tensor's absmean (ternary), then every weight is encoded on
// its own: q = encode(w, params) (format.h gives the formulas).
#pragma once
#include <exception>
#include <vector>

#include "lowbit/core/tensor.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

// Runs fn(r) for every row r in [0, rows), on OpenMP threads when `work` (elements touched) is large
// enough to pay for them. Rows must be independent. When fn throws for some rows, the exception of
// the smallest such row is rethrown: the one a sequential loop over the rows would have thrown.
inline constexpr int64_t kParallelRowsMinWork = int64_t(1) << 16;
template <class Fn>
void parallel_rows(int64_t rows, int64_t work, Fn&& fn) {
  int64_t bad = rows;
  std::exception_ptr ex;
#pragma omp parallel for schedule(static) if (work >= kParallelRowsMinWork)
  for (int64_t r = 0; r < rows; ++r) {
    try {
      fn(r);
    } catch (...) {
#pragma omp critical(lowbit_parallel_rows)
      if (r < bad) bad = r, ex = std::current_exception();
    }
  }
  if (ex) std::rethrow_exception(ex);
}

// Returns `w` as a contiguous f32 CPU [out, in] tensor (a copy only when a conversion was needed:
// a contiguous f32 CPU `w` is returned as is, sharing its storage), after checking that it is 2-D,
// non-empty and finite (the error names the first non-finite element in row-major order). `who`
// prefixes the error message.
Tensor checked_weight(const Tensor& w, const QuantFormat& f, const char* who);

// Tensor-level scale of the format for W (1 when the format has none).
float compute_tensor_scale(const QuantFormat& f, const Tensor& w);

// RTN parameters of one group of n values (min/max of the values -> params_from_range).
GroupParams fit_group_params(const QuantFormat& f, const float* x, int64_t n, float tensor_scale);
// RTN parameters of every group of W [out, in] (contiguous f32), row-major [out * n_groups].
std::vector<GroupParams> fit_all_group_params(const QuantFormat& f, const Tensor& w, float tensor_scale);

// Quantize-then-dequantize of one value with given parameters.
inline float quantize_dequantize(const QuantFormat& f, float x, const GroupParams& p) {
  LB_CHECK(f.codec != nullptr, "quantize_dequantize [", f.name, "]: ggml block formats have no per-value codec");
  return f.codec->decode(f, f.codec->encode(f, x, p), p);
}

// Encodes W with the given per-group parameters (from params_from_range / fit_group_params).
QuantizedTensor quantize_with_params(const Tensor& w, const QuantFormat& f, const std::vector<GroupParams>& params,
                                     float tensor_scale);

// RTN reference quantizer: quantize(W, format) and its inverse.
QuantizedTensor quantize(const Tensor& w, const QuantFormat& f);
inline Tensor dequantize(const QuantizedTensor& q) { return q.dequantize(); }

// Fake quantization (quantize then dequantize, no packing), f32 [out, in] on the CPU. Equal to
// dequantize(quantize(w, f)) element for element. 1-D weights are treated as [1, n].
Tensor fake_quantize(const Tensor& w, const QuantFormat& f);

}  // namespace lowbit
