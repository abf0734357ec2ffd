#include "lowbit/methods/awq.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "lowbit/core/blas.h"
#include "lowbit/methods/layer_error.h"
#include "lowbit/methods/rtn.h"
#include "lowbit/quant/ggml_grid.h"
#include "lowbit/quant/quantize.h"

namespace lowbit {

namespace {

// x [..., in] as a contiguous f32 [n, in] CPU tensor, checked finite.
Tensor calibration_rows(const Tensor& x, int64_t in, const char* who) {
  LB_CHECK(x.defined() && x.dim() >= 1 && x.size(-1) == in && x.numel() > 0, who, ": calibration inputs must be [n, ",
           in, "], got ", x.defined() ? x.describe() : std::string("undefined"));
  Tensor c = x.to(Device::CPU).to(DType::F32).contiguous().view({-1, in});
  const float* p = c.data<float>();
  for (int64_t i = 0; i < c.numel(); ++i)
    LB_CHECK(std::isfinite(p[i]), who, ": non-finite calibration input at row ", i / in, ", channel ", i % in);
  return c;
}

Tensor checked_scales(const Tensor& s, int64_t in, const char* who) {
  LB_CHECK(s.defined() && s.numel() == in, who, ": scales must have ", in, " values, got ",
           s.defined() ? s.describe() : std::string("undefined"));
  Tensor c = s.to(Device::CPU).to(DType::F32).contiguous().view({in});
  for (int64_t i = 0; i < in; ++i)
    LB_CHECK(std::isfinite(c.data<float>()[i]) && c.data<float>()[i] > 0, who, ": scale ", i, " is ",
             c.data<float>()[i], ", must be finite and > 0");
  return c;
}

}  // namespace

Tensor activation_mean_abs(const Tensor& x) {
  LB_CHECK(x.defined() && x.dim() >= 1, "activation_mean_abs: expected [..., in], got ", x.describe());
  Tensor c = calibration_rows(x, x.size(-1), "activation_mean_abs");
  const int64_t n = c.size(0), in = c.size(1);
  std::vector<double> sum(size_t(in), 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < in; ++i) sum[size_t(i)] += std::fabs(double(c.data<float>()[t * in + i]));
  Tensor s = Tensor::empty({in});
  for (int64_t i = 0; i < in; ++i) s.data<float>()[i] = float(sum[size_t(i)] / double(n));
  return s;
}

Tensor activation_mean_square(const Tensor& x) {
  LB_CHECK(x.defined() && x.dim() >= 1, "activation_mean_square: expected [..., in], got ", x.describe());
  Tensor c = calibration_rows(x, x.size(-1), "activation_mean_square");
  const int64_t n = c.size(0), in = c.size(1);
  std::vector<double> sum(size_t(in), 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < in; ++i) {
      const double v = double(c.data<float>()[t * in + i]);
      sum[size_t(i)] += v * v;
    }
  Tensor s = Tensor::empty({in});
  for (int64_t i = 0; i < in; ++i) s.data<float>()[i] = float(sum[size_t(i)] / double(n));
  return s;
}

Tensor scale_weight_columns(const Tensor& w_in, const Tensor& s_in) {
  LB_CHECK(w_in.defined() && w_in.dim() == 2, "scale_weight_columns: expected W [out, in], got ", w_in.describe());
  const int64_t out = w_in.size(0), in = w_in.size(1);
  Tensor s = checked_scales(s_in, in, "scale_weight_columns");
  Tensor w = w_in.to(Device::CPU).to(DType::F32).contiguous().clone();
  for (int64_t r = 0; r < out; ++r)
    for (int64_t c = 0; c < in; ++c) w.data<float>()[r * in + c] *= s.data<float>()[c];
  return w;
}

Tensor divide_input_columns(const Tensor& x_in, const Tensor& s_in) {
  LB_CHECK(x_in.defined() && x_in.dim() >= 1, "divide_input_columns: expected X [..., in], got ", x_in.describe());
  const int64_t in = x_in.size(-1);
  Tensor s = checked_scales(s_in, in, "divide_input_columns");
  Tensor x = x_in.to(Device::CPU).to(DType::F32).contiguous().clone();
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] /= s.data<float>()[i % in];
  return x;
}

