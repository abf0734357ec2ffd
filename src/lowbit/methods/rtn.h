// Round-to-nearest (RTN) baseline at the level of one linear layer: every group's parameters come
// from its own min/max (or absmax / absmean, see quant/format.h) and every weight is rounded on its
// own. This is the reference the other methods are measured against.
#pragma once
#include "lowbit/core/tensor.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

QuantizedTensor rtn_quantize(const Tensor& w, const QuantFormat& f);

// RTN with each group's range clipped to [-clip_max, clip_max] before the parameters are fitted
// (the weight is clamped, then quantized). clip_max: F32 [out, n_groups(in)], e.g. from
// awq_search_clip. Formats whose parameters do not depend on the range (ternary) ignore it.
QuantizedTensor rtn_quantize_clipped(const Tensor& w, const QuantFormat& f, const Tensor& clip_max);

}  // namespace lowbit
