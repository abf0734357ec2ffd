#include "lowbit/quant/ggml_quants.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "lowbit/core/format_traits.h"

namespace lowbit::ggml {

namespace {

template <class B>
void store(const B& b, uint8_t* row, int64_t i) {
  std::memcpy(row + i * int64_t(sizeof(B)), &b, sizeof(B));
}

// The value of largest magnitude (first one on ties), with its sign.
float signed_absmax(const float* x, int n) {
  float amax = 0, max = 0;
  for (int j = 0; j < n; ++j)
    if (amax < std::fabs(x[j])) amax = std::fabs(x[j]), max = x[j];
  return max;
}

float absmax(const float* x, int n) {
  float amax = 0;
  for (int j = 0; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
  return amax;
}

void min_max(const float* x, int n, float& mn, float& mx) {
  mn = x[0], mx = x[0];
  for (int j = 1; j < n; ++j) mn = std::min(mn, x[j]), mx = std::max(mx, x[j]);
}

float inverse(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

// Truncation toward zero clipped to [0, hi]. NaN (an infinite inverse scale of a block whose range
// is below ~1e-38, where the reference is undefined) gives 0.
int trunc_clip(float v, int hi) { return v >= 0 ? (v < float(hi) + 1 ? int(v) : hi) : 0; }

// roundf (half away from zero) clipped to [lo, hi]; NaN gives 0.
int round_clip(float v, int lo, int hi) {
  if (!(v == v)) return 0;
  return v <= float(lo) ? lo : v >= float(hi) ? hi : int(std::round(v));
}

}  // namespace

void quantize_row_q4_0(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK4_0; ++i, x += QK4_0) {
    const float d = signed_absmax(x, QK4_0) / -8.0f, id = inverse(d);
    block_q4_0 b;
    b.d = fmt_f32_to_f16(d);
    for (int j = 0; j < 16; ++j)
      b.qs[j] = uint8_t(trunc_clip(x[j] * id + 8.5f, 15) | (trunc_clip(x[j + 16] * id + 8.5f, 15) << 4));
    store(b, row, i);
  }
}

void quantize_row_q4_1(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK4_1; ++i, x += QK4_1) {
    float mn, mx;
    min_max(x, QK4_1, mn, mx);
    const float d = (mx - mn) / 15.0f, id = inverse(d);
    block_q4_1 b;
    b.d = fmt_f32_to_f16(d);
    b.m = fmt_f32_to_f16(mn);
    for (int j = 0; j < 16; ++j)
      b.qs[j] = uint8_t(trunc_clip((x[j] - mn) * id + 0.5f, 15) | (trunc_clip((x[j + 16] - mn) * id + 0.5f, 15) << 4));
    store(b, row, i);
  }
}

void quantize_row_q5_0(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK5_0; ++i, x += QK5_0) {
    const float d = signed_absmax(x, QK5_0) / -16.0f, id = inverse(d);
    block_q5_0 b;
    b.d = fmt_f32_to_f16(d);
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      const int x0 = trunc_clip(x[j] * id + 16.5f, 31), x1 = trunc_clip(x[j + 16] * id + 16.5f, 31);
      b.qs[j] = uint8_t((x0 & 0xF) | ((x1 & 0xF) << 4));
      qh |= uint32_t(x0 >> 4) << j | uint32_t(x1 >> 4) << (j + 16);
    }
    for (int k = 0; k < 4; ++k) b.qh[k] = uint8_t(qh >> (8 * k));
    store(b, row, i);
  }
}

void quantize_row_q5_1(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK5_1; ++i, x += QK5_1) {
    float mn, mx;
    min_max(x, QK5_1, mn, mx);
    const float d = (mx - mn) / 31.0f, id = inverse(d);
    block_q5_1 b;
    b.d = fmt_f32_to_f16(d);
    b.m = fmt_f32_to_f16(mn);
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      const int x0 = trunc_clip((x[j] - mn) * id + 0.5f, 31), x1 = trunc_clip((x[j + 16] - mn) * id + 0.5f, 31);
      b.qs[j] = uint8_t((x0 & 0xF) | ((x1 & 0xF) << 4));
      qh |= uint32_t(x0 >> 4) << j | uint32_t(x1 >> 4) << (j + 16);
    }
    for (int k = 0; k < 4; ++k) b.qh[k] = uint8_t(qh >> (8 * k));
    store(b, row, i);
  }
}

