// CPU reference bodies of INT4 training's quantizers (ops/lp_int4.h): the Hadamard quantizer and the
// bit-splitting + leverage-score-sampling estimate of the output gradient, their argument checks and
// the routing to the CUDA bodies (ops/cuda/lp_int4.cu). The arithmetic both bodies share is
// ops/lp_int4_math.h's.
#include "lowbit/ops/lp_int4.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"
#include "lowbit/ops/lp_int4_math.h"

namespace lowbit::ops {

namespace {

void check_2d(const char* op, const Tensor& x, const char* name) {
  detail::check_contiguous(op, x, name);
  if (x.dim() != 2) throw_error(op, ": ", name, " must be [rows, cols], got ", x.describe());
}

// x's values in f32 (f64 rounded first, as everything below is f32); false when one is NaN/inf.
template <class T>
bool load_f32(const T* xp, int64_t n, std::vector<float>& v) {
  v.resize(size_t(n));
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    v[size_t(i)] = float(xp[i]);
    finite = finite && std::isfinite(v[size_t(i)]);
  }
  return finite;
}

float amax_of(const std::vector<float>& v) {
  float m = 0;
  for (float a : v) m = std::max(m, std::fabs(a));
  return m;
}

void block_hadamard(std::vector<float>& v, int64_t R, int64_t C, int32_t block, uint64_t seed, bool inverse) {
  if (block <= 0) return;
  const int64_t groups = C / block;
  parallel_for(R, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C)), [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r)
      for (int64_t j = 0; j < groups; ++j) lp::rht_apply(v.data() + r * C + j * block, 1, block, seed, inverse);
  });
}

// Per-row scales have no CUDA body (the shared per-element arithmetic would serve; the per-row
// amax reduction is not written): refused with the op's name.
void refuse_per_row_cuda(const char* op, const Tensor& t) {
  if (detail::on_cuda(t))
    throw_error(op, ": per-row INT4 scales (--lp-int4-scale row) have no CUDA body yet: use --device cpu or "
                "--lp-int4-scale tensor");
}

}  // namespace

void lp_int4_hq(const Tensor& x, int32_t block, uint64_t seed, bool back, Tensor& y, LpInt4Stats* stats,
                bool per_row) {
  const char* op = "lp_int4_hq";
  check_2d(op, x, "x");
  if (block != 0 && (block < 2 || block > 256 || (block & (block - 1)) != 0))
    throw_error(op, ": Hadamard block ", block, " is not 0 (none) or a power of two in [2, 256]");
  const int64_t R = x.size(0), C = x.size(1), n = R * C;
  if (per_row) refuse_per_row_cuda(op, x);
  y = Tensor::empty(x.shape(), x.dtype(), x.device());
  LB_CUDA_ROUTE(x, lp_int4_hq, x, block, seed, back, y, stats)
  detail::dispatch_float(op, x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* yp = y.data<T>();
    std::vector<float> v;
    if (!load_f32(x.data<T>(), n, v)) {
      if (stats) *stats = {std::nan(""), 0.0};
      std::fill(yp, yp + n, T(std::nan("")));
      return;
    }
    block_hadamard(v, R, C, block, seed, false);
    if (per_row) {  // s_r = amax(row r) / 7
      float amax = 0;
      for (int64_t r = 0; r < R; ++r) {
        float m = 0;
        for (int64_t c = 0; c < C; ++c) m = std::max(m, std::fabs(v[size_t(r * C + c)]));
        const float s = m / lp::kInt4Max;
        for (int64_t c = 0; c < C; ++c) v[size_t(r * C + c)] = lp::int4_qdq(v[size_t(r * C + c)], s);
        amax = std::max(amax, m);
      }
      if (stats) *stats = {double(amax), double(amax / lp::kInt4Max)};
    } else {
      const float amax = amax_of(v), s = amax / lp::kInt4Max;
      if (stats) *stats = {double(amax), double(s)};
      for (float& a : v) a = lp::int4_qdq(a, s);
    }
    if (back) block_hadamard(v, R, C, block, seed, true);
    for (int64_t i = 0; i < n; ++i) yp[i] = T(v[size_t(i)]);
  });
}

void lp_lss_probabilities(const double* s, int64_t n, double budget, double* p) {
  lp::lss_probabilities(s, n, budget, p);
}

