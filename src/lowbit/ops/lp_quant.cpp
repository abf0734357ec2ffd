// CPU reference body of the operand quantizer of low-precision training (ops/lp_quant.h), its
// argument checks and the routing to the CUDA body. The arithmetic is ops/lp_quant_math.h's (f32).
#include "lowbit/ops/lp_quant.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"
#include "lowbit/ops/ops.h"

namespace lowbit::ops {

const char* lp_format_name(LpFormat f) {
  switch (f) {
    case LpFormat::None: return "none";
    case LpFormat::BF16: return "bf16";
    case LpFormat::E4M3: return "e4m3";
    case LpFormat::E5M2: return "e5m2";
    case LpFormat::MXFP4: return "mxfp4";
    case LpFormat::NVFP4: return "nvfp4";
    case LpFormat::E2M1: return "e2m1";
  }
  return "?";
}

namespace {

void check_spec(const char* op, const LpQuantSpec& s) {
  if (int(s.format) > int(LpFormat::E2M1)) throw_error(op, ": unknown format ", int(s.format));
  if (lp::is_fp4(s.format) && (s.tile_rows < 1 || s.tile_cols < 1))
    throw_error(op, " [", lp_format_name(s.format), "]: tile ", s.tile_rows, " x ", s.tile_cols, " must be at least 1 x 1");
  if (s.rounding == LpRounding::Stochastic && !lp::is_fp4(s.format))
    throw_error(op, " [", lp_format_name(s.format), "]: stochastic rounding is implemented for the E2M1 formats (mxfp4, nvfp4, e2m1)");
  if (s.rht_axis < -1 || s.rht_axis > 1) throw_error(op, ": rht_axis ", s.rht_axis, " is not -1, 0 or 1");
  if (s.rht_axis >= 0 && (s.rht_size < 2 || s.rht_size > 256 || (s.rht_size & (s.rht_size - 1)) != 0))
    throw_error(op, ": rht_size ", s.rht_size, " is not a power of two in [2, 256]");
  if (!(s.tensor_scale >= 0) || !std::isfinite(s.tensor_scale))
    throw_error(op, ": tensor_scale ", s.tensor_scale, " must be finite and >= 0 (0: current scaling)");
}

}  // namespace

void lp_quantize(const Tensor& x, const LpQuantSpec& spec, Tensor& y, LpQuantStats* stats) {
  const char* op = "lp_quantize";
  detail::check_contiguous(op, x, "x");
  if (x.dim() != 2) throw_error(op, ": x must be [rows, cols], got ", x.describe());
  check_spec(op, spec);
  y = Tensor::empty(x.shape(), x.dtype(), x.device());
  LB_CUDA_ROUTE(x, lp_quantize, x, spec, y, stats)
  const int64_t R = x.size(0), C = x.size(1), n = R * C;
  detail::dispatch_float(op, x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data<T>();
    T* yp = y.data<T>();
    if (spec.format == LpFormat::None && spec.rht_axis < 0) {  // the value itself, in its own dtype
      double amax = 0;
      for (int64_t i = 0; i < n; ++i) {
        yp[i] = xp[i];
        amax = std::max(amax, std::fabs(double(xp[i])));
      }
      if (stats) *stats = {amax, 0.0};
      return;
    }
    // The f32 working copy (f64 inputs are rounded to f32 first, as everything below is f32).
    std::vector<float> v(static_cast<size_t>(n));
    parallel_for(n, 1 << 16, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) v[size_t(i)] = float(xp[i]);
    });
    // 1. Hadamard groups (whole groups only: a shorter last group stays as it is). Along columns
    // (axis 0) rht_apply_rows runs on whole rows of a group — per value the operations and their
    // order of rht_apply, so the values are the CUDA body's — which keeps the loops contiguous.
    if (spec.rht_axis == 1) {
      const int hn = spec.rht_size;
      const int64_t groups = C / hn;
      parallel_for(groups * R, std::max<int64_t>(1, 4096 / hn), [&](int64_t a, int64_t b) {
        for (int64_t t = a; t < b; ++t) lp::rht_apply(v.data() + (t / groups) * C + (t % groups) * hn, 1, hn, spec.rht_seed, false);
      });
    } else if (spec.rht_axis == 0) {  // whole rows of a group at once (contiguous loops)
      const int hn = spec.rht_size;
      parallel_for(R / hn, 1, [&](int64_t a, int64_t b) {
        for (int64_t g = a; g < b; ++g) lp::rht_apply_rows(v.data() + g * hn * C, C, C, hn, spec.rht_seed, false);
      });
    }
    // 2. amax (order-free: the largest of the chunks' maxima).
    const int64_t chunk = 1 << 15, chunks = std::max<int64_t>(1, (n + chunk - 1) / chunk);
    std::vector<float> part(size_t(chunks), 0.0f);
    parallel_for(chunks, 1, [&](int64_t a, int64_t b) {
      for (int64_t h = a; h < b; ++h) {
        float m = 0;
        for (int64_t i = h * chunk, e = std::min(n, i + chunk); i < e; ++i) m = std::max(m, std::fabs(v[size_t(i)]));
        part[size_t(h)] = m;
      }
    });
    float amax = 0;
    for (float m : part) amax = std::max(amax, m);
    bool finite = true;  // NaN is not caught by max: look for it once
    for (int64_t i = 0; i < n && finite; ++i) finite = std::isfinite(v[size_t(i)]);
    if (!finite) {  // NaN / inf in the operand: NaN out (the trainer stops with its divergence error)
      if (stats) *stats = {std::nan(""), 0.0};
      for (int64_t i = 0; i < n; ++i) yp[i] = T(std::nan(""));
      return;
    }
    const LpFormat f = spec.format;
    const bool sr = spec.rounding == LpRounding::Stochastic;
    float ts = 0;  // the tensor-level scale
    if (lp::is_fp8(f)) ts = spec.tensor_scale > 0 ? spec.tensor_scale : lp::tensor_scale(f, amax);
    else if (f == LpFormat::NVFP4) ts = lp::tensor_scale(f, amax);
    if (stats) *stats = {double(amax), double(ts)};
    if (!lp::is_fp4(f)) {
      parallel_for(n, 1 << 14, [&](int64_t a, int64_t b) {
        for (int64_t i = a; i < b; ++i) yp[i] = T(lp::qdq(f, v[size_t(i)], ts, false, 0.0f));
      });
      return;
    }
    // 4. tiles: one row of tiles per task; the tile maxima from column maxima over the tile's rows,
    // then each row quantized against its tiles' scales (contiguous loops, no branches per element).
    const int64_t tr = spec.tile_rows, tc = spec.tile_cols;
    const int64_t TR = (R + tr - 1) / tr, TC = (C + tc - 1) / tc;
    parallel_for(TR, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, tr * C)), [&](int64_t a, int64_t b) {
      std::vector<float> colmax(static_cast<size_t>(C)), scale(static_cast<size_t>(C));
      for (int64_t i = a; i < b; ++i) {
        const int64_t r0 = i * tr, r1 = std::min(R, r0 + tr);
        std::fill(colmax.begin(), colmax.end(), 0.0f);
        for (int64_t r = r0; r < r1; ++r) {
          const float* row = v.data() + r * C;
          for (int64_t c = 0; c < C; ++c) colmax[size_t(c)] = std::max(colmax[size_t(c)], std::fabs(row[c]));
        }
        for (int64_t j = 0; j < TC; ++j) {
          const int64_t c0 = j * tc, c1 = std::min(C, c0 + tc);
          float bmax = 0;
          for (int64_t c = c0; c < c1; ++c) bmax = std::max(bmax, colmax[size_t(c)]);
          const float S = lp::tile_scale(f, bmax, ts, sr);
          for (int64_t c = c0; c < c1; ++c) scale[size_t(c)] = S;
        }
        for (int64_t r = r0; r < r1; ++r) {
          const float* row = v.data() + r * C;
          T* out = yp + r * C;
          if (sr) {
            for (int64_t c = 0; c < C; ++c)
              out[c] = T(lp::qdq_e2m1(row[c], scale[size_t(c)], true, lp::uniform(spec.seed, uint64_t(r * C + c))));
          } else {
            for (int64_t c = 0; c < C; ++c) out[c] = T(lp::qdq_e2m1(row[c], scale[size_t(c)], false, 0.0f));
          }
        }
      }
    });
  });
}

