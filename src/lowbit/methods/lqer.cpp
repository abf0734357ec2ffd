#include "lowbit/methods/lqer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "lowbit/autograd/variable.h"
#include "lowbit/core/blas.h"
#include "lowbit/core/error.h"
#include "lowbit/methods/pipeline.h"
#include "lowbit/quant/quant_linear.h"

namespace lowbit {

namespace {

// Orthonormalises the rows of x [p, n] in place (modified Gram-Schmidt, two passes); a row that
// is (numerically) in the span of the rows before it becomes zero.
void orthonormalize_rows(std::vector<double>& x, int64_t p, int64_t n) {
  for (int64_t i = 0; i < p; ++i) {
    double* xi = x.data() + i * n;
    double n0 = 0;
    for (int64_t c = 0; c < n; ++c) n0 += xi[c] * xi[c];
    n0 = std::sqrt(n0);
    for (int pass = 0; pass < 2; ++pass)
      for (int64_t j = 0; j < i; ++j) {
        const double* xj = x.data() + j * n;
        double d = 0;
        for (int64_t c = 0; c < n; ++c) d += xi[c] * xj[c];
        for (int64_t c = 0; c < n; ++c) xi[c] -= d * xj[c];
      }
    double n1 = 0;
    for (int64_t c = 0; c < n; ++c) n1 += xi[c] * xi[c];
    n1 = std::sqrt(n1);
    if (!(n1 > 1e-12 * n0) || n1 == 0) {
      std::fill(xi, xi + n, 0.0);
      continue;
    }
    for (int64_t c = 0; c < n; ++c) xi[c] /= n1;
  }
}

// Eigen-decomposition of a symmetric g [p, p] (cyclic Jacobi): g = V diag(lambda) Vᵀ; v row-major,
// column i the eigenvector of lambda[i].
void symmetric_eigen(std::vector<double> g, int64_t p, std::vector<double>& lambda, std::vector<double>& v) {
  v.assign(size_t(p * p), 0.0);
  for (int64_t i = 0; i < p; ++i) v[size_t(i * p + i)] = 1;
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0, diag = 0;
    for (int64_t i = 0; i < p; ++i)
      for (int64_t j = 0; j < p; ++j) (i == j ? diag : off) += g[size_t(i * p + j)] * g[size_t(i * p + j)];
    if (off <= 1e-30 * diag || off == 0) break;
    for (int64_t a = 0; a < p - 1; ++a)
      for (int64_t b = a + 1; b < p; ++b) {
        const double gab = g[size_t(a * p + b)];
        if (gab == 0) continue;
        const double gaa = g[size_t(a * p + a)], gbb = g[size_t(b * p + b)];
        const double theta = (gbb - gaa) / (2 * gab);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int64_t k = 0; k < p; ++k) {  // columns a, b of g
          const double x = g[size_t(k * p + a)], y = g[size_t(k * p + b)];
          g[size_t(k * p + a)] = c * x - s * y;
          g[size_t(k * p + b)] = s * x + c * y;
        }
        for (int64_t k = 0; k < p; ++k) {  // rows a, b
          const double x = g[size_t(a * p + k)], y = g[size_t(b * p + k)];
          g[size_t(a * p + k)] = c * x - s * y;
          g[size_t(b * p + k)] = s * x + c * y;
        }
        for (int64_t k = 0; k < p; ++k) {
          const double x = v[size_t(k * p + a)], y = v[size_t(k * p + b)];
          v[size_t(k * p + a)] = c * x - s * y;
          v[size_t(k * p + b)] = s * x + c * y;
        }
      }
  }
  lambda.resize(size_t(p));
  for (int64_t i = 0; i < p; ++i) lambda[size_t(i)] = g[size_t(i * p + i)];
}

}  // namespace

