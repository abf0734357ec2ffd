#include "lowbit/methods/awq.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "lowbit/core/blas.h"
#include "lowbit/core/threads.h"
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
  const int64_t numel = c.numel();
  for (int64_t i = 0; i < numel; ++i)
    LB_CHECK(std::isfinite(p[i]), who, ": non-finite calibration input at row ", i / in, ", channel ", i % in);
  return c;
}

Tensor checked_scales(const Tensor& s, int64_t in, const char* who) {
  LB_CHECK(s.defined() && s.numel() == in, who, ": scales must have ", in, " values, got ",
           s.defined() ? s.describe() : std::string("undefined"));
  Tensor c = s.to(Device::CPU).to(DType::F32).contiguous().view({in});
  const float* p = c.data<float>();
  for (int64_t i = 0; i < in; ++i)
    LB_CHECK(std::isfinite(p[i]) && p[i] > 0, who, ": scale ", i, " is ", p[i], ", must be finite and > 0");
  return c;
}

// G = X^T X [in, in] for x [n, in]: the upper triangles of f32 products of blocks of kGramRows
// rows (ssyrk), summed in double, mirrored and rounded to f32 at the end.
constexpr int64_t kGramRows = 1024;
std::vector<float> gram_matrix(const Tensor& x) {
  const int64_t n = x.size(0), in = x.size(1);
  std::vector<double> g(size_t(in * in), 0.0);
  std::vector<float> part(size_t(in * in));
  const float* px = x.data<float>();
  BlasThreadsGuard blas_threads;  // syrk has no split of its own (core/threads.h)
  for (int64_t t = 0; t < n; t += kGramRows) {
    const int64_t len = std::min(kGramRows, n - t);
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, int(in), int(len), 1.0f, px + t * in, int(in), 0.0f,
                part.data(), int(in));
    for (int64_t i = 0; i < in; ++i)
      for (int64_t j = i; j < in; ++j) g[size_t(i * in + j)] += double(part[size_t(i * in + j)]);
  }
  for (int64_t i = 0; i < in; ++i)
    for (int64_t j = i; j < in; ++j) part[size_t(i * in + j)] = part[size_t(j * in + i)] = float(g[size_t(i * in + j)]);
  return part;
}

// sum_r d_r^T G d_r = ||X D^T||_F^2 for D = W - Q (w, q [out, in] f32; the difference taken in
// double and rounded to f32, as linear_output_mse does), G = X^T X from gram_matrix.
double output_error_sum(const std::vector<float>& gram, const Tensor& w, const Tensor& q) {
  const int64_t out = w.size(0), in = w.size(1);
  std::vector<float> d(size_t(out * in)), dg(size_t(out * in));
  const float *pw = w.data<float>(), *pq = q.data<float>();
  for (size_t i = 0; i < d.size(); ++i) d[i] = float(double(pw[i]) - double(pq[i]));
  blas::gemm(false, false, out, in, in, 1.0f, d.data(), in, gram.data(), in, 0.0f, dg.data(), in);
  double s = 0;
  for (size_t i = 0; i < d.size(); ++i) s += double(d[i]) * double(dg[i]);
  return s;
}

}  // namespace

Tensor activation_mean_abs(const Tensor& x) {
  LB_CHECK(x.defined() && x.dim() >= 1, "activation_mean_abs: expected [..., in], got ", x.describe());
  Tensor c = calibration_rows(x, x.size(-1), "activation_mean_abs");
  const int64_t n = c.size(0), in = c.size(1);
  std::vector<double> sum(size_t(in), 0.0);
  const float* p = c.data<float>();
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < in; ++i) sum[size_t(i)] += std::fabs(double(p[t * in + i]));
  Tensor s = Tensor::empty({in});
  for (int64_t i = 0; i < in; ++i) s.data<float>()[i] = float(sum[size_t(i)] / double(n));
  return s;
}

