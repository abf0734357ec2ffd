#include "lowbit/quant/ggml_grid.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>

#include "lowbit/core/error.h"
#include "lowbit/core/ggml_blocks.h"
#include "lowbit/quant/ggml_quants.h"

namespace lowbit {

namespace {
namespace g = ggml;

float inv(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }
// Truncation of v clipped to [0, hi] (the reference quantizers' "+ 0.5 then truncate"); NaN -> 0.
int trunc_clip(float v, int hi) { return v >= 0 ? (v < float(hi) + 1 ? int(v) : hi) : 0; }
int round_clip(float v, int lo, int hi) {
  if (!(v == v)) return 0;
  return v <= float(lo) ? lo : v >= float(hi) ? hi : int(std::round(v));
}
// A 4-bit code at position j of a 32-value block: j < 16 low nibble of qs[j], else high of qs[j-16].
void put_nibble(uint8_t* qs, int j, int q) {
  uint8_t& b = qs[j & 15];
  b = j < 16 ? uint8_t((b & 0xF0) | (q & 0xF)) : uint8_t((b & 0x0F) | ((q & 0xF) << 4));
}
void put_high_bit(uint8_t* qh, int j, int bit) {
  qh[j / 8] = uint8_t((qh[j / 8] & ~(1u << (j % 8))) | (unsigned(bit & 1) << (j % 8)));
}
uint16_t u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
// The first of the 16 sorted iq4 levels nearest to x (|x - v_k| in f32; ties to the lower level).
// |x - v_k| is unimodal in k, so only the two levels around x are compared; far outside the levels
// (where f32 differences may tie) and for NaN, the plain scan over all 16.
int nearest_iq4(float x) {
  if (!(std::fabs(x) < 1e6f)) {
    int best = 0;
    float bd = std::fabs(x - float(g::iq4nl_value(0)));
    for (int k = 1; k < 16; ++k) {
      const float d = std::fabs(x - float(g::iq4nl_value(k)));
      if (d < bd) bd = d, best = k;
    }
    return best;
  }
  int hi = 0;  // the number of levels below x = the index of the first level >= x (16: none)
  for (int step = 16; step > 0; step >>= 1)
    if (hi + step <= 16 && float(g::iq4nl_value(hi + step - 1)) < x) hi += step;
  if (hi == 0) return 0;
  if (hi == 16) return 15;
  return std::fabs(x - float(g::iq4nl_value(hi - 1))) <= std::fabs(x - float(g::iq4nl_value(hi))) ? hi - 1 : hi;
}
}  // namespace

namespace {

// ---- k-quants: a super-block of 256 values, sub-blocks of 16 or 32 with quantized scales ----------

bool is_kquant(QuantFormatId id) {
  return id == QuantFormatId::Q2_K || id == QuantFormatId::Q3_K || id == QuantFormatId::Q4_K ||
         id == QuantFormatId::Q5_K || id == QuantFormatId::Q6_K;
}

// One k-quant type's grid: sub-block size, code range, sub-scale range.
struct KGrid {
  QuantFormatId id;
  int sub;        // values per sub-block
  bool affine;    // w = d sc q - dmin m (q2_k, q4_k, q5_k); else w = d sc (q - off) (q3_k, q6_k)
  int qmax;       // codes 0..qmax
  int off;        // signed types: code offset (level = q - off)
  int sc_lo, sc_hi;  // stored sub-scale range (affine: also the min's range, 0..sc_hi)
  // make_qkx2 search of the affine types: rmin, rdelta, nstep (llama.cpp's reference values)
  float rmin, rdelta;
  int nstep;
};

KGrid kgrid(QuantFormatId id) {
  switch (id) {
    case QuantFormatId::Q2_K: return {id, 16, true, 3, 0, 0, 15, -0.5f, 0.1f, 15};
    case QuantFormatId::Q3_K: return {id, 16, false, 7, 4, -32, 31, 0, 0, 0};
    case QuantFormatId::Q4_K: return {id, 32, true, 15, 0, 0, 63, -1.0f, 0.1f, 20};
    case QuantFormatId::Q5_K: return {id, 32, true, 31, 0, 0, 63, -0.5f, 0.1f, 15};
    case QuantFormatId::Q6_K: return {id, 16, false, 63, 32, -128, 127, 0, 0, 0};
    default: throw_error("ggml grid: not a k-quant");
  }
}

// Byte offsets of the fields inside one block (ggml_blocks.h layouts).
void put_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
size_t off_d(QuantFormatId id) {
  switch (id) {
    case QuantFormatId::Q2_K: return offsetof(g::block_q2_K, d);
    case QuantFormatId::Q3_K: return offsetof(g::block_q3_K, d);
    case QuantFormatId::Q4_K: return offsetof(g::block_q4_K, d);
    case QuantFormatId::Q5_K: return offsetof(g::block_q5_K, d);
    default: return offsetof(g::block_q6_K, d);
  }
}
size_t off_dmin(QuantFormatId id) {
  switch (id) {
    case QuantFormatId::Q2_K: return offsetof(g::block_q2_K, dmin);
    case QuantFormatId::Q4_K: return offsetof(g::block_q4_K, dmin);
    default: return offsetof(g::block_q5_K, dmin);
  }
}
float k_d(const KGrid& k, const uint8_t* b) { return fmt_f16_to_f32(u16(b + off_d(k.id))); }
float k_dmin(const KGrid& k, const uint8_t* b) { return k.affine ? fmt_f16_to_f32(u16(b + off_dmin(k.id))) : 0.0f; }

// Stored scale (and min) of sub-block s.
void get_scale(const KGrid& k, const uint8_t* b, int s, int& sc, int& m) {
  m = 0;
  switch (k.id) {
    case QuantFormatId::Q2_K: {
      const uint8_t v = b[offsetof(g::block_q2_K, scales) + size_t(s)];
      sc = v & 0xF, m = v >> 4;
      break;
    }
    case QuantFormatId::Q3_K: sc = g::q3k_scale(s, b + offsetof(g::block_q3_K, scales)); break;
    case QuantFormatId::Q4_K: g::k4_scale_min(s, b + offsetof(g::block_q4_K, scales), sc, m); break;
    case QuantFormatId::Q5_K: g::k4_scale_min(s, b + offsetof(g::block_q5_K, scales), sc, m); break;
    default: sc = int(int8_t(b[offsetof(g::block_q6_K, scales) + size_t(s)])); break;
  }
}
void set_scale(const KGrid& k, uint8_t* b, int s, int sc, int m) {
  switch (k.id) {
    case QuantFormatId::Q2_K: b[offsetof(g::block_q2_K, scales) + size_t(s)] = uint8_t((sc & 0xF) | ((m & 0xF) << 4)); break;
    case QuantFormatId::Q3_K: {
      uint8_t* q = b + offsetof(g::block_q3_K, scales);
      const int l = sc + 32;  // 0..63
      if (s < 8) q[s] = uint8_t((q[s] & 0xF0) | (l & 0xF));
      else q[s - 8] = uint8_t((q[s - 8] & 0x0F) | ((l & 0xF) << 4));
      uint8_t& h = q[8 + s % 4];
      const int sh = 2 * (s / 4);
      h = uint8_t((h & ~(3 << sh)) | ((l >> 4) << sh));
      break;
    }
    case QuantFormatId::Q4_K: case QuantFormatId::Q5_K: {
      uint8_t* q = b + (k.id == QuantFormatId::Q4_K ? offsetof(g::block_q4_K, scales) : offsetof(g::block_q5_K, scales));
      if (s < 4) {
        q[s] = uint8_t((q[s] & 0xC0) | sc), q[s + 4] = uint8_t((q[s + 4] & 0xC0) | m);
      } else {
        q[s + 4] = uint8_t((sc & 0xF) | ((m & 0xF) << 4));
        q[s - 4] = uint8_t((q[s - 4] & 0x3F) | ((sc >> 4) << 6));
        q[s] = uint8_t((q[s] & 0x3F) | ((m >> 4) << 6));
      }
      break;
    }
    default: b[offsetof(g::block_q6_K, scales) + size_t(s)] = uint8_t(int8_t(sc)); break;
  }
}
// Stores code q of value i (0..255) where dequantize_block reads it.
void set_code(const KGrid& k, uint8_t* b, int i, int q) {
  const int h = i / 128, sh = (i / 32) % 4, l = i % 32;
  auto put2 = [&](uint8_t* qs, int v) {  // q2_K / q3_K low 2 bits: bits 2sh of qs[h*32 + l]
    uint8_t& c = qs[h * 32 + l];
    c = uint8_t((c & ~(3 << (2 * sh))) | ((v & 3) << (2 * sh)));
  };
  switch (k.id) {
    case QuantFormatId::Q2_K: put2(b + offsetof(g::block_q2_K, qs), q); break;
    case QuantFormatId::Q3_K: {
      put2(b + offsetof(g::block_q3_K, qs), q & 3);
      uint8_t& m = b[offsetof(g::block_q3_K, hmask) + size_t(l)];  // bit i/32: set = level q & 3, else (q & 3) - 4
      m = uint8_t((m & ~(1u << (i / 32))) | (unsigned(q >> 2) << (i / 32)));
      break;
    }
    case QuantFormatId::Q4_K: case QuantFormatId::Q5_K: {
      const int j = i / 32;  // sub-block: chunk j/2, low nibble for even j
      uint8_t* qs = b + (k.id == QuantFormatId::Q4_K ? offsetof(g::block_q4_K, qs) : offsetof(g::block_q5_K, qs));
      uint8_t& c = qs[(j / 2) * 32 + l];
      c = j % 2 ? uint8_t((c & 0x0F) | ((q & 0xF) << 4)) : uint8_t((c & 0xF0) | (q & 0xF));
      if (k.id == QuantFormatId::Q5_K) {
        uint8_t& hb = b[offsetof(g::block_q5_K, qh) + size_t(l)];
        hb = uint8_t((hb & ~(1u << j)) | (unsigned(q >> 4) << j));
      }
      break;
    }
    default: {  // q6_K: low nibble of ql[h*64 + (sh%2)*32 + l] (high nibble when sh >= 2), 2 bits at 2sh of qh[h*32 + l]
      uint8_t& lo = b[offsetof(g::block_q6_K, ql) + size_t(h * 64 + (sh % 2) * 32 + l)];
      lo = sh < 2 ? uint8_t((lo & 0xF0) | (q & 0xF)) : uint8_t((lo & 0x0F) | ((q & 0xF) << 4));
      uint8_t& hi = b[offsetof(g::block_q6_K, qh) + size_t(h * 32 + l)];
      hi = uint8_t((hi & ~(3 << (2 * sh))) | ((q >> 4) << (2 * sh)));
      break;
    }
  }
}

// The value of code q under stored d, dmin, sc, m: the same f32 operations, in the same order, as
// dequantize_block (so the result is bit-identical with dequantize_row).
float k_value(const KGrid& k, float d, float dmin, int sc, int m, int q) {
  if (k.affine) {
    const float dl = d * float(sc), ml = dmin * float(m);
    return dl * float(q) - ml;
  }
  const float dl = d * float(sc);
  return dl * float(q - k.off);
}
// Nearest-integer of v clamped to [lo, hi] (v NaN -> lo; huge values saturate).
int nearest_clamped(float v, int lo, int hi) {
  if (!(v == v)) return lo;
  if (v <= float(lo)) return lo;
  if (v >= float(hi)) return hi;
  return int(std::nearbyint(v));
}
// The code of the grid point nearest to x.
int k_nearest(const KGrid& k, float d, float dmin, int sc, int m, float x) {
  const float dl = d * float(sc);
  if (k.affine) {
    if (dl == 0.0f) return 0;
    return nearest_clamped((x + dmin * float(m)) / dl, 0, k.qmax);
  }
  if (dl == 0.0f) return k.off;
  return nearest_clamped(x / dl, -k.off, k.qmax - k.off) + k.off;
}
double sub_error(const KGrid& k, float d, float dmin, int sc, int m, const float* x, const float* w) {
  double e = 0;
  for (int i = 0; i < k.sub; ++i) {
    const double r = double(k_value(k, d, dmin, sc, m, k_nearest(k, d, dmin, sc, m, x[i]))) - double(x[i]);
    e += double(w[i]) * r * r;
  }
  return e;
}

// Weights of the sub-block fit: with an importance (GPTQ: the Hessian diagonal) imp_i *
// sqrt(sigma2 + x_i^2), sigma2 = 2 mean(x^2) over the sub-block (the form llama.cpp gives its
// importance-matrix k-quant search); without, the reference quantizer's own weights.
void sub_weights(const KGrid& k, const float* x, const float* imp, float* w) {
  float sx2 = 0;
  for (int i = 0; i < k.sub; ++i) sx2 += x[i] * x[i];
  if (imp) {
    const float sigma2 = 2.0f * sx2 / float(k.sub);
    for (int i = 0; i < k.sub; ++i) w[i] = std::max(imp[i], 0.0f) * std::sqrt(sigma2 + x[i] * x[i]);
    return;
  }
  const float av = std::sqrt(sx2 / float(k.sub));
  for (int i = 0; i < k.sub; ++i)
    w[i] = k.id == QuantFormatId::Q2_K ? std::fabs(x[i]) : k.affine ? av + std::fabs(x[i]) : x[i] * x[i];
}

// Unquantized sub-block fit. Affine: scale >= 0 and min >= 0 with x ~ scale L - min (make_qkx2).
// Signed: the scale of levels in [-off, qmax-off] maximising (sum w x L)^2 / sum w L^2 over 19
// trial grids -(off + 0.1 is) / x_extreme, is = -9..9.
// With an importance (weighted): the affine search runs over twice as many grids at half the step
// (the same range), and the signed one over 81 trial grids -(off + 0.05 is) / x_extreme, is =
// -40..40, each refitted twice (levels nearest under the least-squares scale, then their
// least-squares scale), keeping the scale of least weighted squared error.
void continuous_fit(const KGrid& k, const float* x, const float* w, bool mad, float& scale, float& min,
                    bool weighted = false) {
  min = 0;
  if (k.affine) {
    uint8_t L[32];
    scale = weighted ? g::fit_levels_with_min(k.sub, k.qmax, x, w, L, &min, k.rmin, k.rdelta / 2, k.nstep * 2, mad)
                     : g::fit_levels_with_min(k.sub, k.qmax, x, w, L, &min, k.rmin, k.rdelta, k.nstep, mad);
    return;
  }
  float mx = 0, amax = 0;
  for (int i = 0; i < k.sub; ++i)
    if (std::fabs(x[i]) > amax) amax = std::fabs(x[i]), mx = x[i];
  scale = 0;
  if (amax < 1e-15f) return;
  if (weighted) {
    double best_err = -1;
    for (int is = -40; is <= 40; ++is) {
      const float iscale = -(float(k.off) + 0.05f * float(is)) / mx;
      int l[32];
      for (int i = 0; i < k.sub; ++i) l[i] = nearest_clamped(iscale * x[i], -k.off, k.qmax - k.off);
      for (int it = 0; it <= 2; ++it) {
        double slx = 0, sl2 = 0;
        for (int i = 0; i < k.sub; ++i) slx += double(w[i]) * double(x[i]) * l[i], sl2 += double(w[i]) * double(l[i]) * l[i];
        if (!(sl2 > 0)) break;
        const float sc = float(slx / sl2);
        double e = 0;
        for (int i = 0; i < k.sub; ++i) {
          l[i] = sc != 0.0f ? nearest_clamped(x[i] / sc, -k.off, k.qmax - k.off) : 0;
          const double r = double(sc) * l[i] - double(x[i]);
          e += double(w[i]) * r * r;
        }
        if (best_err < 0 || e < best_err) best_err = e, scale = sc;
      }
    }
    return;
  }
  double best = -1;
  for (int is = -9; is <= 9; ++is) {
    const float iscale = -(float(k.off) + 0.1f * float(is)) / mx;
    double slx = 0, sl2 = 0;
    for (int i = 0; i < k.sub; ++i) {
      const int l = nearest_clamped(iscale * x[i], -k.off, k.qmax - k.off);
      slx += double(w[i]) * double(x[i]) * l;
      sl2 += double(w[i]) * double(l) * l;
    }
    if (sl2 > 0 && slx * slx / sl2 > best) best = slx * slx / sl2, scale = float(slx / sl2);
  }
}

// Chooses sub-block s's stored scale (and min) given the block's stored d / dmin: the integers
// within 2 of the rounded continuous fit with the least weighted error on the exact grid (ties keep
// the plain rounding), then writes the codes of x (its sub values) nearest on that grid.
void choose_sub(const KGrid& k, uint8_t* b, int s, const float* x, const float* w, float scale, float min) {
  const float d = k_d(k, b), dmin = k_dmin(k, b);
  const int sc0 = d != 0.0f ? nearest_clamped(scale / d, k.sc_lo, k.sc_hi) : 0;
  const int m0 = k.affine && dmin != 0.0f ? nearest_clamped(min / dmin, 0, k.sc_hi) : 0;
  int best_sc = sc0, best_m = m0;
  if (d != 0.0f) {
    double best = sub_error(k, d, dmin, sc0, m0, x, w);
    const int mr = k.affine && dmin != 0.0f ? 2 : 0;
    for (int sc = std::max(k.sc_lo, sc0 - 2); sc <= std::min(k.sc_hi, sc0 + 2); ++sc)
      for (int m = std::max(0, m0 - mr); m <= std::min(k.sc_hi, m0 + mr); ++m) {
        if (sc == sc0 && m == m0) continue;
        const double e = sub_error(k, d, dmin, sc, m, x, w);
        if (e < best) best = e, best_sc = sc, best_m = m;
      }
  }
  set_scale(k, b, s, best_sc, best_m);
  for (int i = 0; i < k.sub; ++i) set_code(k, b, s * k.sub + i, k_nearest(k, d, dmin, best_sc, best_m, x[i]));
}

void kquant_fit_block(const KGrid& k, const float* x, const float* imp, uint8_t* b, int block_bytes) {
  std::memset(b, 0, size_t(block_bytes));
  const int ns = g::QK_K / k.sub;
  float w[g::QK_K], scale[16], min[16];
  for (int s = 0; s < ns; ++s) {
    sub_weights(k, x + s * k.sub, imp ? imp + s * k.sub : nullptr, w + s * k.sub);
    continuous_fit(k, x + s * k.sub, w + s * k.sub, !imp && k.id == QuantFormatId::Q2_K, scale[s], min[s], imp != nullptr);
  }
  if (k.affine) {
    float max_scale = 0, max_min = 0;
    for (int s = 0; s < ns; ++s) max_scale = std::max(max_scale, scale[s]), max_min = std::max(max_min, min[s]);
    put_u16(b + off_d(k.id), fmt_f32_to_f16(max_scale / float(k.sc_hi)));
    put_u16(b + off_dmin(k.id), fmt_f32_to_f16(max_min / float(k.sc_hi)));
  } else {
    float max_scale = 0, amax = 0;  // the sub-scale of largest magnitude maps to sc_lo (-32 / -128)
    for (int s = 0; s < ns; ++s)
      if (std::fabs(scale[s]) > amax) amax = std::fabs(scale[s]), max_scale = scale[s];
    put_u16(b + off_d(k.id), fmt_f32_to_f16(amax > 0 ? max_scale / float(k.sc_lo) : 0.0f));
  }
  for (int s = 0; s < ns; ++s) choose_sub(k, b, s, x + s * k.sub, w + s * k.sub, scale[s], min[s]);
}

// ---- 32-value blocks with an importance: q4_0, q5_0 (w = d (q - off)), q4_1, q5_1 (w = d q + m) ----

// Weighted squared error of x on the grid of f16 d (and m), rounded with the stored rule of
// ggml_grid_round; the values are computed with dequantize_block's operations.
double block32_error(QuantFormatId id, uint16_t dh, uint16_t mh, const float* x, const float* w) {
  const float d = fmt_f16_to_f32(dh), m = fmt_f16_to_f32(mh), id_ = inv(d);
  double e = 0;
  for (int j = 0; j < 32; ++j) {
    float v;
    switch (id) {
      case QuantFormatId::Q4_0: v = d * float(trunc_clip(x[j] * id_ + 8.5f, 15) - 8); break;
      case QuantFormatId::Q5_0: v = d * float(trunc_clip(x[j] * id_ + 16.5f, 31) - 16); break;
      case QuantFormatId::Q4_1: v = d * float(trunc_clip((x[j] - m) * id_ + 0.5f, 15)) + m; break;
      case QuantFormatId::Q5_1: v = d * float(trunc_clip((x[j] - m) * id_ + 0.5f, 31)) + m; break;
      case QuantFormatId::Q8_0: v = d * float(round_clip(x[j] * id_, -127, 127)); break;
      default: v = d * float(g::iq4nl_value(d != 0.0f ? nearest_iq4(x[j] / d) : 8)); break;  // IQ4_NL
    }
    const double r = double(v) - double(x[j]);
    e += double(w[j]) * r * r;
  }
  return e;
}

// Trial grids of the weighted 32-value fit: scales -(off + kTrialStep is) / signed extreme, |is| <=
// kTrialSteps (i.e. off +- 2), each followed by kRefits least-squares refits on the stored grid.
constexpr int kTrialSteps = 40;
constexpr float kTrialStep = 0.05f;
constexpr int kRefits = 2;
// iq4_nl's trial grids: the signed extreme at level +-(-127 - kIq4Step is), |is| <= kIq4Steps (+-10 levels).
constexpr int kIq4Steps = 20;
constexpr float kIq4Step = 0.5f;

// The reference block's d (and m), or a better one for the weights h_i sqrt(2 mean(x^2) + x_i^2)
// (as the k-quants): symmetric types try the least-squares scales of 81 trial grids
// (-(off + 0.05 is) / signed extreme, is = -40..40), each refitted twice (levels from the stored
// f16 grid of the scale, then their least-squares scale); affine types ggml's make_qkx2 search with
// 81 grids (rmin -1, rdelta 0.05); q8_0 the absolute maximum at level 127 + 0.05 is (81 grids),
// iq4_nl the signed extreme at level +-(-127 - 0.5 is), is = -20..20 (82 grids, the nearest
// non-uniform levels), each refitted twice as the symmetric types. Every candidate is scored by
// its weighted error on the stored (f16) grid; the least wins; ties keep the reference.
void fit_block32_weighted(const QuantFormat& f, const float* x, const float* imp, uint8_t* block) {
  f.quantize_row(x, 32, block);
  float w[32], sx2 = 0;
  for (int j = 0; j < 32; ++j) sx2 += x[j] * x[j];
  for (int j = 0; j < 32; ++j) w[j] = std::max(imp[j], 0.0f) * std::sqrt(2.0f * sx2 / 32.0f + x[j] * x[j]);
  const bool affine = f.id == QuantFormatId::Q4_1 || f.id == QuantFormatId::Q5_1;
  uint16_t best_d = u16(block), best_m = affine ? u16(block + 2) : 0;
  double best = block32_error(f.id, best_d, best_m, x, w);
  auto consider = [&](float d, float m) {
    const uint16_t dh = fmt_f32_to_f16(d), mh = fmt_f32_to_f16(m);
    const double e = block32_error(f.id, dh, mh, x, w);
    if (e < best) best = e, best_d = dh, best_m = mh;
  };
  // kRefits times over the levels l: their least-squares scale (a candidate), then the levels the
  // stored (f16) grid of that scale gives (`reround(its f16 value, l)`; false stops).
  const auto refit = [&](float* l, const auto& reround) {
    for (int it = 0; it <= kRefits; ++it) {
      double slx = 0, sl2 = 0;
      for (int j = 0; j < 32; ++j) {
        slx += double(w[j]) * double(x[j]) * l[j];
        sl2 += double(w[j]) * double(l[j]) * l[j];
      }
      if (!(sl2 > 0)) break;
      const float d = float(slx / sl2);
      consider(d, 0.0f);
      if (!reround(fmt_f16_to_f32(fmt_f32_to_f16(d)), l)) break;
    }
  };
  if (f.id == QuantFormatId::IQ4_NL) {
    // Trial grids: the signed extreme at level +-(v_0 - kIq4Step is) (v_0 = -127: the levels run
    // from -127 to 113, so the extreme at the low end or, flipped, beyond the high end; llama.cpp's
    // imatrix search tries v_0 + -7..7 and the flipped v_0), the least-squares scale of the nearest
    // levels, then kRefits times the levels of that f16 scale and their least-squares scale.
    float mx = 0, amax = 0;
    for (int j = 0; j < 32; ++j)
      if (std::fabs(x[j]) > amax) amax = std::fabs(x[j]), mx = x[j];
    if (amax > 0)
      for (int t = 0; t < 2 * (2 * kIq4Steps + 1); ++t) {
        const int is = t % (2 * kIq4Steps + 1) - kIq4Steps;
        const float id = (t < 2 * kIq4Steps + 1 ? 1.0f : -1.0f) * (float(g::iq4nl_value(0)) - kIq4Step * float(is)) / mx;
        float l[32];
        for (int j = 0; j < 32; ++j) l[j] = float(g::iq4nl_value(nearest_iq4(id * x[j])));
        refit(l, [&](float dh, float* lv) {
          if (dh == 0.0f) return false;
          for (int j = 0; j < 32; ++j) lv[j] = float(g::iq4nl_value(nearest_iq4(x[j] / dh)));
          return true;
        });
      }
  } else if (f.id == QuantFormatId::Q8_0) {
    // Trial grids: the absolute maximum at level 127 + kTrialStep is, then as above.
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
    if (amax > 0)
      for (int is = -kTrialSteps; is <= kTrialSteps; ++is) {
        const float iscale = (127.0f + kTrialStep * float(is)) / amax;
        float l[32];
        for (int j = 0; j < 32; ++j) l[j] = float(round_clip(iscale * x[j], -127, 127));
        refit(l, [&](float dh, float* lv) {
          const float id = inv(dh);
          for (int j = 0; j < 32; ++j) lv[j] = float(round_clip(x[j] * id, -127, 127));
          return true;
        });
      }
  } else if (affine) {
    uint8_t L[32];
    float the_min;
    const int nmax = f.id == QuantFormatId::Q4_1 ? 15 : 31;
    const float scale = g::fit_levels_with_min(32, nmax, x, w, L, &the_min, -1.0f, kTrialStep, 2 * kTrialSteps, false);
    consider(scale, -the_min);
  } else {
    const int off = f.id == QuantFormatId::Q4_0 ? 8 : 16;
    float mx = 0, amax = 0;
    for (int j = 0; j < 32; ++j)
      if (std::fabs(x[j]) > amax) amax = std::fabs(x[j]), mx = x[j];
    if (amax > 0)
      for (int is = -kTrialSteps; is <= kTrialSteps; ++is) {
        const float iscale = -(float(off) + kTrialStep * float(is)) / mx;
        float l[32];
        for (int j = 0; j < 32; ++j)
          l[j] = std::max(float(-off), std::min(float(off - 1), std::nearbyint(iscale * x[j])));
        // Refitted on the stored grid with the rounding of ggml_grid_round.
        refit(l, [&](float dh, float* lv) {
          const float id = inv(dh);
          for (int j = 0; j < 32; ++j) lv[j] = float(trunc_clip(x[j] * id + float(off) + 0.5f, 2 * off - 1) - off);
          return true;
        });
      }
  }
  std::memcpy(block, &best_d, 2);
  if (affine) std::memcpy(block + 2, &best_m, 2);
}

}  // namespace

namespace {
// Writes the code of x at position j of a 32-value block on its stored grid (ggml_grid_round's rule).
void put_code32(const QuantFormat& f, uint8_t* block, int j, float x) {
  switch (f.id) {
    case QuantFormatId::Q4_0: {
      const float d = fmt_f16_to_f32(u16(block));
      put_nibble(block + 2, j, trunc_clip(x * inv(d) + 8.5f, 15));
      break;
    }
    case QuantFormatId::Q4_1: {
      const float d = fmt_f16_to_f32(u16(block)), m = fmt_f16_to_f32(u16(block + 2));
      put_nibble(block + 4, j, trunc_clip((x - m) * inv(d) + 0.5f, 15));
      break;
    }
    case QuantFormatId::Q5_0: {
      const float d = fmt_f16_to_f32(u16(block));
      const int q = trunc_clip(x * inv(d) + 16.5f, 31);
      put_high_bit(block + 2, j, q >> 4);
      put_nibble(block + 6, j, q);
      break;
    }
    case QuantFormatId::Q5_1: {
      const float d = fmt_f16_to_f32(u16(block)), m = fmt_f16_to_f32(u16(block + 2));
      const int q = trunc_clip((x - m) * inv(d) + 0.5f, 31);
      put_high_bit(block + 4, j, q >> 4);
      put_nibble(block + 8, j, q);
      break;
    }
    case QuantFormatId::Q8_0: {
      const float d = fmt_f16_to_f32(u16(block));
      block[2 + j] = uint8_t(int8_t(round_clip(x * inv(d), -127, 127)));
      break;
    }
    case QuantFormatId::IQ4_NL: {
      const float d = fmt_f16_to_f32(u16(block));
      put_nibble(block + 2, j, d != 0.0f ? nearest_iq4(x / d) : 8);  // level 1 ~ 0 for an all-zero block
      break;
    }
    default:
      throw_error("ggml grid: format ", f.name, " has no per-value grid (", ggml_block_grid_names(), " do)");
  }
}
}  // namespace

bool ggml_block_grid_supported(const QuantFormat& f) {
  if (!f.is_ggml_block() || f.quantize_row == nullptr || f.dequantize_row == nullptr) return false;
  switch (f.id) {
    case QuantFormatId::Q4_0: case QuantFormatId::Q4_1: case QuantFormatId::Q5_0: case QuantFormatId::Q5_1:
    case QuantFormatId::Q8_0: case QuantFormatId::IQ4_NL:
      return f.group_size == 32;
    default:
      return is_kquant(f.id) && f.group_size == g::QK_K;
  }
}

const char* ggml_block_grid_names() { return "q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl, q2_k, q3_k, q4_k, q5_k, q6_k"; }

int ggml_grid_sub_block_size(const QuantFormat& f) {
  LB_CHECK(ggml_block_grid_supported(f), "ggml grid: format ", f.name, " has no per-value grid (", ggml_block_grid_names(), " do)");
  return is_kquant(f.id) ? kgrid(f.id).sub : int(f.group_size);
}

void ggml_grid_fit_block(const QuantFormat& f, const float* x, uint8_t* block, const float* importance) {
  LB_CHECK(ggml_block_grid_supported(f), "ggml grid: format ", f.name, " has no per-value grid (", ggml_block_grid_names(), " do)");
  if (is_kquant(f.id)) return kquant_fit_block(kgrid(f.id), x, importance, block, f.block_bytes);
  const bool weighted = importance != nullptr;  // every 32-value type (the k-quants returned above)
  if (!weighted) return f.quantize_row(x, f.group_size, block);
  fit_block32_weighted(f, x, importance, block);
  for (int j = 0; j < 32; ++j) ggml_grid_round(f, block, j, x[j]);  // the codes of x on the chosen grid
}

void ggml_grid_refit_sub_block(const QuantFormat& f, uint8_t* block, int s, const float* x, const float* importance) {
  LB_CHECK(ggml_block_grid_supported(f) && is_kquant(f.id), "ggml grid: format ", f.name,
           " has no sub-blocks (the k-quants q2_k..q6_k do)");
  const KGrid k = kgrid(f.id);
  LB_CHECK(s >= 0 && s < g::QK_K / k.sub, "ggml grid: sub-block ", s, " outside a ", f.name, " block");
  float w[32], scale, min;
  sub_weights(k, x, importance, w);
  continuous_fit(k, x, w, !importance && k.id == QuantFormatId::Q2_K, scale, min, importance != nullptr);
  choose_sub(k, block, s, x, w, scale, min);
}

float ggml_grid_round(const QuantFormat& f, uint8_t* block, int j, float x) {
  if (is_kquant(f.id)) {
    const KGrid k = kgrid(f.id);
    LB_CHECK(j >= 0 && j < g::QK_K, "ggml grid: position ", j, " outside a 256-value block");
    int sc, m;
    get_scale(k, block, j / k.sub, sc, m);
    const float d = k_d(k, block), dmin = k_dmin(k, block);
    const int q = k_nearest(k, d, dmin, sc, m, x);
    set_code(k, block, j, q);
    return k_value(k, d, dmin, sc, m, q);
  }
  LB_CHECK(j >= 0 && j < 32, "ggml grid: position ", j, " outside a 32-value block");
  put_code32(f, block, j, x);
  float y[32];
  f.dequantize_row(block, 32, y);
  return y[j];
}

void ggml_grid_set_params(const QuantFormat& f, uint8_t* block, const float* scale, const float* min) {
  LB_CHECK(ggml_block_grid_supported(f) && f.id != QuantFormatId::IQ4_NL, "ggml grid: format ", f.name,
           " has no uniform grid to set (", ggml_block_grid_names(), " but iq4_nl)");
  if (!is_kquant(f.id)) {
    std::memset(block, 0, size_t(f.block_bytes));
    put_u16(block, fmt_f32_to_f16(scale[0]));
    if (f.id == QuantFormatId::Q4_1 || f.id == QuantFormatId::Q5_1) put_u16(block + 2, fmt_f32_to_f16(min[0]));
    return;
  }
  const KGrid k = kgrid(f.id);
  std::memset(block, 0, size_t(f.block_bytes));
  const int ns = g::QK_K / k.sub;
  if (k.affine) {
    float max_scale = 0, max_min = 0;
    for (int s = 0; s < ns; ++s) max_scale = std::max(max_scale, scale[s]), max_min = std::max(max_min, min[s]);
    put_u16(block + off_d(k.id), fmt_f32_to_f16(max_scale / float(k.sc_hi)));
    put_u16(block + off_dmin(k.id), fmt_f32_to_f16(max_min / float(k.sc_hi)));
  } else {
    float max_scale = 0, amax = 0;
    for (int s = 0; s < ns; ++s)
      if (std::fabs(scale[s]) > amax) amax = std::fabs(scale[s]), max_scale = scale[s];
    put_u16(block + off_d(k.id), fmt_f32_to_f16(amax > 0 ? max_scale / float(k.sc_lo) : 0.0f));
  }
  const float d = k_d(k, block), dmin = k_dmin(k, block);
  for (int s = 0; s < ns; ++s) {
    const int sc = d != 0.0f ? nearest_clamped(scale[s] / d, k.sc_lo, k.sc_hi) : 0;
    const int m = k.affine && dmin != 0.0f ? nearest_clamped(min[s] / dmin, 0, k.sc_hi) : 0;
    set_scale(k, block, s, sc, m);
  }
}

GgmlSubParams ggml_grid_sub_params(const QuantFormat& f, const uint8_t* block, int s) {
  GgmlSubParams p;
  if (is_kquant(f.id)) {
    const KGrid k = kgrid(f.id);
    LB_CHECK(s >= 0 && s < g::QK_K / k.sub, "ggml grid: sub-block ", s, " outside a ", f.name, " block");
    get_scale(k, block, s, p.sc, p.m);
    p.d = k_d(k, block), p.dmin = k_dmin(k, block);
    p.step = p.d * float(p.sc);
    p.shift = p.dmin * float(p.m);
    return p;
  }
  LB_CHECK(ggml_block_grid_supported(f) && s == 0, "ggml grid: format ", f.name, " has no sub-block ", s);
  p.d = p.step = fmt_f16_to_f32(u16(block));
  if (f.id == QuantFormatId::Q4_1 || f.id == QuantFormatId::Q5_1) p.dmin = fmt_f16_to_f32(u16(block + 2)), p.shift = -p.dmin;
  return p;
}

void ggml_grid_round_block(const QuantFormat& f, uint8_t* block, const float* x, float* y) {
  LB_CHECK(ggml_block_grid_supported(f), "ggml grid: format ", f.name, " has no per-value grid (", ggml_block_grid_names(), " do)");
  if (is_kquant(f.id)) {
    for (int j = 0; j < g::QK_K; ++j) y[j] = ggml_grid_round(f, block, j, x[j]);
    return;
  }
  for (int j = 0; j < 32; ++j) put_code32(f, block, j, x[j]);
  f.dequantize_row(block, 32, y);
}

}  // namespace lowbit
