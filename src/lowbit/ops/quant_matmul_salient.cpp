// quant_matmul's SalientBinary bodies (ptq161, PTQ1.61): the layout and the arithmetic are described
// in quant_matmul.h. Portable C++ (table lookups vectorize poorly; the tables make a binary weight
// cost one load per 8 weights instead of a multiply-add per weight).
#include "lowbit/ops/quant_matmul_salient.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <vector>

#include "lowbit/core/dtype.h"
#include "lowbit/core/error.h"
#include "lowbit/core/format_traits.h"
#include "lowbit/core/threads.h"

namespace lowbit::ops::salient {

namespace {

constexpr int64_t kBlock = 32;  // int8 activation block (4 sign bytes)

inline bool is_salient(const uint8_t* mask, int64_t j) { return (mask[j / 8] >> (j % 8)) & 1; }

// The binary and salient column indices of the view, in column order (cached per thread: the same
// mask pointer comes back for every token of a decode).
struct Columns {
  std::vector<uint8_t> mask;  // the mask the lists were made from (compared by content)
  int64_t in = 0;
  std::vector<int32_t> bin, sal;
};
const Columns& columns_of(const PackedWeight& w) {
  thread_local Columns c;
  const size_t mb = size_t((w.in + 7) / 8);
  if (c.in == w.in && c.mask.size() == mb && std::equal(c.mask.begin(), c.mask.end(), w.col_mask)) return c;
  c.mask.assign(w.col_mask, w.col_mask + mb);
  c.in = w.in;
  c.bin.clear();
  c.sal.clear();
  for (int64_t j = 0; j < w.in; ++j) (is_salient(w.col_mask, j) ? c.sal : c.bin).push_back(int32_t(j));
  return c;
}

// Lookup table of one sign byte: t[v] = sum of x[i] over the set bits i of v (x has 8 values, zero
// past the end of the row).
template <class X, class T>
inline void build_table(const X* x, T* t) {
  t[0] = T(0);
  for (int v = 1; v < 256; ++v) t[v] = T(t[v & (v - 1)] + x[std::countr_zero(unsigned(v))]);
}

// Rows of the weight in chunks of at least ~16K weights.
template <class F>
void rows(const PackedWeight& w, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, w.in));
  parallel_for(w.out, grain, [&](int64_t b, int64_t e) { fn(b, e); });
}

}  // namespace

void check(const PackedWeight& w, const char* op) {
  if (!w.col_mask || !w.col_scales || !w.scales || !w.zeros)
    throw_error(op, ": weight [", w.format, "] SalientBinary view lacks its column mask, column factors or row factors");
  int64_t k = 0;
  for (int64_t b = 0; b < (w.in + 7) / 8; ++b) k += std::popcount(unsigned(w.col_mask[b]));
  if (k != w.salient || w.n_groups != 2 || w.row_bytes != FormatTraits::masked_row_bytes(w.in, k))
    throw_error(op, ": weight [", w.format, "] SalientBinary view: ", k, " mask bits for salient = ", w.salient,
                ", ", w.n_groups, " groups (expected 2), row_bytes ", w.row_bytes, " (expected ",
                FormatTraits::masked_row_bytes(w.in, k), ")");
}

void decode_row(const PackedWeight& w, int64_t r, float* dst) {
  const int64_t sb = (w.in - w.salient + 7) / 8;
  const uint8_t* rp = w.codes + r * w.row_bytes;
  const float alpha = f16_to_f32(w.scales[2 * r]), s = f16_to_f32(w.scales[2 * r + 1]);
  const float mu = f16_to_f32(w.zeros[2 * r]), z = f16_to_f32(w.zeros[2 * r + 1]);
  for (int64_t j = 0, t = 0, u = 0; j < w.in; ++j) {
    if (is_salient(w.col_mask, j)) {
      dst[j] = salient_int4_value(rp[sb + u / 2] >> (4 * (u % 2)) & 15, s, z);
      ++u;
    } else {
      dst[j] = salient_binary_value(rp[t / 8] >> (t % 8) & 1, f16_to_f32(w.col_scales[t]), alpha, mu);
      ++t;
    }
  }
}

