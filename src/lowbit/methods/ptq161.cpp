#include "lowbit/methods/ptq161.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>

#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/optim.h"
#include "lowbit/core/blas.h"
#include "lowbit/core/threads.h"
#include "lowbit/methods/gptq.h"
#include "lowbit/methods/rtn.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"
#include "lowbit/quant/ptq161_tensor.h"

namespace lowbit {

namespace {

double round_f16(double v) { return double(f16_to_f32(f32_to_f16(float(v)))); }

// Weighted error sum_i e_i^T H e_i of the rows of e [out, in] (row-major, double).
double quad_error(const std::vector<double>& e, const std::vector<double>& h, int64_t out, int64_t in) {
  std::vector<double> eh(static_cast<size_t>(out * in));
  BlasThreadsGuard blas;
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(out), int(in), int(in), 1.0, e.data(), int(in), h.data(),
              int(in), 0.0, eh.data(), int(in));
  double s = 0;
  for (size_t i = 0; i < e.size(); ++i) s += e[i] * eh[i];
  return s;
}

// Residual w - decode(l) in double (f32-precision factors, no f16 rounding).
std::vector<double> residual(const float* w, const Ptq161Layer& l) {
  const Tensor wq = l.dequantize(false);
  const float* pq = wq.data<float>();
  std::vector<double> e(static_cast<size_t>(l.out * l.in));
  for (size_t i = 0; i < e.size(); ++i) e[i] = double(w[i]) - double(pq[i]);
  return e;
}

// The binary factors of a Ptq161Layer as trainable Vars: W = (alpha 1^T o S + mu 1^T o N) o (1 r^T) + C,
// S the signs, N the binary-column indicator, C the decoded salient part (constants).
class Ptq161TrainLinear : public Linear {
 public:
  Ptq161TrainLinear(const Ptq161Layer& l, Tensor bias, Device dev) : bias_(std::move(bias)) {
    const int64_t out = l.out, in = l.in;
    std::vector<float> a(static_cast<size_t>(out)), m(static_cast<size_t>(out)), r(static_cast<size_t>(in));
    for (int64_t i = 0; i < out; ++i) a[size_t(i)] = float(l.alpha[size_t(i)]), m[size_t(i)] = float(l.mu[size_t(i)]);
    for (int64_t j = 0; j < in; ++j) r[size_t(j)] = float(l.col[size_t(j)]);
    alpha_ = Var(Tensor::from_vector(a, {out, 1}).to(dev), true);
    mu_ = Var(Tensor::from_vector(m, {out, 1}).to(dev), true);
    col_ = Var(Tensor::from_vector(r, {1, in}).to(dev), true);
    Tensor S = Tensor::zeros({out, in}), N = Tensor::zeros({out, in}), C = Tensor::zeros({out, in});
    for (int64_t i = 0; i < out; ++i)
      for (int64_t j = 0; j < in; ++j) {
        const size_t k = size_t(i * in + j);
        if (l.mask[size_t(j)]) {
          C.data<float>()[k] = int_value(l.q4[k], l.s4[size_t(i)], l.z4[size_t(i)]);
        } else {
          S.data<float>()[k] = float(l.sign[k]);
          N.data<float>()[k] = 1.0f;
        }
      }
    S_ = Var(S.to(dev)), N_ = Var(N.to(dev)), C_ = Var(C.to(dev));
    ones_in_ = Var(Tensor::full({1, in}, 1.0).to(dev)), ones_out_ = Var(Tensor::full({out, 1}, 1.0).to(dev));
    out_ = out, in_ = in;
  }
  Var weight() const {
    const Var A = matmul(alpha_, ones_in_), M = matmul(mu_, ones_in_), R = matmul(ones_out_, col_);
    return add(mul(add(mul(A, S_), mul(M, N_)), R), C_);
  }
  Var forward(const Var& x) const override { return linear(x, weight(), bias_.defined() ? Var(bias_) : Var()); }
  int64_t in_features() const override { return in_; }
  int64_t out_features() const override { return out_; }
  std::vector<Var> parameters() const override { return {alpha_, mu_, col_}; }
  Tensor effective_weight() const override { return weight().value(); }
  Tensor bias() const override { return bias_; }
  std::string kind() const override { return "ptq161-train"; }
  // The trained factors into l (binary columns only carry r).
  void write_back(Ptq161Layer& l) const {
    const Tensor a = alpha_.value().to(Device::CPU).contiguous(), m = mu_.value().to(Device::CPU).contiguous();
    const Tensor r = col_.value().to(Device::CPU).contiguous();
    for (int64_t i = 0; i < out_; ++i) l.alpha[size_t(i)] = a.data<float>()[i], l.mu[size_t(i)] = m.data<float>()[i];
    for (int64_t j = 0; j < in_; ++j)
      if (!l.mask[size_t(j)]) l.col[size_t(j)] = r.data<float>()[j];
  }
  const Var& alpha() const { return alpha_; }
  const Var& mu() const { return mu_; }
  const Var& col() const { return col_; }

