// quant_matmul's SalientBinary bodies (ptq161, PTQ1.61): the layout and the arithmetic are described
// in quant_matmul.h. The portable bodies use 256-entry tables per sign byte (one load per 8 binary
// weights); the x86 int8 body (int8_simd) gathers and quantizes the activations here and runs the
// per-ISA row kernels of quant_matmul_salient_x86.inc (sign bits expanded to bytes, integer dot
// products).
#include "lowbit/ops/quant_matmul_salient.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "lowbit/core/dtype.h"
#include "lowbit/core/error.h"
#include "lowbit/core/format_traits.h"
#include "lowbit/core/threads.h"
#include "lowbit/core/vecmath.h"
#include "lowbit/ops/quant_matmul_kernels.h"

namespace lowbit::ops::salient {

namespace {

constexpr int64_t kBlock = 32;  // int8 activation block (4 sign bytes)

inline bool is_salient(const uint8_t* mask, int64_t j) { return (mask[j / 8] >> (j % 8)) & 1; }

// The binary and salient column indices of the view, in column order (cached per thread: the same
// mask pointer comes back for every token of a decode).
struct Columns {
  std::vector<uint8_t> mask;  // the mask the lists were made from (compared by content)
  int64_t in = 0;
  std::vector<uint16_t> col_scales;  // and the factors (f16 bits)
  std::vector<int32_t> bin, sal;
  std::vector<float> r;  // r_j of the binary columns, f32
};
const Columns& columns_of(const PackedWeight& w) {
  thread_local Columns c;
  const size_t mb = size_t((w.in + 7) / 8);
  const size_t nb = size_t(w.in - w.salient);
  if (c.in == w.in && c.mask.size() == mb && c.col_scales.size() == nb &&
      std::memcmp(c.mask.data(), w.col_mask, mb) == 0 &&
      std::memcmp(c.col_scales.data(), w.col_scales, nb * sizeof(uint16_t)) == 0)
    return c;
  c.mask.assign(w.col_mask, w.col_mask + mb);
  c.in = w.in;
  c.col_scales.assign(w.col_scales, w.col_scales + nb);
  c.bin.clear();
  c.sal.clear();
  for (int64_t j = 0; j < w.in; ++j) (is_salient(w.col_mask, j) ? c.sal : c.bin).push_back(int32_t(j));
  c.r.resize(c.bin.size());
  for (size_t t = 0; t < c.r.size(); ++t) c.r[t] = f16_to_f32(w.col_scales[t]);
  return c;
}

// Lookup table of one sign byte: t[v] = sum of x[i] over the set bits i of v (x has 8 values, zero
// past the end of the row).
template <class X, class T>
inline void build_table(const X* x, T* t) {
  t[0] = T(0);
  for (int v = 1; v < 256; ++v) t[v] = T(t[v & (v - 1)] + x[std::countr_zero(unsigned(v))]);
}

// fn(i) for the n tables of a call: on the calling thread for a decode step's few hundred (one
// table is 255 additions; a parallel region costs more than that on a busy machine), else in
// parallel chunks.
template <class F>
void build_tables(int64_t n, const F& fn) {
  if (n <= 1024) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  parallel_for(n, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) fn(i);
  });
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
  const int64_t k = FormatTraits::mask_count(w.col_mask, (w.in + 7) / 8);
  if (k != w.salient || w.n_groups != 2 || w.row_bytes != FormatTraits::masked_row_bytes(w.in, k))
    throw_error(op, ": weight [", w.format, "] SalientBinary view: ", k, " mask bits for salient = ", w.salient,
                ", ", w.n_groups, " groups (expected 2), row_bytes ", w.row_bytes, " (expected ",
                FormatTraits::masked_row_bytes(w.in, k), ")");
}