void quantize_row_q8_0(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK8_0; ++i, x += QK8_0) {
    const float d = absmax(x, QK8_0) / 127.0f, id = inverse(d);
    block_q8_0 b;
    b.d = fmt_f32_to_f16(d);
    for (int j = 0; j < QK8_0; ++j) b.qs[j] = int8_t(round_clip(x[j] * id, -127, 127));  // half away from zero
    store(b, row, i);
  }
}

namespace {
// Ternary digits {0, 1, 2} of one 256-value block: round(x / amax) + 1.
float ternary_digits(const float* x, uint8_t* q) {
  const float d = absmax(x, QK_K), id = inverse(d);
  for (int j = 0; j < QK_K; ++j) q[j] = uint8_t(round_clip(x[j] * id, -1, 1) + 1);
  return d;
}
// n base-3 digits (most significant first) -> ceil(v * 256 / 243), the byte tq1_digit decodes.
uint8_t pack_base3(const uint8_t* q, int stride, int n) {
  uint32_t v = 0;
  for (int k = 0; k < n; ++k) v = v * 3 + q[k * stride];
  for (int k = n; k < 5; ++k) v *= 3;
  return uint8_t((v * 256 + 242) / 243);
}
}  // namespace

void quantize_row_tq1_0(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK_K; ++i, x += QK_K) {
    uint8_t q[QK_K];
    block_tq1_0 b;
    b.d = fmt_f32_to_f16(ternary_digits(x, q));
    for (int l = 0; l < 32; ++l) b.qs[l] = pack_base3(q + l, 32, 5);
    for (int l = 0; l < 16; ++l) b.qs[32 + l] = pack_base3(q + 160 + l, 16, 5);
    for (int l = 0; l < 4; ++l) b.qh[l] = pack_base3(q + 240 + l, 4, 4);
    store(b, row, i);
  }
}

void quantize_row_tq2_0(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK_K; ++i, x += QK_K) {
    uint8_t q[QK_K];
    block_tq2_0 b;
    b.d = fmt_f32_to_f16(ternary_digits(x, q));
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 32; ++l) {
        uint8_t byte = 0;
        for (int k = 0; k < 4; ++k) byte = uint8_t(byte | (q[h * 128 + k * 32 + l] << (2 * k)));
        b.qs[h * 32 + l] = byte;
      }
    store(b, row, i);
  }
}

// ---- k-quants (256-value super-blocks) ------------------------------------------------------------
// The reference (no importance matrix) rounding of llama.cpp's quantize_row_q{2..6}_K_ref: per
// sub-block a scale (and min) is fitted by a small search, the sub-block scales are quantized to
// 4/6/8 bits against one f16 super-block scale, and the values are re-rounded with the stored
// scales. Every float operation is written in the reference's order (f32, no contraction).

namespace {

constexpr float kGroupMaxEps = 1e-15f;

// Round half to even (the reference adds 1.5 * 2^23, valid below 2^22); out-of-range values
// saturate and NaN gives 0 instead of being undefined.
int nearest_int(float v) {
  v = std::nearbyint(v);
  if (!(v == v)) return 0;
  return v >= 2147483520.0f ? std::numeric_limits<int>::max() : v <= -2147483648.0f ? std::numeric_limits<int>::min() : int(v);
}

}  // namespace

// Asymmetric levels L in [0, nmax] for n values with weights w: x ~ scale * L - the_min. Starts from
// the min/max grid and tries nstep+1 widened grids (rmin + rdelta * is), keeping the one of least
// weighted error (|diff| when use_mad, else diff^2) with the least-squares scale and min for its
// levels. Returns the scale; *the_min >= 0.
float fit_levels_with_min(int n, int nmax, const float* x, const float* w, uint8_t* L, float* the_min, float rmin,
                          float rdelta, int nstep, bool use_mad) {
  float mn = x[0], mx = x[0], sum_w = w[0], sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < mn) mn = x[i];
    if (x[i] > mx) mx = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (mn > 0) mn = 0;
  if (mx == mn) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -mn;
    return 0.0f;
  }
  float iscale = float(nmax) / (mx - mn), scale = 1 / iscale, best = 0;
  auto err = [&](float d) { return use_mad ? std::fabs(d) : d * d; };
  for (int i = 0; i < n; ++i) {
    L[i] = uint8_t(std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - mn)))));
    best += w[i] * err(scale * float(L[i]) + mn - x[i]);
  }
  uint8_t aux[32];
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * float(is) + float(nmax)) / (mx - mn);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - mn))));
      aux[i] = uint8_t(l);
      sum_l += w[i] * float(l);
      sum_l2 += w[i] * float(l) * float(l);
      sum_xl += w[i] * float(l) * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (!(D > 0)) continue;
    float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
    float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
    if (this_min > 0) this_min = 0, this_scale = sum_xl / sum_l2;
    float cur = 0;
    for (int i = 0; i < n; ++i) cur += w[i] * err(this_scale * float(aux[i]) + this_min - x[i]);
    if (cur < best) {
      std::memcpy(L, aux, size_t(n));
      best = cur, scale = this_scale, mn = this_min;
    }
  }
  *the_min = -mn;
  return scale;
}

