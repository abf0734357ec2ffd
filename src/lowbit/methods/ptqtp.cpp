#include "lowbit/methods/ptqtp.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "lowbit/core/threads.h"
#include "lowbit/methods/rtn.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"

namespace lowbit {

namespace {

int sign_of(float x) { return x > 0 ? 1 : (x < 0 ? -1 : 0); }

double pair_value(uint8_t q, double a1, double a2) { return double(tp_t1(q)) * a1 + double(tp_t2(q)) * a2; }

}  // namespace

void ptqtp_solve_scales(const float* w, const uint8_t* q, int64_t n, const PtqtpOptions& o, double& a1, double& a2,
                        double* lambda_used) {
  // Normal equations of min ||w - a1 t1 - a2 t2||^2: [[a b] [b c]] (a1 a2)^T = (p r)^T.
  double a = 0, b = 0, c = 0, p = 0, r = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double t1 = tp_t1(q[i]), t2 = tp_t2(q[i]), x = w[i];
    a += t1 * t1, b += t1 * t2, c += t2 * t2, p += t1 * x, r += t2 * x;
  }
  if (lambda_used) *lambda_used = 0;
  if (a + c == 0) {  // both planes empty: nothing to scale
    a1 = a2 = 0;
    return;
  }
  // Eigenvalues of S^T S, and the ridge that bounds the condition number of S^T S + lambda I.
  const double m = (a + c) / 2, d = std::sqrt((a - c) * (a - c) / 4 + b * b);
  const double mu1 = m + d, mu2 = std::max(m - d, 0.0);
  double lambda = o.lambda0 * m;
  if ((mu1 + lambda) > o.cond_max * (mu2 + lambda)) lambda = (mu1 - o.cond_max * mu2) / (o.cond_max - 1);
  if (lambda_used) *lambda_used = lambda;
  const double det = (a + lambda) * (c + lambda) - b * b;
  a1 = ((c + lambda) * p - b * r) / det;
  a2 = ((a + lambda) * r - b * p) / det;
}

void ptqtp_assign_trits(const float* w, int64_t n, double a1, double a2, uint8_t* q) {
  double v[9];
  for (uint8_t k = 0; k < 9; ++k) v[k] = pair_value(k, a1, a2);
  for (int64_t i = 0; i < n; ++i) {
    const double x = w[i];
    uint8_t best = 4;  // (0, 0): ties go to the zero pair, then to the lower code
    double best_err = std::fabs(x);
    for (uint8_t k = 0; k < 9; ++k) {
      const double e = std::fabs(x - v[k]);
      if (e < best_err) best_err = e, best = k;
    }
    q[i] = best;
  }
}

double ptqtp_group_error(const float* w, const uint8_t* q, int64_t n, double a1, double a2) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double e = double(w[i]) - pair_value(q[i], a1, a2);
    s += e * e;
  }
  return s;
}

namespace {

// The alternation from the start held in f (a1, a2, q): scale step, trit step, until a fixed point,
// a scale move below tol, or max_iters. f.errors[0] is the start's error.
void alternate(const float* w, int64_t n, const PtqtpOptions& o, PtqtpGroupFit& f) {
  double err = ptqtp_group_error(w, f.q.data(), n, f.a1, f.a2);
  f.errors.assign(1, err);
  f.iters = 0;
  std::vector<uint8_t> next(static_cast<size_t>(n));
  for (int it = 0; it < o.max_iters; ++it) {
    ++f.iters;
    // Scale step (kept only when it does not raise the error: the ridge term may).
    double b1 = f.a1, b2 = f.a2;
    ptqtp_solve_scales(w, f.q.data(), n, o, b1, b2);
    const double scale_err = ptqtp_group_error(w, f.q.data(), n, b1, b2);
    const double moved = std::max(std::fabs(b1 - f.a1), std::fabs(b2 - f.a2));
    const double size = std::max(std::fabs(b1), std::fabs(b2));
    if (scale_err <= err) f.a1 = b1, f.a2 = b2, err = scale_err;
    // Trit step (exact for the scales).
    ptqtp_assign_trits(w, n, f.a1, f.a2, next.data());
    const bool same = std::equal(next.begin(), next.end(), f.q.begin());
    f.q.swap(next);
    err = ptqtp_group_error(w, f.q.data(), n, f.a1, f.a2);
    f.errors.push_back(err);
    if (same || moved <= o.tol * size) break;
  }
}

}  // namespace