void decode_row(const PackedWeight& w, int64_t r, float* dst) {
  const Columns& c = columns_of(w);  // this thread's lists (decode runs on the workers)
  const int64_t nb = int64_t(c.bin.size()), k = int64_t(c.sal.size()), sb = (nb + 7) / 8;
  const uint8_t* rp = w.codes + r * w.row_bytes;
  const float alpha = f16_to_f32(w.scales[2 * r]), s = f16_to_f32(w.scales[2 * r + 1]);
  const float mu = f16_to_f32(w.zeros[2 * r]), z = f16_to_f32(w.zeros[2 * r + 1]);
  for (int64_t t = 0; t < nb; ++t)
    dst[c.bin[size_t(t)]] = salient_binary_value(rp[t / 8] >> (t % 8) & 1, c.r[size_t(t)], alpha, mu);
  for (int64_t u = 0; u < k; ++u) dst[c.sal[size_t(u)]] = salient_int4_value(rp[sb + u / 2] >> (4 * (u % 2)) & 15, s, z);
}

namespace {

// The int8 body's operand (qmm::SalientActs) in the calling thread's buffers, valid until its next
// call: binary columns r_j x_j per block of 32 to int8 (d = amax / 127, round half to even, as
// the other layouts' activations; natural order); salient columns x_j per block of 32 to int16
// (d = amax / 32767, block_source_index(4) order). `panel_order`: both in the panel kernel's order
// instead (qmm::salient_panel_source; the same codes and scales, placed elsewhere). `simd`: the
// AVX2 block quantizer for the int8 blocks (the same numbers as the scalar loop).
struct Operand {
  std::vector<float> r, db, ds, dsum;
  std::vector<int8_t> qb;
  std::vector<int16_t> qs;
  qmm::SalientActs a;
};
const qmm::SalientActs& prepare_into(Operand& B, const float* x, int64_t M, const PackedWeight& w, bool simd,
                                     bool panel_order) {
  const int64_t in = w.in, k = w.salient, nb = in - k;
  const int64_t bblk = (nb + kBlock - 1) / kBlock, sblk = (k + kBlock - 1) / kBlock;
  B.r.resize(size_t(nb));
  vec::f16_to_f32(w.col_scales, B.r.data(), nb);
  B.qb.resize(size_t(M * bblk * kBlock));
  B.qs.resize(size_t(M * sblk * kBlock));
  B.db.resize(size_t(M * bblk));
  B.ds.resize(size_t(M * sblk));
  B.dsum.resize(size_t(2 * M));
  int src4[kBlock], srcb[kBlock];
  for (int p = 0; p < kBlock; ++p) {
    src4[p] = panel_order ? qmm::salient_panel_source(false, p) : qmm::block_source_index(4, p);
    srcb[p] = panel_order ? qmm::salient_panel_source(true, p) : p;
  }
  Operand& Bm = B;
#if defined(__x86_64__) || defined(__i386__)
  const qmm::SplitColumns split = simd ? qmm::avx512_split_columns() : nullptr;
#endif
  // Row m, with xb / xs the gathered columns' scratch (16 slots past the columns: the gathers write
  // there).
  const auto row = [&](int64_t m, float* xb, float* xs) {
    const float* xm = x + m * in;
#if defined(__x86_64__) || defined(__i386__)
    if (split) {
      split(xm, w.col_mask, in, xb, xs);
    } else
#endif
    {
      int64_t t = 0, u = 0;
      for (int64_t j = 0; j < in; ++j) {  // both lists written, one index advanced (no branch)
        const int64_t sal = (w.col_mask[j >> 3] >> (j & 7)) & 1;
        xs[u] = xm[j];
        xb[t] = xm[j];
        u += sal;
        t += 1 - sal;
      }
    }
    for (int64_t i = 0; i < nb; ++i) xb[i] *= Bm.r[size_t(i)];
    std::fill(xb + nb, xb + bblk * kBlock, 0.0f);
    std::fill(xs + k, xs + sblk * kBlock, 0.0f);
    float dsb = 0.0f, dss = 0.0f;
    for (int64_t b = 0; b < bblk; ++b) {
      float perm[kBlock];
      const float* v = xb + b * kBlock;
      if (panel_order) {  // the same values, so the same d and codes, in the panel's positions
        for (int p = 0; p < kBlock; ++p) perm[p] = v[srcb[p]];
        v = perm;
      }
      int8_t* q = Bm.qb.data() + (m * bblk + b) * kBlock;
      float& d = Bm.db[size_t(m * bblk + b)];
      int32_t s = 0;
#if defined(__x86_64__) || defined(__i386__)
      if (simd) s = qmm::avx2_quantize_block(v, 8, q, &d);
#endif
      if (!simd) {
        float amax = 0.0f;
        for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
        d = amax / 127.0f;
        const float inv = d > 0 ? 1.0f / d : 0.0f;
        for (int i = 0; i < kBlock; ++i) {
          q[i] = int8_t(std::clamp(int(std::nearbyint(v[i] * inv)), -127, 127));
          s += q[i];
        }
      }
      dsb += d * float(s);
    }
    for (int64_t b = 0; b < sblk; ++b) {
      const float* v = xs + b * kBlock;
      int16_t* q = Bm.qs.data() + (m * sblk + b) * kBlock;
      float amax = 0.0f;
      for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 32767.0f, inv = d > 0 ? 1.0f / d : 0.0f;
      // Round half to even by the 1.5 * 2^23 trick (|value| <= 32767, default rounding mode): the
      // numbers of clamp(nearbyint(v * inv), +-32767) without a library call per value.
      constexpr float kMagic = 12582912.0f;
      float rv[kBlock];
      for (int p = 0; p < kBlock; ++p) rv[p] = v[src4[p]];
      int32_t s = 0;
      for (int p = 0; p < kBlock; ++p) {  // (ternaries: min / max instructions, no branch)
        float c = rv[p] * inv;
        c = c < 32767.0f ? c : 32767.0f;
        c = c > -32767.0f ? c : -32767.0f;
        q[p] = int16_t((c + kMagic) - kMagic);
      }
      for (int p = 0; p < kBlock; ++p) s += q[p];
      Bm.ds[size_t(m * sblk + b)] = d;
      dss += d * float(s);
    }
    Bm.dsum[size_t(2 * m)] = dsb;
    Bm.dsum[size_t(2 * m + 1)] = dss;
  };
  // Prefill: the rows in parallel (each with its thread's scratch; the numbers are each row's own).
  // A batched decode's few rows stay on the calling thread (another parallel region costs more).
  auto rows_of = [&](int64_t m0, int64_t m1) {
    thread_local std::vector<float> sxb, sxs;
    sxb.resize(size_t(std::max(bblk * kBlock, nb + 16)));
    sxs.resize(size_t(std::max(sblk * kBlock, k + 16)));
    for (int64_t m = m0; m < m1; ++m) row(m, sxb.data(), sxs.data());
  };
  if (M <= 8) rows_of(0, M);
  else parallel_for(M, 1, [&](int64_t m0, int64_t m1) { rows_of(m0, m1); });
  B.a = {M, bblk, sblk, B.qb.data(), B.db.data(), B.qs.data(), B.ds.data(), B.dsum.data()};
  return B.a;
}
const qmm::SalientActs& prepare(const float* x, int64_t M, const PackedWeight& w, bool simd, bool panel_order = false) {
  thread_local Operand B;
  return prepare_into(B, x, M, w, simd, panel_order);
}

// Units of `unit` weight rows per parallel chunk: at least ~32K weight x activation-row products,
// each row of `in` weights meeting M activation rows.
int64_t units_grain(int64_t in, int64_t unit, int64_t M) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, in * unit * M));
}
// Rows in chunks of units_grain (one parallel region per product), each chunk starting at a
// multiple of `unit` rows (the x86 kernels take four rows per pass, the panels 8 or 16). `M`: the
// activation rows each row meets (the panel kernel; the others count one).
template <class F>
void int8_rows(const PackedWeight& w, const F& fn, int64_t unit = 1, int64_t M = 1) {
  const int64_t units = (w.out + unit - 1) / unit;
  const int64_t grain = units_grain(w.in, unit, M);
  parallel_for(units, grain, [&](int64_t u0, int64_t u1) { fn(u0 * unit, std::min(w.out, u1 * unit)); });
}

}  // namespace