void lp_int4_bitsplit(const Tensor& g, uint64_t seed, Tensor& hi, Tensor& lo, LpSplitStats* stats, bool per_row) {
  const char* op = "lp_int4_bitsplit";
  check_2d(op, g, "g");
  if (per_row) refuse_per_row_cuda(op, g);
  const int64_t n = g.numel();
  hi = Tensor::empty(g.shape(), g.dtype(), g.device());
  lo = Tensor::empty(g.shape(), g.dtype(), g.device());
  LB_CUDA_ROUTE(g, lp_int4_bitsplit, g, seed, hi, lo, stats)
  detail::dispatch_float(op, g.dtype(), [&](auto tag) {
    using D = decltype(tag);
    D* hp = hi.data<D>();
    D* lp_ = lo.data<D>();
    std::vector<float> v;
    if (!load_f32(g.data<D>(), n, v)) {
      if (stats) *stats = {std::nan(""), std::nan("")};
      std::fill(hp, hp + n, D(std::nan("")));
      std::fill(lp_, lp_ + n, D(std::nan("")));
      return;
    }
    const uint64_t sr_seed = lp::mix64(seed ^ 0x1ull);
    if (per_row) {  // s_hi,t = amax(g row t) / 7, s_lo,t = s_hi,t / 14; the draws as below (element index)
      const int64_t T = g.size(0), N = g.size(1);
      float smax = 0;
      for (int64_t t = 0; t < T; ++t) {
        float m = 0;
        for (int64_t c = 0; c < N; ++c) m = std::max(m, std::fabs(v[size_t(t * N + c)]));
        const float sh = m / lp::kInt4Max, sl = sh / 14.0f;
        smax = std::max(smax, sh);
        for (int64_t c = 0; c < N; ++c) {
          const int64_t i = t * N + c;
          float h = 0, l = 0;
          if (sh > 0) lp::int4_bitsplit(v[size_t(i)], sh, sl, lp::uniform(sr_seed, uint64_t(i)), h, l);
          hp[i] = D(h);
          lp_[i] = D(l);
        }
      }
      if (stats) *stats = {double(smax), double(smax / 14.0f)};
      return;
    }
    // hi = s_hi rint(g / s_hi), lo = s_lo SR((g - hi) / s_lo)
    const float s_hi = amax_of(v) / lp::kInt4Max, s_lo = s_hi / 14.0f;
    if (stats) *stats = {double(s_hi), double(s_lo)};
    if (!(s_hi > 0)) {
      std::fill(hp, hp + n, D(0));
      std::fill(lp_, lp_ + n, D(0));
      return;
    }
    parallel_for(n, 1 << 14, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        float h, l;
        lp::int4_bitsplit(v[size_t(i)], s_hi, s_lo, lp::uniform(sr_seed, uint64_t(i)), h, l);
        hp[i] = D(h);
        lp_[i] = D(l);
      }
    });
  });
}

void lp_int4_lss(const Tensor& hi, const Tensor& lo, const Tensor& partner, bool sample, uint64_t seed, Tensor& y,
                 LpLssStats* stats) {
  const char* op = "lp_int4_lss";
  check_2d(op, hi, "hi");
  check_2d(op, lo, "lo");
  if (lo.shape() != hi.shape() || lo.dtype() != hi.dtype())
    throw_error(op, ": lo ", lo.describe(), " is not the shape and dtype of hi ", hi.describe());
  if (partner.defined()) {
    check_2d(op, partner, "partner");
    if (partner.size(0) != hi.size(0))
      throw_error(op, ": partner ", partner.describe(), " does not pair its rows with hi ", hi.describe());
  }
  for (const Tensor* t : {&lo, &partner})
    if (t->defined() && t->device() != hi.device())
      throw_error(op, ": ", t == &lo ? "lo " : "partner ", t->describe(), " is not on hi's device (", hi.describe(), ")");
  const int64_t T = hi.size(0), N = hi.size(1);
  y = Tensor::empty(hi.shape(), hi.dtype(), hi.device());
  LB_CUDA_ROUTE(hi, lp_int4_lss, hi, lo, partner, sample, seed, y, stats)
  std::vector<double> pnorm(size_t(T), 1.0);  // |partner row| (1 without one)
  if (partner.defined()) {
    const int64_t K = partner.size(1);
    detail::dispatch_float(op, partner.dtype(), [&](auto tag) {
      using P = decltype(tag);
      const P* pp = partner.data<P>();
      for (int64_t t = 0; t < T; ++t) {
        double ss = 0;
        for (int64_t k = 0; k < K; ++k) ss = lp::sumsq_step(ss, double(pp[t * K + k]));
        pnorm[size_t(t)] = std::sqrt(ss);
      }
    });
  }
  detail::dispatch_float(op, hi.dtype(), [&](auto tag) {
    using D = decltype(tag);
    const D* hp = hi.data<D>();
    const D* lp_ = lo.data<D>();
    D* yp = y.data<D>();
    // keep-probabilities of the 2T stacked rows [hi; lo], paired with [partner; partner]
    std::vector<double> score(size_t(2 * T)), p(size_t(2 * T), 1.0);
    for (int64_t half = 0; half < 2; ++half) {
      const D* m = half ? lp_ : hp;
      for (int64_t t = 0; t < T; ++t) {
        double ss = 0;
        for (int64_t c = 0; c < N; ++c) ss = lp::sumsq_step(ss, double(m[t * N + c]));
        score[size_t(half * T + t)] = std::sqrt(ss) * pnorm[size_t(t)];
      }
    }
    if (sample) lp::lss_probabilities(score.data(), 2 * T, double(T), p.data());
    // y = kept hi / p + kept lo / p
    std::vector<float> f(size_t(2 * T));  // the factor of each stacked row: 1 / p_i or 0
    const lp::LssCounts st = lp::lss_factors(score.data(), p.data(), 2 * T, seed, f.data());
    for (int64_t t = 0; t < T; ++t) {
      const float fh = f[size_t(t)], fl = f[size_t(T + t)];
      for (int64_t c = 0; c < N; ++c) yp[t * N + c] = D(lp::lss_combine(float(hp[t * N + c]), fh, float(lp_[t * N + c]), fl));
    }
    if (stats) *stats = {st.nonzero, st.kept, st.certain};
  });
}

}  // namespace lowbit::ops