 private:
  Var alpha_, mu_, col_, S_, N_, C_, ones_in_, ones_out_;
  Tensor bias_;
  int64_t out_ = 0, in_ = 0;
};

// Mean squared error of the block over all calibration windows (in the pipeline's batches).
double block_mse(const BlockContext& ctx) {
  const Tensor y = ctx.run_block(ctx.inputs).to(Device::CPU).to(DType::F32).contiguous();
  const Tensor t = ctx.fp_targets.to(Device::CPU).to(DType::F32).contiguous();
  double s = 0;
  for (int64_t i = 0; i < y.numel(); ++i) {
    const double d = double(y.data<float>()[i]) - double(t.data<float>()[i]);
    s += d * d;
  }
  return s / double(std::max<int64_t>(1, y.numel()));
}

}  // namespace

int64_t ptq161_salient_count(int64_t in, double ratio) {
  const double k = std::round(ratio * double(in));
  return std::clamp<int64_t>(int64_t(k), 0, in);
}

std::vector<uint8_t> ptq161_select_channels(const float* score, int64_t in, double ratio) {
  LB_CHECK(ratio >= 0 && ratio <= 1, "ptq161: salient ratio must be in [0, 1], got ", ratio);
  const int64_t k = ptq161_salient_count(in, ratio);
  std::vector<int64_t> idx(static_cast<size_t>(in));
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return score[a] > score[b]; });
  std::vector<uint8_t> mask(size_t(in), 0);
  for (int64_t i = 0; i < k; ++i) mask[size_t(idx[size_t(i)])] = 1;
  return mask;
}

void ptq161_binarize_row(const float* w, const uint8_t* mask, int64_t in, double& alpha, double& mu, int8_t* sign) {
  double s = 0;
  int64_t n = 0;
  for (int64_t j = 0; j < in; ++j)
    if (!mask[j]) s += w[j], ++n;
  mu = n ? s / double(n) : 0.0;
  double a = 0;
  for (int64_t j = 0; j < in; ++j) {
    if (mask[j]) {
      sign[j] = 0;
      continue;
    }
    const double d = double(w[j]) - mu;
    sign[j] = d >= 0 ? 1 : -1;
    a += std::fabs(d);
  }
  alpha = n ? a / double(n) : 0.0;
}

Tensor Ptq161Layer::dequantize(bool stored_f16) const {
  Tensor t = Tensor::empty({out, in});
  float* p = t.data<float>();
  for (int64_t i = 0; i < out; ++i) {
    const double a = stored_f16 ? round_f16(alpha[size_t(i)]) : alpha[size_t(i)];
    const double m = stored_f16 ? round_f16(mu[size_t(i)]) : mu[size_t(i)];
    for (int64_t j = 0; j < in; ++j) {
      const size_t k = size_t(i * in + j);
      if (mask[size_t(j)]) {
        p[k] = int_value(q4[k], s4[size_t(i)], z4[size_t(i)]);
      } else {
        const double r = stored_f16 ? round_f16(col[size_t(j)]) : col[size_t(j)];
        p[k] = float(r * (m + a * double(sign[k])));
      }
    }
  }
  return t;
}

void Ptq161Layer::round_to_f16() {
  for (auto& v : alpha) v = round_f16(v);
  for (auto& v : mu) v = round_f16(v);
  for (auto& v : col) v = round_f16(v);
}

int64_t ptq161_storage_bits(int64_t out, int64_t in, int64_t k) {
  return out * (in - k) + 4 * out * k + 64 * out + in + 16 * (in - k);
}