void exact_body(const float* x, int64_t M, const PackedWeight& w, float* y) {
  const Columns& c = columns_of(w);
  const int64_t nb = int64_t(c.bin.size()), k = int64_t(c.sal.size()), sb = (nb + 7) / 8;
  // Per activation row: x_b (padded to whole bytes), its sum, x_s and the tables.
  std::vector<float> xb(static_cast<size_t>(M * sb * 8), 0.0f), xs(static_cast<size_t>(M * k));
  std::vector<float> sum(static_cast<size_t>(M)), tab(static_cast<size_t>(M * sb * 256));
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * w.in;
    float* b = xb.data() + m * sb * 8;
    float acc = 0.0f;
    for (int64_t t = 0; t < nb; ++t) {
      b[t] = f16_to_f32(w.col_scales[t]) * xm[c.bin[size_t(t)]];
      acc += b[t];
    }
    sum[size_t(m)] = acc;
    for (int64_t u = 0; u < k; ++u) xs[size_t(m * k + u)] = xm[c.sal[size_t(u)]];
  }
  parallel_for(M * sb, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) build_table(xb.data() + i * 8, tab.data() + i * 256);
  });
  rows(w, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* rp = w.codes + r * w.row_bytes;
      const uint8_t* q4 = rp + sb;
      const float alpha = f16_to_f32(w.scales[2 * r]), s = f16_to_f32(w.scales[2 * r + 1]);
      const float mu = f16_to_f32(w.zeros[2 * r]), z = f16_to_f32(w.zeros[2 * r + 1]);
      for (int64_t m = 0; m < M; ++m) {
        const float* t = tab.data() + m * sb * 256;
        float p0 = 0, p1 = 0, p2 = 0, p3 = 0;
        int64_t i = 0;
        for (; i + 4 <= sb; i += 4) {
          p0 += t[i * 256 + rp[i]];
          p1 += t[(i + 1) * 256 + rp[i + 1]];
          p2 += t[(i + 2) * 256 + rp[i + 2]];
          p3 += t[(i + 3) * 256 + rp[i + 3]];
        }
        for (; i < sb; ++i) p0 += t[i * 256 + rp[i]];
        const float plus = (p0 + p1) + (p2 + p3);
        const float* xsm = xs.data() + m * k;
        float a0 = 0, a1 = 0;
        int64_t u = 0;
        for (; u + 2 <= k; u += 2) {
          const uint8_t byte = q4[u / 2];
          a0 += (float(byte & 15) - z) * xsm[u];
          a1 += (float(byte >> 4) - z) * xsm[u + 1];
        }
        if (u < k) a0 += (float(q4[u / 2] & 15) - z) * xsm[u];
        y[m * w.out + r] = (mu + alpha) * plus + (mu - alpha) * (sum[size_t(m)] - plus) + s * (a0 + a1);
      }
    }
  });
}

