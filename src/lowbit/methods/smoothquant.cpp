#include "lowbit/methods/smoothquant.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/variable.h"
#include "lowbit/core/blas.h"
#include "lowbit/core/error.h"
#include "lowbit/methods/pipeline.h"
#include "lowbit/quant/quantize.h"

namespace lowbit {

SmoothStats collect_smooth_stats(LlamaModel& model, const Tensor& tokens_in, int64_t batch, int64_t sample_rows) {
  LB_CHECK(tokens_in.dim() == 2 && tokens_in.dtype() == DType::I32 && tokens_in.size(0) >= 1,
           "smoothquant: calibration tokens must be i32 [N, T], got ", tokens_in.describe());
  LB_CHECK(batch >= 1, "smoothquant: batch must be >= 1, got ", batch);
  LB_CHECK(sample_rows >= 0, "smoothquant: sample_rows must be >= 0, got ", sample_rows);
  const Tensor tokens = tokens_in.contiguous();
  const int L = model.n_layers();
  const int64_t D = model.config().dim, F = model.config().hidden_dim;
  SmoothStats st;
  st.attn.assign(size_t(L), std::vector<double>(size_t(D), 0.0));
  st.ffn.assign(size_t(L), std::vector<double>(size_t(D), 0.0));
  st.down.assign(size_t(L), std::vector<double>(size_t(F), 0.0));
  // Sampled rows: every stride-th calibration token, at most sample_rows per point.
  const int64_t total_rows = tokens.size(0) * tokens.size(1);
  const int64_t stride = sample_rows > 0 ? std::max<int64_t>(1, total_rows / sample_rows) : 0;
  std::vector<std::vector<float>> rows_attn(static_cast<size_t>(L)), rows_ffn(static_cast<size_t>(L)),
      rows_down(static_cast<size_t>(L));
  int64_t row_base = 0;  // global token index of the current forward's first row
  std::vector<std::pair<std::string, std::shared_ptr<Linear>*>> slots;
  for (int i = 0; i < L; ++i)
    for (auto& [name, slot] : model.block(i).linears())
      if (name == "self_attn.q_proj" || name == "mlp.gate_proj" || name == "mlp.down_proj")
        slots.emplace_back(std::to_string(i) + ":" + name, slot);
  bool finite = true;
  LinearHookScope hooks(slots, [&](const std::string& key, const Tensor& x) {
    const auto colon = key.find(':');
    const int layer = std::stoi(key.substr(0, colon));
    const std::string name = key.substr(colon + 1);
    std::vector<double>& m = name == "self_attn.q_proj" ? st.attn[size_t(layer)]
                             : name == "mlp.gate_proj"  ? st.ffn[size_t(layer)]
                                                        : st.down[size_t(layer)];
    std::vector<float>& kept = name == "self_attn.q_proj" ? rows_attn[size_t(layer)]
                               : name == "mlp.gate_proj"  ? rows_ffn[size_t(layer)]
                                                          : rows_down[size_t(layer)];
    const Tensor h = x.to(Device::CPU).to(DType::F32).contiguous();
    const int64_t n = h.numel() / h.size(-1), in = h.size(-1);
    LB_CHECK(in == int64_t(m.size()), "smoothquant: ", name, " input has ", in, " channels, expected ", m.size());
    const float* p = h.data<float>();
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < in; ++j) {
        const double a = std::fabs(double(p[r * in + j]));
        if (!std::isfinite(a)) finite = false;
        m[size_t(j)] = std::max(m[size_t(j)], a);
      }
    if (stride > 0)
      for (int64_t r = 0; r < n; ++r)
        if ((row_base + r) % stride == 0 && int64_t(kept.size()) < sample_rows * in)
          kept.insert(kept.end(), p + r * in, p + (r + 1) * in);
  });
  NoGradGuard ng;
  for (int64_t s = 0; s < tokens.size(0); s += batch) {
    const int64_t e = std::min(tokens.size(0), s + batch);
    row_base = s * tokens.size(1);
    model.forward(tokens.slice(0, s, e).contiguous());
  }
  if (!finite) throw_error("smoothquant: the model's activations are not finite on the calibration data");
  if (sample_rows > 0) {
    auto to_tensors = [](std::vector<std::vector<float>>& rows, int64_t in) {
      std::vector<Tensor> out;
      for (auto& r : rows) {
        const int64_t n = int64_t(r.size()) / in;
        out.push_back(Tensor::from_vector(std::move(r), {n, in}));
      }
      return out;
    };
    st.attn_x = to_tensors(rows_attn, D);
    st.ffn_x = to_tensors(rows_ffn, D);
    st.down_x = to_tensors(rows_down, F);
  }
  return st;
}

