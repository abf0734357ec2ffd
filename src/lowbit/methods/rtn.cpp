#include "lowbit/methods/rtn.h"

#include <algorithm>
#include <cmath>

#include "lowbit/core/threads.h"
#include "lowbit/quant/ggml_grid.h"
#include "lowbit/quant/quantize.h"

namespace lowbit {

QuantizedTensor rtn_quantize(const Tensor& w, const QuantFormat& f) { return quantize(w, f); }

QuantizedTensor rtn_quantize_clipped(const Tensor& w_in, const QuantFormat& f, const Tensor& clip_max) {
  Tensor w = checked_weight(w_in, f, "rtn_quantize_clipped").clone();
  // The tensor-level scale (nvfp4) comes from the unclipped weight, as in awq_search_clip.
  const float tensor_scale = f.is_ggml_block() ? 1.0f : compute_tensor_scale(f, w);
  const int64_t out = w.size(0), in = w.size(1), groups = f.n_groups(in);
  LB_CHECK(clip_max.defined() && clip_max.shape() == Shape({out, groups}), "rtn_quantize_clipped [", f.name,
           "]: clip_max must be [", out, ", ", groups, "], got ",
           clip_max.defined() ? clip_max.describe() : std::string("undefined"));
  Tensor cm = clip_max.to(DType::F32).contiguous();
  float* pw = w.data<float>();
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float m = cm.data<float>()[r * groups + g];
      LB_CHECK(m >= 0, "rtn_quantize_clipped: negative clip value ", m, " at row ", r, ", group ", g);
      for (int64_t c = f.group_begin(g); c < f.group_end(g, in); ++c) pw[r * in + c] = std::clamp(pw[r * in + c], -m, m);
    }
  if (f.is_ggml_block()) return quantize(w, f);  // the block rule on the clamped weights (AWQ's apply_clip)
  return quantize_with_params(w, f, fit_all_group_params(f, w, tensor_scale), tensor_scale);
}

QuantizedTensor rtn_quantize_weighted(const Tensor& w_in, const QuantFormat& f, const Tensor& importance) {
  LB_CHECK(f.is_ggml_block(), "rtn_quantize_weighted: format ", f.name, " is not a ggml block type (weighted rounding "
           "chooses ggml block scales: ", ggml_block_grid_names(), ")");
  Tensor w = checked_weight(w_in, f, "rtn_quantize_weighted");
  const int64_t out = w.size(0), in = w.size(1);
  LB_CHECK(importance.defined() && importance.numel() == in, "rtn_quantize_weighted [", f.name,
           "]: importance must have ", in, " values (one per input channel), got ",
           importance.defined() ? importance.describe() : std::string("undefined"));
  Tensor imp = importance.to(Device::CPU).to(DType::F32).contiguous().view({in});
  const float* pi = imp.data<float>();
  for (int64_t c = 0; c < in; ++c)
    LB_CHECK(std::isfinite(pi[c]) && pi[c] >= 0, "rtn_quantize_weighted: importance of input channel ", c, " is ",
             pi[c], ", must be finite and >= 0");
  if (!ggml_block_grid_supported(f)) return quantize(w, f);  // iq4_xs, tq1_0, tq2_0: the reference rule
  f.check_row_length(in, "rtn_quantize_weighted");
  const int64_t rb = f.row_bytes(in), gs = f.group_size, nb = in / gs;
  Tensor blocks = Tensor::empty({out, rb}, DType::U8);
  const float* pw = w.data<float>();
  uint8_t* pb = blocks.data<uint8_t>();
  parallel_for(out, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < nb; ++b)
        ggml_grid_fit_block(f, pw + r * in + b * gs, pb + r * rb + b * f.block_bytes, pi + b * gs);
  });
  return make_ggml_quantized_tensor(f, out, in, blocks, "rtn_quantize_weighted");
}

}  // namespace lowbit
