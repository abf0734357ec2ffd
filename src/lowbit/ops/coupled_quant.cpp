// The Coupled Quantization codec (ops/coupled_quant.h).
#include "lowbit/ops/coupled_quant.h"

#include <cmath>
#include <limits>
#include <vector>

#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

void cq_check_codebook(const Tensor& cb, const char* what) {
  if (!cb.defined()) throw_error(what, ": the codebook is missing");
  if (cb.dim() != 3 || cb.dtype() != DType::F32 || cb.device() != Device::CPU)
    throw_error(what, ": the codebook must be f32 [groups, centroids, channels] on the CPU, got ", cb.describe());
  if (!cb.is_contiguous()) throw_error(what, ": the codebook is not contiguous");
  if (cb.size(0) < 1 || cb.size(1) < 1 || cb.size(1) > 256 || cb.size(2) < 1)
    throw_error(what, ": codebook ", cb.describe(), " (expected >= 1 group, 1..256 centroids, >= 1 channel)");
  const float* p = cb.data<float>();
  for (int64_t i = 0; i < cb.numel(); ++i)
    if (!std::isfinite(p[i])) throw_error(what, ": codebook value ", i, " is not finite (", p[i], ")");
}

int64_t cq_nearest(const float* x, const float* ct, int64_t K, int64_t c, float* dist) {
  // Distances of all K centroids at once (the inner loop runs over centroids: vectorizable).
  constexpr int64_t kMaxK = 256;
  if (K < 1 || K > kMaxK) throw_error("cq_nearest: ", K, " centroids (expected 1 to ", kMaxK, ")");
  float d[kMaxK] = {};
  for (int64_t ch = 0; ch < c; ++ch) {
    const float xv = x[ch];
    const float* row = ct + ch * K;
    for (int64_t j = 0; j < K; ++j) {
      const float e = xv - row[j];
      d[j] += e * e;
    }
  }
  int64_t best = 0;
  float bd = d[0];
  for (int64_t j = 1; j < K; ++j)
    if (d[j] < bd) {
      bd = d[j];
      best = j;
    }
  if (dist) *dist = bd;
  return best;
}

namespace {
void check_rows(const char* op, const Tensor& x, const Tensor& cb, const char* name) {
  if (x.dim() != 2 || x.dtype() != DType::F32 || x.device() != Device::CPU)
    throw_error(op, ": ", name, " must be f32 [rows, groups * channels] on the CPU, got ", x.describe());
  detail::check_contiguous(op, x, name);
  if (x.size(1) != cb.size(0) * cb.size(2))
    throw_error(op, ": ", name, " has ", x.size(1), " channels, the codebook ", cb.size(0), " groups of ", cb.size(2));
}

// Per group, the centroids transposed to [c, K] (cq_nearest's layout).
std::vector<float> transposed(const Tensor& cb) {
  const int64_t G = cb.size(0), K = cb.size(1), c = cb.size(2);
  std::vector<float> ct(size_t(G * K * c));
  const float* p = cb.data<float>();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < K; ++j)
      for (int64_t d = 0; d < c; ++d) ct[size_t((g * c + d) * K + j)] = p[(g * K + j) * c + d];
  return ct;
}

// fn(row, group, code) for every (row, group) of x, rows split over the pool.
template <class F>
void encode_rows(const Tensor& x, const Tensor& cb, F&& fn) {
  const int64_t M = x.size(0), G = cb.size(0), K = cb.size(1), c = cb.size(2);
  const std::vector<float> ct = transposed(cb);
  const float* xp = x.data<float>();
  parallel_for(M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t g = 0; g < G; ++g) fn(m, g, cq_nearest(xp + m * G * c + g * c, ct.data() + g * c * K, K, c));
  });
}
}  // namespace

void cq_encode(const Tensor& x, const Tensor& cb, Tensor& codes) {
  const char* op = "cq_encode";
  cq_check_codebook(cb, op);
  check_rows(op, x, cb, "x");
  if (codes.dtype() != DType::U8) throw_error(op, ": codes must be u8, got ", codes.describe());
  detail::check_contiguous(op, codes, "codes");
  detail::check_shape(op, codes, {x.size(0), cb.size(0)}, "codes");
  uint8_t* cp = codes.data<uint8_t>();
  const int64_t G = cb.size(0);
  encode_rows(x, cb, [&](int64_t m, int64_t g, int64_t j) { cp[m * G + g] = uint8_t(j); });
}

void cq_decode(const Tensor& codes, const Tensor& cb, Tensor& y) {
  const char* op = "cq_decode";
  cq_check_codebook(cb, op);
  const int64_t G = cb.size(0), K = cb.size(1), c = cb.size(2);
  if (codes.dim() != 2 || codes.dtype() != DType::U8 || codes.size(1) != G)
    throw_error(op, ": codes must be u8 [rows, ", G, "], got ", codes.describe());
  detail::check_contiguous(op, codes, "codes");
  check_rows(op, y, cb, "y");
  detail::check_shape(op, y, {codes.size(0), G * c}, "y");
  const uint8_t* cp = codes.data<uint8_t>();
  const float* p = cb.data<float>();
  float* yp = y.data<float>();
  for (int64_t m = 0; m < codes.size(0); ++m)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t j = cp[m * G + g];
      if (j >= K) throw_error(op, ": code ", j, " at row ", m, ", group ", g, " is outside the codebook's ", K, " centroids");
      for (int64_t d = 0; d < c; ++d) yp[m * G * c + g * c + d] = p[(g * K + j) * c + d];
    }
}

void cq_fake_quant(const Tensor& x, const Tensor& cb, Tensor& y) {
  const char* op = "cq_fake_quant";
  cq_check_codebook(cb, op);
  check_rows(op, x, cb, "x");
  check_rows(op, y, cb, "y");
  detail::check_shape(op, y, x.shape(), "y");
  const int64_t G = cb.size(0), K = cb.size(1), c = cb.size(2);
  const float* p = cb.data<float>();
  float* yp = y.data<float>();
  // Codes first for a whole row, then the row written: y may be x.
  std::vector<uint8_t> codes(size_t(x.size(0) * G));
  encode_rows(x, cb, [&](int64_t m, int64_t g, int64_t j) { codes[size_t(m * G + g)] = uint8_t(j); });
  for (int64_t m = 0; m < x.size(0); ++m)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t j = codes[size_t(m * G + g)];
      for (int64_t d = 0; d < c; ++d) yp[m * G * c + g * c + d] = p[(g * K + j) * c + d];
    }
}

}  // namespace lowbit::ops
