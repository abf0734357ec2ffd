#include "lowbit/methods/adaround.h"

#include <algorithm>
#include <cmath>

#include "lowbit/core/format_traits.h"
#include "lowbit/ops/ops.h"
#include "lowbit/quant/quantize.h"

namespace lowbit {

namespace {

void check_int_format(const QuantFormat& f, const char* who) {
  if (f.kind != QuantKind::IntAsym && f.kind != QuantKind::IntSym)
    throw_error(who, ": format ", f.name, " is not an integer format (int*g*, int*pc and their symmetric forms)");
}

Tensor checked_hessian(const Tensor& h, int64_t in, const char* who) {
  Tensor hc = h.to(Device::CPU).to(DType::F64).contiguous();
  if (hc.dim() != 2 || hc.size(0) != in || hc.size(1) != in) throw_error(who, ": Hessian must be [", in, ", ", in, "]");
  for (int64_t i = 0; i < in * in; ++i)
    if (!std::isfinite(hc.data<double>()[i])) throw_error(who, ": the Hessian has a non-finite element at ", i);
  return hc;
}

// rec(Q) = 1/2 sum_rows e H e^T with E = W - Q; eh (if non-null) gets E H.
double reconstruction(const Tensor& w, const Tensor& h, const std::vector<double>& q, std::vector<double>* eh) {
  const int64_t out = w.size(0), in = w.size(1);
  Tensor e = Tensor::empty({out, in}, DType::F64);
  double* E = e.data<double>();
  const float* W = w.data<float>();
  for (int64_t i = 0; i < out * in; ++i) E[i] = double(W[i]) - q[size_t(i)];
  Tensor g = Tensor::empty({out, in}, DType::F64);
  ops::gemm(e, false, h, false, g, 1.0, 0.0);
  const double* G = g.data<double>();
  double s = 0;
  for (int64_t i = 0; i < out * in; ++i) s += E[i] * G[i];
  if (eh) eh->assign(G, G + out * in);
  return 0.5 * s;
}

// Adam (Kingma & Ba; PyTorch's defaults beta1 0.9, beta2 0.999, eps 1e-8) on a flat vector.
struct Adam {
  explicit Adam(size_t n) : m(n, 0.0), v(n, 0.0) {}
  std::vector<double> m, v;
  int64_t t = 0;
  void step(std::vector<double>& x, const std::vector<double>& g, double lr, size_t b = 0, size_t e = SIZE_MAX) {
    if (e == SIZE_MAX) e = x.size();
    const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
    const double c1 = 1 - std::pow(b1, double(t)), c2 = 1 - std::pow(b2, double(t));
    for (size_t i = b; i < e; ++i) ops::adaround::adam(x[i], m[i], v[i], g[i], lr, b1, b2, eps, c1, c2);
  }
};

}  // namespace

double rectified_sigmoid(double v, double zeta, double gamma) {
  return ops::adaround::soft<double>(v, 0, 1, 0, {0, 1, zeta, gamma}).h;
}

double rectified_sigmoid_grad(double v, double zeta, double gamma) {
  return ops::adaround::soft<double>(v, 0, 1, 0, {0, 1, zeta, gamma}).dhdv;
}

// ---- AdaRound ------------------------------------------------------------------------------------

AdaRoundProblem::AdaRoundProblem(const Tensor& w_in, const Tensor& h_in, const QuantFormat& f, const AdaRoundOptions& o)
    : f_(f), o_(o) {
  check_int_format(f, "adaround");
  if (!(o.zeta > 1) || !(o.gamma < 0)) throw_error("adaround: the rectified sigmoid needs zeta > 1 and gamma < 0");
  w_ = checked_weight(w_in, f, "adaround");
  out_ = w_.size(0);
  in_ = w_.size(1);
  h_ = checked_hessian(h_in, in_, "adaround");
  G_ = f.n_groups(in_);
  ts_ = compute_tensor_scale(f, w_);
  params_ = fit_all_group_params(f, w_, ts_);
  qmin_ = int_code_min(f);
  qmax_ = float(f.qmax());
  const size_t n = size_t(out_ * in_);
  floor_.resize(n);
  scale_.resize(n);
  zero_.resize(n);
  v0_.resize(n);
  const float* W = w_.data<float>();
  for (int64_t r = 0; r < out_; ++r)
    for (int64_t j = 0; j < in_; ++j) {
      const size_t k = size_t(r * in_ + j);
      const GroupParams& p = params_[size_t(r * G_ + (f.group_size ? j / f.group_size : 0))];
      scale_[k] = p.scale;
      zero_[k] = p.zero;
      if (!(p.scale > 0)) {  // an all-zero group: code z, nothing to learn
        floor_[k] = p.zero;
        v0_[k] = -10;
        continue;
      }
      const double x = double(W[k]) / double(p.scale);
      const double fl = std::floor(x);
      floor_[k] = fl + double(p.zero);
      // h(V0) = rest: sigmoid(V0) = (rest - gamma) / (zeta - gamma)
      const double rest = std::clamp(x - fl, 0.0, 1.0);
      const double sg = (rest - o.gamma) / (o.zeta - o.gamma);
      v0_[k] = std::log(sg / (1 - sg));
    }
}

double AdaRoundProblem::rec(const std::vector<double>& q, std::vector<double>* eh) const {
  return reconstruction(w_, h_, q, eh);
}

double AdaRoundProblem::loss(const std::vector<double>& v, double beta, double reg_weight, std::vector<double>* grad) const {
  const size_t n = size_t(out_ * in_);
  if (v.size() != n) throw_error("adaround: ", v.size(), " rounding variables for ", n, " weights");
  // The per-weight arithmetic of ops/adaround_math.h (the loop's ops call the same functions).
  const ops::adaround::Grid g = grid();
  q_.resize(n);
  for (size_t k = 0; k < n; ++k) q_[k] = ops::adaround::soft<double>(v[k], floor_[k], scale_[k], zero_[k], g).q;
  double l = rec(q_, grad ? &eh_ : nullptr);
  if (grad) grad->assign(n, 0.0);
  for (size_t k = 0; k < n; ++k) {
    const ops::adaround::Soft<double> p = ops::adaround::soft<double>(v[k], floor_[k], scale_[k], zero_[k], g);
    if (reg_weight > 0) l += ops::adaround::reg_term(p.h, beta, reg_weight);
    if (grad) (*grad)[k] = ops::adaround::grad(p, eh_[k], scale_[k], beta, reg_weight);
  }
  return l;
}

double AdaRoundProblem::hard_loss(const std::vector<double>& v, std::vector<double>* q_out) const {
  const size_t n = size_t(out_ * in_);
  std::vector<double> q(n);
  for (size_t k = 0; k < n; ++k) {
    const double c = std::clamp(floor_[k] + (v[k] >= 0 ? 1.0 : 0.0), double(qmin_), double(qmax_));
    q[k] = (c - zero_[k]) * scale_[k];
  }
  const double l = rec(q, nullptr);
  if (q_out) *q_out = std::move(q);
  return l;
}

double AdaRoundProblem::rtn_loss() const {
  const size_t n = size_t(out_ * in_);
  std::vector<double> q(n);
  const float* W = w_.data<float>();
  for (int64_t r = 0; r < out_; ++r)
    for (int64_t j = 0; j < in_; ++j) {
      const size_t k = size_t(r * in_ + j);
      q[k] = quantize_dequantize(f_, W[k], params_[size_t(r * G_ + (f_.group_size ? j / f_.group_size : 0))]);
    }
  return rec(q, nullptr);
}

AdaRoundResult adaround_quantize(const Tensor& w, const Tensor& h, const QuantFormat& f, const AdaRoundOptions& o) {
  if (o.iters < 0) throw_error("adaround: iterations must be >= 0, got ", o.iters);
  if (!(o.lr > 0) || !(o.lambda >= 0) || !(o.beta_start > 0) || !(o.beta_end > 0) || !(o.warmup >= 0 && o.warmup <= 1))
    throw_error("adaround: needs lr > 0, lambda >= 0, beta > 0 and warm-up in [0, 1]");
  // Set up on the host; the loop on W's device, in f64: soft error -> E H -> Adam step.
  const Device dev = w.device();
  AdaRoundProblem p(w.to(Device::CPU), h.to(Device::CPU), f, o);
  const Shape shape{p.out(), p.in()};
  auto up = [&](const std::vector<double>& x) { return Tensor::from_vector(x, shape).to(dev); };
  Tensor V = up(p.v_init()), FL = up(p.floors()), S = up(p.scales()), Z = up(p.zeros());
  const Tensor WD = p.weight().to(DType::F64).to(dev), H = p.hessian().to(dev);
  Tensor M = Tensor::zeros(shape, DType::F64, dev), M2 = Tensor::zeros(shape, DType::F64, dev);
  Tensor E = Tensor::empty(shape, DType::F64, dev), EH = Tensor::empty(shape, DType::F64, dev);
  const ops::adaround::Grid grid = p.grid();
  const int warm = int(std::lround(o.warmup * o.iters));
  for (int t = 0; t < o.iters; ++t) {
    ops::AdaRoundStep st;
    st.beta = o.beta_start;
    st.lr = o.lr;
    st.t = t + 1;
    if (t >= warm) {  // BRECQ's LinearTempDecay: from beta_start at the end of the warm-up to beta_end
      const double rel = double(t - warm) / double(std::max(1, o.iters - warm));
      st.beta = o.beta_end + (o.beta_start - o.beta_end) * std::max(0.0, 1 - rel);
      st.reg = o.lambda;
    }
    ops::adaround_soft_error(V, WD, FL, S, Z, grid, E);
    ops::gemm(E, false, H, false, EH, 1.0, 0.0);
    ops::adaround_adam_step(V, M, M2, EH, FL, S, Z, grid, st);
  }
  const Tensor vc = V.to(Device::CPU);
  std::vector<double> v(vc.data<double>(), vc.data<double>() + vc.numel());
  AdaRoundResult res;
  res.loss_rtn = p.rtn_loss();
  std::vector<double> q;
  res.loss = p.hard_loss(v, &q);
  // Flips against round-to-nearest, undecided soft values.
  const Tensor& wc = p.weight();  // checked, f32, on the CPU
  const float* W = wc.data<float>();
  const int64_t in = p.in(), G = f.n_groups(in);
  for (int64_t r = 0; r < p.out(); ++r)
    for (int64_t j = 0; j < in; ++j) {
      const size_t k = size_t(r * in + j);
      const float nearest = quantize_dequantize(f, W[k], p.params()[size_t(r * G + (f.group_size ? j / f.group_size : 0))]);
      if (float(q[k]) != nearest) ++res.flipped;
      if (std::fabs(2 * rectified_sigmoid(v[k], o.zeta, o.gamma) - 1) < 0.99) ++res.undecided;
    }
  Tensor qv = Tensor::empty({p.out(), in});
  for (size_t k = 0; k < q.size(); ++k) qv.data<float>()[k] = float(q[k]);
  res.q = quantize_with_params(qv, f, p.params(), p.tensor_scale());
  res.v = std::move(v);
  return res;
}

std::string AdaRoundMethod::options_key() const {
  return "iters=" + std::to_string(a_.iters) + ",lr=" + key_number(a_.lr) + ",lambda=" + key_number(a_.lambda) +
         ",beta=" + key_number(a_.beta_start) + ">" + key_number(a_.beta_end) + ",warmup=" + key_number(a_.warmup) +
         ",zeta=" + key_number(a_.zeta) + ",gamma=" + key_number(a_.gamma);
}

GptqResult AdaRoundMethod::solve(const Tensor& w, const Tensor& h, const QuantFormat& f) {
  GptqResult r;
  r.q = adaround_quantize(w, h, f, a_).q;  // the loop on w's device (the GPU when the pipeline runs there)
  return r;
}

// ---- AdaQuant ------------------------------------------------------------------------------------

AdaQuantResult adaquant_quantize(const Tensor& w_in, const Tensor& h_in, const QuantFormat& f, const AdaQuantOptions& o) {
  check_int_format(f, "adaquant");
  if (o.iters < 0) throw_error("adaquant: iterations must be >= 0, got ", o.iters);
  if (!(o.lr_w >= 0) || !(o.lr_range >= 0)) throw_error("adaquant: learning rates must be >= 0");
  const Tensor w = checked_weight(w_in, f, "adaquant");
  const int64_t out = w.size(0), in = w.size(1), G = f.n_groups(in);
  const Tensor h = checked_hessian(h_in, in, "adaquant");
  const float ts = compute_tensor_scale(f, w);
  std::vector<GroupParams> params = fit_all_group_params(f, w, ts);
  const double qmin = int_code_min(f), qmax = double(f.qmax());
  const float* W = w.data<float>();
  const size_t n = size_t(out * in);
  auto group_of = [&](int64_t j) { return f.group_size ? j / f.group_size : 0; };
  // Trainable: x = W + V (element-wise) then the group scales s (one vector for Adam).
  std::vector<double> x(n + params.size()), g(x.size(), 0.0);
  for (size_t k = 0; k < n; ++k) x[k] = W[k];
  const double lr_w = o.lr_w, lr_s = o.lr_range / (qmax - qmin);
  for (size_t i = 0; i < params.size(); ++i) x[n + i] = params[i].scale;
  auto scale_of = [&](const std::vector<double>& xs, int64_t r, int64_t j) { return xs[n + size_t(r * G + group_of(j))]; };
  // Q, the clamp mask and the codes for the current x.
  std::vector<double> q(n), code(n);
  std::vector<uint8_t> inside(n);
  auto forward = [&](const std::vector<double>& xs) {
    for (int64_t r = 0; r < out; ++r)
      for (int64_t j = 0; j < in; ++j) {
        const size_t k = size_t(r * in + j);
        const double s = scale_of(xs, r, j), z = params[size_t(r * G + group_of(j))].zero;
        if (!(s > 0)) {
          q[k] = 0;
          code[k] = z;
          inside[k] = 0;
          continue;
        }
        const double c = std::nearbyint(xs[k] / s) + z;
        inside[k] = c >= qmin && c <= qmax;
        code[k] = std::clamp(c, qmin, qmax);
        q[k] = (code[k] - z) * s;
      }
  };
  AdaQuantResult res;
  {
    std::vector<double> q0(n);
    for (int64_t r = 0; r < out; ++r)
      for (int64_t j = 0; j < in; ++j)
        q0[size_t(r * in + j)] = quantize_dequantize(f, W[r * in + j], params[size_t(r * G + group_of(j))]);
    res.loss_rtn = reconstruction(w, h, q0, nullptr);
  }
  Adam adam(x.size());
  std::vector<double> eh;
  for (int t = 0; t < o.iters; ++t) {
    forward(x);
    reconstruction(w, h, q, &eh);
    std::fill(g.begin(), g.end(), 0.0);
    for (int64_t r = 0; r < out; ++r)
      for (int64_t j = 0; j < in; ++j) {
        const size_t k = size_t(r * in + j);
        const double dq = -eh[k];  // d rec / dQ
        const size_t gi = n + size_t(r * G + group_of(j));
        const double s = x[gi], z = params[gi - n].zero;
        if (!(s > 0)) continue;
        if (inside[k]) {
          g[k] = dq;  // STE: dQ/dx = 1 inside the grid
          g[gi] += dq * ((code[k] - z) - x[k] / s);
        } else {
          g[gi] += dq * (code[k] - z);
        }
      }
    ++adam.t;
    adam.step(x, g, lr_w, 0, n);
    if (o.learn_scales) {
      adam.step(x, g, lr_s, n, x.size());
      for (size_t i = 0; i < params.size(); ++i)  // a step stays positive (and the grid finite)
        if (params[i].scale > 0) x[n + i] = std::max(x[n + i], double(params[i].scale) * 1e-3);
    }
  }
  // The stored f16 steps, then the codes of W + V on them.
  for (size_t i = 0; i < params.size(); ++i) {
    if (!(params[i].scale > 0)) continue;
    const float s16 = fmt_f16_to_f32(fmt_f32_to_f16(float(x[n + i])));
    if (s16 > 0 && std::isfinite(s16)) params[i].scale = s16;
    x[n + i] = params[i].scale;
  }
  forward(x);
  res.loss = reconstruction(w, h, q, nullptr);
  Tensor qv = Tensor::empty({out, in});
  for (size_t k = 0; k < n; ++k) qv.data<float>()[k] = float(q[k]);
  res.q = quantize_with_params(qv, f, params, ts);
  return res;
}

std::string AdaQuantMethod::options_key() const {
  return "iters=" + std::to_string(a_.iters) + ",lr_w=" + key_number(a_.lr_w) + ",lr_range=" + key_number(a_.lr_range) +
         ",scales=" + std::to_string(a_.learn_scales);
}

GptqResult AdaQuantMethod::solve(const Tensor& w, const Tensor& h, const QuantFormat& f) {
  GptqResult r;
  r.q = adaquant_quantize(w.to(Device::CPU), h.to(Device::CPU), f, a_).q;
  return r;
}

}  // namespace lowbit