const char* ptqtp_start_name(PtqtpStart s) {
  switch (s) {
    case PtqtpStart::Paper: return "paper";
    case PtqtpStart::Grid: return "grid";
    case PtqtpStart::Both: return "both";
  }
  return "?";
}

PtqtpStart parse_ptqtp_start(const std::string& s) {
  if (s == "paper") return PtqtpStart::Paper;
  if (s == "grid") return PtqtpStart::Grid;
  if (s == "both") return PtqtpStart::Both;
  throw_error("ptqtp start must be 'paper', 'grid' or 'both', got '", s, "'");
}

PtqtpGroupFit ptqtp_fit_group(const float* w, int64_t n, const PtqtpOptions& o, double row_a1) {
  PtqtpGroupFit f;
  f.q.assign(static_cast<size_t>(n), tp_code(0, 0));
  if (n <= 0) return f;
  double s1 = 0, amax = 0;
  for (int64_t i = 0; i < n; ++i) s1 += std::fabs(double(w[i])), amax = std::max(amax, std::fabs(double(w[i])));
  if (o.start != PtqtpStart::Grid) {
    // The paper's progressive decomposition: the first plane is sign(w) with the absmean scale of the
    // row, the second the sign of the first plane's residual with the residual's absmean.
    f.a1 = std::isnan(row_a1) ? s1 / double(n) : row_a1;
    double s2 = 0;
    for (int64_t i = 0; i < n; ++i) s2 += std::fabs(double(w[i]) - f.a1 * sign_of(w[i]));
    f.a2 = s2 / double(n);
    for (int64_t i = 0; i < n; ++i) {
      const int t1 = sign_of(w[i]);
      f.q[size_t(i)] = tp_code(t1, sign_of(float(double(w[i]) - f.a1 * t1)));
    }
    alternate(w, n, o, f);
    if (o.start == PtqtpStart::Paper || amax == 0) return f;
  }
  // lowbit's start: the balanced-ternary grid a1 = 3 a2, a2 = amax / 4 (tp2g128's RTN), trits
  // assigned for it. With both starts the better fit is kept, so PTQTP is never worse than RTN in
  // weight error.
  PtqtpGroupFit g;
  g.a2 = amax / 4, g.a1 = 3 * g.a2;
  g.q.resize(static_cast<size_t>(n));
  ptqtp_assign_trits(w, n, g.a1, g.a2, g.q.data());
  alternate(w, n, o, g);
  if (o.start == PtqtpStart::Grid) return g;
  return g.errors.back() < f.errors.back() ? g : f;
}

