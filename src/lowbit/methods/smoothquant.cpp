#include "lowbit/methods/smoothquant.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "lowbit/autograd/variable.h"
#include "lowbit/core/error.h"
#include "lowbit/methods/pipeline.h"

namespace lowbit {

SmoothStats collect_smooth_stats(LlamaModel& model, const Tensor& tokens_in, int64_t batch) {
  LB_CHECK(tokens_in.dim() == 2 && tokens_in.dtype() == DType::I32 && tokens_in.size(0) >= 1,
           "smoothquant: calibration tokens must be i32 [N, T], got ", tokens_in.describe());
  LB_CHECK(batch >= 1, "smoothquant: batch must be >= 1, got ", batch);
  const Tensor tokens = tokens_in.contiguous();
  const int L = model.n_layers();
  const int64_t D = model.config().dim, F = model.config().hidden_dim;
  SmoothStats st;
  st.attn.assign(size_t(L), std::vector<double>(size_t(D), 0.0));
  st.ffn.assign(size_t(L), std::vector<double>(size_t(D), 0.0));
  st.down.assign(size_t(L), std::vector<double>(size_t(F), 0.0));
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
  });
  NoGradGuard ng;
  for (int64_t s = 0; s < tokens.size(0); s += batch) {
    const int64_t e = std::min(tokens.size(0), s + batch);
    model.forward(tokens.slice(0, s, e).contiguous());
  }
  if (!finite) throw_error("smoothquant: the model's activations are not finite on the calibration data");
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
    const std::vector<double> sa = smooth_scales(st.attn[i], {&l.wq, &l.wk, &l.wv}, o.alpha);
    divide_vector(l.attn_norm, sa);
    for (Tensor* t : {&l.wq, &l.wk, &l.wv}) scale_columns(*t, sa);
    note(sa);
    const std::vector<double> sf = smooth_scales(st.ffn[i], {&l.w_gate, &l.w_up}, o.alpha);
    divide_vector(l.ffn_norm, sf);
    for (Tensor* t : {&l.w_gate, &l.w_up}) scale_columns(*t, sf);
    note(sf);
    if (o.down) {
      const std::vector<double> sd = smooth_scales(st.down[i], {&l.w_down}, o.alpha);
      divide_rows(l.w_up, sd);
      scale_columns(l.w_down, sd);
      note(sd);
    }
  }
  if (rep.points == 0) rep.min_scale = 0;
  return rep;
}

}  // namespace lowbit
