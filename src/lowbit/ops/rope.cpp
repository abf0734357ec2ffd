// Rotary position embedding (RoFormer, Su et al. 2021, eq. 34). Pair i of a head rotates by
// angle pos * theta^(-2i/hd). The rotation is orthogonal, so its backward is the rotation by the
// negative angle (inverse = true).
#include <algorithm>
#include <cmath>
#include <vector>

#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit {

std::vector<double> rope_inv_freq(double theta, int64_t hd, const RopeScaling& s) {
  const int64_t half = hd / 2;
  std::vector<double> inv(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) inv[size_t(i)] = std::pow(theta, -double(2 * i) / double(hd));
  for (double& f : inv) f = rope_scaled_freq(f, s);
  return inv;
}

}  // namespace lowbit

namespace lowbit::ops {

namespace {
// cos/sin of pos * theta^(-2i/hd) in double (closer to the exact rotation than f32), kept per
// thread for positions [0, n) and reused while theta and hd stay: a forward calls rope twice
// per block with the same angles. Returns the tables (valid until this thread's next call).
struct RopeTable {
  double theta = 0;
  int64_t hd = 0, npos = 0;
  RopeScaling scaling;
  std::vector<double> c, s;
  bool same(double th, int64_t d, const RopeScaling& sc) const {
    return theta == th && hd == d && scaling.factor == sc.factor && scaling.low_freq_factor == sc.low_freq_factor &&
           scaling.high_freq_factor == sc.high_freq_factor && scaling.original_max_position == sc.original_max_position;
  }
};
const RopeTable& rope_table(double theta, int64_t hd, const RopeScaling& scaling, int64_t need) {
  const int64_t half = hd / 2;
  thread_local RopeTable tab;
  if (!tab.same(theta, hd, scaling) || tab.npos < need) {
    const int64_t npos = std::max<int64_t>(need, tab.same(theta, hd, scaling) ? 2 * tab.npos : 0);
    const std::vector<double> inv_freq = rope_inv_freq(theta, hd, scaling);
    tab.c.resize(size_t(npos * half));
    tab.s.resize(size_t(npos * half));
    for (int64_t p = 0; p < npos; ++p)
      for (int64_t i = 0; i < half; ++i) {
        const double ang = double(p) * inv_freq[i];
        tab.c[p * half + i] = std::cos(ang);
        tab.s[p * half + i] = std::sin(ang);
      }
    tab.theta = theta;
    tab.hd = hd;
    tab.scaling = scaling;
    tab.npos = npos;
  }
  return tab;
}

// The CPU body on rows bt = 0 .. BT-1 of H heads (position pos0 + bt % T); y may be x.
template <class TT>
void rope_body(const TT* xp, TT* yp, int64_t BT, int64_t T, int64_t H, int64_t hd, int64_t pos0, double theta,
               RopeStyle style, bool inverse, const RopeScaling& scaling) {
  const int64_t half = hd / 2;
  const RopeTable& tab = rope_table(theta, hd, scaling, pos0 + T);
  const double *ct = tab.c.data(), *st = tab.s.data();
  parallel_for(BT, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * hd)), [&](int64_t lo, int64_t hi) {
    for (int64_t bt = lo; bt < hi; ++bt) {
      const int64_t pos = pos0 + bt % T;
      const double* cp = ct + pos * half;
      const double* sp = st + pos * half;
      const double sgn = inverse ? -1.0 : 1.0;  // exact: the negated sine
      // Head by head, pairs in order (contiguous: the compiler vectorizes the Half style's loop).
      for (int64_t h = 0; h < H; ++h) {
        const TT* x = xp + (bt * H + h) * hd;
        TT* y = yp + (bt * H + h) * hd;
        if (style == RopeStyle::Interleaved) {
          for (int64_t i = 0; i < half; ++i) {
            const double c = cp[i], s = sgn * sp[i], x0 = x[2 * i], x1 = x[2 * i + 1];
            y[2 * i] = TT(x0 * c - x1 * s);
            y[2 * i + 1] = TT(x0 * s + x1 * c);
          }
        } else {
          for (int64_t i = 0; i < half; ++i) {
            const double c = cp[i], s = sgn * sp[i], x0 = x[i], x1 = x[i + half];
            y[i] = TT(x0 * c - x1 * s);
            y[i + half] = TT(x0 * s + x1 * c);
          }
        }
      }
    }
  });
}
}  // namespace

void rope_f32(const float* x, float* y, int64_t T, int64_t H, int64_t hd, int64_t pos0, double theta, RopeStyle style,
              const RopeScaling& scaling) {
  if (hd % 2 != 0) throw_error("rope: head_dim ", hd, " must be even");
  if (pos0 < 0) throw_error("rope: position offset ", pos0, " is negative");
  rope_body(x, y, T, T, H, hd, pos0, theta, style, false, scaling);
}

void rope(const Tensor& x, int64_t pos0, double theta, RopeStyle style, bool inverse, Tensor& y,
          const RopeScaling& scaling) {
  const char* op = "rope";
  detail::check_contiguous(op, x, "x");
  if (x.dim() != 4) throw_error(op, ": x must be [B, T, H, hd], got ", x.describe());
  detail::check_shape(op, y, x.shape(), "y");
  detail::check_same_kind(op, x, y, "y");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), hd = x.size(3);
  if (hd % 2 != 0) throw_error(op, ": head_dim ", hd, " must be even");
  if (pos0 < 0) throw_error(op, ": position offset ", pos0, " is negative");
  LB_CUDA_ROUTE(x, rope, x, pos0, theta, style, inverse, y, scaling);
  detail::dispatch_float(op, x.dtype(), [&](auto tag) {
    using TT = decltype(tag);
    rope_body(x.data<TT>(), y.data<TT>(), B * T, T, H, hd, pos0, theta, style, inverse, scaling);
  });
}

}  // namespace lowbit::ops