void int8_portable(const float* x, int64_t M, const PackedWeight& w, float* y) {
  // Chunks of 8 activation rows (every row's numbers are its own; the tables grow with M).
  for (int64_t m0 = 8; m0 < M; m0 += 8) int8_portable(x + m0 * w.in, std::min<int64_t>(8, M - m0), w, y + m0 * w.out);
  M = std::min<int64_t>(M, 8);
  const qmm::SalientActs& a = prepare(x, M, w, false);
  const int64_t k = w.salient, nb = w.in - k, sb = (nb + 7) / 8;
  const int64_t bblk = a.bblk, sblk = a.sblk;
  // Tables over whole blocks (4 bytes each; bytes past the row's sign bytes are never read).
  thread_local std::vector<int16_t> tables;
  tables.resize(size_t(M * bblk * 4 * 256));
  std::vector<int16_t>& tab = tables;  // named through a reference inside the parallel lambda
  build_tables(M * bblk * 4, [&](int64_t i) { build_table(a.qb + i * 8, tab.data() + i * 256); });
  int src4[kBlock];
  for (int p = 0; p < kBlock; ++p) src4[p] = qmm::block_source_index(4, p);
  int8_rows(w, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* rp = w.codes + r * w.row_bytes;
      const uint8_t* q4 = rp + sb;
      const float alpha = f16_to_f32(w.scales[2 * r]), s = f16_to_f32(w.scales[2 * r + 1]);
      const float mu = f16_to_f32(w.zeros[2 * r]), z = f16_to_f32(w.zeros[2 * r + 1]);
      for (int64_t m = 0; m < M; ++m) {
        const int16_t* t = tab.data() + m * bblk * 4 * 256;
        const float* db = a.db + m * bblk;
        // Binary: per block, the integer sum over the set sign bits (one table read a byte).
        float plus = 0.0f;
        for (int64_t b = 0; b < bblk; ++b) {
          int32_t is = 0;
          for (int64_t i = 4 * b; i < std::min(sb, 4 * b + 4); ++i) is += t[i * 256 + rp[i]];
          plus += db[b] * float(is);
        }
        // Salient: per block, the integer products of the codes with the int16 activations.
        const int16_t* qs = a.qs + m * sblk * kBlock;
        float sal = 0.0f;
        for (int64_t b = 0; b < sblk; ++b) {
          int32_t is = 0;
          for (int p = 0; p < kBlock; ++p) {
            const int64_t u = b * kBlock + src4[p];
            if (u < k) is += int32_t(q4[u / 2] >> (4 * (u % 2)) & 15) * qs[b * kBlock + p];
          }
          sal += a.ds[m * sblk + b] * float(is);
        }
        const float* dsum = a.dsum + 2 * m;
        y[m * w.out + r] = 2.0f * alpha * plus + s * sal + (mu - alpha) * dsum[0] - s * z * dsum[1];
      }
    }
  });
}