std::vector<double> smooth_scales(const std::vector<double>& act_max, const std::vector<const Tensor*>& readers,
                                  double alpha) {
  LB_CHECK(alpha >= 0 && alpha <= 1, "smoothquant: alpha must be in [0, 1], got ", alpha);
  const size_t in = act_max.size();
  std::vector<double> wmax(in, 0.0);
  for (const Tensor* t : readers) {
    LB_CHECK(t->dim() == 2 && size_t(t->size(1)) == in && t->dtype() == DType::F32 && t->device() == Device::CPU,
             "smoothquant: a weight reading ", in, " channels must be f32 [out, ", in, "] on the host, got ", t->describe());
    const Tensor c = t->contiguous();
    const float* p = c.data<float>();
    for (int64_t r = 0; r < c.size(0); ++r)
      for (size_t j = 0; j < in; ++j) wmax[j] = std::max(wmax[j], std::fabs(double(p[size_t(r) * in + j])));
  }
  std::vector<double> s(in, 1.0);
  for (size_t j = 0; j < in; ++j)
    if (act_max[j] > 0 && wmax[j] > 0) s[j] = std::pow(act_max[j], alpha) / std::pow(wmax[j], 1 - alpha);
  return s;
}

namespace {
// X W^T for f32 [R, in] x and [out, in] w (host, contiguous).
Tensor times_transpose(const Tensor& x, const Tensor& w) {
  const int64_t R = x.size(0), in = x.size(1), out = w.size(0);
  Tensor y = Tensor::zeros({R, out});
  blas::gemm(false, true, R, out, in, 1.0f, x.data<float>(), in, w.data<float>(), in, 0.0f, y.data<float>(), out);
  return y;
}

// The objective with each reader's reference output X W^T given.
double smooth_error_given(const std::vector<double>& act_max, const Tensor& x, const std::vector<const Tensor*>& readers,
                          const std::vector<Tensor>& refs, double alpha, const QuantFormat& format,
                          const ActQuantSpec& act) {
  const std::vector<double> s = smooth_scales(act_max, readers, alpha);
  const int64_t R = x.size(0), in = x.size(1);
  Tensor xs = Tensor::empty({R, in});
  const float* px = x.data<float>();
  float* pxs = xs.data<float>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < in; ++j) pxs[r * in + j] = float(double(px[r * in + j]) / s[size_t(j)]);
  if (act.enabled()) xs = act_fake_quant(Var(xs, false), act).value().contiguous();
  double err = 0;
  for (size_t k = 0; k < readers.size(); ++k) {
    Tensor ws = readers[k]->contiguous().clone();
    float* pw = ws.data<float>();
    for (int64_t o = 0; o < ws.size(0); ++o)
      for (int64_t j = 0; j < in; ++j) pw[o * in + j] = float(double(pw[o * in + j]) * s[size_t(j)]);
    const Tensor y = times_transpose(xs, fake_quantize(ws, format).contiguous());
    const float* a = y.data<float>();
    const float* b = refs[k].data<float>();
    for (int64_t i = 0; i < y.numel(); ++i) {
      const double d = double(a[i]) - double(b[i]);
      err += d * d;
    }
  }
  return err;
}

// Each reader's full-precision output X W^T (x contiguous).
std::vector<Tensor> reference_outputs(const Tensor& x, const std::vector<const Tensor*>& readers) {
  std::vector<Tensor> refs;
  for (const Tensor* w : readers) refs.push_back(times_transpose(x, w->contiguous()));
  return refs;
}

void check_rows(const Tensor& x, size_t in) {
  LB_CHECK(x.defined() && x.dim() == 2 && x.size(0) >= 1 && size_t(x.size(1)) == in && x.dtype() == DType::F32 &&
               x.device() == Device::CPU,
           "smoothquant: the alpha search needs sampled f32 [R, ", in, "] rows on the host, got ",
           x.defined() ? x.describe() : std::string("none"));
}
}  // namespace

double smooth_error(const std::vector<double>& act_max, const Tensor& x_in, const std::vector<const Tensor*>& readers,
                    double alpha, const QuantFormat& format, const ActQuantSpec& act) {
  check_rows(x_in, act_max.size());
  const Tensor x = x_in.contiguous();
  return smooth_error_given(act_max, x, readers, reference_outputs(x, readers), alpha, format, act);
}