void lp_quantize_fp8(const Tensor& x, const LpQuantSpec& spec, Tensor& codes, LpQuantStats* stats, bool transpose) {
  const char* op = "lp_quantize_fp8";
  detail::check_contiguous(op, x, "x");
  if (x.dim() != 2) throw_error(op, ": x must be [rows, cols], got ", x.describe());
  if (x.dtype() != DType::F32) throw_error(op, ": x must be f32, got ", x.describe());
  check_spec(op, spec);
  if (!lp::is_fp8(spec.format) || spec.rht_axis >= 0)
    throw_error(op, ": format ", lp_format_name(spec.format), spec.rht_axis >= 0 ? " with a Hadamard transform" : "",
                " has no FP8 codes (e4m3 and e5m2 per tensor only)");
  const int64_t R = x.size(0), C = x.size(1), n = R * C;
  codes = Tensor::empty(transpose ? Shape{C, R} : Shape{R, C}, DType::U8, x.device());
  LB_CUDA_ROUTE(x, lp_quantize_fp8, x, spec, codes, stats, transpose)
  const float* xp = x.data<float>();
  uint8_t* cp = codes.data<uint8_t>();
  const LpFormat f = spec.format;
  float ts = spec.tensor_scale;
  bool finite = true;
  if (stats || !(ts > 0)) {
    float amax = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float a = std::fabs(xp[i]);
      if (!(a <= 3.402823466e38f)) finite = false;
      else amax = std::max(amax, a);
    }
    if (!finite) {
      if (stats) *stats = {std::nan(""), 0.0};
      std::fill(cp, cp + n, uint8_t(0x7f));
      return;
    }
    if (!(ts > 0)) ts = lp::tensor_scale(f, amax);
    if (stats) *stats = {double(amax), double(ts)};
  }
  parallel_for(R, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, C)), [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const float v = xp[r * C + c];
        cp[transpose ? c * R + r : r * C + c] = std::isfinite(v) ? lp::fp8_code(f, v, ts) : uint8_t(0x7f);
      }
  });
}

