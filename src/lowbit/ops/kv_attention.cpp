// Attention over a KV cache stored as f32, f16 or int8 (inference; ops.h, "KV-cache attention").
//
// Storage: f16 keeps each value as IEEE half (round to nearest even); q8 keeps one int8 code per
// value and one f32 scale per (token, kv head) row of head_dim values: scale = max|x| / 127,
// code = round(x / scale), value = code * scale (absmax symmetric, as ggml's Q8_0 but over a
// whole head row instead of 32 values).
//
// CPU body: work items are (kv head, tile of up to 64 query rows). An item widens the keys and
// values it may see (rows 0 .. the tile's last position, one kv head) into a per-thread f32
// buffer, once for all the query heads that share the kv head, then runs the same BLAS products
// and softmax as ops::attention_forward on them. So no f32 copy of the cache exists: each step
// reads the cache in its own type, one kv head's rows at a time. f32 caches are read in place.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "lowbit/core/blas.h"
#include "lowbit/core/threads.h"
#include "lowbit/core/vecmath.h"
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

namespace {
bool is_cache_dtype(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::I8; }

// Rows [0, n) of one kv head (row stride ld elements) widened to f32 rows of hd values.
void widen_rows(const Tensor& t, const float* scale, int64_t kh, int64_t KVH, int64_t hd, int64_t n, float* dst) {
  const int64_t ld = KVH * hd;
  if (t.dtype() == DType::F16) {
    const auto* p = static_cast<const uint16_t*>(t.raw_data()) + kh * hd;
    if (hd == ld) {
      vec::f16_to_f32(p, dst, n * hd);
    } else {
      for (int64_t j = 0; j < n; ++j) vec::f16_to_f32(p + j * ld, dst + j * hd, hd);
    }
    return;
  }
  const auto* p = static_cast<const int8_t*>(t.raw_data()) + kh * hd;
  for (int64_t j = 0; j < n; ++j) {
    const int8_t* src = p + j * ld;
    const float s = scale[j * KVH + kh];
    float* d = dst + j * hd;
    for (int64_t c = 0; c < hd; ++c) d[c] = float(src[c]) * s;
  }
}

inline float softmax_row(float* s, int64_t n) {
  const float mx = vec::max(s, n);
  const float sum = vec::exp_shift_sum(s, n, mx);
  vec::scale(s, n, 1.0f / sum);
  return mx + std::log(sum);
}
}  // namespace

void kv_store(const Tensor& src, Tensor& dst, Tensor& dst_scale) {
  const char* op = "kv_store";
  detail::check_contiguous(op, src, "src");
  detail::check_contiguous(op, dst, "dst");
  if (src.dtype() != DType::F32 || src.device() != Device::CPU) throw_error(op, ": src must be f32 on the CPU, got ", src.describe());
  if (dst.device() != Device::CPU || !is_cache_dtype(dst.dtype()))
    throw_error(op, ": dst must be f32, f16 or i8 on the CPU, got ", dst.describe());
  if (src.dim() != 3) throw_error(op, ": src must be [T, KVH, head_dim], got ", src.describe());
  detail::check_shape(op, dst, src.shape(), "dst");
  const int64_t T = src.size(0), KVH = src.size(1), hd = src.size(2), rows = T * KVH;
  const float* s = src.data<float>();
  switch (dst.dtype()) {
    case DType::F32: std::memcpy(dst.data<float>(), s, size_t(rows * hd) * sizeof(float)); return;
    case DType::F16: vec::f32_to_f16_exact(s, static_cast<uint16_t*>(dst.raw_data()), rows * hd); return;
    default: break;
  }
  detail::check_contiguous(op, dst_scale, "dst_scale");
  detail::check_shape(op, dst_scale, {T, KVH}, "dst_scale");
  if (dst_scale.dtype() != DType::F32) throw_error(op, ": dst_scale must be f32, got ", dst_scale.describe());
  int8_t* d = dst.data<int8_t>();
  float* sc = dst_scale.data<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = s + r * hd;
    float amax = 0;
    for (int64_t c = 0; c < hd; ++c) amax = std::max(amax, std::abs(x[c]));
    const float scale = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
    sc[r] = scale;
    for (int64_t c = 0; c < hd; ++c) d[r * hd + c] = int8_t(std::lrint(std::clamp(x[c] * inv, -127.0f, 127.0f)));
  }
}

