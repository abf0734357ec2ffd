// Codebook learning for Coupled Quantization of the KV cache (methods/kv_cq.h).
#include "lowbit/methods/kv_cq.h"
#include "lowbit/methods/kv_calib_scope.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>

#include "lowbit/autograd/variable.h"
#include "lowbit/core/error.h"
#include "lowbit/core/format_traits.h"
#include "lowbit/core/threads.h"
#include "lowbit/ops/coupled_quant.h"

namespace lowbit {

namespace {
// Centroids [k, c] -> transposed [c, k] (ops::cq_nearest's layout).
void transpose_into(const std::vector<float>& cent, int64_t k, int64_t c, std::vector<float>& ct) {
  ct.resize(size_t(k * c));
  for (int64_t j = 0; j < k; ++j)
    for (int64_t d = 0; d < c; ++d) ct[size_t(d * k + j)] = cent[size_t(j * c + d)];
}

double sqdist(const float* a, const float* b, int64_t c) {
  double s = 0;
  for (int64_t d = 0; d < c; ++d) {
    const double e = double(a[d]) - double(b[d]);
    s += e * e;
  }
  return s;
}

// Assigns every point to its nearest centroid; returns the number of changed assignments.
int64_t assign(const float* xp, int64_t N, int64_t k, int64_t c, const std::vector<float>& cent,
               std::vector<int64_t>& a) {
  std::vector<float> ct;
  transpose_into(cent, k, c, ct);
  std::vector<int64_t> changed_per(size_t(N), 0);
  parallel_for(N, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t j = ops::cq_nearest(xp + i * c, ct.data(), k, c);
      changed_per[size_t(i)] = a[size_t(i)] != j;
      a[size_t(i)] = j;
    }
  });
  int64_t changed = 0;
  for (int64_t v : changed_per) changed += v;
  return changed;
}

double objective(const float* xp, int64_t N, int64_t c, const std::vector<float>& cent, const std::vector<int64_t>& a,
                 const std::vector<double>& w) {
  double s = 0;
  for (int64_t i = 0; i < N; ++i) s += w[size_t(i)] * sqdist(xp + i * c, cent.data() + a[size_t(i)] * c, c);
  return s;
}

// Index i with probability p_i / sum p (p >= 0, sum > 0).
int64_t sample(const std::vector<double>& p, double total, std::mt19937_64& rng) {
  const double u = std::uniform_real_distribution<double>(0.0, total)(rng);
  double acc = 0;
  int64_t last = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] <= 0) continue;
    acc += p[i];
    last = int64_t(i);
    if (u < acc) return int64_t(i);
  }
  return last;
}
}  // namespace