namespace {

// n values quantized per block of 32 to int8 (d = amax / 127, round to nearest, as the other
// layouts' activations), zero padded to `padded` values; per block: d and d * (sum of the codes).
void quantize_blocks(const float* v, int64_t n, int64_t padded, int8_t* q, float* d, float* dsum) {
  for (int64_t b = 0; b * kBlock < padded; ++b) {
    const int64_t b0 = b * kBlock, e = std::min(n, b0 + kBlock);
    float amax = 0.0f;
    for (int64_t i = b0; i < e; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float db = amax / 127.0f, inv = db > 0 ? 1.0f / db : 0.0f;
    int32_t s = 0;
    for (int64_t i = b0; i < b0 + kBlock; ++i) {
      const int qv = i < e ? std::clamp(int(std::nearbyint(v[i] * inv)), -127, 127) : 0;
      q[i] = int8_t(qv);
      s += qv;
    }
    d[b] = db;
    dsum[b] = db * float(s);
  }
}

}  // namespace

void int8_body(const float* x, int64_t M, const PackedWeight& w, float* y) {
  const Columns& c = columns_of(w);
  const int64_t nb = int64_t(c.bin.size()), k = int64_t(c.sal.size()), sb = (nb + 7) / 8;
  const int64_t bblk = (nb + kBlock - 1) / kBlock, sblk = (k + kBlock - 1) / kBlock;
  const int64_t bpad = bblk * kBlock, spad = sblk * kBlock;
  // The calling thread's buffers, reused across calls (named through a reference: inside the
  // parallel lambdas a thread_local name would be the worker's own instance).
  struct Buffers {
    std::vector<float> tmp;
    std::vector<int8_t> qb, qs;
    std::vector<float> db, dbs, ds, dss, sum_b, sum_s;
    std::vector<int16_t> tab;
  };
  thread_local Buffers buffers;
  Buffers& B = buffers;
  auto& tmp = B.tmp;
  auto& qb = B.qb;
  auto& qs = B.qs;
  auto &db = B.db, &dbs = B.dbs, &ds = B.ds, &dss = B.dss, &sum_b = B.sum_b, &sum_s = B.sum_s;
  auto& tab = B.tab;
  tmp.resize(size_t(std::max(bpad, spad)));
  qb.assign(size_t(M * bpad), 0);
  qs.assign(size_t(M * spad), 0);
  db.resize(size_t(M * bblk)), dbs.resize(size_t(M * bblk)), ds.resize(size_t(M * sblk)), dss.resize(size_t(M * sblk));
  sum_b.resize(size_t(M)), sum_s.resize(size_t(M));
  tab.resize(size_t(M * bblk * 4 * 256));
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * w.in;
    for (int64_t t = 0; t < nb; ++t) tmp[size_t(t)] = f16_to_f32(w.col_scales[t]) * xm[c.bin[size_t(t)]];
    quantize_blocks(tmp.data(), nb, bpad, qb.data() + m * bpad, db.data() + m * bblk, dbs.data() + m * bblk);
    for (int64_t u = 0; u < k; ++u) tmp[size_t(u)] = xm[c.sal[size_t(u)]];
    quantize_blocks(tmp.data(), k, spad, qs.data() + m * spad, ds.data() + m * sblk, dss.data() + m * sblk);
    float a = 0.0f, b = 0.0f;
    for (int64_t i = 0; i < bblk; ++i) a += dbs[size_t(m * bblk + i)];
    for (int64_t i = 0; i < sblk; ++i) b += dss[size_t(m * sblk + i)];
    sum_b[size_t(m)] = a;
    sum_s[size_t(m)] = b;
  }
  // Tables over whole blocks (4 bytes each; bytes past the row's sign bytes are never read).
  parallel_for(M * bblk * 4, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) build_table(qb.data() + i * 8, tab.data() + i * 256);
  });
  rows(w, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* rp = w.codes + r * w.row_bytes;
      const uint8_t* q4 = rp + sb;
      const float alpha = f16_to_f32(w.scales[2 * r]), s = f16_to_f32(w.scales[2 * r + 1]);
      const float mu = f16_to_f32(w.zeros[2 * r]), z = f16_to_f32(w.zeros[2 * r + 1]);
      for (int64_t m = 0; m < M; ++m) {
        const int16_t* t = tab.data() + m * bblk * 4 * 256;
        const float* dm = db.data() + m * bblk;
        float plus = 0.0f;
        const int64_t full = sb / 4;  // blocks whose 4 sign bytes all exist
        for (int64_t b = 0; b < full; ++b) {
          const int16_t* tb = t + b * 4 * 256;
          const uint8_t* pb = rp + b * 4;
          const int32_t is = int32_t(tb[pb[0]]) + tb[256 + pb[1]] + tb[512 + pb[2]] + tb[768 + pb[3]];
          plus += dm[b] * float(is);
        }
        if (full < bblk) {
          int32_t is = 0;
          for (int64_t i = full * 4; i < sb; ++i) is += t[i * 256 + rp[i]];
          plus += dm[full] * float(is);
        }
        const int8_t* qsm = qs.data() + m * spad;
        const float* dsm = ds.data() + m * sblk;
        float sal = 0.0f;
        for (int64_t b = 0; b < sblk; ++b) {
          const int64_t u0 = b * kBlock, u1 = std::min(k, u0 + kBlock);
          int32_t is = 0;
          int64_t u = u0;
          for (; u + 2 <= u1; u += 2) {
            const uint8_t byte = q4[u / 2];
            is += int32_t(byte & 15) * qsm[u] + int32_t(byte >> 4) * qsm[u + 1];
          }
          if (u < u1) is += int32_t(q4[u / 2] & 15) * qsm[u];
          sal += dsm[b] * float(is);
        }
        y[m * w.out + r] = (mu + alpha) * plus + (mu - alpha) * (sum_b[size_t(m)] - plus) + s * (sal - z * sum_s[size_t(m)]);
      }
    }
  });
}

}  // namespace lowbit::ops::salient