TruncatedSvd truncated_svd(const Tensor& m_in, int64_t k, uint64_t seed, int power_iters) {
  LB_CHECK(m_in.dim() == 2 && m_in.device() == Device::CPU && (m_in.dtype() == DType::F32 || m_in.dtype() == DType::F64),
           "truncated_svd: expected an f32/f64 CPU matrix, got ", m_in.describe());
  LB_CHECK(k >= 1, "truncated_svd: rank must be >= 1, got ", k);
  LB_CHECK(power_iters >= 0, "truncated_svd: power_iters must be >= 0, got ", power_iters);
  const Tensor m = m_in.to(DType::F64).contiguous();
  const int64_t R = m.size(0), C = m.size(1), mn = std::min(R, C);
  k = std::min(k, mn);
  const int64_t p = std::min<int64_t>(k + 16, mn);
  const double* M = m.data<double>();
  // Yt [p, R] = Ω M^T with Ω [p, C] Gaussian: the rows span (approximately) M's top range.
  const Tensor omega = Tensor::randn({p, C}, seed ^ 0x4c514552ULL, 1.0, DType::F64).contiguous();
  std::vector<double> yt(size_t(p * R)), zt(size_t(p * C));
  blas::gemm(false, true, p, R, C, 1.0, omega.data<double>(), C, M, C, 0.0, yt.data(), R);
  orthonormalize_rows(yt, p, R);
  for (int it = 0; it < power_iters; ++it) {
    blas::gemm(false, false, p, C, R, 1.0, yt.data(), R, M, C, 0.0, zt.data(), C);  // Zt = Yt M
    orthonormalize_rows(zt, p, C);
    blas::gemm(false, true, p, R, C, 1.0, zt.data(), C, M, C, 0.0, yt.data(), R);  // Yt = Zt M^T
    orthonormalize_rows(yt, p, R);
  }
  // B = Qᵀ M [p, C] (Q = Ytᵀ); B Bᵀ = J Λ Jᵀ; M ≈ Q B = (Q J) (Jᵀ B), with Jᵀ B = Σ Vᵀ.
  std::vector<double> b(size_t(p * C)), g(size_t(p * p));
  blas::gemm(false, false, p, C, R, 1.0, yt.data(), R, M, C, 0.0, b.data(), C);
  blas::gemm(false, true, p, p, C, 1.0, b.data(), C, b.data(), C, 0.0, g.data(), p);
  std::vector<double> lambda, j;
  symmetric_eigen(g, p, lambda, j);
  std::vector<int64_t> order(static_cast<size_t>(p));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return lambda[size_t(a)] > lambda[size_t(c)]; });
  std::vector<double> jk(size_t(p * k));  // J_k [p, k]
  TruncatedSvd out;
  for (int64_t i = 0; i < k; ++i) {
    out.s.push_back(std::sqrt(std::max(0.0, lambda[size_t(order[size_t(i)])])));
    for (int64_t r = 0; r < p; ++r) jk[size_t(r * k + i)] = j[size_t(r * p + order[size_t(i)])];
  }
  out.u = Tensor::zeros({R, k}, DType::F64);
  out.sv = Tensor::zeros({k, C}, DType::F64);
  blas::gemm(true, false, R, k, p, 1.0, yt.data(), R, jk.data(), k, 0.0, out.u.data<double>(), k);    // Q J_k
  blas::gemm(true, false, k, C, p, 1.0, jk.data(), k, b.data(), C, 0.0, out.sv.data<double>(), C);    // J_kᵀ B
  return out;
}

