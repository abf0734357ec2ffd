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

// Importance-weighted round to nearest on a ggml block type (what llama-quantize does with an
// importance matrix, `--weighted-round` of rtn/awq): importance [in] >= 0 is the calibration
// inputs' mean x_c^2 per input channel (the diagonal of the layer's Hessian up to a factor), and
// each block's parameters are chosen to minimise the rounding error weighted by
// importance_c sqrt(2 mean(w^2) + w_c^2) on the stored f16 grid (quant/ggml_grid.h,
// ggml_grid_fit_block with an importance: q4_0/q5_0 the reference d or one of 81 least-squares
// trial scales with two refits each, q8_0 / iq4_nl likewise over their own trial grids, q4_1/q5_1 the
// reference or ggml's make_qkx2 search, the k-quants the weighted sub-block search with 4/6/8-bit
// sub-scales chosen on the exact grid). Every weight is then rounded to the nearest point of its
// block's stored grid. ggml types without a per-value grid (iq4_xs, tq1_0, tq2_0) are rounded with
// the reference quantizer. Formats that are not ggml block types are refused.
QuantizedTensor rtn_quantize_weighted(const Tensor& w, const QuantFormat& f, const Tensor& importance);

}  // namespace lowbit