void fp8_gemm(const Tensor& a, LpFormat fa, const Tensor& b, LpFormat fb, float alpha, Tensor& y) {
  const char* op = "fp8_gemm";
  detail::check_contiguous(op, a, "a");
  detail::check_contiguous(op, b, "b");
  if (a.dim() != 2 || b.dim() != 2 || a.dtype() != DType::U8 || b.dtype() != DType::U8 || a.size(1) != b.size(1))
    throw_error(op, ": a [M, K] and b [N, K] must be u8 FP8 codes with the same K, got ", a.describe(), " and ", b.describe());
  if (!lp::is_fp8(fa) || !lp::is_fp8(fb))
    throw_error(op, ": formats ", lp_format_name(fa), " x ", lp_format_name(fb), " are not FP8 (e4m3, e5m2)");
  if (fa == LpFormat::E5M2 && fb == LpFormat::E5M2)
    throw_error(op, ": e5m2 x e5m2 is not a product FP8 tensor cores take (one operand must be e4m3)");
  if (a.device() != b.device()) throw_error(op, ": a is ", a.describe(), " but b is ", b.describe());
  const int64_t M = a.size(0), N = b.size(0);
  detail::check_contiguous(op, y, "y");
  detail::check_shape(op, y, {M, N}, "y");
  if (y.dtype() != DType::F32 || y.device() != a.device())
    throw_error(op, ": y must be f32 on the operands' device, got ", y.describe());
  LB_CUDA_ROUTE(a, fp8_gemm, a, fa, b, fb, alpha, y)
  auto decode = [](const Tensor& c, LpFormat f) {
    Tensor d = Tensor::empty(c.shape(), DType::F32);
    const uint8_t* cp = c.data<uint8_t>();
    float* dp = d.data<float>();
    float table[256];
    for (int k = 0; k < 256; ++k) table[k] = lp::fp8_value(f, uint8_t(k));
    for (int64_t i = 0; i < c.numel(); ++i) dp[i] = table[cp[i]];
    return d;
  };
  gemm(decode(a, fa), false, decode(b, fb), true, y, double(alpha));
}