namespace {

// Symmetric levels L in [0, 2 nmax) (signed level + nmax) with weights x^2: a least-squares scale
// over 19 trial grids -(nmax + 0.1 is) / max. Returns the (signed) scale.
float fit_signed_levels(int n, int nmax, const float* x, int8_t* L) {
  float mx = 0, amax = 0;
  for (int i = 0; i < n; ++i)
    if (std::fabs(x[i]) > amax) amax = std::fabs(x[i]), mx = x[i];
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.0f;
  }
  auto level = [&](float iscale, int i) { return std::max(-nmax, std::min(nmax - 1, nearest_int(iscale * x[i]))); };
  auto sums = [&](float iscale, float& sumlx, float& suml2) {
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const float l = float(level(iscale, i)), w = x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
  };
  float iscale = float(-nmax) / mx, sumlx, suml2;
  sums(iscale, sumlx, suml2);
  for (int i = 0; i < n; ++i) L[i] = int8_t(level(iscale, i) + nmax);
  float scale = suml2 != 0 ? sumlx / suml2 : 0.0f, best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(float(nmax) + 0.1f * float(is)) / mx;
    sums(iscale, sumlx, suml2);
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = int8_t(level(iscale, i) + nmax);
      scale = sumlx / suml2, best = scale * sumlx;
    }
  }
  return scale;
}

// q3_K's sub-block fit: signed levels in [-nmax, nmax) refined coordinate-wise (5 passes) to
// maximise (sum w x l)^2 / sum w l^2 with w = x^2; L returned offset by nmax.
float fit_q3_levels(int n, int nmax, const float* x, int8_t* L) {
  float mx = 0, amax = 0;
  for (int i = 0; i < n; ++i)
    if (std::fabs(x[i]) > amax) amax = std::fabs(x[i]), mx = x[i];
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.0f;
  }
  const float iscale = float(-nmax) / mx;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = std::max(-nmax, std::min(nmax - 1, nearest_int(iscale * x[i])));
    L[i] = int8_t(l);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * float(l);
    suml2 += w * float(l) * float(l);
  }
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      float slx = sumlx - w * x[i] * float(L[i]);
      if (!(slx > 0)) continue;
      float sl2 = suml2 - w * float(L[i]) * float(L[i]);
      const int nl = std::max(-nmax, std::min(nmax - 1, nearest_int(x[i] * sl2 / slx)));
      if (nl == L[i]) continue;
      slx += w * x[i] * float(nl);
      sl2 += w * float(nl) * float(nl);
      if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
        L[i] = int8_t(nl), sumlx = slx, suml2 = sl2;
        ++changed;
      }
    }
    if (!changed) break;
  }
  for (int i = 0; i < n; ++i) L[i] = int8_t(L[i] + nmax);
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// Packs 2-bit levels of 256 values as q2_K / q3_K store them: value h*128 + s*32 + l at bits 2s
// of byte h*32 + l.
void pack_2bit_levels(const uint8_t* L, uint8_t* qs) {
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 32; ++l) {
      const uint8_t* p = L + h * 128 + l;
      qs[h * 32 + l] = uint8_t(p[0] | (p[32] << 2) | (p[64] << 4) | (p[96] << 6));
    }
}

// The 6-bit scale/min pair of sub-block j into q4_K / q5_K's 12 bytes (inverse of k4_scale_min).
void put_k4_scale_min(int j, uint8_t ls, uint8_t lm, uint8_t* s) {
  if (j < 4) {
    s[j] = ls, s[j + 4] = lm;
  } else {
    s[j + 4] = uint8_t((ls & 0xF) | ((lm & 0xF) << 4));
    s[j - 4] = uint8_t(s[j - 4] | ((ls >> 4) << 6));
    s[j] = uint8_t(s[j] | ((lm >> 4) << 6));
  }
}