LqerFactors lqer_factors(const Tensor& error, const std::vector<double>& scale, int64_t rank, uint64_t seed) {
  LB_CHECK(error.dim() == 2, "lqer: the error must be [out, in], got ", error.describe());
  const int64_t out = error.size(0), in = error.size(1);
  LB_CHECK(scale.empty() || int64_t(scale.size()) == in, "lqer: ", scale.size(), " channel scales for ", in,
           " input channels");
  for (double s : scale) LB_CHECK(s > 0 && std::isfinite(s), "lqer: channel scales must be positive and finite, got ", s);
  Tensor m = error.to(Device::CPU).to(DType::F64).contiguous().clone();
  double* pm = m.data<double>();
  if (!scale.empty())
    for (int64_t o = 0; o < out; ++o)
      for (int64_t c = 0; c < in; ++c) pm[o * in + c] *= scale[size_t(c)];
  const TruncatedSvd svd = truncated_svd(m, rank, seed);
  const int64_t k = int64_t(svd.s.size());
  // Balanced: B = U Σ^½, A = Σ^-½ (Σ Vᵀ) S⁻¹.
  LqerFactors f;
  f.A = Tensor::empty({k, in});
  f.B = Tensor::empty({out, k});
  const double* u = svd.u.data<double>();
  const double* sv = svd.sv.data<double>();
  float* pa = f.A.data<float>();
  float* pb = f.B.data<float>();
  for (int64_t i = 0; i < k; ++i) {
    const double r = svd.s[size_t(i)] > 0 ? std::sqrt(svd.s[size_t(i)]) : 1.0;
    for (int64_t c = 0; c < in; ++c)
      pa[i * in + c] = float(sv[i * in + c] / r / (scale.empty() ? 1.0 : scale[size_t(c)]));
    for (int64_t o = 0; o < out; ++o) pb[o * k + i] = float(u[o * k + i] * r);
  }
  return f;
}

LqerScale parse_lqer_scale(const std::string& name, const std::string& what) {
  if (name == "act") return LqerScale::Activation;
  if (name == "none") return LqerScale::None;
  throw_error(what, " must be 'act' (L²QER: the error scaled by the activations' channel magnitude) or 'none', got '",
              name, "'");
}

const char* lqer_scale_name(LqerScale s) { return s == LqerScale::Activation ? "act" : "none"; }

std::map<std::string, std::vector<double>> collect_lqer_scales(LlamaModel& model, const Tensor& tokens_in) {
  LB_CHECK(tokens_in.dim() == 2 && tokens_in.dtype() == DType::I32 && tokens_in.size(0) >= 1,
           "lqer: calibration tokens must be i32 [N, T], got ", tokens_in.describe());
  const Tensor tokens = tokens_in.contiguous();
  std::map<std::string, std::vector<double>> sums;
  std::map<std::string, int64_t> rows;
  std::vector<std::pair<std::string, std::shared_ptr<Linear>*>> slots;
  for (int i = 0; i < model.n_layers(); ++i)
    for (auto& [name, slot] : model.block(i).linears())
      slots.emplace_back("model.layers." + std::to_string(i) + "." + name, slot);
  bool finite = true;
  {
    LinearHookScope hooks(slots, [&](const std::string& key, const Tensor& x) {
      const Tensor h = x.to(Device::CPU).to(DType::F32).contiguous();
      const int64_t in = h.size(-1), n = h.numel() / in;
      std::vector<double>& s = sums[key];
      if (s.empty()) s.assign(size_t(in), 0.0);
      const float* p = h.data<float>();
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < in; ++j) s[size_t(j)] += std::fabs(double(p[r * in + j]));
      rows[key] += n;
    });
    NoGradGuard ng;
    for (int64_t s = 0; s < tokens.size(0); ++s) model.forward(tokens.slice(0, s, s + 1).contiguous());
  }
  for (auto& [key, s] : sums) {
    const double n = double(std::max<int64_t>(1, rows[key]));
    double mean = 0, minpos = 0;
    for (double& v : s) {
      v /= n;
      if (!std::isfinite(v)) finite = false;
      mean += v / double(s.size());
      if (v > 0 && (minpos == 0 || v < minpos)) minpos = v;
    }
    if (!finite) throw_error("lqer: the model's activations are not finite on the calibration data");
    for (double& v : s) v = (v > 0 ? v : (minpos > 0 ? minpos : 1.0)) / (mean > 0 ? mean : 1.0);
  }
  return sums;
}