#if defined(__x86_64__) || defined(__i386__)
void int8_simd(const float* x, int64_t M, const PackedWeight& w, float* y, qmm::SalientKernel kernel) {
  const qmm::SalientActs& a = prepare(x, M, w, true);
  int8_rows(w, [&](int64_t r0, int64_t r1) { kernel(w, r0, r1, a, y); }, 4);
}

void int8_panel(const float* x, int64_t M, const PackedWeight& w, float* y, qmm::SalientPanel panel) {
  const qmm::SalientActs& a = prepare(x, M, w, true, true);
  int8_rows(w, [&](int64_t r0, int64_t r1) { panel.fn(w, r0, r1, a, y); }, panel.rows, M);
}

void int8_panel_many(const float* x, int64_t M, const std::vector<const PackedWeight*>& ws, const std::vector<float*>& ys,
                     qmm::SalientPanel panel) {
  const size_t n = ws.size();
  thread_local std::vector<Operand> ops;
  if (ops.size() < n) ops.resize(n);
  std::vector<int64_t> first(n + 1, 0);  // product i owns panels [first[i], first[i + 1])
  for (size_t i = 0; i < n; ++i) {
    prepare_into(ops[i], x, M, *ws[i], true, true);
    first[i + 1] = first[i] + (ws[i]->out + panel.rows - 1) / panel.rows;
  }
  int64_t in = 1;
  for (const PackedWeight* w : ws) in = std::max(in, w->in);
  const int64_t grain = units_grain(in, panel.rows, M);
  std::vector<Operand>& o = ops;  // named through a reference inside the parallel lambda
  parallel_for(first[n], grain, [&](int64_t u0, int64_t u1) {
    for (size_t i = 0; i < n && u0 < u1; ++i) {
      const int64_t b = std::max(u0, first[i]), e = std::min(u1, first[i + 1]);
      if (b >= e) continue;
      const PackedWeight& w = *ws[i];
      panel.fn(w, (b - first[i]) * panel.rows, std::min(w.out, (e - first[i]) * panel.rows), o[i].a, ys[i]);
    }
  });
}
#endif