Ptq161Layer ptq161_init(const Tensor& w_in, const float* act_score, const Ptq161Options& o) {
  LB_CHECK(w_in.defined() && w_in.dim() == 2, "ptq161: weight must be [out, in]");
  const Tensor w = w_in.to(Device::CPU).to(DType::F32).contiguous();
  Ptq161Layer l;
  l.out = w.size(0), l.in = w.size(1);
  const int64_t out = l.out, in = l.in;
  l.mask = ptq161_select_channels(act_score, in, o.salient_ratio);
  l.s4.assign(size_t(out), 1.0f), l.z4.assign(size_t(out), 0.0f);
  l.q4.assign(size_t(out * in), 0);
  l.sign.assign(size_t(out * in), 0);
  l.alpha.assign(size_t(out), 0.0), l.mu.assign(size_t(out), 0.0);
  l.col.assign(size_t(in), 1.0);
  const QuantFormat& f4 = quant_format(QuantFormatId::Int4PC);
  const float* pw = w.data<float>();
  for (int64_t i = 0; i < out; ++i) {
    const float* row = pw + i * in;
    float lo = 0, hi = 0;
    bool any = false;
    for (int64_t j = 0; j < in; ++j)
      if (l.mask[size_t(j)]) {
        lo = any ? std::min(lo, row[j]) : row[j], hi = any ? std::max(hi, row[j]) : row[j];
        any = true;
      }
    const GroupParams p = f4.codec->params_from_range(f4, lo, hi, 1.0f);
    if (!std::isfinite(p.scale))
      throw_error("ptq161: the salient weights of row ", i, " do not fit the f16 scale of int4pc");
    l.s4[size_t(i)] = p.scale, l.z4[size_t(i)] = p.zero;
    for (int64_t j = 0; j < in; ++j)
      if (l.mask[size_t(j)]) l.q4[size_t(i * in + j)] = f4.codec->encode(f4, row[j], p);
    ptq161_binarize_row(row, l.mask.data(), in, l.alpha[size_t(i)], l.mu[size_t(i)], l.sign.data() + i * in);
  }
  return l;
}

double ptq161_layer_error(const Tensor& w_in, const Tensor& wq_in, const std::vector<double>& h) {
  const Tensor w = w_in.to(Device::CPU).to(DType::F32).contiguous();
  const Tensor wq = wq_in.to(Device::CPU).to(DType::F32).contiguous();
  const int64_t out = w.size(0), in = w.size(1);
  LB_CHECK(wq.size(0) == out && wq.size(1) == in && int64_t(h.size()) == in * in, "ptq161_layer_error: shape mismatch");
  std::vector<double> e(static_cast<size_t>(out * in));
  for (size_t i = 0; i < e.size(); ++i) e[i] = double(w.data<float>()[i]) - double(wq.data<float>()[i]);
  return quad_error(e, h, out, in);
}

std::vector<double> ptq161_damped_hessian(const Tensor& h_in, double percdamp) {
  const Tensor h = h_in.to(Device::CPU).to(DType::F32).contiguous();
  const int64_t n = h.size(0);
  std::vector<double> d(static_cast<size_t>(n * n));
  for (size_t i = 0; i < d.size(); ++i) d[i] = h.data<float>()[i];
  double mean = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (d[size_t(j * n + j)] == 0) d[size_t(j * n + j)] = 1;  // dead input channel (as GPTQ)
    mean += d[size_t(j * n + j)];
  }
  mean /= double(n);
  for (int64_t j = 0; j < n; ++j) d[size_t(j * n + j)] += percdamp * mean;
  return d;
}