namespace {
// The point's alpha: o.alpha, or the grid's minimiser of the objective (first of equals).
double point_alpha(const SmoothOptions& o, const std::vector<double>& act_max, const Tensor& x_in,
                   const std::vector<const Tensor*>& readers) {
  if (!o.search) return o.alpha;
  LB_CHECK(o.format != nullptr, "smoothquant: the alpha search needs the weight format");
  LB_CHECK(!o.grid.empty(), "smoothquant: the alpha search needs a non-empty grid");
  check_rows(x_in, act_max.size());
  const Tensor x = x_in.contiguous();
  const std::vector<Tensor> refs = reference_outputs(x, readers);
  double best = o.grid[0], best_err = std::numeric_limits<double>::infinity();
  for (const double a : o.grid) {
    const double e = smooth_error_given(act_max, x, readers, refs, a, *o.format, o.act);
    if (e < best_err) best_err = e, best = a;
  }
  return best;
}

void scale_columns(Tensor& w, const std::vector<double>& s) {
  float* p = w.data<float>();
  const int64_t rows = w.size(0), cols = w.size(1);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) p[r * cols + j] = float(double(p[r * cols + j]) * s[size_t(j)]);
}
void divide_rows(Tensor& w, const std::vector<double>& s) {
  float* p = w.data<float>();
  const int64_t rows = w.size(0), cols = w.size(1);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) p[r * cols + j] = float(double(p[r * cols + j]) / s[size_t(r)]);
}
void divide_vector(Tensor& v, const std::vector<double>& s) {
  float* p = v.data<float>();
  for (int64_t j = 0; j < v.numel(); ++j) p[j] = float(double(p[j]) / s[size_t(j)]);
}
}  // namespace

SmoothReport smooth_weights(LlamaWeights& w, const SmoothStats& st, const SmoothOptions& o) {
  LB_CHECK(st.attn.size() == w.layers.size() && st.ffn.size() == w.layers.size() && st.down.size() == w.layers.size(),
           "smoothquant: statistics for ", st.attn.size(), " layers, the model has ", w.layers.size());
  if (o.search)
    LB_CHECK(st.attn_x.size() == w.layers.size() && st.ffn_x.size() == w.layers.size() &&
                 st.down_x.size() == w.layers.size(),
             "smoothquant: the alpha search needs sampled rows for every layer (collect_smooth_stats' sample_rows)");
  SmoothReport rep;
  rep.min_scale = std::numeric_limits<double>::infinity();
  auto note = [&](const std::vector<double>& s) {
    ++rep.points;
    for (double v : s) {
      rep.max_scale = std::max(rep.max_scale, v);
      rep.min_scale = std::min(rep.min_scale, v);
    }
  };
  for (size_t i = 0; i < w.layers.size(); ++i) {
    LayerWeights& l = w.layers[i];
    // Owned, contiguous f32 host copies (the fold writes into them).
    for (Tensor* t : {&l.attn_norm, &l.ffn_norm, &l.wq, &l.wk, &l.wv, &l.w_gate, &l.w_up, &l.w_down})
      *t = t->to(Device::CPU).to(DType::F32).contiguous().clone();
    const double aa = point_alpha(o, st.attn[i], o.search ? st.attn_x[i] : Tensor(), {&l.wq, &l.wk, &l.wv});
    rep.alphas.push_back(aa);
    const std::vector<double> sa = smooth_scales(st.attn[i], {&l.wq, &l.wk, &l.wv}, aa);
    divide_vector(l.attn_norm, sa);
    for (Tensor* t : {&l.wq, &l.wk, &l.wv}) scale_columns(*t, sa);
    note(sa);
    const double af = point_alpha(o, st.ffn[i], o.search ? st.ffn_x[i] : Tensor(), {&l.w_gate, &l.w_up});
    rep.alphas.push_back(af);
    const std::vector<double> sf = smooth_scales(st.ffn[i], {&l.w_gate, &l.w_up}, af);
    divide_vector(l.ffn_norm, sf);
    for (Tensor* t : {&l.w_gate, &l.w_up}) scale_columns(*t, sf);
    note(sf);
    if (o.down) {
      const double ad = point_alpha(o, st.down[i], o.search ? st.down_x[i] : Tensor(), {&l.w_down});
      rep.alphas.push_back(ad);
      const std::vector<double> sd = smooth_scales(st.down[i], {&l.w_down}, ad);
      divide_rows(l.w_up, sd);
      scale_columns(l.w_down, sd);
      note(sd);
    }
  }
  if (rep.points == 0) rep.min_scale = 0;
  return rep;
}

}  // namespace lowbit