void kv_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_scale,
                          const Tensor& v_scale, double scale, Tensor& out) {
  const char* op = "kv_attention_forward";
  detail::check_contiguous(op, q, "q");
  detail::check_contiguous(op, k, "k");
  detail::check_contiguous(op, v, "v");
  if (q.dtype() != DType::F32 || q.device() != Device::CPU) throw_error(op, ": q must be f32 on the CPU, got ", q.describe());
  if (q.dim() != 3 || k.dim() != 3) throw_error(op, ": q and k must be [T, heads, head_dim], got ", q.describe(), ", ", k.describe());
  if (!is_cache_dtype(k.dtype()) || k.device() != Device::CPU)
    throw_error(op, ": the cache must be f32, f16 or i8 on the CPU, got ", k.describe());
  detail::check_shape(op, v, k.shape(), "v");
  if (v.dtype() != k.dtype() || v.device() != k.device()) throw_error(op, ": v is ", v.describe(), " but k is ", k.describe());
  const int64_t Tq = q.size(0), H = q.size(1), hd = q.size(2), Tk = k.size(0), KVH = k.size(1);
  if (k.size(2) != hd) throw_error(op, ": k ", k.describe(), " does not match q ", q.describe());
  if (KVH == 0 || H % KVH != 0) throw_error(op, ": ", KVH, " kv heads do not divide ", H, " heads");
  if (Tk < Tq) throw_error(op, ": fewer keys (", Tk, ") than queries (", Tq, ")");
  const bool q8 = k.dtype() == DType::I8;
  if (q8) {
    for (auto* s : {&k_scale, &v_scale}) {
      detail::check_contiguous(op, *s, "scale");
      detail::check_shape(op, *s, {Tk, KVH}, "scale");
      if (s->dtype() != DType::F32) throw_error(op, ": scales must be f32, got ", s->describe());
    }
  }
  detail::check_shape(op, out, q.shape(), "out");
  if (out.dtype() != DType::F32 || !out.is_contiguous()) throw_error(op, ": out must be contiguous f32, got ", out.describe());
  if (Tq == 0) return;
  const int64_t group = H / KVH, off = Tk - Tq, ldq = H * hd, ldk = KVH * hd;
  const float* qp = q.data<float>();
  float* op_ = out.data<float>();
  const float* ksc = q8 ? k_scale.data<float>() : nullptr;
  const float* vsc = q8 ? v_scale.data<float>() : nullptr;
  const bool wide = k.dtype() == DType::F32;
  const int64_t Bq = Tk <= 4096 ? 64 : 16, tiles = (Tq + Bq - 1) / Bq;
  parallel_each(KVH * tiles, [&](int64_t item) {
    const int64_t qt = tiles - 1 - item / KVH, kh = item % KVH;  // longest tiles first
    const int64_t i0 = qt * Bq, i1 = std::min(Tq, i0 + Bq), rows = i1 - i0, kn = off + i1;
    thread_local std::vector<float> S, Kw, Vw;
    const float *K, *V;
    int64_t ld;
    if (wide) {
      K = k.data<float>() + kh * hd;
      V = v.data<float>() + kh * hd;
      ld = ldk;
    } else {
      if (Kw.size() < size_t(kn * hd)) Kw.resize(size_t(kn * hd)), Vw.resize(size_t(kn * hd));
      widen_rows(k, ksc, kh, KVH, hd, kn, Kw.data());
      widen_rows(v, vsc, kh, KVH, hd, kn, Vw.data());
      K = Kw.data();
      V = Vw.data();
      ld = hd;
    }
    if (rows == 1) {
      // One query row (decode): the group's heads are adjacent in q, so one product serves them all.
      if (S.size() < size_t(group * kn)) S.resize(size_t(group * kn));
      const float* Q = qp + (i0 * H + kh * group) * hd;
      float* O = op_ + (i0 * H + kh * group) * hd;
      blas::gemm(false, true, group, kn, hd, float(scale), Q, hd, K, ld, 0.0f, S.data(), kn);
      for (int64_t g = 0; g < group; ++g) softmax_row(S.data() + g * kn, kn);
      blas::gemm(false, false, group, hd, kn, 1.0f, S.data(), kn, V, ld, 0.0f, O, hd);
      return;
    }
    if (S.size() < size_t(rows * kn)) S.resize(size_t(rows * kn));
    for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
      const float* Q = qp + (i0 * H + h) * hd;
      float* O = op_ + (i0 * H + h) * hd;
      blas::gemm(false, true, rows, kn, hd, float(scale), Q, ldq, K, ld, 0.0f, S.data(), kn);
      for (int64_t r = 0; r < rows; ++r) {
        float* s = S.data() + r * kn;
        const int64_t valid = off + i0 + r + 1;
        softmax_row(s, valid);
        for (int64_t j = valid; j < kn; ++j) s[j] = 0;
      }
      blas::gemm(false, false, rows, hd, kn, 1.0f, S.data(), kn, V, ld, 0.0f, O, ldq);
    }
  });
}

}  // namespace lowbit::ops