namespace {

// One part of LOWBIT_PTQ161_ACT_SIM: block 0 = that part exact.
struct SimPart {
  int64_t block = 0;  // values per scale (-1: the whole row)
  int bits = 8;
};
struct SimSpec {
  bool on = false;
  SimPart b, s;
};

SimSpec parse_sim(const char* e) {
  SimSpec spec;
  if (!e || !*e) return spec;
  const std::string v = e;
  const auto bad = [&](const std::string& why) {
    throw_error("LOWBIT_PTQ161_ACT_SIM='", v, "': ", why, " (expected parts like b32x8,s32x8: b or s, a block size or 'row', 'x', bits 2..16)");
  };
  size_t p = 0;
  while (p < v.size()) {
    const size_t q = std::min(v.find(',', p), v.size());
    const std::string part = v.substr(p, q - p);
    p = q + 1;
    const size_t xpos = part.find('x');
    if (part.size() < 4 || (part[0] != 'b' && part[0] != 's') || xpos == std::string::npos) bad("bad part '" + part + "'");
    SimPart sp;
    const std::string blk = part.substr(1, xpos - 1), bits = part.substr(xpos + 1);
    try {
      sp.block = blk == "row" ? -1 : std::stoll(blk);
      sp.bits = std::stoi(bits);
    } catch (const std::exception&) {
      bad("bad number in '" + part + "'");
    }
    if (sp.block == 0 || sp.block < -1 || sp.bits < 2 || sp.bits > 16) bad("out of range in '" + part + "'");
    (part[0] == 'b' ? spec.b : spec.s) = sp;
  }
  spec.on = true;
  return spec;
}

const SimSpec& sim_spec() {
  static const SimSpec spec = parse_sim(std::getenv("LOWBIT_PTQ161_ACT_SIM"));
  return spec;
}

// v[0, n) rounded to the grid of a symmetric `bits`-bit code per block (d = amax / (2^(bits-1) - 1),
// round to nearest even as the int8 body), in place.
void fake_quantize(float* v, int64_t n, const SimPart& sp) {
  if (sp.block == 0) return;
  const int64_t blk = sp.block < 0 ? std::max<int64_t>(n, 1) : sp.block;
  const float qmax = float((1 << (sp.bits - 1)) - 1);
  for (int64_t b0 = 0; b0 < n; b0 += blk) {
    const int64_t e = std::min(n, b0 + blk);
    float amax = 0.0f;
    for (int64_t i = b0; i < e; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float d = amax / qmax, inv = d > 0 ? 1.0f / d : 0.0f;
    for (int64_t i = b0; i < e; ++i) v[i] = std::clamp(std::nearbyint(v[i] * inv), -qmax, qmax) * d;
  }
}

}  // namespace

bool act_sim_enabled() { return sim_spec().on; }

void act_sim(const float* x, int64_t M, const PackedWeight& w, float* out) {
  const SimSpec& spec = sim_spec();
  const Columns& c = columns_of(w);
  const int64_t nb = int64_t(c.bin.size()), k = int64_t(c.sal.size());
  std::vector<float> vb(static_cast<size_t>(nb)), vs(static_cast<size_t>(k));
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * w.in;
    float* om = out + m * w.in;
    for (int64_t t = 0; t < nb; ++t) vb[size_t(t)] = c.r[size_t(t)] * xm[c.bin[size_t(t)]];
    for (int64_t u = 0; u < k; ++u) vs[size_t(u)] = xm[c.sal[size_t(u)]];
    fake_quantize(vb.data(), nb, spec.b);
    fake_quantize(vs.data(), k, spec.s);
    for (int64_t t = 0; t < nb; ++t) {
      const float r = c.r[size_t(t)];
      const int64_t j = c.bin[size_t(t)];
      om[j] = spec.b.block == 0 || r == 0.0f ? xm[j] : vb[size_t(t)] / r;
    }
    for (int64_t u = 0; u < k; ++u) om[c.sal[size_t(u)]] = vs[size_t(u)];
  }
}

}  // namespace lowbit::ops::salient