AwqScaleResult awq_search_scales(const Tensor& x_in, const std::vector<Tensor>& weights, const QuantFormat& f,
                                 const Tensor& act_scale, const AwqOptions& opt) {
  return awq_search_scales(x_in, weights, std::vector<const QuantFormat*>(weights.size(), &f), act_scale, opt);
}

AwqScaleResult awq_search_scales(const Tensor& x_in, const std::vector<Tensor>& weights,
                                 const std::vector<const QuantFormat*>& formats, const Tensor& act_scale,
                                 const AwqOptions& opt) {
  LB_CHECK(!weights.empty(), "awq_search_scales: no weights given");
  LB_CHECK(formats.size() == weights.size(), "awq_search_scales: ", formats.size(), " formats for ", weights.size(),
           " weights");
  LB_CHECK(opt.n_grid > 0, "awq_search_scales: n_grid must be > 0, got ", opt.n_grid);
  std::vector<Tensor> ws;
  for (size_t k = 0; k < weights.size(); ++k) ws.push_back(checked_weight(weights[k], *formats[k], "awq_search_scales"));
  const int64_t in = ws[0].size(1);
  for (const Tensor& w : ws)
    LB_CHECK(w.size(1) == in, "awq_search_scales: weights sharing one input must have the same in_features, got ",
             w.describe(), " and ", ws[0].describe());
  Tensor x = calibration_rows(x_in, in, "awq_search_scales");
  Tensor sx = act_scale.defined() ? act_scale.to(DType::F32).contiguous() : activation_mean_abs(x);
  LB_CHECK(sx.numel() == in, "awq_search_scales: activation scale has ", sx.numel(), " values, expected ", in);

  AwqScaleResult res;
  res.loss = std::numeric_limits<double>::infinity();
  for (int i = 0; i < opt.n_grid; ++i) {
    const double alpha = double(i) / double(opt.n_grid);
    // s = s_x^alpha (clamped to >= 1e-4 as in llm-awq), normalised by sqrt(max * min).
    Tensor s = Tensor::empty({in});
    float* ps = s.data<float>();
    float smax = 0, smin = std::numeric_limits<float>::max();
    for (int64_t c = 0; c < in; ++c) {
      ps[c] = std::max(float(std::pow(double(std::max(sx.data<float>()[c], 0.0f)), alpha)), 1e-4f);
      smax = std::max(smax, ps[c]), smin = std::min(smin, ps[c]);
    }
    const float norm = std::sqrt(smax * smin);
    for (int64_t c = 0; c < in; ++c) ps[c] /= norm;

    double sq = 0, count = 0;
    for (size_t k = 0; k < ws.size(); ++k) {
      const Tensor& w = ws[k];
      // Effective weight Q(W diag(s)) diag(s)^-1.
      Tensor q = fake_quantize(scale_weight_columns(w, s), *formats[k]);
      for (int64_t k = 0; k < q.numel(); ++k) q.data<float>()[k] /= ps[k % in];
      double n_out = double(x.size(0) * w.size(0));
      sq += linear_output_mse(x, w, q) * n_out;
      count += n_out;
    }
    const double loss = sq / count;
    res.losses.push_back(loss);
    if (loss < res.loss) res.loss = loss, res.alpha = alpha, res.scales = s;
  }
  return res;
}