Tensor activation_mean_square(const Tensor& x) {
  LB_CHECK(x.defined() && x.dim() >= 1, "activation_mean_square: expected [..., in], got ", x.describe());
  Tensor c = calibration_rows(x, x.size(-1), "activation_mean_square");
  const int64_t n = c.size(0), in = c.size(1);
  std::vector<double> sum(size_t(in), 0.0);
  const float* p = c.data<float>();
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < in; ++i) {
      const double v = double(p[t * in + i]);
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
  float* pw = w.data<float>();
  const float* ps = s.data<float>();
  for (int64_t r = 0; r < out; ++r)
    for (int64_t c = 0; c < in; ++c) pw[r * in + c] *= ps[c];
  return w;
}

Tensor divide_input_columns(const Tensor& x_in, const Tensor& s_in) {
  LB_CHECK(x_in.defined() && x_in.dim() >= 1, "divide_input_columns: expected X [..., in], got ", x_in.describe());
  const int64_t in = x_in.size(-1);
  Tensor s = checked_scales(s_in, in, "divide_input_columns");
  Tensor x = x_in.to(Device::CPU).to(DType::F32).contiguous().clone();
  float* px = x.data<float>();
  const float* ps = s.data<float>();
  const int64_t rows = x.numel() / in;
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t c = 0; c < in; ++c) px[t * in + c] /= ps[c];
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

  // The output error of a candidate Q, ||X (W - Q)^T||^2, costs n * out * in per grid point as one
  // product with the n calibration rows (up to 65,536 in the pipeline). With G = X^T X [in, in],
  // built once for n * in^2, it is sum_r d_r^T G d_r (d_r the rows of W - Q): out * in^2 per grid
  // point, independent of n. The cheaper of the two is used (both are the same sum, rounded
  // differently: the relative difference is ~1e-7, far below the gaps between grid points).
  const int64_t n = x.size(0);
  int64_t out_sum = 0;
  for (const Tensor& w : ws) out_sum += w.size(0);
  const double direct_cost = double(opt.n_grid) * double(n) * double(out_sum) * double(in);
  const double gram_cost = double(n) * double(in) * double(in) + double(opt.n_grid) * double(out_sum) * double(in * in);
  std::vector<float> gram;
  if (gram_cost < direct_cost) gram = gram_matrix(x);
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
      float* pq = q.data<float>();
      for (int64_t r = 0; r < w.size(0); ++r)
        for (int64_t c = 0; c < in; ++c) pq[r * in + c] /= ps[c];
      sq += gram.empty() ? linear_output_mse(x, w, q) * double(n * w.size(0)) : output_error_sum(gram, w, q);
      count += double(n * w.size(0));
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
  LB_CHECK(x_in.defined() && x_in.dim() >= 1 && x_in.size(-1) == in && x_in.numel() > 0,
           "awq_search_clip: calibration inputs must be [n, ", in, "], got ",
           x_in.defined() ? x_in.describe() : std::string("undefined"));
  LB_CHECK(opt.max_clip_tokens > 0 && opt.clip_grid > 0, "awq_search_clip: max_clip_tokens and clip_grid must be > 0");
  // Strided subsample of the calibration rows (llm-awq: input_feat[:, 0::n // n_sample_token]),
  // taken before the f32 copy and the finiteness check (only the sampled rows are read).
  const Tensor x_all = x_in.to(Device::CPU).contiguous().view({-1, in});
  const int64_t step = std::max<int64_t>(1, x_all.size(0) / opt.max_clip_tokens);
  const int64_t n = (x_all.size(0) + step - 1) / step;
  Tensor x_sub = Tensor::empty({n, in}, x_all.dtype());
  for (int64_t t = 0; t < n; ++t) x_sub.slice(0, t, t + 1).copy_(x_all.slice(0, t * step, t * step + 1));
  Tensor x = calibration_rows(x_sub, in, "awq_search_clip");

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
