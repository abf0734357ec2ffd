// Randomized Hadamard transform (QuIP's incoherence processing, QuaRot's rotations) and the
// fake quantizers of activations and KV caches (per token / per channel, integer grids).
//
// hadamard_transform: n = p * m, p a power of two. K = H_p / sqrt(p) (x) S (Kronecker product,
// index i = a * m + b with a < p, b < m; H_p the Sylvester Hadamard matrix, S an m x m matrix).
// Forward: y = (x * signs) K, computed per row as y[a, :] = x[a, :] S (an m-vector product per a),
// then the fast Walsh-Hadamard butterfly over a (stride m), n log2(p) additions. Transpose:
// y = (x K^T) * signs, the inverse of the forward when S is orthogonal (H_p / sqrt(p) is
// symmetric and orthogonal).
#include <algorithm>
#include <cmath>
#include <vector>

#include "lowbit/core/threads.h"
#include "lowbit/ops/act_quant_math.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

namespace {
bool power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }
}  // namespace

void hadamard_transform(const Tensor& x, const Tensor& signs, const Tensor& small, bool transpose, Tensor& y) {
  const char* op = "hadamard_transform";
  detail::check_contiguous(op, x, "x");
  detail::check_contiguous(op, y, "y");
  detail::check_shape(op, y, x.shape(), "y");
  detail::check_same_kind(op, x, y, "y");
  if (x.dim() < 1) throw_error(op, ": x must have at least one dimension, got ", x.describe());
  const int64_t n = x.size(-1), M = n > 0 ? x.numel() / n : 0;
  const int64_t m = small.defined() ? small.size(0) : 1;
  if (small.defined()) {
    detail::check_contiguous(op, small, "small");
    detail::check_shape(op, small, {m, m}, "small");
    detail::check_same_kind(op, x, small, "small");
  }
  if (m < 1 || n % m != 0 || !power_of_two(n / m))
    throw_error(op, ": row length ", n, " is not a power of two times the small matrix's size ", m);
  if (signs.defined()) {
    detail::check_contiguous(op, signs, "signs");
    detail::check_shape(op, signs, {n}, "signs");
    detail::check_same_kind(op, x, signs, "signs");
  }
  LB_CUDA_ROUTE(x, hadamard_transform, x, signs, small, transpose, y);
  const int64_t p = n / m;
  detail::dispatch_float(op, x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* xp = x.data<T>();
    const T* sp = signs.defined() ? signs.template data<T>() : nullptr;
    const T* Sp = small.defined() ? small.template data<T>() : nullptr;
    T* yp = y.data<T>();
    const T norm = T(1.0 / std::sqrt(double(p)));
    parallel_for(M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n)), [&](int64_t r0, int64_t r1) {
      std::vector<T> buf(static_cast<size_t>(n)), row(static_cast<size_t>(m));
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = xp + r * n;
        for (int64_t i = 0; i < n; ++i) buf[size_t(i)] = (!transpose && sp) ? xr[i] * sp[i] : xr[i];
        if (Sp) {  // each block of m values times S (forward) or S^T (transpose)
          for (int64_t a = 0; a < p; ++a) {
            T* blk = buf.data() + a * m;
            for (int64_t c = 0; c < m; ++c) {
              T acc = 0;
              for (int64_t b = 0; b < m; ++b) acc += blk[b] * (transpose ? Sp[c * m + b] : Sp[b * m + c]);
              row[size_t(c)] = acc;
            }
            for (int64_t c = 0; c < m; ++c) blk[c] = row[size_t(c)];
          }
        }
        for (int64_t h = 1; h < p; h *= 2)  // butterflies over the block index a (stride m)
          for (int64_t a0 = 0; a0 < p; a0 += 2 * h)
            for (int64_t a = a0; a < a0 + h; ++a)
              for (int64_t b = 0; b < m; ++b) {
                T& u = buf[size_t(a * m + b)];
                T& v = buf[size_t((a + h) * m + b)];
                const T s = u + v, d = u - v;
                u = s;
                v = d;
              }
        T* yr = yp + r * n;
        for (int64_t i = 0; i < n; ++i) yr[i] = buf[size_t(i)] * norm * ((transpose && sp) ? sp[i] : T(1));
      }
    });
  });
}

void fake_quant(const Tensor& x, int bits, bool asymmetric, double clip, int64_t group, bool per_column, Tensor& y) {
  const char* op = "fake_quant";
  detail::check_contiguous(op, x, "x");
  detail::check_contiguous(op, y, "y");
  detail::check_shape(op, y, x.shape(), "y");
  detail::check_same_kind(op, x, y, "y");
  if (bits < 2 || bits > 16) throw_error(op, ": ", bits, " bits (expected 2 to 16)");
  if (!(clip > 0 && clip <= 1)) throw_error(op, ": clip ratio ", clip, " is not in (0, 1]");
  if (x.dim() != 2) throw_error(op, ": x must be [rows, columns], got ", x.describe());
  const int64_t M = x.size(0), N = x.size(1);
  const int64_t along = per_column ? M : N;  // the dimension groups run along
  if (group < 1 || along % group != 0)
    throw_error(op, ": group of ", group, " does not divide the ", per_column ? "rows" : "columns", " (", along, ")");
  LB_CUDA_ROUTE(x, fake_quant, x, bits, asymmetric, clip, group, per_column, y);
  // Groups: per_column = false: row r, columns [g*group, (g+1)*group); true: column c, rows likewise.
  const int64_t groups_per_line = along / group, lines = per_column ? N : M;
  detail::dispatch_float(op, x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* xp = x.data<T>();
    T* yp = y.data<T>();
    parallel_for(lines * groups_per_line, std::max<int64_t>(1, 8192 / group), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t line = g / groups_per_line, start = (g % groups_per_line) * group;
        // Element k of the group: offset base + k * stride.
        const int64_t base = per_column ? start * N + line : line * N + start, stride = per_column ? N : 1;
        double lo = 0, hi = 0;  // the grid always holds zero
        for (int64_t k = 0; k < group; ++k) {
          const double v = double(xp[base + k * stride]);
          lo = aq::min_of(lo, v);
          hi = aq::max_of(hi, v);
        }
        const aq::FqGrid grid = aq::fq_grid(lo, hi, clip, bits, asymmetric);
        for (int64_t k = 0; k < group; ++k) yp[base + k * stride] = T(aq::fq_value(double(xp[base + k * stride]), grid));
      }
    });
  });
}

}  // namespace lowbit::ops