std::vector<double> ptq161_optimize(const Tensor& w_in, const std::vector<double>& h, Ptq161Layer& l, int iters) {
  const Tensor w = w_in.to(Device::CPU).to(DType::F32).contiguous();
  const int64_t out = l.out, in = l.in;
  LB_CHECK(w.size(0) == out && w.size(1) == in && int64_t(h.size()) == in * in, "ptq161_optimize: shape mismatch");
  const float* pw = w.data<float>();
  std::vector<double> errs{quad_error(residual(pw, l), h, out, in)};
  std::vector<int64_t> free_cols;
  for (int64_t j = 0; j < in; ++j)
    if (!l.mask[size_t(j)]) free_cols.push_back(j);
  const int64_t nf = int64_t(free_cols.size());
  if (nf == 0) return errs;
  for (int it = 0; it < iters; ++it) {
    // ---- (alpha_i, mu_i) with r fixed: e_i = d_i - alpha a_i - mu b, d_i = w_i - salient part.
    {
      std::vector<double> A(size_t(out * in), 0.0), D(size_t(out * in), 0.0), b(size_t(in), 0.0);
      for (int64_t j : free_cols) b[size_t(j)] = l.col[size_t(j)];
      for (int64_t i = 0; i < out; ++i)
        for (int64_t j = 0; j < in; ++j) {
          const size_t k = size_t(i * in + j);
          if (l.mask[size_t(j)]) {
            D[k] = double(pw[k]) - double(int_value(l.q4[k], l.s4[size_t(i)], l.z4[size_t(i)]));
          } else {
            D[k] = pw[k];
            A[k] = l.col[size_t(j)] * double(l.sign[k]);
          }
        }
      std::vector<double> HA(static_cast<size_t>(out * in)), Hb(static_cast<size_t>(in));
      {
        BlasThreadsGuard blas;
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(out), int(in), int(in), 1.0, A.data(), int(in),
                    h.data(), int(in), 0.0, HA.data(), int(in));
        cblas_dgemv(CblasRowMajor, CblasNoTrans, int(in), int(in), 1.0, h.data(), int(in), b.data(), 1, 0.0, Hb.data(), 1);
      }
      double bHb = 0;
      for (int64_t j = 0; j < in; ++j) bHb += b[size_t(j)] * Hb[size_t(j)];
      auto old_alpha = l.alpha, old_mu = l.mu;
      for (int64_t i = 0; i < out; ++i) {
        double aHa = 0, aHb = 0, aHd = 0, bHd = 0;
        for (int64_t j = 0; j < in; ++j) {
          const size_t k = size_t(i * in + j);
          aHa += A[k] * HA[k], aHb += A[k] * Hb[size_t(j)];
          aHd += HA[k] * D[k], bHd += Hb[size_t(j)] * D[k];
        }
        const double det = aHa * bHb - aHb * aHb;
        if (!(det > 1e-12 * std::max(aHa * bHb, 1e-300))) continue;  // degenerate row: keep
        l.alpha[size_t(i)] = (bHb * aHd - aHb * bHd) / det;
        l.mu[size_t(i)] = (aHa * bHd - aHb * aHd) / det;
      }
      const double e = quad_error(residual(pw, l), h, out, in);
      if (e <= errs.back()) errs.push_back(e);
      else l.alpha = old_alpha, l.mu = old_mu, errs.push_back(errs.back());
    }
    // ---- r with (alpha, mu) fixed: [H o (V^T V)]_FF r_F = sum_i v_i o (H d_i), restricted to the
    // non-salient columns F (v_i = mu_i + alpha_i s_i there, 0 on salient columns).
    {
      std::vector<double> V(size_t(out * in), 0.0), D(size_t(out * in), 0.0);
      for (int64_t i = 0; i < out; ++i)
        for (int64_t j = 0; j < in; ++j) {
          const size_t k = size_t(i * in + j);
          if (l.mask[size_t(j)]) {
            D[k] = double(pw[k]) - double(int_value(l.q4[k], l.s4[size_t(i)], l.z4[size_t(i)]));
          } else {
            D[k] = pw[k];
            V[k] = l.mu[size_t(i)] + l.alpha[size_t(i)] * double(l.sign[k]);
          }
        }
      std::vector<double> VtV(static_cast<size_t>(in * in)), DH(size_t(out * in));
      {
        BlasThreadsGuard blas;
        cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(in), int(in), int(out), 1.0, V.data(), int(in),
                    V.data(), int(in), 0.0, VtV.data(), int(in));
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(out), int(in), int(in), 1.0, D.data(), int(in),
                    h.data(), int(in), 0.0, DH.data(), int(in));
      }
      std::vector<double> M(static_cast<size_t>(nf * nf)), rhs(size_t(nf), 0.0);
      double tr = 0;
      for (int64_t a = 0; a < nf; ++a) {
        const int64_t ja = free_cols[size_t(a)];
        for (int64_t c = 0; c < nf; ++c) {
          const int64_t jc = free_cols[size_t(c)];
          M[size_t(a * nf + c)] = h[size_t(ja * in + jc)] * VtV[size_t(ja * in + jc)];
        }
        tr += M[size_t(a * nf + a)];
        for (int64_t i = 0; i < out; ++i) rhs[size_t(a)] += V[size_t(i * in + ja)] * DH[size_t(i * in + ja)];
      }
      const double ridge = 1e-9 * tr / double(nf) + 1e-300;
      for (int64_t a = 0; a < nf; ++a) M[size_t(a * nf + a)] += ridge;
      auto old_col = l.col;
      bool ok = true;
      try {
        cholesky_lower_inplace(M.data(), nf);
      } catch (const Error&) {
        ok = false;
      }
      if (ok) {
        // Solve L L^T r = rhs.
        std::vector<double> y(rhs);
        for (int64_t a = 0; a < nf; ++a) {
          double s = y[size_t(a)];
          for (int64_t c = 0; c < a; ++c) s -= M[size_t(a * nf + c)] * y[size_t(c)];
          y[size_t(a)] = s / M[size_t(a * nf + a)];
        }
        for (int64_t a = nf - 1; a >= 0; --a) {
          double s = y[size_t(a)];
          for (int64_t c = a + 1; c < nf; ++c) s -= M[size_t(c * nf + a)] * y[size_t(c)];
          y[size_t(a)] = s / M[size_t(a * nf + a)];
        }
        for (int64_t a = 0; a < nf; ++a)
          if (std::isfinite(y[size_t(a)])) l.col[size_t(free_cols[size_t(a)])] = y[size_t(a)];
      }
      const double e = quad_error(residual(pw, l), h, out, in);
      if (ok && e <= errs.back()) errs.push_back(e);
      else l.col = old_col, errs.push_back(errs.back());
    }
  }
  return errs;
}