KMeansResult kmeans(const Tensor& x_in, int64_t k, const KMeansOptions& o, const Tensor& weights) {
  if (x_in.dim() != 2 || x_in.device() != Device::CPU)
    throw_error("kmeans: points must be [N, c] on the CPU, got ", x_in.describe());
  const Tensor x = x_in.to(DType::F32).contiguous();
  const int64_t N = x.size(0), c = x.size(1);
  if (N < 1 || c < 1) throw_error("kmeans: no points (", x.describe(), ")");
  if (k < 1 || k > 256) throw_error("kmeans: ", k, " centroids (expected 1 to 256)");
  if (o.max_iters < 0) throw_error("kmeans: max_iters ", o.max_iters, " is negative");
  const float* xp = x.data<float>();
  for (int64_t i = 0; i < N * c; ++i)
    if (!std::isfinite(xp[i])) throw_error("kmeans: point ", i / c, " is not finite");
  std::vector<double> w(size_t(N), 1.0);
  if (weights.defined()) {
    if (weights.dim() != 1 || weights.size(0) != N || weights.device() != Device::CPU)
      throw_error("kmeans: weights must be [", N, "] on the CPU, got ", weights.describe());
    const Tensor wd = weights.to(DType::F64).contiguous();
    for (int64_t i = 0; i < N; ++i) {
      w[size_t(i)] = wd.data<double>()[i];
      if (!(w[size_t(i)] >= 0) || !std::isfinite(w[size_t(i)]))
        throw_error("kmeans: weight ", i, " is ", w[size_t(i)], " (expected finite and >= 0)");
    }
  }
  // k-means++ seeding (weighted by w * D^2).
  std::mt19937_64 rng(o.seed);
  std::vector<float> cent(size_t(k * c));
  double wsum = 0;
  for (double v : w) wsum += v;
  int64_t first = wsum > 0 ? sample(w, wsum, rng) : 0;
  std::copy(xp + first * c, xp + (first + 1) * c, cent.begin());
  const size_t n_points = size_t(N);
  std::vector<double> D(n_points), p(n_points);
  for (int64_t i = 0; i < N; ++i) D[size_t(i)] = sqdist(xp + i * c, cent.data(), c);
  for (int64_t j = 1; j < k; ++j) {
    double total = 0;
    for (int64_t i = 0; i < N; ++i) total += p[size_t(i)] = w[size_t(i)] * D[size_t(i)];
    // No mass left (fewer distinct points than k): repeat points in order.
    const int64_t pick = total > 0 ? sample(p, total, rng) : j % N;
    std::copy(xp + pick * c, xp + (pick + 1) * c, cent.begin() + j * c);
    for (int64_t i = 0; i < N; ++i) D[size_t(i)] = std::min(D[size_t(i)], sqdist(xp + i * c, cent.data() + j * c, c));
  }
  KMeansResult r;
  r.assignment.assign(size_t(N), -1);
  assign(xp, N, k, c, cent, r.assignment);
  r.objective.push_back(objective(xp, N, c, cent, r.assignment, w));
  const size_t n_cent = size_t(k);
  std::vector<double> sum(n_cent * size_t(c)), cnt(n_cent);
  for (int it = 0; it < o.max_iters; ++it) {
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(cnt.begin(), cnt.end(), 0.0);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t a = r.assignment[size_t(i)];
      cnt[size_t(a)] += w[size_t(i)];
      for (int64_t d = 0; d < c; ++d) sum[size_t(a * c + d)] += w[size_t(i)] * double(xp[i * c + d]);
    }
    for (int64_t j = 0; j < k; ++j)
      if (cnt[size_t(j)] > 0)  // an empty centroid keeps its place
        for (int64_t d = 0; d < c; ++d) cent[size_t(j * c + d)] = float(sum[size_t(j * c + d)] / cnt[size_t(j)]);
    const int64_t changed = assign(xp, N, k, c, cent, r.assignment);
    r.objective.push_back(objective(xp, N, c, cent, r.assignment, w));
    r.iterations = it + 1;
    if (changed == 0) break;
  }
  r.centroids = Tensor::from_vector(cent, {k, c});
  return r;
}

