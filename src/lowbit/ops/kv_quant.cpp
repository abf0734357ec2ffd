// The KIVI codec of the packed KV cache (ops/kv_quant.h).
#include "lowbit/ops/kv_quant.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "lowbit/core/format_traits.h"
#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

namespace {
struct Params {
  float s = 0;  // scale; 0: the group decodes to zeros
  int z = 0;    // zero point
};

// lo <= 0 <= hi: the group's range (the grid holds zero).
Params params(double lo, double hi, int qmax) {
  const float s = float((hi - lo) / qmax);
  if (!(s > 0)) return {};
  double z = std::nearbyint(-lo / double(s));
  z = std::clamp(z, 0.0, double(qmax));
  return {s, int(z)};
}

unsigned encode(float x, const Params& p, int qmax) {
  if (!(p.s > 0)) return 0;
  double r = std::nearbyint(double(x) / double(p.s)) + p.z;
  if (!(r >= 0)) r = 0;  // also NaN
  if (r > qmax) r = qmax;
  return unsigned(r);
}

inline float decode(unsigned code, const Params& p) { return float(int(code) - p.z) * p.s; }

void check_bits(const char* op, int bits) {
  if (bits != 2 && bits != 4 && bits != 8) throw_error(op, ": ", bits, " bits (expected 2, 4 or 8)");
}

// The groups of x [M, N]: their count along each line and the checks shared by the three ops.
void check_groups(const char* op, const Tensor& x, int64_t group, bool per_column) {
  if (x.dim() != 2) throw_error(op, ": x must be [rows, columns], got ", x.describe());
  const int64_t along = per_column ? x.size(0) : x.size(1);
  if (group < 1 || along % group != 0)
    throw_error(op, ": group of ", group, " does not divide the ", per_column ? "rows" : "columns", " (", along, ")");
}

Shape param_shape(int64_t M, int64_t N, int64_t group, bool per_column) {
  return per_column ? Shape{M / group, N} : Shape{M, N / group};
}

void check_packed(const char* op, int64_t M, int64_t N, int bits, int64_t group, bool per_column, const Tensor& codes,
                  const Tensor& scale, const Tensor& zero) {
  if ((N * bits) % 8 != 0) throw_error(op, ": ", N, " values of ", bits, " bits are not a whole number of bytes");
  for (const Tensor* t : {&codes, &scale, &zero}) {
    detail::check_contiguous(op, *t, "codes/scale/zero");
    if (t->device() != Device::CPU) throw_error(op, ": CPU only, got ", t->describe());
  }
  if (codes.dtype() != DType::U8 || zero.dtype() != DType::U8 || scale.dtype() != DType::F32)
    throw_error(op, ": codes and zero must be u8, scale f32; got ", codes.describe(), ", ", zero.describe(), ", ",
                scale.describe());
  detail::check_shape(op, codes, {M, N * bits / 8}, "codes");
  const Shape ps = param_shape(M, N, group, per_column);
  detail::check_shape(op, scale, ps, "scale");
  detail::check_shape(op, zero, ps, "zero");
}

void check_x(const char* op, const Tensor& x, const char* name) {
  detail::check_contiguous(op, x, name);
  if (x.dtype() != DType::F32 || x.device() != Device::CPU) throw_error(op, ": ", name, " must be f32 on the CPU, got ", x.describe());
}

// Visits every group of x [M, N]: fn(params, element offsets as (base, stride, count)).
template <class Fn>
void for_each_group(const float* xp, int64_t M, int64_t N, int bits, int64_t group, bool per_column, Fn&& fn) {
  const int qmax = (1 << bits) - 1;
  const int64_t lines = per_column ? N : M, per_line = (per_column ? M : N) / group;
  parallel_for(lines * per_line, std::max<int64_t>(1, 8192 / group), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t line = g / per_line, idx = g % per_line, start = idx * group;
      const int64_t base = per_column ? start * N + line : line * N + start, stride = per_column ? N : 1;
      double lo = 0, hi = 0;
      for (int64_t k = 0; k < group; ++k) {
        const double v = double(xp[base + k * stride]);
        lo = std::min(lo, v);
        hi = std::max(hi, v);
      }
      // The group's slot in scale/zero: per_column [M/group, N] -> (idx, line); else [M, N/group] -> (line, idx).
      const int64_t slot = per_column ? idx * N + line : line * per_line + idx;
      fn(params(lo, hi, qmax), base, stride, slot);
    }
  });
}
}  // namespace