Ptq161Method::Ptq161Method(const QuantFormat& f, Ptq161Options o) : f_(f), o_(o) {
  if (f.id != QuantFormatId::PTQ161)
    throw_error("--method ptq161: format ", f.name,
                " is not ptq161 (the method writes its own format: salient channels at 4 bits, the rest binarized; use "
                "--format ptq161)");
  LB_CHECK(o.salient_ratio >= 0 && o.salient_ratio <= 1 && o.opt_iters >= 0 && o.percdamp >= 0 && o.block_epochs >= 0,
           "ptq161: bad options (salient ratio ", o.salient_ratio, ", iterations ", o.opt_iters, ", percdamp ",
           o.percdamp, ")");
}

std::string Ptq161Method::options_key() const {
  return "ratio=" + key_number(o_.salient_ratio) + ",iters=" + std::to_string(o_.opt_iters) +
         ",percdamp=" + key_number(o_.percdamp) + ",block_epochs=" + std::to_string(o_.block_epochs);
}

void Ptq161Method::quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) {
  LlamaBlock& b = ctx.model.block(ctx.layer);
  std::map<std::string, HessianAccumulator> hess;
  std::map<std::string, std::vector<float>> act_max;
  std::map<std::string, Tensor> sample_x;
  ctx.run_block(ctx.inputs, [&](const std::string& name, const Tensor& x_in) {
    const Tensor x = x_in.to(Device::CPU).to(DType::F32).contiguous();
    const int64_t in = x.size(-1), rows = x.numel() / in;
    auto it = hess.find(name);
    if (it == hess.end()) it = hess.emplace(name, HessianAccumulator(in)).first;
    it->second.add(x);
    auto& m = act_max[name];
    if (m.empty()) m.assign(size_t(in), 0.0f);
    const float* p = x.data<float>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < in; ++j) m[size_t(j)] = std::max(m[size_t(j)], std::fabs(p[r * in + j]));
    if (!sample_x.count(name)) sample_x[name] = report_sample(x).clone();
  });
  std::vector<Pending> pending;
  for (auto& [name, slot] : b.linears()) {
    const Device dev = (*slot)->effective_weight().device();
    const Tensor w = (*slot)->effective_weight().to(Device::CPU).to(DType::F32).contiguous();
    const QuantFormat& f = ctx.format_of(name, f_);
    LinearReport r;
    r.name = "model.layers." + std::to_string(ctx.layer) + "." + name;
    r.params = w.size(0) * w.size(1);
    auto sx = sample_x.find(name);
    if (f.id != f_.id) {  // a mixed plan's other format: RTN in it
      QuantizedTensor q = rtn_quantize(w, f);
      const Tensor deq = q.dequantize();
      r.rel_error = sx != sample_x.end() ? relative_output_error(sx->second, w, deq) : 0.0;
      r.bits_per_weight = f.bits_per_weight(w.size(0), w.size(1));
      reports.push_back(r);
      *slot = std::make_shared<QuantLinear>(std::move(q), (*slot)->bias(), dev, Tensor(), Tensor(), deq);
      continue;
    }
    auto am = act_max.find(name);
    LB_CHECK(am != act_max.end(), "ptq161: no calibration input reached ", r.name);
    Ptq161Layer l = ptq161_init(w, am->second.data(), o_);
    if (o_.opt_iters > 0) {
      const std::vector<double> h = ptq161_damped_hessian(hess.at(name).hessian(), o_.percdamp);
      ptq161_optimize(w, h, l, o_.opt_iters);
    }
    pending.push_back({name, slot, std::move(l), w, (*slot)->bias(), dev, reports.size()});
    reports.push_back(r);
  }
  if (o_.block_epochs > 0 && !pending.empty()) refine_block(ctx, pending);
  for (auto& p : pending) {
    Ptq161Layer& l = p.layer;
    LinearReport& r = reports[p.report];
    l.round_to_f16();
    QuantizedTensor packed = pack_ptq161(l.out, l.in, l.mask, l.sign, l.q4, l.alpha, l.mu, l.s4, l.z4, l.col);
    const Tensor deq = packed.dequantize();
    for (int64_t i = 0; i < deq.numel(); ++i)
      if (!std::isfinite(deq.data<float>()[i]))
        throw_error("ptq161: ", r.name, " decodes to a non-finite weight at row ", i / l.in, " column ", i % l.in,
                    " (a scaling factor overflowed f16)");
    r.bits_per_weight = double(packed.nbytes()) * 8.0 / double(l.out * l.in);
    auto sx = sample_x.find(p.name);
    r.rel_error = sx != sample_x.end() ? relative_output_error(sx->second, p.w, deq) : 0.0;
    *p.slot = std::make_shared<QuantLinear>(std::move(packed), p.bias, p.dev, Tensor(), Tensor(), deq);
  }
}

