// Calibration of WKVQuant's KV smoothing (methods/kv_wkv.h).
#include "lowbit/methods/kv_wkv.h"
#include "lowbit/methods/kv_calib_scope.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "lowbit/autograd/variable.h"
#include "lowbit/core/error.h"

namespace lowbit {

namespace {
double sq_err(const Tensor& a, const Tensor& b, double& norm) {
  const Tensor ac = a.to(DType::F32).contiguous(), bc = b.to(DType::F32).contiguous();
  const float *x = ac.data<float>(), *y = bc.data<float>();
  double e = 0;
  for (int64_t i = 0; i < ac.numel(); ++i) {
    const double d = double(x[i]) - double(y[i]);
    e += d * d;
    norm += double(y[i]) * double(y[i]);
  }
  return e;
}
}  // namespace

WkvCalibReport learn_wkv_smoothing(LlamaModel& model, const Tensor& tokens_in, const WkvCalibOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  if (tokens_in.dim() != 2 || tokens_in.dtype() != DType::I32 || tokens_in.size(0) < 1 || tokens_in.size(1) < 1)
    throw_error("wkv calibration: calibration tokens must be i32 [N, T], got ", tokens_in.describe());
  if (o.bits != 2 && o.bits != 4) throw_error("wkv calibration: ", o.bits, " bits (expected 4 or 2)");
  if (o.group < 1) throw_error("wkv calibration: group ", o.group, " (expected >= 1)");
  if (o.lookahead < 0) throw_error("wkv calibration: lookahead ", o.lookahead, " (expected >= 0)");
  for (double a : o.alphas)
    if (!(a >= 0 && a <= 1)) throw_error("wkv calibration: exponent ", a, " is not in [0, 1]");
  const LlamaConfig& cfg = model.config();
  const int64_t hd = cfg.resolved_head_dim(), C = int64_t(cfg.n_kv_heads) * hd, L = model.n_layers();
  const Tensor tokens = tokens_in.contiguous();
  const int64_t Nw = tokens.size(0), T = tokens.size(1);
  WkvCalibReport rep;
  rep.shift = Tensor::zeros({L, 2, C});
  rep.scale = Tensor::full({L, 2, C}, 1.0f);
  KvCalibrationScope scope(model);  // restores the transforms and clears the observer on every exit
  const ModelTransforms& saved = scope.saved();
  ModelTransforms plain = saved;
  plain.kv = KVQuantSpec{};
  // Candidate specs: layer l's smoothing as given, the others none (only layer l runs quantized).
  ModelTransforms cand = plain;
  cand.kv.bits = o.bits;
  cand.kv.group = o.group;
  cand.kv.window = 0;
  cand.kv.wkv = true;
  const size_t nC = static_cast<size_t>(C);
  std::vector<double> kmin(nC), kmax(nC), vmin(nC), vmax(nC);
  model.set_transforms(plain);
  const LlamaModel::KVObserver observe = [&](int, const Tensor& k, const Tensor& v) {
    const Tensor kf = k.to(DType::F32).contiguous(), vf = v.to(DType::F32).contiguous();
    const int64_t n = kf.numel() / C;
    const float *kp = kf.data<float>(), *vp = vf.data<float>();
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const double a = kp[r * C + c], b = vp[r * C + c];
        kmin[size_t(c)] = std::min(kmin[size_t(c)], a);
        kmax[size_t(c)] = std::max(kmax[size_t(c)], a);
        vmin[size_t(c)] = std::min(vmin[size_t(c)], b);
        vmax[size_t(c)] = std::max(vmax[size_t(c)], b);
      }
  };
  NoGradGuard ng;
  std::vector<Var> h(static_cast<size_t>(Nw)), out(static_cast<size_t>(Nw)), target(static_cast<size_t>(Nw));
  for (int64_t s = 0; s < Nw; ++s) h[size_t(s)] = model.embed(tokens.slice(0, s, s + 1).contiguous());
  for (int64_t i = 0; i < L; ++i) {
    const int64_t last = std::min<int64_t>(L - 1, i + o.lookahead);
    // Full precision: the statistics, block i's output and block `last`'s output.
    std::fill(kmin.begin(), kmin.end(), INFINITY);
    std::fill(vmin.begin(), vmin.end(), INFINITY);
    std::fill(kmax.begin(), kmax.end(), -INFINITY);
    std::fill(vmax.begin(), vmax.end(), -INFINITY);
    for (int64_t s = 0; s < Nw; ++s) {
      model.set_kv_observer(observe);
      out[size_t(s)] = model.block_forward(int(i), h[size_t(s)], 1, T);
      model.set_kv_observer({});
      Var y = out[size_t(s)];
      for (int64_t j = i + 1; j <= last; ++j) y = model.block_forward(int(j), y, 1, T);
      target[size_t(s)] = y;
    }
    model.set_kv_observer({});
    for (int64_t c = 0; c < C; ++c)
      if (!std::isfinite(kmin[size_t(c)] + kmax[size_t(c)] + vmin[size_t(c)] + vmax[size_t(c)]))
        throw_error("wkv calibration: layer ", i, "'s keys/values are not finite on the calibration data");
    // Candidate rows: kind 0 keys, 1 values; alpha < 0: no smoothing.
    auto fill = [&](float* d, float* sc, bool values, double alpha) {
      const std::vector<double>& lo = values ? vmin : kmin;
      const std::vector<double>& hi = values ? vmax : kmax;
      double rmax = 0;
      for (int64_t c = 0; c < C; ++c) rmax = std::max(rmax, (hi[size_t(c)] - lo[size_t(c)]) / 2);
      const double floor = std::max(rmax * 1e-6, 1e-30);
      for (int64_t c = 0; c < C; ++c) {
        if (alpha < 0) {
          d[c] = 0.0f;
          sc[c] = 1.0f;
          continue;
        }
        const double r = std::max((hi[size_t(c)] - lo[size_t(c)]) / 2, floor);
        d[c] = float((hi[size_t(c)] + lo[size_t(c)]) / 2);
        sc[c] = float(std::pow(r, alpha));
        if (!(sc[c] > 0) || !std::isfinite(sc[c])) sc[c] = 1.0f;
      }
    };
    struct Loss {
      double cross = 0, local = 0;
    };
    auto evaluate = [&](double ak, double av) {
      Tensor sh = Tensor::zeros({L, 2, C}), sc = Tensor::full({L, 2, C}, 1.0f);
      fill(sh.data<float>() + (i * 2 + 0) * C, sc.data<float>() + (i * 2 + 0) * C, false, ak);
      fill(sh.data<float>() + (i * 2 + 1) * C, sc.data<float>() + (i * 2 + 1) * C, true, av);
      ModelTransforms t = cand;
      t.kv.wkv_shift = sh;
      t.kv.wkv_scale = sc;
      double ec = 0, nc = 0, el = 0, nl = 0;
      for (int64_t s = 0; s < Nw; ++s) {
        model.set_transforms(t);
        Var y = model.block_forward(int(i), h[size_t(s)], 1, T);
        el += sq_err(y.value(), out[size_t(s)].value(), nl);
        model.set_transforms(plain);
        for (int64_t j = i + 1; j <= last; ++j) y = model.block_forward(int(j), y, 1, T);
        ec += sq_err(y.value(), target[size_t(s)].value(), nc);
      }
      model.set_transforms(plain);
      return Loss{nc > 0 ? ec / nc : 0.0, nl > 0 ? el / nl : 0.0};
    };
    const Loss none = evaluate(-1, -1);
    double bk = -1, bv = -1;
    Loss best = none;
    for (double a : o.alphas) {
      const Loss l = evaluate(a, -1);
      if (l.cross < best.cross) best = l, bk = a;
    }
    for (double a : o.alphas) {
      const Loss l = evaluate(bk, a);
      if (l.cross < best.cross) best = l, bv = a;
    }
    fill(rep.shift.data<float>() + (i * 2 + 0) * C, rep.scale.data<float>() + (i * 2 + 0) * C, false, bk);
    fill(rep.shift.data<float>() + (i * 2 + 1) * C, rep.scale.data<float>() + (i * 2 + 1) * C, true, bv);
    rep.alpha_keys.push_back(bk);
    rep.alpha_values.push_back(bv);
    rep.loss_plain.push_back(none.cross);
    rep.loss_chosen.push_back(best.cross);
    rep.local_plain.push_back(none.local);
    rep.local_chosen.push_back(best.local);
    h.swap(out);  // the next layer calibrates on full-precision inputs
  }
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

}  // namespace lowbit