void lp_dge_scale(const Tensor& w, const LpQuantSpec& spec, float k, float clip, Tensor& g) {
  const char* op = "lp_dge_scale";
  detail::check_contiguous(op, w, "w");
  detail::check_contiguous(op, g, "g");
  if (w.dim() != 2) throw_error(op, ": w must be [rows, cols], got ", w.describe());
  detail::check_shape(op, g, w.shape(), "g");
  if (g.dtype() != w.dtype()) throw_error(op, ": g is ", g.describe(), " but w is ", w.describe());
  check_spec(op, spec);
  if (!lp::is_fp4(spec.format) || spec.rounding != LpRounding::Nearest || spec.rht_axis >= 0)
    throw_error(op, ": format ", lp_format_name(spec.format),
                " — the estimator is the derivative of a smoothed E2M1 step (e2m1, mxfp4, nvfp4; round to nearest, "
                "no Hadamard transform)");
  if (!(k >= 1.0f) || !std::isfinite(k)) throw_error(op, ": k ", k, " must be finite and >= 1");
  if (!(clip > 0.0f) || !std::isfinite(clip)) throw_error(op, ": clip ", clip, " must be finite and > 0");
  if (w.device() != Device::CPU || g.device() != Device::CPU)
    throw_error(op, ": no CUDA body (the FP4 DGE backward runs on the CPU only)");
  const int64_t R = w.size(0), C = w.size(1);
  detail::dispatch_float(op, w.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* wp = w.data<T>();
    T* gp = g.data<T>();
    float amax = 0;  // the NVFP4 tensor scale needs it
    for (int64_t i = 0; i < R * C; ++i) amax = std::max(amax, std::fabs(float(wp[i])));
    const float ts = spec.format == LpFormat::NVFP4 ? lp::tensor_scale(spec.format, amax) : 0.0f;
    const int64_t tr = spec.tile_rows, tc = spec.tile_cols;
    const int64_t TR = (R + tr - 1) / tr, TC = (C + tc - 1) / tc;
    parallel_for(TR * TC, 1, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) {
        const int64_t r0 = (t / TC) * tr, r1 = std::min(R, r0 + tr), c0 = (t % TC) * tc, c1 = std::min(C, c0 + tc);
        float bmax = 0;
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = c0; c < c1; ++c) bmax = std::max(bmax, std::fabs(float(wp[r * C + c])));
        const float S = lp::tile_scale(spec.format, bmax, ts, false);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = c0; c < c1; ++c) {
            // an all-zero tile (S = 0) quantizes to 0 whatever the value: v = 0, the interval's end
            const float v = S > 0 ? float(wp[r * C + c]) / S : 0.0f;
            gp[r * C + c] = T(double(gp[r * C + c]) * double(lp::dge_derivative(v, k, clip)));
          }
      }
    });
  });
}

double lp_quantile(float* v, int64_t n, double alpha) {
  if (n <= 0) throw_error("lp_quantile: no values");
  const double pos = alpha * double(n - 1);
  const int64_t i = std::min<int64_t>(n - 1, int64_t(std::floor(pos)));
  const double frac = pos - double(i);
  std::nth_element(v, v + i, v + n);
  const double a = v[i];
  if (frac == 0 || i + 1 >= n) return a;
  const double b = *std::min_element(v + i + 1, v + n);  // the next order statistic
  return a + frac * (b - a);
}

void lp_occ_split(const Tensor& x, double alpha, Tensor& clamped, Tensor& residual, LpOccStats* stats) {
  const char* op = "lp_occ_split";
  detail::check_contiguous(op, x, "x");
  if (x.dim() != 2) throw_error(op, ": x must be [rows, cols], got ", x.describe());
  if (!(alpha > 0.5 && alpha <= 1.0)) throw_error(op, ": quantile ", alpha, " is outside (0.5, 1]");
  if (x.device() != Device::CPU) throw_error(op, ": no CUDA body (the outlier quantile runs on the CPU only)");
  const int64_t n = x.numel();
  clamped = Tensor::empty(x.shape(), x.dtype(), x.device());
  residual = Tensor::zeros(x.shape(), x.dtype(), x.device());
  detail::dispatch_float(op, x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data<T>();
    T* cp = clamped.data<T>();
    T* rp = residual.data<T>();
    std::vector<float> v(static_cast<size_t>(n));
    bool finite = true;
    for (int64_t i = 0; i < n; ++i) {
      v[size_t(i)] = float(xp[i]);
      finite = finite && std::isfinite(v[size_t(i)]);
    }
    if (!finite || n == 0 || alpha == 1.0) {
      std::copy(xp, xp + n, cp);
      if (stats) *stats = {finite ? -INFINITY : NAN, finite ? INFINITY : NAN, 0};
      return;
    }
    const double hi = lp_quantile(v.data(), n, alpha), lo = lp_quantile(v.data(), n, 1.0 - alpha);
    const T thi = T(hi), tlo = T(lo);
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) {
      const T c = xp[i] > thi ? thi : xp[i] < tlo ? tlo : xp[i];
      cp[i] = c;
      if (c != xp[i]) rp[i] = xp[i] - c, ++count;
    }
    // Through memory: GCC 12 -O3's SLP vectorizer drops the f32 rounding of a pair of
    // double(float(d)) conversions stored side by side (checked: it stored the unrounded doubles).
    volatile T vlo = tlo, vhi = thi;
    if (stats) *stats = {double(vlo), double(vhi), count};
  });
}

}  // namespace lowbit::ops
