#include "lowbit/methods/rtn.h"

#include <algorithm>

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

}  // namespace lowbit