Tensor awq_search_clip(const Tensor& x_in, const Tensor& w_in, const QuantFormat& f, const AwqOptions& opt) {
  Tensor w = checked_weight(w_in, f, "awq_search_clip");
  const int64_t out = w.size(0), in = w.size(1), groups = f.n_groups(in);
  Tensor x_all = calibration_rows(x_in, in, "awq_search_clip");
  LB_CHECK(opt.max_clip_tokens > 0 && opt.clip_grid > 0, "awq_search_clip: max_clip_tokens and clip_grid must be > 0");
  // Strided subsample of the calibration rows (llm-awq: input_feat[:, 0::n // n_sample_token]).
  const int64_t step = std::max<int64_t>(1, x_all.size(0) / opt.max_clip_tokens);
  const int64_t n = (x_all.size(0) + step - 1) / step;
  Tensor x = Tensor::empty({n, in});
  for (int64_t t = 0; t < n; ++t)
    std::copy_n(x_all.data<float>() + t * step * in, in, x.data<float>() + t * in);

  const float* pw = w.data<float>();
  const bool ggml = f.is_ggml_block();
  const float tensor_scale = ggml ? 1.0f : compute_tensor_scale(f, w);
  std::vector<uint8_t> block(ggml ? size_t(f.block_bytes) : 0);
  Tensor clip = Tensor::empty({out, groups});
  float* pc = clip.data<float>();
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float m = 0;
      for (int64_t c = f.group_begin(g); c < f.group_end(g, in); ++c) m = std::max(m, std::fabs(pw[r * in + c]));
      pc[r * groups + g] = m;
    }
  if (f.kind == QuantKind::Ternary) return clip;  // parameters do not depend on the range

  const int n_shrink = std::max(1, int(opt.max_shrink * opt.clip_grid));
  std::vector<float> best_err(static_cast<size_t>(out));
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b = f.group_begin(g), len = f.group_end(g, in) - b;
    std::vector<float> org_max(static_cast<size_t>(out)), delta(static_cast<size_t>(out * len));
    std::vector<float> clamped(static_cast<size_t>(len)), y(static_cast<size_t>(n * out));
    for (int64_t r = 0; r < out; ++r) org_max[size_t(r)] = pc[r * groups + g];
    std::fill(best_err.begin(), best_err.end(), std::numeric_limits<float>::infinity());
    for (int i_s = 0; i_s < n_shrink; ++i_s) {
      const float shrink = 1.0f - float(i_s) / float(opt.clip_grid);
      for (int64_t r = 0; r < out; ++r) {
        const float mv = org_max[size_t(r)] * shrink;
        const float* wr = pw + r * in + b;
        for (int64_t c = 0; c < len; ++c) clamped[size_t(c)] = std::clamp(wr[c], -mv, mv);
        if (ggml) {  // one ggml block: the reference quantizer's parameters and codes for the clamped values
          f.quantize_row(clamped.data(), len, block.data());
          f.dequantize_row(block.data(), len, &delta[size_t(r * len)]);
          for (int64_t c = 0; c < len; ++c) delta[size_t(r * len + c)] -= wr[c];
          continue;
        }
        GroupParams p = fit_group_params(f, clamped.data(), len, tensor_scale);
        for (int64_t c = 0; c < len; ++c)
          delta[size_t(r * len + c)] = quantize_dequantize(f, clamped[size_t(c)], p) - wr[c];
      }
      // Per-group output error: Y = X[:, group] (Q - W)[:, group]^T, err_r = sum_t Y[t, r]^2.
      blas::gemm(false, true, n, out, len, 1.0f, x.data<float>() + b, in, delta.data(), len, 0.0f, y.data(), out);
      for (int64_t r = 0; r < out; ++r) {
        float e = 0;
        for (int64_t t = 0; t < n; ++t) e += y[size_t(t * out + r)] * y[size_t(t * out + r)];
        if (e < best_err[size_t(r)]) best_err[size_t(r)] = e, pc[r * groups + g] = org_max[size_t(r)] * shrink;
      }
    }
  }
  return clip;
}

AwqResult awq_quantize(const Tensor& x, const std::vector<Tensor>& weights, const QuantFormat& f, bool clip,
                       const AwqOptions& opt) {
  AwqResult res;
  res.scale = awq_search_scales(x, weights, f, Tensor(), opt);
  Tensor xs = divide_input_columns(x, res.scale.scales);
  for (const Tensor& w : weights) {
    Tensor ws = scale_weight_columns(w, res.scale.scales);
    if (opt.weighted_round && f.is_ggml_block() && ggml_block_grid_supported(f)) {
      res.q.push_back(rtn_quantize_weighted(ws, f, activation_mean_square(xs)));
    } else if (clip) {
      res.clip_max.push_back(awq_search_clip(xs, ws, f, opt));
      res.q.push_back(rtn_quantize_clipped(ws, f, res.clip_max.back()));
    } else {
      res.q.push_back(rtn_quantize(ws, f));
    }
  }
  return res;
}

}  // namespace lowbit