void kivi_quantize(const Tensor& x, int bits, int64_t group, bool per_column, Tensor& codes, Tensor& scale,
                   Tensor& zero) {
  const char* op = "kivi_quantize";
  check_x(op, x, "x");
  check_bits(op, bits);
  check_groups(op, x, group, per_column);
  const int64_t M = x.size(0), N = x.size(1);
  check_packed(op, M, N, bits, group, per_column, codes, scale, zero);
  const int qmax = (1 << bits) - 1;
  const float* xp = x.data<float>();
  auto* cp = codes.data<uint8_t>();
  float* sp = scale.data<float>();
  auto* zp = zero.data<uint8_t>();
  // Codes first as one byte per value (groups may share a packed byte across threads), then packed
  // with the format table's row packer (core/format_traits.h: the layout of lowbit's weight codes).
  std::vector<uint8_t> wide(size_t(M * N));
  for_each_group(xp, M, N, bits, group, per_column, [&](const Params& p, int64_t base, int64_t stride, int64_t slot) {
    sp[slot] = p.s;
    zp[slot] = uint8_t(p.z);
    for (int64_t k = 0; k < group; ++k) wide[size_t(base + k * stride)] = uint8_t(encode(xp[base + k * stride], p, qmax));
  });
  const int64_t rb = N * bits / 8;
  for (int64_t r = 0; r < M; ++r) pack_code_row(bits, wide.data() + r * N, N, cp + r * rb);
}

void kivi_dequantize(const Tensor& codes, const Tensor& scale, const Tensor& zero, int bits, int64_t group,
                     bool per_column, Tensor& y) {
  const char* op = "kivi_dequantize";
  check_x(op, y, "y");
  check_bits(op, bits);
  check_groups(op, y, group, per_column);
  const int64_t M = y.size(0), N = y.size(1);
  check_packed(op, M, N, bits, group, per_column, codes, scale, zero);
  const int qmax = (1 << bits) - 1;
  const auto* cp = codes.data<uint8_t>();
  const float* sp = scale.data<float>();
  const auto* zp = zero.data<uint8_t>();
  float* yp = y.data<float>();
  const int64_t rb = N * bits / 8;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t j = 0; j < N; ++j) {
      const int64_t slot = per_column ? (r / group) * N + j : r * (N / group) + j / group;
      if (zp[slot] > qmax) throw_error(op, ": zero point ", int(zp[slot]), " is outside [0, ", qmax, "]");
      yp[r * N + j] = decode(unpack_code(bits, cp + r * rb, j), Params{sp[slot], int(zp[slot])});
    }
}

void kivi_fake_quant(const Tensor& x, int bits, int64_t group, bool per_column, Tensor& y) {
  const char* op = "kivi_fake_quant";
  check_x(op, x, "x");
  check_x(op, y, "y");
  detail::check_shape(op, y, x.shape(), "y");
  check_bits(op, bits);
  check_groups(op, x, group, per_column);
  const int qmax = (1 << bits) - 1;
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  for_each_group(xp, x.size(0), x.size(1), bits, group, per_column,
                 [&](const Params& p, int64_t base, int64_t stride, int64_t) {
                   for (int64_t k = 0; k < group; ++k) {
                     const int64_t i = base + k * stride;
                     yp[i] = decode(encode(xp[i], p, qmax), p);
                   }
                 });
}

}  // namespace lowbit::ops