// q4_K / q5_K: 8 sub-blocks of 32 with scale and min, both quantized to 6 bits. Levels in L.
void quantize_k4_superblock(const float* x, int nmax, float rmin, float rdelta, int nstep, uint8_t* scales_out,
                            uint16_t& d_out, uint16_t& dmin_out, uint8_t* L) {
  float scales[8], mins[8], w[32], max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + 32 * j;
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) w[l] = av_x + std::fabs(xs[l]);
    scales[j] = fit_levels_with_min(32, nmax, xs, w, L + 32 * j, &mins[j], rmin, rdelta, nstep, false);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f, inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  for (int j = 0; j < 8; ++j) {
    const uint8_t ls = std::min<uint8_t>(63, uint8_t(nearest_int(inv_scale * scales[j])));
    const uint8_t lm = std::min<uint8_t>(63, uint8_t(nearest_int(inv_min * mins[j])));
    put_k4_scale_min(j, ls, lm, scales_out);
  }
  d_out = fmt_f32_to_f16(max_scale / 63.f);
  dmin_out = fmt_f32_to_f16(max_min / 63.f);
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    k4_scale_min(j, scales_out, sc, m);
    const float d = fmt_f16_to_f32(d_out) * float(sc);
    if (d == 0) continue;
    const float dm = fmt_f16_to_f32(dmin_out) * float(m);
    for (int l = 0; l < 32; ++l) L[32 * j + l] = uint8_t(std::max(0, std::min(nmax, nearest_int((x[32 * j + l] + dm) / d))));
  }
}

}  // namespace

void quantize_row_q2_k(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK_K; ++i, x += QK_K) {
    block_q2_K b{};
    uint8_t L[QK_K];
    float scales[16], mins[16], w[16], max_scale = 0, max_min = 0;
    for (int j = 0; j < 16; ++j) {
      for (int l = 0; l < 16; ++l) w[l] = std::fabs(x[16 * j + l]);
      scales[j] = fit_levels_with_min(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], -0.5f, 0.1f, 15, true);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    if (max_scale > 0) {
      const float iscale = 15.f / max_scale;
      for (int j = 0; j < 16; ++j) b.scales[j] = uint8_t(nearest_int(iscale * scales[j]));
      b.d = fmt_f32_to_f16(max_scale / 15.f);
    } else {
      b.d = fmt_f32_to_f16(0.f);
    }
    if (max_min > 0) {
      const float iscale = 15.f / max_min;
      for (int j = 0; j < 16; ++j) b.scales[j] = uint8_t(b.scales[j] | (nearest_int(iscale * mins[j]) << 4));
      b.dmin = fmt_f32_to_f16(max_min / 15.f);
    } else {
      b.dmin = fmt_f32_to_f16(0.f);
    }
    for (int j = 0; j < 16; ++j) {
      const float d = fmt_f16_to_f32(b.d) * float(b.scales[j] & 0xF);
      if (d == 0) continue;
      const float dm = fmt_f16_to_f32(b.dmin) * float(b.scales[j] >> 4);
      for (int l = 0; l < 16; ++l) L[16 * j + l] = uint8_t(std::max(0, std::min(3, nearest_int((x[16 * j + l] + dm) / d))));
    }
    pack_2bit_levels(L, b.qs);
    store(b, row, i);
  }
}

void quantize_row_q3_k(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK_K; ++i, x += QK_K) {
    block_q3_K b{};
    int8_t L[QK_K];
    float scales[16], amax = 0, max_scale = 0;
    for (int j = 0; j < 16; ++j) {
      scales[j] = fit_q3_levels(16, 4, x + 16 * j, L + 16 * j);
      if (std::fabs(scales[j]) > amax) amax = std::fabs(scales[j]), max_scale = scales[j];
    }
    if (max_scale != 0) {
      const float iscale = -32.f / max_scale;
      for (int j = 0; j < 16; ++j) {
        int l = int(int8_t(nearest_int(iscale * scales[j])));
        l = std::max(-32, std::min(31, l)) + 32;
        if (j < 8) b.scales[j] = uint8_t(l & 0xF);
        else b.scales[j - 8] = uint8_t(b.scales[j - 8] | ((l & 0xF) << 4));
        b.scales[8 + j % 4] = uint8_t(b.scales[8 + j % 4] | ((l >> 4) << (2 * (j / 4))));
      }
      b.d = fmt_f32_to_f16(1 / iscale);
    } else {
      b.d = fmt_f32_to_f16(0.f);
    }
    for (int j = 0; j < 16; ++j) {
      const float d = fmt_f16_to_f32(b.d) * float(q3k_scale(j, b.scales));
      if (d == 0) continue;
      for (int l = 0; l < 16; ++l) L[16 * j + l] = int8_t(std::max(-4, std::min(3, nearest_int(x[16 * j + l] / d))) + 4);
    }
    // High bit of value j into bit j/32 of hmask[j % 32]; the low 2 bits packed like q2_K.
    uint8_t low[QK_K];
    for (int j = 0; j < QK_K; ++j) {
      int l = L[j];
      if (l > 3) {
        b.hmask[j % 32] = uint8_t(b.hmask[j % 32] | (1 << (j / 32)));
        l -= 4;
      }
      low[j] = uint8_t(l);
    }
    pack_2bit_levels(low, b.qs);
    store(b, row, i);
  }
}