std::map<std::string, Tensor> snapshot_linear_weights(LlamaModel& model) {
  std::map<std::string, Tensor> out;
  for (int i = 0; i < model.n_layers(); ++i)
    for (auto& [name, slot] : model.block(i).linears())
      out.emplace("model.layers." + std::to_string(i) + "." + name,
                  (*slot)->effective_weight().to(Device::CPU).to(DType::F32).contiguous().clone());
  return out;
}

LqerReport apply_lqer(LlamaModel& model, const std::map<std::string, Tensor>& fp,
                      const std::map<std::string, std::vector<double>>& scales, const LqerOptions& o) {
  LB_CHECK(o.rank >= 1, "lqer: rank must be >= 1, got ", o.rank);
  const auto t0 = std::chrono::steady_clock::now();
  LqerReport rep;
  for (int i = 0; i < model.n_layers(); ++i)
    for (auto& [name, slot] : model.block(i).linears()) {
      const std::string key = "model.layers." + std::to_string(i) + "." + name;
      const auto* ql = dynamic_cast<const QuantLinear*>(slot->get());
      if (!ql) throw_error("lqer: ", key, " is not a quantized layer (", (*slot)->kind(), ")");
      if (ql->has_lora())
        throw_error("lqer: ", key, " already has low-rank adapters (the method trained them); LQER adds its own");
      auto w = fp.find(key);
      if (w == fp.end()) throw_error("lqer: no full-precision weight of ", key);
      const Tensor what = ql->effective_weight().to(Device::CPU).to(DType::F32).contiguous();
      LB_CHECK(w->second.shape() == what.shape(), "lqer: ", key, ": full-precision weight ", w->second.describe(),
               " does not match the quantized ", what.describe());
      std::vector<double> s;
      if (o.scale == LqerScale::Activation) {
        auto it = scales.find(key);
        if (it == scales.end()) throw_error("lqer: no activation scales of ", key);
        s = it->second;
      }
      const int64_t out = what.size(0), in = what.size(1);
      Tensor e = Tensor::empty({out, in});
      const float *pw = w->second.data<float>(), *pq = what.data<float>();
      float* pe = e.data<float>();
      for (int64_t x = 0; x < out * in; ++x) pe[x] = pw[x] - pq[x];
      LqerFactors f = lqer_factors(e, s, o.rank, o.seed + uint64_t(i) * 131 + std::hash<std::string>{}(name) % 97);
      f.A = f.A.to(DType::F16).to(DType::F32);  // what the checkpoint keeps
      f.B = f.B.to(DType::F16).to(DType::F32);
      // Errors in the scaled space: ||E S||, ||(E − B A) S|| relative to ||W S||.
      const int64_t k = f.A.size(0);
      std::vector<double> ba(size_t(out * in));
      {
        std::vector<double> a64(f.A.data<float>(), f.A.data<float>() + k * in), b64(f.B.data<float>(), f.B.data<float>() + out * k);
        blas::gemm(false, false, out, in, k, 1.0, b64.data(), k, a64.data(), in, 0.0, ba.data(), in);
      }
      double ew = 0, ee = 0, er = 0;
      for (int64_t o2 = 0; o2 < out; ++o2)
        for (int64_t c = 0; c < in; ++c) {
          const double sc = s.empty() ? 1.0 : s[size_t(c)];
          const double wv = pw[o2 * in + c] * sc, ev = pe[o2 * in + c] * sc, rv = ev - ba[size_t(o2 * in + c)] * sc;
          ew += wv * wv;
          ee += ev * ev;
          er += rv * rv;
        }
      rep.mean_rel_error += ew > 0 ? std::sqrt(ee / ew) : 0;
      rep.mean_rel_residual += ew > 0 ? std::sqrt(er / ew) : 0;
      rep.params += double(k * (in + out));
      rep.max_rank = std::max(rep.max_rank, k);
      ++rep.layers;
      *slot = std::make_shared<QuantLinear>(ql->quantized(), ql->bias(), Device::CPU, f.A, f.B);
    }
  if (rep.layers > 0) {
    rep.mean_rel_error /= rep.layers;
    rep.mean_rel_residual /= rep.layers;
  }
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

}  // namespace lowbit
