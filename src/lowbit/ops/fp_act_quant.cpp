// FP8 / FP4 activation fake quantizers (ops/fp_act_quant.h).
#include "lowbit/ops/fp_act_quant.h"

#include <algorithm>
#include <cmath>

#include "lowbit/core/format_traits.h"
#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

namespace {
// One E2M1 block with scale S (S > 0): y = e2m1(x / S) S, saturating at +-6 S.
template <typename T>
void e2m1_block(const T* x, T* y, int64_t n, double S) {
  for (int64_t k = 0; k < n; ++k) {
    if (!(S > 0)) {
      y[k] = T(0);
      continue;
    }
    y[k] = T(double(e2m1_to_float(float_to_e2m1(float(double(x[k]) / S)))) * S);
  }
}
}  // namespace

int64_t fp_act_block(FpActFormat f) {
  return f == FpActFormat::Fp4Mx ? 32 : f == FpActFormat::Fp4Nv ? 16 : 0;
}

void fp_fake_quant(const Tensor& x, FpActFormat format, double clip, Tensor& y) {
  const char* op = "fp_fake_quant";
  detail::check_contiguous(op, x, "x");
  detail::check_contiguous(op, y, "y");
  detail::check_shape(op, y, x.shape(), "y");
  detail::check_same_kind(op, x, y, "y");
  if (!(clip > 0 && clip <= 1)) throw_error(op, ": clip ratio ", clip, " is not in (0, 1]");
  if (x.dim() != 2) throw_error(op, ": x must be [rows, columns], got ", x.describe());
  if (format != FpActFormat::Fp8E4M3 && format != FpActFormat::Fp4Mx && format != FpActFormat::Fp4Nv)
    throw_error(op, ": unknown format ", int(format));
  if (detail::on_cuda(x)) throw_error(op, ": CPU only (no CUDA body); quantized activations run on the CPU");
  const int64_t M = x.size(0), N = x.size(1), block = fp_act_block(format);
  detail::dispatch_float(op, x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* xp = x.data<T>();
    T* yp = y.data<T>();
    parallel_for(M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = xp + r * N;
        T* yr = yp + r * N;
        double amax = 0;
        for (int64_t c = 0; c < N; ++c) amax = std::max(amax, std::fabs(double(xr[c])));
        if (!std::isfinite(amax)) amax = 0;  // a NaN/inf row: every value saturates to 0 scale below
        if (format == FpActFormat::Fp8E4M3) {
          const float s = float(clip * amax / 448.0);
          for (int64_t c = 0; c < N; ++c)
            yr[c] = s > 0 ? T(double(e4m3_to_float(float_to_e4m3(float(double(xr[c]) / double(s))))) * double(s)) : T(0);
          continue;
        }
        // NVFP4: the per-token f32 scale g maps the row's largest block scale to e4m3's 448.
        const float g = float(clip * amax / (448.0 * 6.0));
        for (int64_t c0 = 0; c0 < N; c0 += block) {
          const int64_t n = std::min(block, N - c0);
          double bmax = 0;
          for (int64_t k = 0; k < n; ++k) bmax = std::max(bmax, std::fabs(double(xr[c0 + k])));
          if (!std::isfinite(bmax)) bmax = 0;
          bmax *= clip;
          double S = 0;
          if (format == FpActFormat::Fp4Mx) {
            // OCP MX: shared scale 2^(floor(log2 amax) - emax(E2M1) = 2), an e8m0 exponent in [-127, 127].
            if (bmax > 0) S = std::ldexp(1.0, std::clamp(int(std::floor(std::log2(bmax))) - 2, -127, 127));
          } else if (g > 0) {
            S = double(e4m3_to_float(float_to_e4m3(float(bmax / 6.0 / double(g))))) * double(g);
          }
          e2m1_block(xr + c0, yr + c0, n, S);
        }
      }
    });
  });
}

}  // namespace lowbit::ops
