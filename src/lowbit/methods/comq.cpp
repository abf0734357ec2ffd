#include "lowbit/methods/comq.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "lowbit/core/format_traits.h"
#include "lowbit/core/threads.h"
#include "lowbit/quant/quantize.h"

namespace lowbit {

namespace {

double layer_loss(const std::vector<double>& e, const std::vector<double>& g, int64_t n) {
  double s = 0;  // sum of e .* (E H) = sum_rows e H e^T
  for (int64_t i = 0; i < n; ++i) s += e[size_t(i)] * g[size_t(i)];
  return s;
}

}  // namespace

ComqResult comq_quantize(const Tensor& w_in, const Tensor& h_in, const QuantFormat& f, const ComqOptions& o) {
  if (f.kind != QuantKind::IntAsym && f.kind != QuantKind::IntSym)
    throw_error("comq: format ", f.name, " is not an integer format (comq handles int*g*, int*pc and their symmetric forms)");
  const Tensor w = checked_weight(w_in, f, "comq");
  const int64_t out = w.size(0), in = w.size(1);
  const Tensor hc = h_in.to(Device::CPU).to(DType::F32).contiguous();
  if (hc.dim() != 2 || hc.size(0) != in || hc.size(1) != in) throw_error("comq: Hessian must be [", in, ", ", in, "]");
  std::vector<double> H(size_t(in * in));
  for (int64_t i = 0; i < in * in; ++i) H[size_t(i)] = hc.data<float>()[i];
  const float* W = w.data<float>();
  const float ts = compute_tensor_scale(f, w);
  std::vector<GroupParams> params = fit_all_group_params(f, w, ts);
  const int64_t G = f.n_groups(in);
  auto group_of = [&](int64_t j) { return f.group_size ? j / f.group_size : 0; };
  auto qd = [&](float x, const GroupParams& p) { return double(f.codec->decode(f, f.codec->encode(f, x, p), p)); };
  // Q (dequantized values), E = W - Q, EH = E H; all row-major [out, in].
  std::vector<double> Q(size_t(out * in)), E(size_t(out * in)), EH(size_t(out * in), 0.0);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t j = 0; j < in; ++j) {
      const size_t k = size_t(r * in + j);
      Q[k] = qd(W[k], params[size_t(r * G + group_of(j))]);
      E[k] = double(W[k]) - Q[k];
    }
  // Rows are independent; on core's thread pool, in chunks of rows worth ~64k multiply-adds each.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, in * in));
  auto for_rows = [&](auto&& fn) {
    parallel_for(out, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) fn(r);
    });
  };
  auto recompute_eh = [&] {
    for_rows([&](int64_t r) {
      const double* e = &E[size_t(r * in)];
      double* g = &EH[size_t(r * in)];
      std::fill(g, g + in, 0.0);
      for (int64_t k = 0; k < in; ++k)
        if (e[k] != 0)
          for (int64_t j = 0; j < in; ++j) g[j] += e[k] * H[size_t(k * in + j)];
    });
  };
  recompute_eh();
  ComqResult res;
  res.loss_rtn = layer_loss(E, EH, out * in);
  // Greedy order: decreasing H_jj * ||W[:, j]||^2; dead columns (H_jj = 0) keep their RTN value.
  std::vector<int64_t> order;
  std::vector<double> key(size_t(in), 0.0);
  for (int64_t j = 0; j < in; ++j) {
    double c = 0;
    for (int64_t r = 0; r < out; ++r) c += double(W[r * in + j]) * double(W[r * in + j]);
    key[size_t(j)] = H[size_t(j * in + j)] * c;
    if (H[size_t(j * in + j)] > 0) order.push_back(j);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key[size_t(a)] > key[size_t(b)]; });
  for (int sweep = 0; sweep < o.sweeps; ++sweep) {
    // Coordinate updates; rows are independent (each row's E H only changes in its own row).
    for_rows([&](int64_t r) {
      double* q = &Q[size_t(r * in)];
      double* e = &E[size_t(r * in)];
      double* g = &EH[size_t(r * in)];
      for (int64_t j : order) {
        const double hjj = H[size_t(j * in + j)];
        const double target = q[j] + g[j] / hjj;
        const double nq = qd(float(target), params[size_t(r * G + group_of(j))]);
        const double d = nq - q[j];
        if (d == 0) continue;
        q[j] = nq;
        e[j] -= d;
        const double* hj = &H[size_t(j * in)];
        for (int64_t k = 0; k < in; ++k) g[k] -= d * hj[k];
      }
      if (!o.update_scales) return;
      for (int64_t gi = 0; gi < G; ++gi) {
        GroupParams& p = params[size_t(r * G + gi)];
        if (!(p.scale > 0)) continue;
        const int64_t b = f.group_begin(gi), end = f.group_end(gi, in);
        double num = 0, den = 0;
        for (int64_t j = b; j < end; ++j) {
          const double vj = q[j] / double(p.scale);
          num += vj * g[j];
          for (int64_t k = b; k < end; ++k) den += vj * H[size_t(j * in + k)] * (q[k] / double(p.scale));
        }
        if (!(den > 0)) continue;
        const float ns = fmt_f16_to_f32(fmt_f32_to_f16(float(double(p.scale) + num / den)));
        if (!(ns > 0) || !std::isfinite(ns) || ns == p.scale) continue;
        const double ratio = double(ns) / double(p.scale);
        for (int64_t j = b; j < end; ++j) {
          const double d = q[j] * ratio - q[j];  // q_j = s v_j -> s' v_j
          if (d == 0) continue;
          q[j] += d;
          e[j] -= d;
          const double* hj = &H[size_t(j * in)];
          for (int64_t k = 0; k < in; ++k) g[k] -= d * hj[k];
        }
        p.scale = ns;
      }
    });
  }
  // Re-encode: Q's values lie on each group's grid, so encoding them with the final parameters
  // gives back exactly their codes.
  Tensor qv = Tensor::empty({out, in});
  for (int64_t i = 0; i < out * in; ++i) qv.data<float>()[i] = float(Q[size_t(i)]);
  res.q = quantize_with_params(qv, f, params, ts);
  recompute_eh();
  res.loss = layer_loss(E, EH, out * in);
  return res;
}

std::string ComqMethod::options_key() const {
  return "sweeps=" + std::to_string(c_.sweeps) + ",scales=" + std::to_string(c_.update_scales);
}

GptqResult ComqMethod::solve(const Tensor& w, const Tensor& h, const QuantFormat& f) {
  if (f.kind != QuantKind::IntAsym && f.kind != QuantKind::IntSym)
    throw_error("comq: format ", f.name, " is not an integer format (int*g*, int*pc, their symmetric forms)");
  GptqResult r;
  r.q = comq_quantize(w.to(Device::CPU), h.to(Device::CPU), f, c_).q;
  return r;
}

}  // namespace lowbit