QuantizedTensor ptqtp_quantize(const Tensor& w_in, const QuantFormat& f, const PtqtpOptions& o, PtqtpStats* stats) {
  LB_CHECK(f.kind == QuantKind::TritPlanes, "ptqtp: format ", f.name,
           " is not a trit-plane format (PTQTP writes tp2g128)");
  LB_CHECK(o.max_iters >= 1 && o.tol >= 0 && o.lambda0 >= 0 && o.cond_max > 1, "ptqtp: bad options (max_iters ",
           o.max_iters, ", tol ", o.tol, ", lambda0 ", o.lambda0, ", cond_max ", o.cond_max, ")");
  const Tensor w = checked_weight(w_in, f, "ptqtp");
  const int64_t out = w.size(0), in = w.size(1), groups = f.n_groups(in);
  const float* pw = w.data<float>();
  std::vector<GroupParams> params(size_t(out * groups));
  std::vector<int> iters(size_t(out * groups));
  parallel_for(out, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = pw + r * in;
      double row_abs = 0;
      for (int64_t i = 0; i < in; ++i) row_abs += std::fabs(double(row[i]));
      const double row_a1 = in > 0 ? row_abs / double(in) : 0.0;
      if (o.row_scales) {
        // One fit over the whole row, its scales repeated in every group.
        const PtqtpGroupFit fit = ptqtp_fit_group(row, in, o, row_a1);
        const GroupParams p{f16_to_f32(f32_to_f16(float(fit.a1))), f16_to_f32(f32_to_f16(float(fit.a2)))};
        for (int64_t g = 0; g < groups; ++g) params[size_t(r * groups + g)] = p, iters[size_t(r * groups + g)] = fit.iters;
        continue;
      }
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t b = f.group_begin(g), e = f.group_end(g, in);
        const PtqtpGroupFit fit = ptqtp_fit_group(row + b, e - b, o, row_a1);
        // The stored scales: nearest f16 (the trit step below re-assigns the codes for them).
        const size_t i = size_t(r * groups + g);
        params[i] = {f16_to_f32(f32_to_f16(float(fit.a1))), f16_to_f32(f32_to_f16(float(fit.a2)))};
        iters[i] = fit.iters;
      }
    }
  });
  for (size_t i = 0; i < params.size(); ++i)
    if (!std::isfinite(params[i].scale) || !std::isfinite(params[i].zero))
      throw_error("ptqtp: the plane scales of row ", int64_t(i) / groups, " group ", int64_t(i) % groups,
                  " do not fit in f16 (", params[i].scale, ", ", params[i].zero, ")");
  if (stats) {
    stats->groups += out * groups;
    double sum = 0;
    for (int k : iters) sum += k, stats->max_iters_hit += k >= o.max_iters ? 1 : 0;
    stats->mean_iters = sum / double(iters.size());
  }
  return quantize_with_params(w, f, params, 1.0f);
}

PtqtpMethod::PtqtpMethod(const QuantFormat& f, PtqtpOptions o) : f_(f), o_(o) {
  LB_CHECK(f.kind == QuantKind::TritPlanes, "--method ptqtp: format ", f.name,
           " is not a trit-plane format (use --format tp2g128)");
}

std::string PtqtpMethod::options_key() const {
  return "iters=" + std::to_string(o_.max_iters) + ",tol=" + key_number(o_.tol) + ",lambda0=" + key_number(o_.lambda0) +
         ",cond_max=" + key_number(o_.cond_max) + ",start=" + ptqtp_start_name(o_.start) +
         ",row_scales=" + std::to_string(o_.row_scales);
}

void PtqtpMethod::quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) {
  LlamaBlock& b = ctx.model.block(ctx.layer);
  // Data-free: the calibration rows (a stub without --calib) only feed the error reports.
  std::map<std::string, Tensor> sample_x;
  ctx.run_block(ctx.inputs, [&](const std::string& name, const Tensor& x) {
    if (!sample_x.count(name)) sample_x[name] = report_sample(x.to(Device::CPU).to(DType::F32).contiguous()).clone();
  });
  for (auto& [name, slot] : b.linears()) {
    const Device dev = (*slot)->effective_weight().device();
    const Tensor w = (*slot)->effective_weight().to(Device::CPU).to(DType::F32).contiguous();
    const QuantFormat& f = ctx.format_of(name, f_);
    QuantizedTensor q = f.kind == QuantKind::TritPlanes ? ptqtp_quantize(w, f, o_) : rtn_quantize(w, f);
    const Tensor deq = q.dequantize();
    LinearReport r;
    r.name = "model.layers." + std::to_string(ctx.layer) + "." + name;
    auto it = sample_x.find(name);
    r.rel_error = it != sample_x.end() ? relative_output_error(it->second, w, deq) : 0.0;
    r.params = q.out_features() * q.in_features();
    r.bits_per_weight = q.fmt().bits_per_weight(q.out_features(), q.in_features());
    reports.push_back(r);
    *slot = std::make_shared<QuantLinear>(std::move(q), (*slot)->bias(), dev, Tensor(), Tensor(), deq);
  }
}

}  // namespace lowbit