void Ptq161Method::refine_block(BlockContext& ctx, std::vector<Pending>& pending) {
  // Install trainable layers, AdamW on the block output, keep the result only if the block's MSE
  // over all windows drops (else the layer-wise fit stays).
  std::vector<std::shared_ptr<Ptq161TrainLinear>> train;
  std::vector<std::shared_ptr<Linear>> saved;
  for (auto& p : pending) {
    saved.push_back(*p.slot);
    train.push_back(std::make_shared<Ptq161TrainLinear>(p.layer, p.bias, p.dev));
    *p.slot = train.back();
  }
  auto restore = [&] {
    for (size_t i = 0; i < pending.size(); ++i) *pending[i].slot = saved[i];
  };
  try {
    double before = 0;
    {
      NoGradGuard ng;
      before = block_mse(ctx);
    }
    std::vector<Var> scales, cols;
    for (auto& t : train) scales.push_back(t->alpha()), scales.push_back(t->mu()), cols.push_back(t->col());
    AdamWOptions as, ac;
    as.lr = 5e-4, ac.lr = 1e-3;  // the reference code's learning rates (scaling factors, rotations)
    as.weight_decay = ac.weight_decay = 0;
    AdamW opt({ParamGroup{scales, as}, ParamGroup{cols, ac}});
    const int64_t N = ctx.n_samples, L = ctx.seqlen;
    for (int e = 0; e < o_.block_epochs; ++e)
      for (int64_t s = 0; s < N; ++s) {
        Var x(ctx.inputs.slice(0, s * L, (s + 1) * L));
        Var y = ctx.model.block_forward(ctx.layer, x, 1, L);
        Var loss = mse(y, Var(ctx.fp_targets.slice(0, s * L, (s + 1) * L).contiguous()));
        opt.zero_grad();
        backward(loss);
        opt.step();
      }
    double after = 0;
    {
      NoGradGuard ng;
      after = block_mse(ctx);
    }
    if (std::isfinite(after) && after < before)
      for (size_t i = 0; i < pending.size(); ++i) train[i]->write_back(pending[i].layer);
    restore();
  } catch (...) {
    restore();
    throw;
  }
}

}  // namespace lowbit