void quantize_row_q4_k(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK_K; ++i, x += QK_K) {
    block_q4_K b{};
    uint8_t L[QK_K];
    quantize_k4_superblock(x, 15, -1.f, 0.1f, 20, b.scales, b.d, b.dmin, L);
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 32; ++l) b.qs[32 * c + l] = uint8_t(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
    store(b, row, i);
  }
}

void quantize_row_q5_k(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK_K; ++i, x += QK_K) {
    block_q5_K b{};
    uint8_t L[QK_K];
    quantize_k4_superblock(x, 31, -0.5f, 0.1f, 15, b.scales, b.d, b.dmin, L);
    // Sub-block j = 2c + k (k = 0 low nibble, 1 high nibble of qs[32c + l]); 5th bit in bit j of qh[l].
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 32; ++l) {
        const int l1 = L[64 * c + l], l2 = L[64 * c + 32 + l];
        b.qs[32 * c + l] = uint8_t((l1 & 15) | ((l2 & 15) << 4));
        b.qh[l] = uint8_t(b.qh[l] | ((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1)));
      }
    store(b, row, i);
  }
}

void quantize_row_q6_k(const float* x, int64_t in, uint8_t* row) {
  for (int64_t i = 0; i < in / QK_K; ++i, x += QK_K) {
    block_q6_K b{};
    int8_t L[QK_K];
    float scales[16], max_scale = 0, max_abs = 0;
    for (int j = 0; j < 16; ++j) {
      scales[j] = fit_signed_levels(16, 32, x + 16 * j, L + 16 * j);
      if (std::fabs(scales[j]) > max_abs) max_abs = std::fabs(scales[j]), max_scale = scales[j];
    }
    if (max_abs < kGroupMaxEps) {  // all zero: an all-zero block
      b.d = fmt_f32_to_f16(0.f);
      store(b, row, i);
      continue;
    }
    const float iscale = -128.f / max_scale;
    b.d = fmt_f32_to_f16(1 / iscale);
    for (int j = 0; j < 16; ++j) b.scales[j] = int8_t(std::min(127, nearest_int(iscale * scales[j])));
    for (int j = 0; j < 16; ++j) {
      const float d = fmt_f16_to_f32(b.d) * float(b.scales[j]);
      if (d == 0) continue;
      for (int l = 0; l < 16; ++l) L[16 * j + l] = int8_t(std::max(-32, std::min(31, nearest_int(x[16 * j + l] / d))) + 32);
    }
    // value h*128 + k*32 + l: low nibble into ql[h*64 + (k%2)*32 + l] (high nibble when k >= 2),
    // top 2 bits into bits 2k of qh[h*32 + l] (the layout dequantize_block reads).
    for (int v = 0; v < QK_K; ++v) {
      const int h = v / 128, k = (v / 32) % 4, l = v % 32, q = L[v];
      uint8_t& lo = b.ql[h * 64 + (k % 2) * 32 + l];
      lo = uint8_t(lo | ((q & 0xF) << (4 * (k / 2))));
      b.qh[h * 32 + l] = uint8_t(b.qh[h * 32 + l] | ((q >> 4) << (2 * k)));
    }
    store(b, row, i);
  }
}

// ---- iq4_nl / iq4_xs (non-linear 4-bit levels) ------------------------------------------------------
// llama.cpp's reference: per block of 32, the scale maximising (sum w q x)^2 / sum w q^2 with
// w = x^2 over trial grids, levels by nearest non-linear value; iq4_xs then quantizes the 8 block
// scales to 6 bits against one f16 super-block scale and re-picks the levels.