KVCodebookReport learn_kv_codebooks(LlamaModel& model, const Tensor& tokens_in, const KVCodebookOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  if (tokens_in.dim() != 2 || tokens_in.dtype() != DType::I32 || tokens_in.size(0) < 1 || tokens_in.size(1) < 1)
    throw_error("kv codebooks: calibration tokens must be i32 [N, T], got ", tokens_in.describe());
  const LlamaConfig& cfg = model.config();
  const int64_t hd = cfg.resolved_head_dim(), C = int64_t(cfg.n_kv_heads) * hd, c = o.channels;
  if (c < 1 || hd % c != 0) throw_error("kv codebooks: groups of ", c, " channels do not divide head_dim ", hd);
  if (o.code_bits < 1 || o.code_bits > 8) throw_error("kv codebooks: ", o.code_bits, " bits a group (expected 1 to 8)");
  if (o.max_points < 1) throw_error("kv codebooks: max_points ", o.max_points, " (expected >= 1)");
  const int64_t K = int64_t(1) << o.code_bits, G = C / c, L = model.n_layers();
  const Tensor tokens = tokens_in.contiguous();
  const int64_t Nw = tokens.size(0), T = tokens.size(1), total = Nw * T;
  const int64_t stride = (total + o.max_points - 1) / o.max_points, P = (total + stride - 1) / stride;
  KVCodebookReport rep;
  rep.points = P;
  rep.keys = Tensor::empty({L, G, K, c});
  rep.values = Tensor::empty({L, G, K, c});
  KvCalibrationScope scope(model);  // restores the transforms and clears the observer on every exit
  const ModelTransforms& saved = scope.saved();
  ModelTransforms plain = saved;
  plain.kv = KVQuantSpec{};
  std::vector<float> kr(size_t(P * C)), vr(size_t(P * C));
  int64_t row_base = 0;
  model.set_transforms(plain);
  model.set_kv_observer([&](int, const Tensor& k, const Tensor& v) {
    const Tensor kf = k.to(DType::F32).contiguous(), vf = v.to(DType::F32).contiguous();
    const int64_t n = kf.numel() / C;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t g = row_base + r;
      if (g % stride != 0) continue;
      const int64_t slot = g / stride;
      std::copy(kf.data<float>() + r * C, kf.data<float>() + (r + 1) * C, kr.begin() + slot * C);
      std::copy(vf.data<float>() + r * C, vf.data<float>() + (r + 1) * C, vr.begin() + slot * C);
    }
  });
  NoGradGuard ng;
  std::vector<Var> h(static_cast<size_t>(Nw));
  for (int64_t s = 0; s < Nw; ++s) h[size_t(s)] = model.embed(tokens.slice(0, s, s + 1).contiguous());
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t s = 0; s < Nw; ++s) {
      row_base = s * T;
      h[size_t(s)] = model.block_forward(int(i), h[size_t(s)], 1, T);
    }
    for (float f : kr)
      if (!std::isfinite(f)) throw_error("kv codebooks: layer ", i, "'s keys are not finite on the calibration data");
    for (float f : vr)
      if (!std::isfinite(f)) throw_error("kv codebooks: layer ", i, "'s values are not finite on the calibration data");
    // 2 * G k-means problems of P points in c dimensions, one per item of the pool.
    std::vector<double> err(size_t(2 * G)), norm(size_t(2 * G));
    parallel_each(2 * G, [&](int64_t item) {
      const bool is_v = item >= G;
      const int64_t g = item % G;
      const std::vector<float>& src = is_v ? vr : kr;
      Tensor pts = Tensor::empty({P, c});
      float* pp = pts.data<float>();
      double nrm = 0;
      for (int64_t r = 0; r < P; ++r)
        for (int64_t d = 0; d < c; ++d) {
          pp[r * c + d] = src[size_t(r * C + g * c + d)];
          nrm += double(pp[r * c + d]) * double(pp[r * c + d]);
        }
      KMeansOptions ko = o.kmeans;
      ko.seed = o.kmeans.seed * 0x9E3779B97F4A7C15ull + uint64_t(i) * 1000003ull + uint64_t(item);
      KMeansResult km = kmeans(pts, K, ko);
      float* dst = (is_v ? rep.values : rep.keys).data<float>() + (i * G + g) * K * c;
      std::copy(km.centroids.data<float>(), km.centroids.data<float>() + K * c, dst);
      err[size_t(item)] = km.objective.back();
      if (o.f16) {  // the stored codebook: f16 centroids, the points re-assigned to them
        std::vector<float> cent(dst, dst + K * c);
        for (float& v : cent) v = fmt_f16_to_f32(fmt_f32_to_f16(v));
        std::copy(cent.begin(), cent.end(), dst);
        assign(pp, P, K, c, cent, km.assignment);
        err[size_t(item)] = objective(pp, P, c, cent, km.assignment, std::vector<double>(size_t(P), 1.0));
      }
      norm[size_t(item)] = nrm;
    });
    double ek = 0, nk = 0, ev = 0, nv = 0;
    for (int64_t g = 0; g < G; ++g) {
      ek += err[size_t(g)];
      nk += norm[size_t(g)];
      ev += err[size_t(G + g)];
      nv += norm[size_t(G + g)];
    }
    rep.key_rel_error.push_back(nk > 0 ? ek / nk : 0.0);
    rep.value_rel_error.push_back(nv > 0 ? ev / nv : 0.0);
  }
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

}  // namespace lowbit