namespace {

// Index of the nearest of the 16 sorted iq4 levels (ties to the upper one), by binary search on
// the midpoints (doubled, so the comparison is exact).
int nearest_iq4_index(float x) {
  const float x2 = x + x;
  int idx = 0;
  for (int step = 8; step > 0; step >>= 1) {
    const int j = idx + step;
    if (x2 >= float(iq4nl_value(j - 1) + iq4nl_value(j))) idx = j;
  }
  return idx;
}

// Scale of one block of 32 (0 for an all-zero block, whose L is left as it was); `ntry` extra grids
// each side (the iq4_nl reference uses none, iq4_xs 7).
float fit_iq4_block(const float* x, uint8_t* L, int ntry) {
  float amax = 0, mx = 0;
  for (int j = 0; j < 32; ++j)
    if (std::fabs(x[j]) > amax) amax = std::fabs(x[j]), mx = x[j];
  if (amax < kGroupMaxEps) return 0.0f;
  const float v0 = float(iq4nl_value(0));
  float d = ntry > 0 ? -mx / v0 : mx / v0, id = 1 / d, sumqx = 0, sumq2 = 0;
  for (int j = 0; j < 32; ++j) {
    const int l = nearest_iq4_index(id * x[j]);
    L[j] = uint8_t(l);
    const float q = float(iq4nl_value(l)), w = x[j] * x[j];
    sumqx += w * q * x[j];
    sumq2 += w * q * q;
  }
  d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
  float best = d * sumqx;
  for (int t = -ntry; t <= ntry; ++t) {
    id = float(t + iq4nl_value(0)) / mx;
    sumqx = sumq2 = 0;
    for (int j = 0; j < 32; ++j) {
      const float q = float(iq4nl_value(nearest_iq4_index(id * x[j]))), w = x[j] * x[j];
      sumqx += w * q * x[j];
      sumq2 += w * q * q;
    }
    if (sumq2 > 0 && sumqx * sumqx > best * sumq2) d = sumqx / sumq2, best = d * sumqx;
  }
  return d;
}

void pack_iq4_levels(const uint8_t* L, int n, uint8_t* qs) {
  for (int i = 0; i < n / 32; ++i)
    for (int j = 0; j < 16; ++j) qs[16 * i + j] = uint8_t(L[32 * i + j] | (L[32 * i + 16 + j] << 4));
}

}  // namespace

void quantize_row_iq4_nl(const float* x, int64_t in, uint8_t* row) {
  uint8_t L[QK4_NL] = {};  // an all-zero block (d = 0) keeps the previous block's levels, as the reference
  for (int64_t i = 0; i < in / QK4_NL; ++i, x += QK4_NL) {
    block_iq4_nl b{};
    b.d = fmt_f32_to_f16(fit_iq4_block(x, L, -1));
    pack_iq4_levels(L, QK4_NL, b.qs);
    store(b, row, i);
  }
}

void quantize_row_iq4_xs(const float* x, int64_t in, uint8_t* row) {
  uint8_t L[QK_K] = {};
  for (int64_t i = 0; i < in / QK_K; ++i, x += QK_K) {
    block_iq4_xs b{};
    float scales[8], max_scale = 0, amax_scale = 0;
    for (int ib = 0; ib < 8; ++ib) {
      scales[ib] = fit_iq4_block(x + 32 * ib, L + 32 * ib, 7);
      if (std::fabs(scales[ib]) > amax_scale) amax_scale = std::fabs(scales[ib]), max_scale = scales[ib];
    }
    const float d = -max_scale / 32, id = d != 0 ? 1 / d : 0.f;
    b.d = fmt_f32_to_f16(d);
    for (int ib = 0; ib < 8; ++ib) {
      int l = std::max(-32, std::min(31, nearest_int(id * scales[ib])));
      const float dl = d * float(l), idl = dl != 0 ? 1 / dl : 0.f;
      for (int j = 0; j < 32; ++j) L[32 * ib + j] = uint8_t(nearest_iq4_index(idl * x[32 * ib + j]));
      l += 32;
      b.scales_l[ib / 2] = uint8_t(b.scales_l[ib / 2] | ((l & 0xF) << (4 * (ib % 2))));
      b.scales_h = uint16_t(b.scales_h | ((l >> 4) << (2 * ib)));
    }
    pack_iq4_levels(L, QK_K, b.qs);
    store(b, row, i);
  }
}

}  // namespace lowbit::ggml
